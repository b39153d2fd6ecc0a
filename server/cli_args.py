"""`prefix-serve`'s command line: flags built from `Settings`, help text, one-line errors.

Only the flags given on the command line are passed to `Settings(...)`, which reads the
`PREFIX_SERVE_*` variables for the rest, so a flag wins over its variable and the variable over
the default. This module imports no torch: `prefix-serve --help` and bad flags answer at once.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from server.settings import ENV_PREFIX, Settings

PROG = "prefix-serve"
DESCRIPTION = (
    "Serve many tenants' Prefix-Tuning prefixes on one frozen Hugging Face causal LM. Every flag "
    "can also be set with the environment variable shown next to it; a flag wins over its "
    "variable."
)
EPILOG = (
    "example: prefix-serve --model Qwen/Qwen3-0.6B --redis-url redis://127.0.0.1:6379/0 "
    "(with PREFIX_SERVE_ADMIN_KEY set). Exit status 2: a setting is wrong (one line names it)."
)


def flag(name: str) -> str:
    """`max_seq_len` -> `--max-seq-len`."""
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """`max_seq_len` -> `PREFIX_SERVE_MAX_SEQ_LEN`."""
    return ENV_PREFIX + name.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('prefix-serve')}")
    for name, field in Settings.model_fields.items():
        _add_flag(parser, name, field)
    return parser


def flag_values(argv: Sequence[str]) -> dict[str, Any]:
    """The settings given as flags (argparse exits with status 2 on an unknown flag)."""
    return vars(build_parser().parse_args(list(argv)))


def parse_settings(argv: Sequence[str]) -> Settings:
    """Settings from command-line flags, falling back to PREFIX_SERVE_* variables.

    Here rather than in settings.py, which the flags are built from: settings know nothing of the
    command line. Raises pydantic's ValidationError on bad values; argparse exits (status 2) on
    unknown flags.
    """
    return Settings(**flag_values(argv))


def _add_flag(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    help_text = f"{field.description or ''} ({_shown_default(field, extra)}; ${env_var(name)})"
    options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if _base_type(field.annotation) is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        choices = _choices(field.annotation)
        if choices:
            options["choices"] = choices
            options["metavar"] = "{" + ",".join(choices) + "}"
        else:
            options["metavar"] = str(extra.get("metavar") or _metavar(name, field.annotation))
    parser.add_argument(flag(name), **options)


def _shown_default(field: FieldInfo, extra: dict[str, Any]) -> str:
    if "shown_default" in extra:
        return f"default: {extra['shown_default']}"
    if field.is_required():
        return "required"
    default = field.get_default()
    if isinstance(default, bool):
        return "default: " + ("on" if default else "off")
    return f"default: {default}"


def _base_type(annotation: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _choices(annotation: Any) -> list[str] | None:
    base = _base_type(annotation)
    if typing.get_origin(base) is typing.Literal:
        return [str(a) for a in typing.get_args(base)]
    return None


def _metavar(name: str, annotation: Any) -> str:
    base = _base_type(annotation)
    if getattr(base, "__name__", "") == "Path":
        return "DIR"
    return {int: "N", float: "X"}.get(base, name.upper())


def describe_error(exc: ValidationError) -> str:
    """One line naming each bad setting by its flag and variable, with what is wrong."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err.get("loc", ())]
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:  # a check across fields: its message names the flags itself
            parts.append(message)
            continue
        name = loc[0]
        where = f"{flag(name)} (${env_var(name)})"
        if err.get("type") == "missing":
            field = Settings.model_fields.get(name)
            what = f": {field.description}" if field and field.description else ""
            parts.append(f"{where} is required{what}")
        else:
            parts.append(f"{where}: {message}{_input_excerpt(name, err.get('input'))}")
    return "; ".join(parts) or "invalid settings"


def _input_excerpt(name: str, value: Any) -> str:
    if name == "admin_key" or value is None or isinstance(value, dict):
        return ""  # never echo the secret
    text = str(value)
    return f" (got {text[:40]!r})"
