"""Safe in-memory extraction of an uploaded .tar / .tar.gz / .zip (a PEFT adapter directory).

Nothing touches the disk and nothing is executed: members are read into memory under a member
count and a total size limit; absolute paths, `..`, links and device files are refused. Every
member counts toward both limits, including directories and the ones skipped as archive-tool
metadata: skipping a tar member still decompresses it, so a bomb hidden in `__MACOSX/` would
otherwise be inflated in full. The limits are checked from each member's declared size before its
data is read, so decompression stops at the limit; a zip's entry count is read from its end record
before the central directory is parsed.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import PurePosixPath

from prefix_registry.errors import InvalidPrefixError, PrefixTooLargeError, UnsafeFileError
from prefix_registry.validation import Limits

SKIPPED_DIRS = ("__MACOSX",)  # archive tools' metadata, never part of an adapter
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory signature
_EOCD_SEARCH = 22 + 65535  # the record plus the longest comment


def is_archive(data: bytes) -> bool:
    """tar (ustar magic), gzip (.tar.gz) or zip, by content."""
    return data[257:262] == b"ustar" or data[:2] == b"\x1f\x8b" or data[:4] == b"PK\x03\x04"


def extract(filename: str, data: bytes, limits: Limits) -> dict[str, bytes]:
    """The archive's regular files by base name (an adapter directory is flat)."""
    if data[:4] == b"PK\x03\x04":
        return _extract_zip(filename, data, limits)
    return _extract_tar(filename, data, limits)


class _Budget:
    def __init__(self, filename: str, limits: Limits) -> None:
        self.filename = filename
        self.limits = limits
        self.files: dict[str, bytes] = {}
        self.members = 0  # every member seen, skipped or not
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
            raise PrefixTooLargeError(
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


def _extract_tar(filename: str, data: bytes, limits: Limits) -> dict[str, bytes]:
    budget = _Budget(filename, limits)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                _tar_member(tar, member, budget)
    except (tarfile.TarError, EOFError, OSError) as e:
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
    if _zip_entries(data) > limits.max_archive_members:
        raise InvalidPrefixError(f"{filename}: more than {limits.max_archive_members} files in "
                                 "the archive")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                _zip_member(zf, info, budget)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, EOFError, OSError) as e:
        raise InvalidPrefixError(f"{filename}: not a readable zip archive ({e})") from e
    return budget.files


def _zip_entries(data: bytes) -> int:
    """The entry count a zip's end-of-central-directory record declares (0xFFFF: a ZIP64 archive,
    counted as too many; 0 when no record is found, and zipfile then refuses the file)."""
    end = data.rfind(_EOCD, max(0, len(data) - _EOCD_SEARCH))
    if end < 0 or end + 12 > len(data):
        return 0
    return int.from_bytes(data[end + 10 : end + 12], "little")


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
