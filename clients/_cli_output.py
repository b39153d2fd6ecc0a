"""How `prefixctl` prints results: plain text for people, `--json` for scripts.

Data goes to stdout; notes for people (usage lines, the once-shown key warning) go to stderr.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from clients._types import (
    ApiKey,
    Generation,
    Health,
    PrefixDetail,
    PrefixInfo,
    Readiness,
    Tenant,
    TenantDeletion,
    TenantQuota,
)


def print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    print(json.dumps(value, indent=2, ensure_ascii=False))


def note(message: str) -> None:
    print(message, file=sys.stderr)


# --- generation ---------------------------------------------------------------------------------


def write_delta(delta: str) -> None:
    sys.stdout.write(delta)
    sys.stdout.flush()


def end_stream(text: str) -> None:
    if text and not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()


def generation(result: Generation, *, as_json: bool, usage: bool) -> None:
    if as_json:
        print_json(result)
        return
    write_delta(result.text)
    end_stream(result.text)
    usage_line(result, usage)


def usage_line(result: Generation, show: bool) -> None:
    if not show:
        return
    u, total = result.usage, result.timings.total_s if result.timings else None
    took = f", {total:.3f} s" if total is not None else ""
    prefix = f"{result.prefix.id}@{result.prefix.version}" if result.prefix else "none"
    note(
        f"[{result.finish_reason}] prefix {prefix} ({u.prefix_tokens} tokens), prompt "
        f"{u.prompt_tokens} tokens, {u.completion_tokens} generated{took}"
    )


# --- prefixes -----------------------------------------------------------------------------------

_PREFIX_COLUMNS = ("NAME", "VERSION", "TENANT", "FORM", "LEN", "DTYPE", "SIZE", "CREATED",
                   "USABLE")


def _prefix_row(info: PrefixInfo) -> tuple[str, ...]:
    return (
        info.name, str(info.version), info.tenant or "-", info.form, str(info.prefix_len),
        info.dtype, human_bytes(info.size_bytes), human_time(info.created_at),
        "yes" if info.compatible else "no: other base model",
    )


def prefix_table(items: Sequence[PrefixInfo], *, as_json: bool) -> None:
    if as_json:
        print_json(list(items))
        return
    table(_PREFIX_COLUMNS, [_prefix_row(info) for info in items])
    if any(not info.compatible for info in items):
        note("(USABLE no: made for another base model; `prefixctl show NAME` says how it differs)")


def prefix_detail(detail: PrefixDetail, *, as_json: bool) -> None:
    if as_json:
        print_json(detail)
        return
    model = detail.model
    fields = {
        "name": detail.name, "version": detail.version, "tenant": detail.tenant or "-",
        "form": detail.form, "prefix_len": detail.prefix_len, "dtype": detail.dtype,
        "size": human_bytes(detail.size_bytes), "sha256": detail.sha256,
        "created": human_time(detail.created_at), "description": detail.description,
        "model": f"{model.architecture} {model.digest}" if model else "-",
        "usable": "yes" if detail.compatible else f"no: {detail.incompatible_reason}",
    }
    for key, value in fields.items():
        print(f"{key + ':':13}{value}")
    if detail.training:
        print("training:")
        for key, value in detail.training.items():
            print(f"  {key + ':':20}{value}")
    if detail.versions:
        print("versions:")
        table(_PREFIX_COLUMNS, [_prefix_row(v) for v in detail.versions], indent="  ")


def uploaded(info: PrefixInfo, *, as_json: bool) -> None:
    if as_json:
        print_json(info)
        return
    print(
        f"uploaded {info.name} version {info.version} ({info.form}, prefix_len "
        f"{info.prefix_len}, {info.dtype}, {human_bytes(info.size_bytes)})"
    )


def deleted(name: str, count: int, *, as_json: bool) -> None:
    if as_json:
        print_json({"deleted": count})
    else:
        print(f"deleted {count} version{'s' if count != 1 else ''} of {name}")


# --- tenants ------------------------------------------------------------------------------------


def new_key(key: ApiKey, *, created_tenant: bool, as_json: bool, key_only: bool = False) -> None:
    if key_only:
        print(key.api_key)
        return
    if as_json:
        print_json(key)
        return
    what = "created tenant" if created_tenant else "new key for"
    print(f"{what} {key.name}\nkey_id:  {key.key_id}\napi_key: {key.api_key}")
    note("(the api_key is shown only once: store it now)")


def tenant_table(tenants: Sequence[Tenant], *, as_json: bool) -> None:
    if as_json:
        print_json(list(tenants))
        return
    rows = [(t.name, ", ".join(k.key_id for k in t.keys) or "-") for t in tenants]
    table(("TENANT", "KEY IDS"), rows)


def revoked(key_id: str, *, as_json: bool) -> None:
    if as_json:
        print_json({"revoked": key_id})
    else:
        print(f"revoked {key_id}")


def tenant_quota(result: TenantQuota, *, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    values = result.quota.model_dump()
    rows = []
    for field, value in values.items():
        if value is None:
            shown = "no limit"
        elif field == "max_stored_bytes":
            shown = human_bytes(value)
        else:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
        rows.append((field, shown, "tenant" if field in result.overrides else "default"))
    print(f"tenant {result.name}")
    table(("FIELD", "VALUE", "SET BY"), rows)
    if result.usage is not None:
        u = result.usage
        print(f"stored: {u.prefixes} prefix{'es' if u.prefixes != 1 else ''}, "
              f"{human_bytes(u.stored_bytes)}")


_BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 2**10, "m": 2**20, "mib": 2**20,
               "mb": 2**20, "g": 2**30, "gib": 2**30, "gb": 2**30}


def parse_bytes(text: str) -> int:
    """'1048576', '512KiB', '64MiB', '1.5GiB' -> bytes (binary units, as the server reports)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def tenant_deleted(result: TenantDeletion, *, as_json: bool) -> None:
    if as_json:
        print_json(result)
    else:
        print(f"deleted tenant {result.name}: {result.keys} key(s) revoked, "
              f"{result.prefixes} prefix version(s) deleted")


# --- health -------------------------------------------------------------------------------------


def health(result: Health, *, as_json: bool) -> None:
    if as_json:
        print_json(result)
    else:
        print(result.status)


def readiness(result: Readiness, *, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    print(result.status)
    for name, state in result.checks.items():
        print(f"  {name}: {state}")


# --- formatting ---------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        cells = (str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        print(indent + "  ".join(cells).rstrip())


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def human_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
