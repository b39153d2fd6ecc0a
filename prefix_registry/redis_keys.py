"""The Redis key layout (all under one namespace), the Lua scripts that need atomicity, and
the mapping of Redis failures to RegistryUnavailableError.

Names and tenants match `NAME_RE` (no `:`), so every key below is unambiguous. See
docs/registry.md for the layout as a table.

Every key carries a Redis Cluster hash tag (the part in braces), so that everything one script or
one write touches lives in one slot: `{registry}` for tenants and API keys (small, and written
together), `{t:<tenant>}` for all of one tenant's prefixes (a tenant's data is one shard; tenants
spread over the cluster). A new script must keep to one of the two.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisClusterException, RedisError, ResponseError

from prefix_registry.artifact import PrefixMeta
from prefix_registry.errors import RegistryUnavailableError
from prefix_registry.records import corrupt


@dataclass(frozen=True)
class Keys:
    ns: str  # e.g. "prefix-serve:"

    def __post_init__(self) -> None:
        if "{" in self.ns or "}" in self.ns:
            raise ValueError(f"a Redis namespace may not contain braces: {self.ns!r}")

    @property
    def registry(self) -> str:  # the stem of the tenant and API key records (one slot)
        return f"{self.ns}{{registry}}:"

    def tenant(self, tenant: str) -> str:  # the stem of one tenant's prefix data (one slot)
        return f"{self.ns}{{t:{tenant}}}:"

    @property
    def tenants(self) -> str:  # HASH tenant -> {"created_at"}
        return f"{self.registry}tenants"

    @property
    def key_hashes(self) -> str:  # HASH key_hash -> {"tenant", "key_id"}
        return f"{self.registry}key-hashes"

    @property
    def channel(self) -> str:  # pub/sub: {"tenant"} with "name", "revoked": [hash] or "quota"
        return f"{self.ns}changes"

    def tenant_keys(self, tenant: str) -> str:  # HASH key_id -> {"key_hash", "created_at"}
        return f"{self.registry}t:{tenant}:keys"

    def quota(self, tenant: str) -> str:  # HASH quota field -> JSON number (the set ones)
        return f"{self.registry}t:{tenant}:quota"

    def stored_bytes(self, tenant: str) -> str:  # STRING size_bytes of all stored versions
        return f"{self.tenant(tenant)}stored-bytes"

    def names(self, tenant: str) -> str:  # ZSET of prefix names, score 0 (ordered by name)
        return f"{self.tenant(tenant)}names"

    def tenant_prefixes(self, tenant: str) -> str:  # the stem of a tenant's prefix keys
        return f"{self.tenant(tenant)}p:"

    def prefix(self, tenant: str, name: str) -> str:  # the stem of one name's keys
        return f"{self.tenant_prefixes(tenant)}{name}:"

    def seq(self, tenant: str, name: str) -> str:  # STRING last allocated version (never reset)
        return self.prefix(tenant, name) + "seq"

    def versions(self, tenant: str, name: str) -> str:  # ZSET version, score = version
        return self.prefix(tenant, name) + "versions"

    def meta(self, tenant: str, name: str, version: int | str) -> str:  # HASH field -> JSON
        return f"{self.prefix(tenant, name)}{version}:meta"

    def blob(self, tenant: str, name: str, version: int | str) -> str:  # STRING safetensors bytes
        return f"{self.prefix(tenant, name)}{version}:blob"


# Replies that mean a stored value is not what the layout says (a string where a hash is, a counter
# that is not an integer): the data is bad, Redis is fine, so retrying would not help.
_CORRUPT_REPLIES = ("WRONGTYPE", "value is not an integer", "value is not a valid float")


@contextmanager
def unavailable(key: str = "") -> Iterator[None]:
    """Turn any Redis/network failure into RegistryUnavailableError, and a reply saying a stored
    value has the wrong type into CorruptRecordError (`key`: what was being read)."""
    try:
        yield
    except ResponseError as e:
        if any(reply in str(e) for reply in _CORRUPT_REPLIES):
            raise corrupt(key or "(a registry key)", str(e)) from e
        raise RegistryUnavailableError(f"prefix registry (Redis) unavailable: {e}") from e
    except (TimeoutError, RedisError, RedisClusterException, OSError) as e:
        raise RegistryUnavailableError(f"prefix registry (Redis) unavailable: {e}") from e


META_FIELD = "json"  # the whole PrefixMeta; the other fields are copies for operators
DIGEST_FIELD = "upload_digest"  # PrefixMeta.upload_digest: PUT_SCRIPT answers a retry with it


def encode_meta(meta: PrefixMeta) -> dict[Any, Any]:
    """The version's metadata hash: the full JSON plus a few fields readable with HGET."""
    return {META_FIELD: json.dumps(meta.to_dict()), "version": meta.version,
            "sha256": meta.sha256, "size_bytes": meta.size_bytes, "created_at": meta.created_at,
            DIGEST_FIELD: meta.upload_digest}


