"""Settings: flags and PREFIX_SERVE_* variables feed one validated object; bad values refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from server.api.quotas import Quota
from server.app import engine_config
from server.cli_args import parse_settings
from server.engine.fairness import FifoQueue, VirtualTokenCounter, make_wait_queue
from server.settings import Settings


def test_flags_parse_into_settings() -> None:
    s = parse_settings([
        "--model", "m", "--dtype", "bfloat16", "--device", "cpu", "--host", "0.0.0.0",
        "--port", "9000", "--redis-url", "redis://u:secret@h:6379/0", "--prefix-cache-mb", "64",
        "--kv-cache-mb", "128", "--max-batch-size", "8", "--max-queue", "3", "--admin-key", "k",
        "--shutdown-grace-s", "5", "--max-upload-mb", "2", "--namespace", "ns",
    ])
    assert (s.model, s.dtype, s.device, s.host, s.port) == ("m", "bfloat16", "cpu", "0.0.0.0", 9000)
    assert (s.max_batch_size, s.max_queue, s.shutdown_grace_s) == (8, 3, 5.0)
    assert s.kv_cache_bytes == 128 * 2**20 and s.prefix_cache_bytes == 64 * 2**20
    assert s.max_upload_bytes == 2 * 2**20 and s.namespace == "ns"
    assert s.admin_key is not None and s.admin_key.get_secret_value() == "k"
    assert "secret" not in s.store_description and "h:6379" in s.store_description


def test_environment_is_read_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIX_SERVE_MODEL", "from-env")
    monkeypatch.setenv("PREFIX_SERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PREFIX_SERVE_AUTH_DISABLED", "true")
    monkeypatch.setenv("PREFIX_SERVE_PORT", "8123")
    s = parse_settings(["--port", "9001"])
    assert (s.model, s.max_batch_size, s.auth_disabled, s.port) == ("from-env", 7, True, 9001)
    assert s.redis_url is None and "local directory" in s.store_description


def test_auth_disabled_is_a_flag() -> None:
    s = parse_settings(["--model", "m", "--auth-disabled"])
    assert s.auth_disabled and s.admin_key is None


def test_an_operator_key_or_auth_disabled_is_required() -> None:
    with pytest.raises(ValidationError, match="--admin-key"):
        Settings(model="m")


@pytest.mark.parametrize("field,value", [
    ("max_batch_size", 0), ("max_queue", 0), ("port", 70000), ("dtype", "int8"),
    ("max_upload_mb", 0), ("shutdown_grace_s", -1), ("fairness", "lottery"),
    ("fair_output_weight", -1), ("fair_prompt_weight", float("inf")), ("tenant_weight", 0),
    ("tenant_max_queued", 0), ("tenant_max_stored_mb", -1), ("tenant_quota_ttl_s", -1),
])
def test_bad_values_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(model="m", auth_disabled=True, **{field: value})


def test_data_dir_expands_home() -> None:
    s = Settings(model="m", auth_disabled=True, data_dir=Path("~/x"))
    assert s.data_dir == Path.home() / "x"


def test_unknown_flag_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--model", "m", "--auth-disabled", "--no-such-flag", "1"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_fairness_flags_reach_the_engine_config() -> None:
    default = engine_config(Settings(model="m", auth_disabled=True))
    assert (default.fairness, default.fair_prompt_weight, default.fair_output_weight) == (
        "vtc", 1.0, 2.0)
    assert isinstance(make_wait_queue(default.fairness), VirtualTokenCounter)
    s = parse_settings(["--model", "m", "--auth-disabled", "--fairness", "fifo",
                        "--fair-prompt-weight", "0.5", "--fair-output-weight", "3"])
    config = engine_config(s)
    assert (config.fairness, config.fair_prompt_weight, config.fair_output_weight) == (
        "fifo", 0.5, 3.0)
    queue = make_wait_queue(config.fairness, config.fair_prompt_weight, config.fair_output_weight)
    assert isinstance(queue, FifoQueue)


def test_tenant_quota_defaults_come_from_flags() -> None:
    s = parse_settings(["--model", "m", "--auth-disabled", "--tenant-weight", "2",
                        "--tenant-max-running", "3", "--tenant-max-stored-mb", "1.5",
                        "--tenant-tokens-per-minute", "1000"])
    assert Quota.defaults(s) == Quota(weight=2.0, max_running=3, tokens_per_minute=1000,
                                      max_stored_bytes=int(1.5 * 2**20))
    assert Quota.defaults(Settings(model="m", auth_disabled=True)) == Quota()
