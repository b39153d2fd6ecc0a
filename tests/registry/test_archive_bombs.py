"""Archive bombs hidden where `tarfile` and `zipfile` work on their own: a PAX record and a GNU
long name that inflate to hundreds of MiB before any member is seen, and a zip whose central
directory holds 600,000 entries. Each is refused (413 / 422 classes) with bounded memory: the
peak of Python allocations during the import (tracemalloc; the inflated bytes and the objects
`zipfile` builds are all Python allocations) stays far below what the bomb would take.

The bombs are built here, streamed through a compressor, so the test itself never holds them
inflated: the 1 GiB PAX record is about 1 MiB of gzip.
"""

from __future__ import annotations

import io
import struct
import tarfile
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import pytest

from prefix_registry.errors import InvalidPrefixError, PrefixTooLargeError, UnsafeFileError
from prefix_registry.formats import import_files
from prefix_registry.validation import Limits
from tests.registry.conftest import FP
from tests.registry.test_formats import peft_files

LIMITS = Limits(max_upload_bytes=64 * 2**20)  # the server's default --max-upload-mb
MiB = 2**20
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, no mtime
MAX_PEAK_BYTES = 100 * MiB  # generous: a refused bomb needs a few MiB at most
MAX_CPU_S = 10.0  # generous on a busy 2-core machine; before the fix: 21.6 s for the PAX bomb