def meta_fields(meta: PrefixMeta) -> list[Any]:
    """`encode_meta` as a flat field, value, ... list (script arguments)."""
    return [item for pair in encode_meta(meta).items() for item in pair]


def decode_meta(raw: bytes | str) -> PrefixMeta:
    """Parse the JSON field (read alone: one reply item instead of one per field)."""
    return PrefixMeta.from_dict(json.loads(raw))


def text(value: object) -> str:
    """A Redis reply item as text (replies are bytes; decode_responses is off for blobs)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def change_message(tenant: str, name: str) -> str:
    return json.dumps({"tenant": tenant, "name": name})


# Read one version's metadata JSON, resolving "" to the newest version atomically.
# KEYS: versions zset. ARGV: key stem of this name, version or "".
# Returns {version, json or ""}, or nil when the name has no version.
META_SCRIPT = """
local v = ARGV[2]
if v == "" then
  local top = redis.call("ZREVRANGE", KEYS[1], 0, 0)
  if #top == 0 then return false end
  v = top[1]
end
return {v, redis.call("HGET", ARGV[1] .. v .. ":meta", "json") or ""}
"""

# A tenant's stored bytes: its counter, computed from every version's `size_bytes` (and kept)
# when the counter is missing, as for data written before it existed. Prepended to the scripts
# that use it; every key it reads shares the tenant's hash tag.
_STORED_BYTES = """
local function stored_bytes(counter, names, stem)
  local used = tonumber(redis.call("GET", counter) or "")
  if used then return used end  -- missing, or not a number (a bad write): computed again
  used = 0
  for _, name in ipairs(redis.call("ZRANGE", names, 0, -1)) do
    for _, v in ipairs(redis.call("ZRANGE", stem .. name .. ":versions", 0, -1)) do
      local size = redis.call("HGET", stem .. name .. ":" .. v .. ":meta", "size_bytes")
      used = used + (tonumber(size) or 0)
    end
  end
  redis.call("SET", counter, string.format("%d", used))
  return used
end
"""

# Store one version within the tenant's storage limits: blob, metadata, the version and name
# indexes, the stored-bytes counter, and announce it, atomically; unless the newest version has
# the same upload digest (a retried upload): then nothing is written, the change is announced
# again and that version is answered.
# KEYS: blob, meta hash, versions zset, names zset, stored-bytes counter.
# ARGV: blob, version, name, channel, message, size_bytes, max prefixes or "", max stored bytes
# or "", key stem of the tenant's prefixes, upload digest, then the meta hash's field, value, ...
# Returns {1, 0} stored, {0, version} the same upload already stored as that version,
# {-1, prefix count} or {-2, stored bytes} over a limit.
PUT_SCRIPT = _STORED_BYTES + """
local top = redis.call("ZREVRANGE", KEYS[3], 0, 0)
if #top > 0 then
  local newest = ARGV[9] .. ARGV[3] .. ":" .. top[1] .. ":meta"
  if redis.call("HGET", newest, "upload_digest") == ARGV[10] then
    -- announced again: a subscriber that missed the first announcement (it was reconnecting,
    -- say during a failover, when pub/sub delivers to no one) hears of it from the retry
    redis.call("PUBLISH", ARGV[4], ARGV[5])
    return {0, tonumber(top[1]) or 0}
  end
end
local size = tonumber(ARGV[6])
local used = stored_bytes(KEYS[5], KEYS[4], ARGV[9])
if ARGV[7] ~= "" and not redis.call("ZSCORE", KEYS[4], ARGV[3]) then
  local count = redis.call("ZCARD", KEYS[4])
  if count >= tonumber(ARGV[7]) then return {-1, count} end
