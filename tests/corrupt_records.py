"""Every kind of record the two stores read, corrupted: the table the corrupt-record tests share.

For each Redis key kind of `prefix_registry/redis_keys.py` and each file kind of
`prefix_registry/local_files.py` there is at least one corruption, written straight into the store
(a sync Redis client on the store's namespace, or the store's directory), as a bit flip, a bad
restore or another program would leave it. `kind` says what a reader meets:

- `prefix`: the prefix `place.name` can no longer be read (generation, /v1/models/{id});
- `meta`: its metadata record (Redis keeps a copy beside the blob: listings, /v1/models/{id});
- `counter`: the version counter of `place.name` (an upload of that name);
- `stored_bytes`: the tenant's stored-bytes counter (uploads within a storage quota);
- `tenant`: the tenant's record (tenant listing);
- `key_hash`: the record of the API key `place.key_hash` (authentication with that key);
- `key_record`: the tenant's record of key `place.key_id` (key listing, revocation, deletion);
- `quota`: the tenant's quota record (every request of the tenant; `quotas.py` ignores a field
  that is not JSON, so the server's default applies).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import torch

from prefix_registry.artifact import PrefixArtifact, content_hash
from prefix_registry.redis_keys import Keys


@dataclass(frozen=True)
class Place:
    """Where the corruption goes: a stored prefix (version 1), one API key of its tenant."""

    tenant: str
    name: str
    key_id: str
    key_hash: str
    good: PrefixArtifact  # what version 1 holds (stored as version 1)
    client: redis.Redis | None = None  # a Redis store: a client and its key layout
    keys: Keys | None = None
    root: Path | None = None  # a local store: its directory

    @property
    def r(self) -> redis.Redis:
        assert self.client is not None
        return self.client

    @property
    def k(self) -> Keys:
        assert self.keys is not None
        return self.keys

    @property
    def tenant_dir(self) -> Path:
        assert self.root is not None
        return self.root / "tenants" / self.tenant


@dataclass(frozen=True)
class Corruption:
    name: str
    store: str  # "redis" | "local"
    kind: str  # see the module docstring
    write: Callable[[Place], None]


# ---- blobs (Redis `...:<v>:blob`, local `<v>.safetensors`): the bytes a reader parses --------

def _restamped(place: Place, **meta: object) -> bytes:
    """Version 1 with its metadata changed (tensors as stored)."""
    good = place.good
    return PrefixArtifact(dataclasses.replace(good.meta, **meta), good.tensors).to_bytes()  # type: ignore[arg-type]


def _consistent(place: Place, tensors: dict[str, torch.Tensor], prefix_len: int) -> bytes:
    """Other tensors, with metadata that agrees with them (hash, size, prefix_len)."""
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = dataclasses.replace(place.good.meta, sha256=content_hash(tensors), size_bytes=size,
                               prefix_len=prefix_len)
    return PrefixArtifact(meta, tensors).to_bytes()


def _empty(place: Place) -> bytes:  # prefix_len 0 everywhere: [L, H, 0, hd] or [L, 0, d]
    dim = 1 if place.good.meta.form == "p_theta" else 2
    tensors = {k: t.narrow(dim, 0, 0).clone() for k, t in place.good.tensors.items()}
    return _consistent(place, tensors, 0)


def _nan(place: Place) -> bytes:
    tensors = {k: t.clone() for k, t in place.good.tensors.items()}
    tensors[min(tensors)].view(-1)[0] = float("nan")
    return _consistent(place, tensors, place.good.meta.prefix_len)


def _another_shape(place: Place) -> bytes:  # one layer more than the model has
    tensors = {k: torch.cat([t, t[:1]]) for k, t in place.good.tensors.items()}
    return _consistent(place, tensors, place.good.meta.prefix_len)


def _changed_values(place: Place) -> bytes:  # metadata (and its hash) of the old tensors
    tensors = {k: t + 1 for k, t in place.good.tensors.items()}
    return PrefixArtifact(place.good.meta, tensors).to_bytes()


BLOBS: dict[str, Callable[[Place], bytes]] = {
    "truncated": lambda p: p.good.to_bytes()[: len(p.good.to_bytes()) // 2],
    "not_safetensors": lambda p: b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  ",
    "prefix_len_0": lambda p: _restamped(p, prefix_len=0),
    "prefix_len_negative": lambda p: _restamped(p, prefix_len=-4),
    "empty_tensors": _empty,
    "nan_values": _nan,
    "shape_of_another_model": _another_shape,
    "hash_mismatch": _changed_values,
    "another_tenant_s": lambda p: _restamped(p, tenant="intruder"),
}


def _redis_blob(make: Callable[[Place], bytes]) -> Callable[[Place], None]:
    def write(p: Place) -> None:
        p.r.set(p.k.blob(p.tenant, p.name, 1), make(p))
    return write


def _local_blob(make: Callable[[Place], bytes]) -> Callable[[Place], None]:
    def write(p: Place) -> None:
        (p.tenant_dir / "prefixes" / p.name / "1.safetensors").write_bytes(make(p))
    return write


# ---- Redis records ----------------------------------------------------------------------------

def _meta_json(value: str) -> Callable[[Place], None]:
    def write(p: Place) -> None:
        p.r.hset(p.k.meta(p.tenant, p.name, 1), "json", value)
    return write


def _meta_prefix_len_0(p: Place) -> None:
    meta = dataclasses.replace(p.good.meta, prefix_len=0)
    p.r.hset(p.k.meta(p.tenant, p.name, 1), "json", json.dumps(meta.to_dict()))


def _versions_member(p: Place) -> None:
    p.r.zadd(p.k.versions(p.tenant, p.name), {"abc": 10**9})  # the newest "version"


def _blob_wrong_type(p: Place) -> None:
    key = p.k.blob(p.tenant, p.name, 1)
    p.r.delete(key)
    p.r.hset(key, "not", "a string")


def _set(write: Callable[[Place], object]) -> Callable[[Place], None]:
    """A one-line Redis write as a corruption (its reply dropped)."""
    def run(p: Place) -> None:
        write(p)
    return run


REDIS = [
    *(Corruption(f"redis_blob_{n}", "redis", "prefix", _redis_blob(b)) for n, b in BLOBS.items()),
    Corruption("redis_blob_of_the_wrong_type", "redis", "prefix", _blob_wrong_type),
    Corruption("redis_meta_not_json", "redis", "meta", _meta_json("{not json")),
    Corruption("redis_meta_missing_fields", "redis", "meta", _meta_json('{"name": "x"}')),
    Corruption("redis_meta_a_list", "redis", "meta", _meta_json("[1, 2, 3]")),
    Corruption("redis_meta_prefix_len_0", "redis", "meta", _meta_prefix_len_0),
    Corruption("redis_versions_member_not_a_number", "redis", "prefix", _versions_member),
    Corruption("redis_seq_not_a_number", "redis", "counter",
               _set(lambda p: p.r.set(p.k.seq(p.tenant, p.name), "garbage"))),
    Corruption("redis_stored_bytes_not_a_number", "redis", "stored_bytes",
               _set(lambda p: p.r.set(p.k.stored_bytes(p.tenant), "garbage"))),
    Corruption("redis_tenants_record_garbage", "redis", "tenant",
               _set(lambda p: p.r.hset(p.k.tenants, p.tenant, "garbage"))),
    Corruption("redis_tenants_record_without_created_at", "redis", "tenant",
               _set(lambda p: p.r.hset(p.k.tenants, p.tenant, '{"created": "yesterday"}'))),
    Corruption("redis_key_hash_record_garbage", "redis", "key_hash",
               _set(lambda p: p.r.hset(p.k.key_hashes, p.key_hash, "garbage"))),
    Corruption("redis_key_hash_record_bad_tenant", "redis", "key_hash",
               _set(lambda p: p.r.hset(p.k.key_hashes, p.key_hash, '{"tenant": "../x"}'))),
    Corruption("redis_key_record_garbage", "redis", "key_record",
               _set(lambda p: p.r.hset(p.k.tenant_keys(p.tenant), p.key_id, "garbage"))),
    Corruption("redis_quota_value_not_json", "redis", "quota",
               _set(lambda p: p.r.hset(p.k.quota(p.tenant), "tokens_per_minute", "{garbage"))),
]


# ---- local files ------------------------------------------------------------------------------

def _local_file(relative: Callable[[Place], Path], data: bytes) -> Callable[[Place], None]:
    def write(p: Place) -> None:
        relative(p).write_bytes(data)
    return write


LOCAL = [
    *(Corruption(f"local_version_file_{n}", "local", "prefix", _local_blob(b))
      for n, b in BLOBS.items()),
    Corruption("local_seq_not_a_number", "local", "counter",
               _local_file(lambda p: p.tenant_dir / "prefixes" / p.name / "seq", b"garbage")),
    Corruption("local_tenant_record_garbage", "local", "tenant",
               _local_file(lambda p: p.tenant_dir / "tenant.json", b"garbage")),
    Corruption("local_key_hash_record_garbage", "local", "key_hash",
               _local_file(lambda p: p.tenant_dir.parent.parent / "key-hashes"
                           / f"{p.key_hash}.json", b"garbage")),
    Corruption("local_key_record_garbage", "local", "key_record",
               _local_file(lambda p: p.tenant_dir / "keys" / f"{p.key_id}.json", b"{]")),
    Corruption("local_quota_not_json", "local", "quota",
               _local_file(lambda p: p.tenant_dir / "quota.json", b"{garbage")),
]

ALL = REDIS + LOCAL


def of(store: str, *kinds: str) -> list[Corruption]:
    return [c for c in ALL if c.store == store and (not kinds or c.kind in kinds)]
