"""The multiplexing LRU is sized from the device prefix cache (no Ray cluster needed)."""

from __future__ import annotations

from server.models.loader import LoadedModel
from server.serve_ray.app import replica_settings
from server.serve_ray.replica import TYPICAL_PREFIX_TOKENS, prefixes_per_replica
from server.settings import Settings
from tests.api.helpers import ADMIN_KEY


def test_the_lru_holds_what_the_prefix_cache_holds(loaded: LoadedModel) -> None:
    fp = loaded.fingerprint
    per_prefix = (2 * fp.num_layers * fp.num_kv_heads * fp.head_dim
                  * loaded.dtype.itemsize * TYPICAL_PREFIX_TOKENS)
    settings = Settings(model="m", admin_key=ADMIN_KEY, prefix_cache_mb=1.0)
    assert prefixes_per_replica(settings, loaded) == 2**20 // per_prefix
    tiny = settings.model_copy(update={"prefix_cache_mb": 0.001})
    assert prefixes_per_replica(tiny, loaded) == 1  # never zero: one prefix always fits
    huge = settings.model_copy(update={"prefix_cache_mb": 1e6})
    assert prefixes_per_replica(huge, loaded) == 4096
    chosen = settings.model_copy(update={"max_prefixes_per_replica": 7})
    assert prefixes_per_replica(chosen, loaded) == 7


def test_replicas_that_share_a_device_share_its_kv_budget() -> None:
    settings = Settings(model="m", admin_key=ADMIN_KEY, replicas=4, cpu_kv_fraction=0.5,
                        gpu_memory_utilization=0.9)
    assert replica_settings(settings, gpus=0).cpu_kv_fraction == 0.125
    assert replica_settings(settings, gpus=0.5).gpu_memory_utilization == 0.45
    assert replica_settings(settings, gpus=1) == settings
    fixed = settings.model_copy(update={"kv_cache_mb": 64.0})
    assert replica_settings(fixed, gpus=0) == fixed
