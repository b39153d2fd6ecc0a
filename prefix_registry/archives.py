"""Safe in-memory extraction of an uploaded .tar / .tar.gz / .zip (a PEFT adapter directory).

Nothing touches the disk and nothing is executed: members are read into memory under a member
count and a total size limit; absolute paths, `..`, links, sparse and device files are refused.

Every byte decompressed counts toward the size limit, headers included. A tar is read as a stream
through `_Inflated`, which counts what the gzip layer yields and stops at the limit, so nothing
past the limit is ever inflated. Header records (PAX, GNU longname/longlink) are data that
`tarfile` reads into memory by itself before any member is seen; each is checked from the size in
its 512-byte header before its payload is read (at most `MAX_HEADER_RECORD_BYTES`) and counts as
a member. Every member counts toward both limits, including directories and the ones skipped as
archive-tool metadata: skipping a tar member still decompresses it.

A zip's central directory is walked record by record, counting entries up to the limit, before
`zipfile` parses it: `zipfile` builds an object per entry and does not stop at any count, and the
count in the end record is the archive's own claim.
"""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import Any

from prefix_registry.errors import InvalidPrefixError, PrefixTooLargeError, UnsafeFileError
from prefix_registry.validation import Limits

SKIPPED_DIRS = ("__MACOSX",)  # archive tools' metadata, never part of an adapter
# A PAX record or GNU long name of a real adapter is well under 1 KiB (a path, a few times).
MAX_HEADER_RECORD_BYTES = 64 * 1024
_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                 tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_CENTRAL = b"PK\x01\x02"  # central directory record: 46 bytes + name, extra, comment
_EOCD = b"PK\x05\x06"  # end of central directory: 22 bytes + comment
_EOCD_SEARCH = 22 + 65535  # the record plus the longest comment
_ZIP64_LOCATOR = b"PK\x06\x07"  # 20 bytes, just before the end record
_ZIP64_END = b"PK\x06\x06"  # 56 bytes, just before the locator (as `zipfile` reads it)


def is_archive(data: bytes) -> bool:
    """tar (ustar magic), gzip (.tar.gz) or zip, by content."""
    return data[257:262] == b"ustar" or data[:2] == _GZIP_MAGIC or data[:4] == _ZIP_LOCAL


def extract(filename: str, data: bytes, limits: Limits) -> dict[str, bytes]:
    """The archive's regular files by base name (an adapter directory is flat)."""
    if data[:4] == _ZIP_LOCAL:
        return _extract_zip(filename, data, limits)
    return _extract_tar(filename, data, limits)


def check_zip_entries(filename: str, data: bytes, limits: Limits) -> None:
    """Refuse a zip with more entries than the limit, counting its central directory's records
    without parsing them (cheap: at most limit + 1 records are looked at). Not a zip: nothing."""
    if data[:4] == _ZIP_LOCAL and _zip_entries(data, limits.max_archive_members) > (
        limits.max_archive_members
    ):
        raise InvalidPrefixError(
            f"{filename}: more than {limits.max_archive_members} files in the archive"
        )


class _Budget:
    def __init__(self, filename: str, limits: Limits) -> None:
        self.filename = filename
        self.limits = limits
        self.files: dict[str, bytes] = {}
        self.members = 0  # every member and header record seen, skipped or not
        self.total = 0  # declared bytes of every member seen

    def count(self, size: int) -> None:
        """Count one member (any kind) before anything of it is read."""
        self.members += 1
        if self.members > self.limits.max_archive_members:
            raise InvalidPrefixError(
                f"{self.filename}: more than {self.limits.max_archive_members} files in the archive"
            )
        self.total += max(size, 0)
        if self.total > self.limits.max_upload_bytes:
            raise self.too_large()

    def header_record(self, size: int) -> None:
        """Count a PAX / GNU long-name record before `tarfile` reads its payload."""
        self.count(0)  # its bytes are counted as they are inflated
        if size > MAX_HEADER_RECORD_BYTES:
            raise PrefixTooLargeError(
                f"{self.filename}: a tar header record of {size} bytes (PAX or GNU long name) "
                f"is over the limit of {MAX_HEADER_RECORD_BYTES} bytes"
            )

    def too_large(self) -> PrefixTooLargeError:
        return PrefixTooLargeError(
            f"{self.filename}: extracted size is over the limit of "
            f"{self.limits.max_upload_bytes} bytes"
        )

    def admit(self, path: str) -> str | None:
        """Check a counted member's path; returns its base name, or None to skip it."""
        parts = _safe_parts(self.filename, path)
        if not parts or parts[0] in SKIPPED_DIRS or parts[-1].startswith("._"):
            return None
        if parts[-1] in self.files:
            raise InvalidPrefixError(
                f"{self.filename}: holds more than one {parts[-1]!r} (one adapter per upload)"
            )
        return parts[-1]

    def add(self, name: str, content: bytes, declared: int) -> None:
        if len(content) != declared:
            raise InvalidPrefixError(f"{self.filename}: member {name!r} is truncated or corrupt")
        self.files[name] = content


