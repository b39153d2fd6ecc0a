"""Engine metrics are mapped from EngineStats fields by construction: a field renamed, added
or misspelt on either side is named, never skipped in silence."""

from __future__ import annotations

import pytest

from server.api import metrics
from server.engine.config import EngineStats


def test_every_engine_stats_field_is_mapped_and_every_mapping_names_a_field() -> None:
    assert metrics.unmapped_engine_fields() == []
    assert set(metrics.ENGINE_FIELDS) <= set(EngineStats.__dataclass_fields__)


def test_a_misspelt_mapping_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = dict(metrics.ENGINE_FIELDS)
    fields["premptions"] = fields.pop("preemptions")
    monkeypatch.setattr(metrics, "ENGINE_FIELDS", fields)
    assert metrics.unmapped_engine_fields() == ["preemptions", "premptions"]


def test_every_mapped_field_reaches_the_scrape() -> None:
    stats = EngineStats(running=1, waiting=2, tokens_generated=3, prefix_cache_hits=4,
                        prefix_cache_misses=5, prefix_cache_evictions=6, prefix_cache_bytes=7,
                        prefix_cache_entries=8, steps=9)
    collector = metrics.EngineCollector(lambda: stats, known=lambda tenant: True)
    names = {family.name for family in collector.collect()}
    for suffix, _doc, _kind in metrics.ENGINE_FIELDS.values():
        assert f"prefix_serve_{suffix}" in names
