"""The embedded store's directory layout, with blocking file I/O (LocalStore runs it in threads).

```
<root>/tenants/<tenant>/tenant.json                     {"created_at": ...}
<root>/tenants/<tenant>/quota.json                      the quota fields the operator set
<root>/tenants/<tenant>/tenant.lock                     flock'ed by quota updates, limited puts
<root>/tenants/<tenant>/keys/<key_id>.json              {"key_hash", "created_at"}
<root>/tenants/<tenant>/prefixes/<name>/seq             last version allocated (never reset)
<root>/tenants/<tenant>/prefixes/<name>/seq.lock        flock'ed while allocating a version
<root>/tenants/<tenant>/prefixes/<name>/<N>.safetensors one immutable version (artifact bytes)
<root>/key-hashes/<key_hash>.json                       {"tenant", "key_id"}
<root>/locks/<tenant>.lock                              flock'ed while creating/deleting it
```
Every file is written to a temporary name (`.<name>.<uuid>.tmp`, flock'ed while it is written)
and then renamed (os.replace), or hard-linked into place when it must not already exist, so a
reader never sees half a file. A process killed mid-write leaves its temporary file behind:
`remove_orphans` deletes those whose lock nobody holds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefix_registry import safe_json
from prefix_registry.artifact import MAX_HEADER_BYTES, META_KEY, PrefixMeta, read_header
from prefix_registry.errors import CorruptRecordError, InvalidPrefixError
from prefix_registry.quotas import TenantUsage
from prefix_registry.records import corrupt, json_record, name_field

VERSION_FILE = re.compile(r"^([1-9][0-9]*)\.safetensors$")
KEY_HASH_FILE = re.compile(r"^[0-9a-f]{32,128}$")
TMP_FILE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")
ORPHAN_MIN_AGE_S = 2.0  # a temporary file younger than this may be between create and lock


@contextmanager
def _temporary(path: Path, data: bytes) -> Iterator[Path]:
    """A locked, synced temporary file holding `data` next to `path`; removed if still there."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # held until closed: tells remove_orphans it is live
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    with _temporary(path, data) as tmp:
        os.replace(tmp, path)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Write `path` with `data` unless it exists (atomically); False if it existed."""
    with _temporary(path, data) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True


def remove_orphans(root: Path) -> int:
    """Delete temporary files under `root` that no live writer holds (their process died);
    returns how many."""
    removed = 0
    now = time.time()
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if TMP_FILE.match(name) and _orphaned(path, now):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _orphaned(path: Path, now: float) -> bool:
    try:
        with open(path, "rb") as f:
            if now - os.fstat(f.fileno()).st_mtime < ORPHAN_MIN_AGE_S:
                return False
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a writer holds it
            return True
    except FileNotFoundError:
        return False


log = logging.getLogger(__name__)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


class LocalFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _tenant(self, tenant: str) -> Path:
        return self.root / "tenants" / tenant

    def _prefixes(self, tenant: str) -> Path:
        return self._tenant(tenant) / "prefixes"

    def _version_path(self, tenant: str, name: str, version: int) -> Path:
        return self._prefixes(tenant) / name / f"{version}.safetensors"

    def _hash_path(self, key_hash: str) -> Path:
        return self.root / "key-hashes" / f"{key_hash}.json"

    # ---- prefixes -------------------------------------------------------------------------

    def allocate_version(self, tenant: str, name: str) -> int:
        """The next version number of `name`, under a file lock shared by every process."""
        with self.name_lock(tenant, name):
            return self.next_version(tenant, name)

    @contextmanager
    def name_lock(self, tenant: str, name: str) -> Iterator[None]:
        """Held by every process while it allocates a version of `name` (and writes it)."""
        directory = self._prefixes(tenant) / name
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "seq.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def next_version(self, tenant: str, name: str) -> int:
        """Allocate the next version number (the caller holds `name_lock`)."""
        seq = self._prefixes(tenant) / name / "seq"
        text = seq.read_bytes() if seq.exists() else b"0"
        if not text.strip().isdigit():  # guessing would risk reusing a version number
            raise corrupt(str(seq), "the version counter is not a number")
        write_atomic(seq, str(int(text) + 1).encode())
        return int(text) + 1

    def write_version(self, tenant: str, name: str, version: int, blob: bytes) -> None:
        write_atomic(self._version_path(tenant, name, version), blob)

    def read_blob(self, tenant: str, name: str, version: int) -> bytes | None:
        try:
            return self._version_path(tenant, name, version).read_bytes()
        except FileNotFoundError:
            return None

    def version_key(self, tenant: str, name: str, version: int) -> str:
        """How a version file is named in logs and errors."""
        return str(self._version_path(tenant, name, version))

    def read_meta(self, tenant: str, name: str, version: int) -> PrefixMeta | None:
        """The metadata from the file's safetensors header, without reading the tensors
        (CorruptRecordError when it can't be parsed; LocalStore checks its fields)."""
        path = self._version_path(tenant, name, version)
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                data = head + f.read(min(int.from_bytes(head, "little"), MAX_HEADER_BYTES))
        except FileNotFoundError:
            return None
        try:
            found = read_header(data)[1].get(META_KEY)
            return PrefixMeta.from_dict(safe_json.loads_object(found or "", "the metadata"))
        except InvalidPrefixError as e:
            raise corrupt(str(path), e.message) from e

    def stored_size(self, tenant: str, name: str, version: int) -> int:
        """A version's bytes on disk (what a corrupt version is counted as in usage)."""
        try:
            return self._version_path(tenant, name, version).stat().st_size
        except FileNotFoundError:
            return 0

    def version_numbers(self, tenant: str, name: str) -> list[int]:
        try:
            files = os.listdir(self._prefixes(tenant) / name)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for f in files if (m := VERSION_FILE.match(f)))

    def names(self, tenant: str) -> list[str]:
        try:
            return sorted(os.listdir(self._prefixes(tenant)))
        except FileNotFoundError:
            return []

    def delete(self, tenant: str, name: str, version: int | None) -> int:
        found = self.version_numbers(tenant, name)
        targets = found if version is None else [v for v in found if v == version]
        deleted = 0
        for v in targets:
            try:
                self._version_path(tenant, name, v).unlink()
                deleted += 1
            except FileNotFoundError:  # another process deleted it first
                pass
        return deleted

    def usage(self, tenant: str) -> TenantUsage:
        """Names with a stored version, and their versions' tensor bytes (reads headers only)."""
        prefixes = stored = 0
        for name in self.names(tenant):
            sizes = [self._size(tenant, name, v) for v in self.version_numbers(tenant, name)]
            prefixes += any(size is not None for size in sizes)
            stored += sum(size or 0 for size in sizes)
        return TenantUsage(prefixes=prefixes, stored_bytes=stored)

    def _size(self, tenant: str, name: str, version: int) -> int | None:
        """A version's tensor bytes; a corrupt one counts its file size (usage goes on)."""
        try:
            meta = self.read_meta(tenant, name, version)
        except CorruptRecordError:
            return self.stored_size(tenant, name, version)
        return None if meta is None else meta.size_bytes

    @contextmanager
    def tenant_lock(self, tenant: str) -> Iterator[None]:
        """Held by every process while it updates the tenant's quota or makes a limited put."""
        with open(self._tenant(tenant) / "tenant.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def read_quota(self, tenant: str) -> dict[str, Any]:
        path = self._tenant(tenant) / "quota.json"
        try:
            record = _read_json(path)
        except ValueError:  # not JSON: the server's defaults apply (TenantQuota.from_stored)
            log.warning("ignoring corrupt quota record %s: not JSON", path)
            return {}
        return record if isinstance(record, dict) else {}

    def write_quota(self, tenant: str, quota: dict[str, Any]) -> None:
        write_atomic(self._tenant(tenant) / "quota.json", json.dumps(quota).encode())

    # ---- tenants and keys -----------------------------------------------------------------

    @contextmanager
    def _lifecycle_lock(self, tenant: str) -> Iterator[None]:
        """Held while a tenant is created or deleted (outside its directory, which goes)."""
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        with open(self.root / "locks" / f"{tenant}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def create_tenant(self, tenant: str, created_at: float) -> bool:
        directory = self._tenant(tenant)
        with self._lifecycle_lock(tenant):
            if (directory / "tenant.json").exists():
                return False
            # A new tenant starts empty, even if an upload racing with the deletion of an
            # earlier tenant of this name left something behind.
            self._discard(directory)
            directory.mkdir(parents=True, exist_ok=True)
            record = json.dumps({"created_at": created_at}).encode()
            return create_exclusive(directory / "tenant.json", record)

    def delete_tenant(self, tenant: str) -> tuple[list[str], dict[str, int]] | None:
        """Delete a tenant: (its key hashes, versions deleted per prefix name), or None if it
        does not exist. Its record goes first, then its keys, then its prefixes."""
        directory = self._tenant(tenant)
        with self._lifecycle_lock(tenant):
            try:
                (directory / "tenant.json").unlink()
            except FileNotFoundError:
                return None
            hashes = [h for key_id in self.key_ids(tenant)
                      if (h := self._forget_key(tenant, key_id)) is not None]
            prefixes = {n: len(self.version_numbers(tenant, n)) for n in self.names(tenant)}
            self._discard(directory)
        return hashes, prefixes

    def _discard(self, directory: Path) -> None:
        """Remove a directory tree: renamed away first, so it disappears at once."""
        if not directory.exists():
            return
        trash = self.root / "trash" / uuid.uuid4().hex
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def tenant_known(self, tenant: str) -> bool:
        """Whether the tenant's record exists (even a corrupt one: the tenant is there)."""
        return (self._tenant(tenant) / "tenant.json").exists()

    def tenant_created_at(self, tenant: str) -> float | None:
        """None when the tenant does not exist; CorruptRecordError when its record is bad."""
        path = self._tenant(tenant) / "tenant.json"
        raw = _read_bytes(path)
        if raw is None:
            return None
        return float(json_record(raw, key=str(path), fields={"created_at": float})["created_at"])

    def tenant_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root / "tenants"))
        except FileNotFoundError:
            return []

    def add_key(self, tenant: str, key_id: str, key_hash: str, created_at: float) -> int:
        """1 ok, -2 key id taken, -3 key hash taken (the caller checked the tenant)."""
        (self._tenant(tenant) / "keys").mkdir(exist_ok=True)
        (self.root / "key-hashes").mkdir(exist_ok=True)
        hash_record = json.dumps({"tenant": tenant, "key_id": key_id}).encode()
        if not create_exclusive(self._hash_path(key_hash), hash_record):
            return -3
        key_record = json.dumps({"key_hash": key_hash, "created_at": created_at}).encode()
        if not create_exclusive(self._tenant(tenant) / "keys" / f"{key_id}.json", key_record):
            self._hash_path(key_hash).unlink()
            return -2
        return 1

    def keys(self, tenant: str) -> list[tuple[str, float]]:
        """(key id, created_at) of each key; a corrupt record is logged and left out."""
        directory = self._tenant(tenant) / "keys"
        found = []
        for f in sorted(os.listdir(directory)) if directory.exists() else []:
            raw = _read_bytes(directory / f) if f.endswith(".json") else None
            if raw is None or f.startswith("."):
                continue
            try:
                record = json_record(raw, key=str(directory / f), fields={"created_at": float})
            except CorruptRecordError:
                continue
            found.append((f.removesuffix(".json"), record["created_at"]))
        return found

    def key_ids(self, tenant: str) -> list[str]:
        """Every key id with a record, corrupt ones included (a deletion revokes them all)."""
        directory = self._tenant(tenant) / "keys"
        files = sorted(os.listdir(directory)) if directory.exists() else []
        return [f.removesuffix(".json") for f in files
                if f.endswith(".json") and not f.startswith(".")]

    def revoke_key(self, tenant: str, key_id: str) -> str | None:
        """The revoked key's hash, or None if the tenant has no such key."""
        return self._forget_key(tenant, key_id)

    def _forget_key(self, tenant: str, key_id: str) -> str | None:
        """Delete a key's records; its hash ("" when its record is corrupt and no key-hash
        record names it), or None when the tenant has no such key."""
        path = self._tenant(tenant) / "keys" / f"{key_id}.json"
        raw = _read_bytes(path)
        if raw is None:
            return None
        try:
            key_hash = str(json_record(raw, key=str(path), fields={"key_hash": str})["key_hash"])
        except CorruptRecordError:  # the key must still stop working: find it by its owner
            key_hash = self._hash_naming(tenant, key_id) or ""
        if KEY_HASH_FILE.match(key_hash):
            self._hash_path(key_hash).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        return key_hash

    def _hash_naming(self, tenant: str, key_id: str) -> str | None:
        """The key hash whose record names (tenant, key_id): a scan, for corrupt key records."""
        directory = self.root / "key-hashes"
        for f in sorted(os.listdir(directory)) if directory.exists() else []:
            raw = _read_bytes(directory / f)
            try:
                record = json_record(raw, key=f, fields={"tenant": str, "key_id": str})
            except CorruptRecordError:
                continue
            if (record["tenant"], record["key_id"]) == (tenant, key_id):
                return f.removesuffix(".json")
        return None

    def tenant_for_key_hash(self, key_hash: str) -> str | None:
        path = self._hash_path(key_hash)
        raw = _read_bytes(path)
        if raw is None:
            return None
        key = str(path.with_name(key_hash[:12] + "..."))  # never the whole hash in a log
        return name_field(json_record(raw, key=key, fields={}), "tenant", key)
