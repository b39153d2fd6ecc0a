"""`prefixctl`: the command line of a prefix-serve server (also `python -m clients.cli`).

    prefixctl generate -p formal "Dear team,"          # streams the text as it is made
    prefixctl upload formal ./adapter_dir --description "formal register"
    prefixctl list --json

Exit codes: 0 success; 1 the server answered with an error (or `ready`: not ready); 2 usage
(bad arguments, an unreadable upload source); 3 no answer (connection refused, timeout);
130 interrupted. Errors are one line on stderr: `error: <type>: <message>`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from typing import Any

from clients import _cli_output as out
from clients._base import QUOTA_FIELDS
from clients._client import PrefixClient
from clients._constants import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL
from clients._exceptions import APIConnectionError, APIStatusError, APITimeoutError
from clients._uploads import UploadSourceError

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_INTERRUPTED = 130

Handler = Callable[[PrefixClient, argparse.Namespace], int]


class UsageError(Exception):
    """A local input problem (exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run `prefixctl` with `argv` (default: sys.argv[1:]) and return its exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.json = getattr(args, "json", False)  # SUPPRESSed when given nowhere
    args.tenant = getattr(args, "tenant", None)
    try:
        with _client(args) as client:
            handler: Handler = args.handler
            return handler(client, args)
    except APIStatusError as exc:
        return _fail(f"{exc.type}: {exc.message}", EXIT_API_ERROR)
    except APITimeoutError as exc:
        return _fail(f"timeout: {exc.message}", EXIT_CONNECTION)
    except APIConnectionError as exc:
        return _fail(f"connection: {exc.message}", EXIT_CONNECTION)
    except UsageError as exc:
        return _fail(f"usage: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)


def _fail(message: str, code: int) -> int:
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr)
    return code


def _client(args: argparse.Namespace) -> PrefixClient:
    client = PrefixClient(getattr(args, "base_url", None), getattr(args, "api_key", None))
    if getattr(args, "timeout", None) is not None:
        client.timeout = args.timeout
    if getattr(args, "max_retries", None) is not None:
        client.max_retries = args.max_retries
    return client


# --- commands -----------------------------------------------------------------------------------


def cmd_generate(client: PrefixClient, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, stop=args.stop, seed=args.seed, tenant=args.tenant,
    )
    if args.json or args.no_stream:
        result = client.generate(args.prefix, prompt, **sampling)
        out.generation(result, as_json=args.json, usage=args.usage)
        return EXIT_OK
    with client.stream(args.prefix, prompt, **sampling) as stream:
        try:
            for delta in stream:
                out.write_delta(delta)
        finally:
            out.end_stream(stream.text)
        out.usage_line(stream.result, args.usage)
    return EXIT_OK


def cmd_upload(client: PrefixClient, args: argparse.Namespace) -> int:
    try:
        info = client.upload_prefix(
            args.name, args.source, description=args.description, tenant=args.tenant
        )
    except (UploadSourceError, OSError) as exc:  # the source could not be read
        raise UsageError(str(exc)) from exc
    out.uploaded(info, as_json=args.json)
    return EXIT_OK


def cmd_list(client: PrefixClient, args: argparse.Namespace) -> int:
    out.prefix_table(list(client.list_prefixes(tenant=args.tenant)), as_json=args.json)
    return EXIT_OK


def cmd_show(client: PrefixClient, args: argparse.Namespace) -> int:
    out.prefix_detail(client.get_prefix(args.name, tenant=args.tenant), as_json=args.json)
    return EXIT_OK


def cmd_delete(client: PrefixClient, args: argparse.Namespace) -> int:
    count = client.delete_prefix(args.name, version=args.version, tenant=args.tenant)
    out.deleted(args.name, count, as_json=args.json)
    return EXIT_OK


def cmd_tenant_create(client: PrefixClient, args: argparse.Namespace) -> int:
    key = client.create_tenant(args.name)
    out.new_key(key, created_tenant=True, as_json=args.json, key_only=args.print_key)
    return EXIT_OK


def cmd_tenant_list(client: PrefixClient, args: argparse.Namespace) -> int:
    out.tenant_table(client.list_tenants(), as_json=args.json)
    return EXIT_OK


def cmd_tenant_create_key(client: PrefixClient, args: argparse.Namespace) -> int:
    key = client.create_key(args.name)
    out.new_key(key, created_tenant=False, as_json=args.json, key_only=args.print_key)
    return EXIT_OK


def cmd_tenant_revoke_key(client: PrefixClient, args: argparse.Namespace) -> int:
    out.revoked(client.revoke_key(args.name, args.key_id), as_json=args.json)
    return EXIT_OK


def cmd_tenant_quota_show(client: PrefixClient, args: argparse.Namespace) -> int:
    out.tenant_quota(client.get_quota(args.name), as_json=args.json)
    return EXIT_OK


def cmd_tenant_quota_set(client: PrefixClient, args: argparse.Namespace) -> int:
    fields = {f: getattr(args, f) for f in QUOTA_FIELDS if hasattr(args, f)}
    if not fields:
        options = ", ".join(_option(f) for f in QUOTA_FIELDS)
        raise UsageError(f"nothing to set: give at least one of {options}")
    out.tenant_quota(client.set_quota(args.name, **fields), as_json=args.json)
    return EXIT_OK


def cmd_tenant_delete(client: PrefixClient, args: argparse.Namespace) -> int:
    if not args.yes:
        out.note(f"refusing to delete tenant {args.name!r} (its keys and every prefix) "
                 "without --yes")
        return EXIT_USAGE
    out.tenant_deleted(client.delete_tenant(args.name), as_json=args.json)
    return EXIT_OK


def cmd_health(client: PrefixClient, args: argparse.Namespace) -> int:
    health = client.health()
    out.health(health, as_json=args.json)
    return EXIT_OK if health.ok else EXIT_API_ERROR


def cmd_ready(client: PrefixClient, args: argparse.Namespace) -> int:
    readiness = client.ready()
    out.readiness(readiness, as_json=args.json)
    return EXIT_OK if readiness.ok else EXIT_API_ERROR


# --- the parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="prefixctl", parents=[common], description="Talk to a prefix-serve server.",
        epilog="exit codes: 0 ok, 1 API error, 2 usage, 3 connection/timeout, 130 interrupted. "
        "With the operator key, --tenant NAME acts for a tenant (generate, upload, list, show, "
        "delete).",
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('prefix-serve')}")
    _tenant_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(commands, common)
    _add_prefix_commands(commands, common)
    _add_tenant_commands(commands, common)
    health = commands.add_parser("health", parents=[common], help="is the server alive")
    health.set_defaults(handler=cmd_health)
    ready = commands.add_parser("ready", parents=[common], help="can it serve (exit 1 if not)")
    ready.set_defaults(handler=cmd_ready)
    return parser