end
if ARGV[8] ~= "" and used + size > tonumber(ARGV[8]) then return {-2, used} end
redis.call("SET", KEYS[1], ARGV[1])
redis.call("HSET", KEYS[2], unpack(ARGV, 11))
redis.call("ZADD", KEYS[3], ARGV[2], ARGV[2])
redis.call("ZADD", KEYS[4], 0, ARGV[3])
redis.call("INCRBY", KEYS[5], size)
redis.call("PUBLISH", ARGV[4], ARGV[5])
return {1, 0}
"""

# KEYS: stored-bytes counter, names zset. ARGV: key stem of the tenant's prefixes.
# Returns {prefix count, stored bytes}.
USAGE_SCRIPT = _STORED_BYTES + """
return {redis.call("ZCARD", KEYS[2]), stored_bytes(KEYS[1], KEYS[2], ARGV[1])}
"""

# Set or clear quota fields of an existing tenant and announce it. KEYS: tenants hash, the
# tenant's quota hash. ARGV: tenant, channel, then field, JSON value ("" = clear), ... Returns the
# quota hash's field, value, ... list, or nil for an unknown tenant.
UPDATE_QUOTA_SCRIPT = """
if redis.call("HEXISTS", KEYS[1], ARGV[1]) == 0 then return false end
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == "" then
    redis.call("HDEL", KEYS[2], ARGV[i])
  else
    redis.call("HSET", KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
redis.call("PUBLISH", ARGV[2], cjson.encode({tenant = ARGV[1], quota = true}))
return redis.call("HGETALL", KEYS[2])
"""

# One page of a tenant's names with each one's newest metadata JSON, in one round trip (the
# tenant's existence is checked apart: its record lives in another slot).
# KEYS: the tenant's names zset. ARGV: ZRANGEBYLEX start ("-" or "(cursor"), count, key stem of
# the tenant's prefixes. Returns [name1, json1, name2, json2, ...] ("" for a name deleted
# meanwhile).
LIST_SCRIPT = """
local names = redis.call("ZRANGEBYLEX", KEYS[1], ARGV[1], "+", "LIMIT", 0, tonumber(ARGV[2]))
local out = {}
for _, name in ipairs(names) do
  local top = redis.call("ZREVRANGE", ARGV[3] .. name .. ":versions", 0, 0)
  local meta = false
  if #top > 0 then
    meta = redis.call("HGET", ARGV[3] .. name .. ":" .. top[1] .. ":meta", "json")
  end
  out[#out + 1] = name
  out[#out + 1] = meta or ""
end
return out
"""

# Delete one version (ARGV[2] = "N") or all (ARGV[2] = ""), keep the names index and the
# stored-bytes counter (when there is one) consistent and announce the change, atomically.
# KEYS: versions zset, names zset, stored-bytes counter.
# ARGV: key stem of this name, version or "", name, channel, message. Returns the count deleted.
# (The per-version keys are derived from the stem; they share the tenant's hash tag, so the script
# stays in one slot on a Redis Cluster too.)
DELETE_SCRIPT = """
local found
if ARGV[2] == "" then
  found = redis.call("ZRANGE", KEYS[1], 0, -1)
elseif redis.call("ZSCORE", KEYS[1], ARGV[2]) then
  found = {ARGV[2]}
else
  found = {}
end
local counted = redis.call("EXISTS", KEYS[3]) == 1
for _, v in ipairs(found) do
  if counted then
    local size = redis.call("HGET", ARGV[1] .. v .. ":meta", "size_bytes")
    redis.call("DECRBY", KEYS[3], tonumber(size) or 0)
  end
  redis.call("DEL", ARGV[1] .. v .. ":meta", ARGV[1] .. v .. ":blob")
  redis.call("ZREM", KEYS[1], v)
end
if redis.call("ZCARD", KEYS[1]) == 0 then
  redis.call("ZREM", KEYS[2], ARGV[3])
end
if #found > 0 then
  redis.call("PUBLISH", ARGV[4], ARGV[5])
end
return #found
"""

# KEYS: tenants hash, the tenant's keys hash, key-hashes hash.
# ARGV: tenant, key_id, key_hash, key record JSON, hash record JSON.
# Returns 1 ok, -1 no tenant, -2 key id taken, -3 key hash taken.
ADD_KEY_SCRIPT = """
if redis.call("HEXISTS", KEYS[1], ARGV[1]) == 0 then return -1 end
if redis.call("HEXISTS", KEYS[2], ARGV[2]) == 1 then return -2 end
if redis.call("HEXISTS", KEYS[3], ARGV[3]) == 1 then return -3 end
redis.call("HSET", KEYS[2], ARGV[2], ARGV[4])
redis.call("HSET", KEYS[3], ARGV[3], ARGV[5])
return 1
"""

# A key's hash from its record; when the record is corrupt (not JSON, no `key_hash`), from the
# key-hash records that name this tenant and key id (a scan, only then): a revocation or a tenant
# deletion must not stop at a bad record and leave the key working. Nil when none names it.
_KEY_HASH_OF = """
local function key_hash_of(raw, hashes, tenant, key_id)
  local ok, record = pcall(cjson.decode, raw)
  if ok and type(record) == "table" and type(record["key_hash"]) == "string" then
    return record["key_hash"]
  end
  local all = redis.call("HGETALL", hashes)
  for i = 1, #all, 2 do
    local fine, owner = pcall(cjson.decode, all[i + 1])
    if fine and type(owner) == "table" and owner["tenant"] == tenant
        and owner["key_id"] == key_id then
      return all[i]
    end
  end
  return nil
end
"""

# Forget one key and announce its hash (servers drop it from their auth caches at once).
# KEYS: the tenant's keys hash, key-hashes hash. ARGV: key_id, channel, tenant.
# Returns the revoked key's hash ("" when none could be found), or nil for an unknown key id.
REVOKE_KEY_SCRIPT = _KEY_HASH_OF + """
local raw = redis.call("HGET", KEYS[1], ARGV[1])
if not raw then return false end
local hash = key_hash_of(raw, KEYS[2], ARGV[3], ARGV[1])
if hash then redis.call("HDEL", KEYS[2], hash) end
redis.call("HDEL", KEYS[1], ARGV[1])
if hash then
  redis.call("PUBLISH", ARGV[2], cjson.encode({tenant = ARGV[3], revoked = {hash}}))
end
return hash or ""
"""

# Delete a tenant's record, quota and every key of it, announcing the key hashes.
# KEYS: tenants hash, the tenant's keys hash, key-hashes hash, the tenant's quota hash.
# ARGV: tenant, channel.
# Returns the revoked hashes (possibly none), or nil for an unknown tenant.
DELETE_TENANT_SCRIPT = _KEY_HASH_OF + """
if redis.call("HEXISTS", KEYS[1], ARGV[1]) == 0 then return false end
local hashes = {}
local records = redis.call("HGETALL", KEYS[2])
for i = 1, #records, 2 do
  local hash = key_hash_of(records[i + 1], KEYS[3], ARGV[1], records[i])
  if hash then
    redis.call("HDEL", KEYS[3], hash)
    hashes[#hashes + 1] = hash
  end
end
redis.call("DEL", KEYS[2], KEYS[4])
redis.call("HDEL", KEYS[1], ARGV[1])
if #hashes > 0 then
  redis.call("PUBLISH", ARGV[2], cjson.encode({tenant = ARGV[1], revoked = hashes}))
end
return hashes
"""

# Delete every prefix of a tenant (all in the tenant's slot), announcing each name.
# KEYS: the tenant's names zset, its stored-bytes counter.
# ARGV: key stem of the tenant's prefixes, channel, tenant.
# Returns {versions deleted, name1, name2, ...}.
PURGE_TENANT_SCRIPT = """
local out = {0}
for _, name in ipairs(redis.call("ZRANGE", KEYS[1], 0, -1)) do
  local stem = ARGV[1] .. name .. ":"
  for _, v in ipairs(redis.call("ZRANGE", stem .. "versions", 0, -1)) do
    redis.call("DEL", stem .. v .. ":meta", stem .. v .. ":blob")
    out[1] = out[1] + 1
  end
  redis.call("DEL", stem .. "versions", stem .. "seq")
  redis.call("PUBLISH", ARGV[2], cjson.encode({tenant = ARGV[3], name = name}))
  out[#out + 1] = name
end
redis.call("DEL", KEYS[1], KEYS[2])
return out
"""
