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
```
Every file is written to a temporary name and then renamed (os.replace), or hard-linked into
place when it must not already exist, so a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefix_registry.artifact import META_KEY, PrefixMeta, read_header
from prefix_registry.quotas import TenantUsage

VERSION_FILE = re.compile(r"^([1-9][0-9]*)\.safetensors$")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Write `path` with `data` unless it exists (atomically); False if it existed."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


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
        directory = self._prefixes(tenant) / name
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "seq.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            seq = directory / "seq"
            last = int(seq.read_text()) if seq.exists() else 0
            write_atomic(seq, str(last + 1).encode())
            return last + 1

    def write_version(self, tenant: str, name: str, version: int, blob: bytes) -> None:
        write_atomic(self._version_path(tenant, name, version), blob)

    def read_blob(self, tenant: str, name: str, version: int) -> bytes | None:
        try:
            return self._version_path(tenant, name, version).read_bytes()
        except FileNotFoundError:
            return None

    def read_meta(self, tenant: str, name: str, version: int) -> PrefixMeta | None:
        """The metadata from the file's safetensors header, without reading the tensors."""
        try:
            with open(self._version_path(tenant, name, version), "rb") as f:
                head = f.read(8)
                data = head + f.read(int.from_bytes(head, "little"))
        except FileNotFoundError:
            return None
        return PrefixMeta.from_dict(json.loads(read_header(data)[1][META_KEY]))

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
            metas = [self.read_meta(tenant, name, v) for v in self.version_numbers(tenant, name)]
            sizes = [m.size_bytes for m in metas if m is not None]
            prefixes += bool(sizes)
            stored += sum(sizes)
        return TenantUsage(prefixes=prefixes, stored_bytes=stored)

    @contextmanager
    def tenant_lock(self, tenant: str) -> Iterator[None]:
        """Held by every process while it updates the tenant's quota or makes a limited put."""
        with open(self._tenant(tenant) / "tenant.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def read_quota(self, tenant: str) -> dict[str, Any]:
        record = _read_json(self._tenant(tenant) / "quota.json")
        return record if isinstance(record, dict) else {}

    def write_quota(self, tenant: str, quota: dict[str, Any]) -> None:
        write_atomic(self._tenant(tenant) / "quota.json", json.dumps(quota).encode())

    # ---- tenants and keys -----------------------------------------------------------------

    def create_tenant(self, tenant: str, created_at: float) -> bool:
        directory = self._tenant(tenant)
        directory.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"created_at": created_at}).encode()
        return create_exclusive(directory / "tenant.json", record)

    def tenant_created_at(self, tenant: str) -> float | None:
        record = _read_json(self._tenant(tenant) / "tenant.json")
        return None if record is None else float(record["created_at"])

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
        directory = self._tenant(tenant) / "keys"
        found = []
        for f in sorted(os.listdir(directory)) if directory.exists() else []:
            record = _read_json(directory / f) if f.endswith(".json") else None
            if record is not None and not f.startswith("."):
                found.append((f.removesuffix(".json"), float(record["created_at"])))
        return found

    def revoke_key(self, tenant: str, key_id: str) -> bool:
        path = self._tenant(tenant) / "keys" / f"{key_id}.json"
        record = _read_json(path)
        if record is None:
            return False
        self._hash_path(record["key_hash"]).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        return True

    def tenant_for_key_hash(self, key_hash: str) -> str | None:
        record = _read_json(self._hash_path(key_hash))
        return None if record is None else str(record["tenant"])