def _common_options() -> argparse.ArgumentParser:
    """Options valid before or after the command (SUPPRESS: a later default keeps an earlier)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    hide = argparse.SUPPRESS
    group.add_argument(
        "--base-url", default=hide, help=f"server URL (default ${BASE_URL_ENV}, else "
        f"{DEFAULT_BASE_URL})"
    )
    group.add_argument("--api-key", default=hide, help=f"API key (default ${API_KEY_ENV})")
    group.add_argument("--json", action="store_true", default=hide, help="print JSON")
    group.add_argument("--timeout", type=float, default=hide, help="seconds per request")
    group.add_argument("--max-retries", type=int, default=hide, help="retries on 429/503/network")
    return common


def _tenant_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tenant", default=argparse.SUPPRESS, help="with the operator key: act for this tenant "
        "(without it the operator acts for tenant 'default')",
    )


def _add_generate(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("generate", parents=[common], help="generate text (streamed)")
    p.add_argument("prompt", help="the prompt; '-' reads it from stdin")
    p.add_argument("-p", "--prefix", help="prefix id ('name' or 'name@VERSION'); none: base model")
    p.add_argument("-n", "--max-new-tokens", type=int)
    p.add_argument("-t", "--temperature", type=float, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-stream", action="store_true", help="print the text when finished")
    p.add_argument("--usage", action="store_true", help="print token counts/timings to stderr")
    _tenant_option(p)
    p.set_defaults(handler=cmd_generate)


def _add_prefix_commands(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    p = commands.add_parser("upload", parents=[common], help="upload a prefix (next version)")
    p.add_argument("name")
    p.add_argument("source", help="a .safetensors / .tar / .zip file, or a PEFT adapter dir")
    p.add_argument("--description")
    p.set_defaults(handler=cmd_upload)
    p = commands.add_parser("list", parents=[common], help="list prefixes (latest versions)")
    p.set_defaults(handler=cmd_list)
    p = commands.add_parser("show", parents=[common], help="one prefix and its versions")
    p.add_argument("name")
    p.set_defaults(handler=cmd_show)
    p = commands.add_parser("delete", parents=[common], help="delete a prefix (all versions)")
    p.add_argument("name")
    p.add_argument("--version", type=int, help="delete only this version")
    p.set_defaults(handler=cmd_delete)
    for name in ("upload", "list", "show", "delete"):
        _tenant_option(commands.choices[name])


def _add_tenant_commands(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    tenant = commands.add_parser("tenant", help="tenants and their keys (operator key)")
    actions = tenant.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("create", parents=[common], help="create a tenant and its first key")
    p.add_argument("name")
    _print_key_option(p)
    p.set_defaults(handler=cmd_tenant_create)
    p = actions.add_parser("list", parents=[common], help="tenants and their key ids")
    p.set_defaults(handler=cmd_tenant_list)
    p = actions.add_parser("create-key", parents=[common], help="a new key for a tenant")
    p.add_argument("name")
    _print_key_option(p)
    p.set_defaults(handler=cmd_tenant_create_key)
    p = actions.add_parser("revoke-key", parents=[common], help="revoke a tenant's key")
    p.add_argument("name")
    p.add_argument("key_id")
    p.set_defaults(handler=cmd_tenant_revoke_key)
    p = actions.add_parser("delete", parents=[common],
                           help="delete a tenant: its keys at once, and all its prefixes")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="really delete (it cannot be undone)")
    p.set_defaults(handler=cmd_tenant_delete)
    _add_quota_commands(actions, common)


# field -> (parse one value, metavar, help); the value "default" clears the field.
_QUOTA_OPTIONS: dict[str, tuple[Callable[[str], Any], str, str]] = {
    "weight": (float, "W", "fair-share weight (2 gets twice the service of 1)"),
    "max_running": (int, "N", "requests running at once"),
    "max_queued": (int, "N", "requests waiting (beyond: 429 tenant_queue_full)"),
    "tokens_per_minute": (int, "N", "prompt + generated tokens per minute (beyond: 429)"),
    "max_prefixes": (int, "N", "prefix names stored"),
    "max_stored_bytes": (out.parse_bytes, "BYTES", "bytes of all stored versions (e.g. 64MiB)"),
}


def _add_quota_commands(actions: argparse._SubParsersAction,
                        common: argparse.ArgumentParser) -> None:
    quota = actions.add_parser("quota", help="show or set a tenant's quota and weight")
    quota_actions = quota.add_subparsers(dest="quota_action", required=True, metavar="ACTION")
    p = quota_actions.add_parser("show", parents=[common],
                                 help="the quota in force, what is set, storage use")
    p.add_argument("name")
    p.set_defaults(handler=cmd_tenant_quota_show)
    p = quota_actions.add_parser(
        "set", parents=[common], help="set fields (operator key); 'default' clears one",
        epilog="example: prefixctl tenant quota set acme --weight 2 --max-queued default",
    )
    p.add_argument("name")
    for field, (parse, metavar, help_text) in _QUOTA_OPTIONS.items():
        p.add_argument(_option(field), dest=field, type=_or_default(parse), metavar=metavar,
                       default=argparse.SUPPRESS, help=f"{help_text}; 'default': the server's")
    p.set_defaults(handler=cmd_tenant_quota_set)


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _or_default(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A value, or None for 'default' (the field is cleared)."""
    def value(text: str) -> Any:
        return None if text.strip().lower() == "default" else parse(text)
    value.__name__ = getattr(parse, "__name__", "value")  # argparse names it in errors
    return value


def _print_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-key", action="store_true",
                        help="print only the new API key (for scripts: KEY=$(prefixctl ...))")


if __name__ == "__main__":
    sys.exit(main())
