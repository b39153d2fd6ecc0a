"""Read a multipart prefix upload while enforcing the size limit as the body streams in.

FastAPI's form parsing reads the whole body first; here `Content-Length` is checked up front and
the bytes are counted chunk by chunk as `request.stream()` yields them, fed to python-multipart's
streaming parser. Going over the limit raises 413 at once: the rest of the body is never read.
Prefix files are a few MB at most, so the parts are kept in memory (bounded by the same limit).
Because each upload holds its bytes in memory until it is imported, `UploadSlots` bounds how many
run at once, in all and per tenant; `RequestGuard` takes a slot before a byte of the body is read
and gives it back when the response is done.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from prefix_registry.errors import excerpt
from server.errors import InvalidRequestError, PayloadTooLargeError, TooManyUploadsError

TEXT_FIELDS = ("name", "description", "tenant")
FILE_FIELD = "file"
MAX_PARTS = 64
MAX_TEXT_BYTES = 64 * 1024
MAX_FILENAME_CHARS = 128
UPLOAD_RETRY_AFTER_S = 2.0  # an upload of a few MiB is read and imported in about a second


class UploadSlots:
    """Uploads in progress: at most `total` at once, and `per_tenant` of any one tenant."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total, self.per_tenant = total, per_tenant
        self.running: Counter[str] = Counter()  # tenant -> uploads in progress

    def take(self, tenant: str) -> None:
        """Hold a slot for `tenant`, or raise TooManyUploadsError (429, Retry-After)."""
        if self.running[tenant] >= self.per_tenant:
            raise TooManyUploadsError(
                f"tenant {tenant!r} already has {self.per_tenant} uploads in progress; retry "
                "when one is done", retry_after=UPLOAD_RETRY_AFTER_S,
            )
        if sum(self.running.values()) >= self.total:
            raise TooManyUploadsError(
                f"the server is reading {self.total} uploads already; retry shortly",
                retry_after=UPLOAD_RETRY_AFTER_S,
            )
        self.running[tenant] += 1

    def give_back(self, tenant: str) -> None:
        self.running[tenant] -= 1
        if self.running[tenant] <= 0:
            del self.running[tenant]


@dataclass
class UploadForm:
    fields: dict[str, str] = field(default_factory=dict)  # text fields by name
    files: dict[str, bytes] = field(default_factory=dict)  # `file` parts: filename -> content


@dataclass
class _Part:
    disposition: bytes = b""
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _FormBuilder:
    """python-multipart callbacks collecting parts into an `UploadForm`."""

    def __init__(self) -> None:
        self.form = UploadForm()
        self.part = _Part()
        self.count = 0
        self._header_name = b""
        self._header_value = b""

    def on_part_begin(self) -> None:
        self.count += 1
        if self.count > MAX_PARTS:
            raise InvalidRequestError(f"too many form parts (at most {MAX_PARTS})")
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self.part.disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        if b"name" not in options:
            raise InvalidRequestError("a form part has no name in its Content-Disposition")
        self.part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            raw = options[b"filename"].decode("utf-8", "replace")
            # Only the base name matters (importers recognise e.g. adapter_config.json); it is
            # echoed in errors, so control characters go and its length is bounded.
            base = raw.replace("\\", "/").rsplit("/", 1)[-1]
            self.part.filename = "".join(c for c in base if c.isprintable())[:MAX_FILENAME_CHARS]

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.part.data += data[start:end]
        if self.part.filename is None and len(self.part.data) > MAX_TEXT_BYTES:
            raise InvalidRequestError(f"form field {excerpt(self.part.name)} is too long")

    def on_part_end(self) -> None:
        part = self.part
        if part.name == FILE_FIELD:
            self._add_file(part)
        elif part.name in TEXT_FIELDS:
            self._add_text(part)
        else:
            raise InvalidRequestError(
                f"unknown form field {excerpt(part.name)}: expected "
                f"{', '.join(TEXT_FIELDS)} or file"
            )

    def _add_file(self, part: _Part) -> None:
        filename = part.filename or f"file{len(self.form.files)}"
        if filename in self.form.files:
            raise InvalidRequestError(f"two uploaded files are named {excerpt(filename)}")
        self.form.files[filename] = bytes(part.data)

    def _add_text(self, part: _Part) -> None:
        if part.name in self.form.fields:
            raise InvalidRequestError(f"form field {excerpt(part.name)} given twice")
        try:
            self.form.fields[part.name] = part.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"form field {excerpt(part.name)} is not UTF-8 text") from exc


async def read_upload(request: Request, max_bytes: int) -> UploadForm:
    """Parse a multipart/form-data body of at most `max_bytes` (413 as soon as it is over)."""
    boundary = _boundary(request.headers.get("content-type", ""))
    _check_declared_length(request.headers.get("content-length"), max_bytes)
    builder = _FormBuilder()
    parser = MultipartParser(boundary, callbacks=_callbacks(builder))  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequestError(f"malformed multipart body: {exc}") from exc
    return builder.form


def _boundary(content_type: str) -> bytes:
    media, options = parse_options_header(content_type)
    if media != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequestError("expected a multipart/form-data body with a boundary")
    return options[b"boundary"]


def _check_declared_length(value: str | None, max_bytes: int) -> None:
    if value is None:
        return
    if not value.isdigit():
        raise InvalidRequestError("invalid Content-Length header")
    if int(value) > max_bytes:
        raise _too_large(max_bytes)


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"upload is larger than the limit of {max_bytes} bytes ({max_bytes / 2**20:.1f} MiB)"
    )


def _callbacks(b: _FormBuilder) -> dict[str, object]:
    return {
        "on_part_begin": b.on_part_begin,
        "on_header_field": b.on_header_field,
        "on_header_value": b.on_header_value,
        "on_header_end": b.on_header_end,
        "on_headers_finished": b.on_headers_finished,
        "on_part_data": b.on_part_data,
        "on_part_end": b.on_part_end,
    }