def gzip_stream(chunks: Iterator[bytes]) -> bytes:
    """A gzip of the chunks, without holding them inflated. Each chunk is deflated on its own
    (a full flush resets the dictionary), so a chunk seen before is not compressed again: the
    same 1 MiB of 'a' a thousand times costs one compression, not a thousand."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; gzip framing written here
    out, seen, crc, size = [GZIP_HEADER], {}, 0, 0
    for chunk in chunks:
        crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        if chunk not in seen:
            seen[chunk] = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
        out.append(seen[chunk])
    out.append(deflate.flush())
    out.append(struct.pack("<II", crc, size & 0xFFFFFFFF))
    return b"".join(out)


def repeated(byte: bytes, size: int, chunk: int = MiB) -> Iterator[bytes]:
    block = byte * chunk
    for start in range(0, size, chunk):
        yield block[: min(chunk, size - start)]


def header(name: str, type_: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = type_, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def small_member() -> bytes:
    data = b'{"peft_type": "PREFIX_TUNING"}'
    return header("adapter/adapter_config.json", tarfile.REGTYPE, len(data)) + data + padding(
        len(data)
    )


def pax_comment_bomb(value_bytes: int) -> bytes:
    """A .tar.gz whose first header is a PAX record `comment=<value_bytes of 'a'>`."""
    body = len(" comment=") + value_bytes + 1
    length = body + len(str(body))
    length = body + len(str(length))  # the length counts its own digits
    record_head = f"{length} comment=".encode()

    def chunks() -> Iterator[bytes]:
        yield header("././@PaxHeader", tarfile.XHDTYPE, length) + record_head
        yield from repeated(b"a", value_bytes)
        yield b"\n" + padding(length)
        yield small_member() + b"\0" * 1024

    return gzip_stream(chunks())


def gnu_longname_bomb(name_bytes: int) -> bytes:
    """A .tar.gz whose first header is a GNU long name of `name_bytes`."""
    def chunks() -> Iterator[bytes]:
        yield header("././@LongLink", tarfile.GNUTYPE_LONGNAME, name_bytes + 1)
        yield from repeated(b"n", name_bytes)
        yield b"\0" + padding(name_bytes + 1)
        yield small_member() + b"\0" * 1024

    return gzip_stream(chunks())


def pax_chain(records: int) -> bytes:
    """A .tar.gz of `records` small PAX headers in a row (tarfile recurses once per record)."""
    record = b"20 comment=aaaaaaaa\n"
    one = header("././@PaxHeader", tarfile.XHDTYPE, len(record)) + record + padding(len(record))
    return gzip_stream(iter([one * records, small_member(), b"\0" * 1024]))


def zip_with_entries(entries: int, declared: int | None = None) -> bytes:
    """One empty stored member, then a central directory of `entries` records all pointing at it;
    the end record declares `declared` entries (default: the truth, capped as zip's u16 is)."""
    name = b"a"
    local = b"PK\x03\x04" + (20).to_bytes(2, "little") + bytes(20) + len(name).to_bytes(
        2, "little") + bytes(2) + name
    central = (b"PK\x01\x02" + (20).to_bytes(2, "little") * 2 + bytes(20)
               + len(name).to_bytes(2, "little") + bytes(16) + name)
    directory = central * entries
    count = min(entries, 0xFFFF) if declared is None else declared
    end = (b"PK\x05\x06" + bytes(4) + count.to_bytes(2, "little") * 2
           + len(directory).to_bytes(4, "little") + len(local).to_bytes(4, "little") + bytes(2))
    return local + directory + end


def measure(run: Callable[[], object]) -> tuple[BaseException, int, float]:
    """The exception `run` raised, the peak of Python allocations meanwhile, and its CPU time."""
    tracemalloc.start()
    started = time.process_time()
    try:
        with pytest.raises(Exception) as caught:
            run()
        return caught.value, tracemalloc.get_traced_memory()[1], time.process_time() - started
    finally:
        tracemalloc.stop()


def upload(filename: str, data: bytes) -> Callable[[], object]:
    return lambda: import_files({filename: data}, model=FP, limits=LIMITS)


def test_a_1_gib_pax_comment_is_refused_from_its_header() -> None:
    bomb = pax_comment_bomb(2**30)
    assert len(bomb) < 1100 * 1024  # the 1,019 KiB
    error, peak, cpu_s = measure(upload("adapter.tar.gz", bomb))
    assert isinstance(error, PrefixTooLargeError), error
    assert "header record" in str(error)
    assert peak < MAX_PEAK_BYTES, f"peak {peak / MiB:.0f} MiB"
    assert cpu_s < MAX_CPU_S


def test_a_128_mib_gnu_long_name_is_refused_from_its_header() -> None:
    bomb = gnu_longname_bomb(128 * MiB)
    error, peak, cpu_s = measure(upload("adapter.tar.gz", bomb))
    assert isinstance(error, PrefixTooLargeError), error
    assert peak < MAX_PEAK_BYTES, f"peak {peak / MiB:.0f} MiB"
    assert cpu_s < MAX_CPU_S


def test_a_pax_record_under_the_header_cap_still_counts_toward_the_size_limit() -> None:
    # 60 KiB records fit the header cap; 40 of them are over a 2 MiB budget of inflated bytes.
    record = b"a" * (60 * 1024)
    one = header("././@PaxHeader", tarfile.XHDTYPE, len(record)) + record + padding(len(record))
    limits = Limits(max_upload_bytes=2 * MiB, max_archive_members=1000)
    bomb = gzip_stream(iter([one * 40, small_member(), b"\0" * 1024]))
    with pytest.raises(PrefixTooLargeError, match="extracted size"):
        import_files({"adapter.tar.gz": bomb}, model=FP, limits=limits)


def test_a_long_chain_of_pax_records_is_refused_by_the_member_count() -> None:
    # Each record makes tarfile recurse; counted as members, 5,000 of them never get that far.
    error, peak, _ = measure(upload("adapter.tar.gz", pax_chain(5000)))
    assert isinstance(error, InvalidPrefixError), error
    assert "files in the archive" in str(error)


@pytest.mark.parametrize("declared", [None, 1], ids=["honest-end-record", "lying-end-record"])
def test_a_zip_with_600k_entries_is_refused_before_its_directory_is_parsed(
    declared: int | None,
) -> None:
    bomb = zip_with_entries(600_000, declared)
    assert len(bomb) < LIMITS.max_upload_bytes
    error, peak, cpu_s = measure(upload("adapter.zip", bomb))
    assert isinstance(error, InvalidPrefixError), error
    assert "files in the archive" in str(error)
    assert peak < MAX_PEAK_BYTES, f"peak {peak / MiB:.0f} MiB"
    assert cpu_s < MAX_CPU_S


def test_sparse_members_are_refused() -> None:
    info = tarfile.TarInfo("adapter/x")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    data = info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024
    with pytest.raises(UnsafeFileError, match="sparse"):
        import_files({"adapter.tar": _ustar(data)}, model=FP, limits=LIMITS)


def _ustar(data: bytes) -> bytes:
    """GNU headers carry 'ustar  ' magic; `is_archive` recognises a tar by it."""
    assert data[257:262] == b"ustar"
    return data


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_adapters_with_long_paths_still_import(tar_format: int, mode: str) -> None:
    """Real PAX records and GNU long names (paths over 100 characters) pass the header checks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tar_format) as tf:  # type: ignore[call-overload]
        for name, data in peft_files().items():
            info = tarfile.TarInfo("out/" + "deep/" * 30 + name)
            info.size, info.pax_headers = len(data), {"comment": "trained on 2 GPUs"}
            tf.addfile(info, io.BytesIO(data))
    imported = import_files({"adapter.tar.gz": buf.getvalue()}, model=FP, limits=LIMITS)
    assert imported.source == "peft"