def _safe_parts(filename: str, path: str) -> list[str]:
    if path.startswith(("/", "\\")) or "\\" in path or (len(path) > 1 and path[1] == ":"):
        raise UnsafeFileError(f"{filename}: refusing archive member with an absolute path {path!r}")
    parts = [p for p in PurePosixPath(path).parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeFileError(f"{filename}: refusing archive member outside the archive {path!r}")
    return parts


class _Inflated:
    """The tar stream, inflated (.tar.gz) or not, as `read(n)` that counts every byte it yields
    and raises once the total is over the budget's limit: gzip output is capped, headers
    included, and nothing past the limit is ever decompressed."""

    def __init__(self, data: bytes, budget: _Budget) -> None:
        raw = io.BytesIO(data)
        self._source: Any = gzip.GzipFile(fileobj=raw) if data[:2] == _GZIP_MAGIC else raw
        self._budget = budget
        self._limit = budget.limits.max_upload_bytes
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        allowed = self._limit - self.total + 1  # one byte more shows the limit is passed
        chunk: bytes = self._source.read(allowed if size < 0 else min(size, allowed))
        self.total += len(chunk)
        if self.total > self._limit:
            raise self._budget.too_large()
        return chunk


class _CheckedTarInfo(tarfile.TarInfo):
    """A tar header that refuses what would make `tarfile` read or build too much by itself."""

    def _proc_member(self, tarfile: Any) -> Any:
        if self.type in _HEADER_TYPES:
            tarfile.budget.header_record(self.size)
        return super()._proc_member(tarfile)  # type: ignore[misc]  # private in typeshed

    def _proc_sparse(self, tarfile: Any) -> Any:
        raise UnsafeFileError(f"{tarfile.budget.filename}: sparse files are not accepted")

    # GNU sparse files described in PAX records (formats 0.0, 0.1, 1.0): their maps can be
    # arbitrarily long lists; an adapter never has one.
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_sparse


class _BudgetTarFile(tarfile.TarFile):
    """A TarFile that carries the budget its headers are checked against (`tarfile.open` reads
    the first header while it constructs the object, so the budget comes in with the call)."""

    tarinfo = _CheckedTarInfo

    def __init__(self, *args: Any, budget: _Budget, **kwargs: Any) -> None:
        self.budget = budget
        super().__init__(*args, **kwargs)


def _extract_tar(filename: str, data: bytes, limits: Limits) -> dict[str, bytes]:
    budget = _Budget(filename, limits)
    stream = _Inflated(data, budget)
    try:  # "r|": a forward-only stream, read once, in order
        # `budget` reaches _BudgetTarFile.__init__ through open's **kwargs (not in typeshed)
        with _BudgetTarFile.open(fileobj=stream, mode="r|", budget=budget) as tar:  # type: ignore[call-overload]
            for member in tar:
                _tar_member(tar, member, budget)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise InvalidPrefixError(f"{filename}: not a readable tar archive ({e})") from e
    return budget.files


def _tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, budget: _Budget) -> None:
    budget.count(member.size)
    if member.isdir():
        return
    if not member.isfile():  # symlink, hard link, device, fifo
        raise UnsafeFileError(
            f"{budget.filename}: refusing archive member {member.name!r} (not a regular file)"
        )
    name = budget.admit(member.name)
    if name is None:
        return
    stream = tar.extractfile(member)
    content = stream.read(member.size + 1) if stream is not None else b""
    budget.add(name, content, member.size)


def _extract_zip(filename: str, data: bytes, limits: Limits) -> dict[str, bytes]:
    budget = _Budget(filename, limits)
    check_zip_entries(filename, data, limits)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                _zip_member(zf, info, budget)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, EOFError, OSError) as e:
        raise InvalidPrefixError(f"{filename}: not a readable zip archive ({e})") from e
    return budget.files


def _zip_entries(data: bytes, limit: int) -> int:
    """How many central directory records `zipfile` would parse, counted up to limit + 1; 0 when
    no end record is found (`zipfile` then refuses the file). The directory is located as
    `zipfile` locates it: it ends where the end record (or the ZIP64 end record) begins."""
    end = data.rfind(_EOCD, max(0, len(data) - _EOCD_SEARCH))
    if end < 0 or end + 22 > len(data):
        return 0
    directory_end, size = end, _u(data, end + 12, 4)
    if data[end - 20 : end - 16] == _ZIP64_LOCATOR and data[end - 76 : end - 72] == _ZIP64_END:
        directory_end, size = end - 76, _u(data, end - 76 + 40, 8)
    position, count = directory_end - size, 0
    while 0 <= position < directory_end and count <= limit:
        if data[position : position + 4] != _ZIP_CENTRAL:
            break  # not a record: `zipfile` refuses the archive
        count += 1
        position += 46 + sum(_u(data, position + at, 2) for at in (28, 30, 32))
    return count


def _u(data: bytes, at: int, size: int) -> int:
    return int.from_bytes(data[at : at + size], "little")


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> None:
    budget.count(info.file_size)
    if info.is_dir():
        return
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeFileError(f"{budget.filename}: refusing symlink {info.filename!r}")
    name = budget.admit(info.filename)
    if name is None:
        return
    with zf.open(info) as stream:  # reads at most the declared size + 1 (bomb-safe)
        content = stream.read(info.file_size + 1)
    budget.add(name, content, info.file_size)
