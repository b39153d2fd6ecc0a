"""Contract: the SDK reads every response the server's OpenAPI document describes.

The SDK's wire types (`clients/_types.py`) mirror the server's schemas by hand. Here every
response schema of the document gets a reader, the code path the SDK (or, for `/v1/*`, the
official `openai` package) uses to read that response, and instances built from the schema
itself must be accepted with their values kept: one with only the required fields, one with every
field, and one with every nullable field null. A new response schema without a reader fails the
test, so a route cannot be added without the SDK's side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai.types
import openai.types.chat
import pytest
from openai._models import construct_type
from pydantic import BaseModel, TypeAdapter

from clients import _types as sdk
from clients._exceptions import APIStatusError, make_status_error
from prefix_registry.fingerprint import ModelFingerprint
from server.api.schemas import DeltaOut, GenerateDone
from server.app import create_app
from server.settings import Settings

Reader = Callable[[dict[str, Any]], Any]


def _openai(model: type[BaseModel]) -> Reader:
    """The official SDK's default reader (`construct_type`, not strict), after checking the
    response strictly against its models. The one value outside their Literals is
    `finish_reason: "abort"` (vLLM's word for a request cut short, docs/http-api.md), which the
    default reader keeps as it is: strictly, it is checked as "stop"."""

    def read(data: dict[str, Any]) -> Any:
        model.model_validate(_abort_as_stop(data))
        return construct_type(type_=model, value=data)

    return read


def _abort_as_stop(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "stop" if k == "finish_reason" and v == "abort" else _abort_as_stop(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_abort_as_stop(v) for v in value]
    return value


def _error(body: dict[str, Any]) -> APIStatusError:
    request = httpx.Request("GET", "http://server/x")
    return make_status_error(httpx.Response(404, json=body, request=request), body)


# Schema name -> how its JSON is read on the client side.
READERS: dict[str, Reader] = {
    "GenerateResponse": sdk.Generation.model_validate,
    "GenerateDone": lambda d: sdk.Generation.model_validate({**d, "text": ""}),  # SSE `done`
    "DeltaOut": lambda d: str(d["text"]),  # SSE `delta`
    "PrefixInfo": sdk.PrefixInfo.model_validate,
    "PrefixDetail": sdk.PrefixDetail.model_validate,
    "PrefixPage": sdk.PrefixPage.model_validate,
    "DeletedOut": lambda d: int(d["deleted"]),
    "IssuedKey": sdk.ApiKey.model_validate,
    "TenantList": lambda d: [sdk.Tenant.model_validate(item) for item in d["items"]],
    "RevokedOut": lambda d: str(d["revoked"]),
    "TenantDeleted": sdk.TenantDeletion.model_validate,
    "TenantQuotaOut": sdk.TenantQuota.model_validate,
    "HealthOut": sdk.Health.model_validate,
    "ReadyOut": sdk.Readiness.model_validate,
    "ErrorBody": _error,
    "CompletionResponse": _openai(openai.types.Completion),
    "ChatCompletionResponse": _openai(openai.types.chat.ChatCompletion),
    "ModelCard": openai.types.Model.model_validate,
    "ModelList": lambda d: [openai.types.Model.model_validate(m) for m in d["data"]],
}


def openapi() -> dict[str, Any]:
    document: dict[str, Any] = create_app(Settings(model="m", auth_disabled=True)).openapi()
    return document


def response_schemas(document: dict[str, Any]) -> set[str]:
    """Names of the component schemas that some route answers with (any status)."""
    names = set()
    for operations in document["paths"].values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                for content in response.get("content", {}).values():
                    ref = content.get("schema", {}).get("$ref", "")
                    if ref.startswith("#/components/schemas/"):
                        names.add(ref.rsplit("/", 1)[1])
    return names


DOCUMENT = openapi()
COMPONENTS = DOCUMENT["components"]["schemas"]
STREAMED = {  # SSE event data: not in the document's components
    "DeltaOut": DeltaOut.model_json_schema(mode="serialization"),
    "GenerateDone": GenerateDone.model_json_schema(mode="serialization"),
}



def test_every_response_schema_has_a_reader() -> None:
    described = response_schemas(DOCUMENT)
    assert {"GenerateResponse", "PrefixPage", "ErrorBody", "ModelCard"} <= described
    missing = sorted(described - set(READERS))
    assert not missing, f"response schemas the SDK contract does not cover: {missing}"


MODES = ("required", "full", "nulls")


def instance(schema: dict[str, Any], mode: str) -> Any:
    """A JSON value that `schema` allows: only required properties ("required"), all of them
    ("full"), or all of them with null wherever null is allowed ("nulls")."""
    if "$ref" in schema:
        return instance(_definition(schema["$ref"]), mode)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][-1 if mode == "full" else 0]
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        nullable = any(o.get("type") == "null" for o in options)
        if mode == "nulls" and nullable:
            return None
        return instance(next(o for o in options if o.get("type") != "null"), mode)
    return _typed(schema, mode)


def _typed(schema: dict[str, Any], mode: str) -> Any:
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        keys = schema.get("required", []) if mode == "required" else list(properties)
        value = {key: instance(properties[key], mode) for key in keys}
        extra = schema.get("additionalProperties")
        if not properties and isinstance(extra, dict) and mode != "required":
            value["some_key"] = instance(extra, mode)
        return value
    if kind == "array":
        return [] if mode == "required" else [instance(schema.get("items", {}), mode)]
    samples = {"string": "psk-x1", "integer": 3, "number": 1.5, "boolean": mode == "full",
               "null": None}
    return samples.get(kind, "any") if isinstance(kind, str) else "any"


def _definition(ref: str) -> dict[str, Any]:
    name = ref.rsplit("/", 1)[1]
    for table in (COMPONENTS, *(s.get("$defs", {}) for s in STREAMED.values())):
        if name in table:
            found: dict[str, Any] = table[name]
            return found
    raise KeyError(ref)


def _schema(name: str) -> dict[str, Any]:
    return STREAMED[name] if name in STREAMED else COMPONENTS[name]


def _scalars_kept(parsed: Any, data: dict[str, Any]) -> None:
    """Every scalar field the client model has keeps the server's value."""
    if isinstance(parsed, APIStatusError):
        assert (parsed.type, parsed.message) == (data["error"]["type"], data["error"]["message"])
        return
    if not isinstance(parsed, BaseModel):
        return
    for key, value in data.items():
        if key in type(parsed).model_fields and isinstance(value, str | int | float | bool):
            assert getattr(parsed, key) == value, key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(READERS))
def test_the_client_accepts_what_the_schema_allows(name: str, mode: str) -> None:
    if name not in STREAMED and name not in COMPONENTS:
        pytest.fail(f"{name} is no longer a schema of the server: drop its reader")
    data = instance(_schema(name), mode)
    _scalars_kept(READERS[name](data), data)


def test_the_check_can_fail() -> None:
    """An instance without a field the client needs is refused."""
    data = instance(_schema("GenerateResponse"), "full")
    del data["usage"]
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        READERS["GenerateResponse"](data)


# --- every SDK field, nested ones too, is in the server's schema with a compatible type --------
# SDK model -> the server's schema it reads.
SDK_ROOTS: dict[type[BaseModel], str] = {
    sdk.Generation: "GenerateResponse",
    sdk.PrefixInfo: "PrefixInfo",
    sdk.PrefixDetail: "PrefixDetail",
    sdk.PrefixPage: "PrefixPage",
    sdk.ApiKey: "IssuedKey",
    sdk.Tenant: "TenantInfo",
    sdk.TenantDeletion: "TenantDeleted",
    sdk.TenantQuota: "TenantQuotaOut",
    sdk.Health: "HealthOut",
    sdk.Readiness: "ReadyOut",
}
# Fields the wire schema leaves open (`dict[str, Any]`), with the server type that fills them.
OPEN_FIELDS: dict[str, dict[str, Any]] = {
    "model": TypeAdapter(ModelFingerprint).json_schema(),  # PrefixInfo.model
}
Schema = dict[str, Any]
Lookup = Callable[[str], Schema]


def _branches(schema: Schema, lookup: Lookup) -> list[Schema]:
    """The alternatives a schema allows, references resolved, unions flattened."""
    if "$ref" in schema:
        return _branches(lookup(schema["$ref"]), lookup)
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        return [b for option in options for b in _branches(option, lookup)]
    return [schema]


def _kind(branch: Schema) -> str:
    """A branch's JSON kind: object, array, string, integer, number, boolean, null, or any."""
    if "const" in branch or "enum" in branch:
        values = [branch["const"]] if "const" in branch else branch["enum"]
        kinds = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
        return kinds.get(type(values[0]).__name__, "any")
    if "properties" in branch:
        return "object"
    kind = branch.get("type", "any")
    return kind if isinstance(kind, str) else "any"


def compatible(client: Schema, server: Schema, where: str, lookups: tuple[Lookup, Lookup],
               ) -> list[str]:
    """Why `client` cannot read every value `server` allows (empty: it can), field by field.

    Kinds are matched exactly (an integer must be read as an integer: 3, not 3.0); an object
    recurses into every field the client names, each of which the server must have."""
    client_lookup, server_lookup = lookups
    readers = {_kind(b): b for b in _branches(client, client_lookup)}
    if "any" in readers:
        return []
    problems = []
    for branch in _branches(server, server_lookup):
        kind = _kind(branch)
        if kind not in readers:
            problems.append(f"{where}: the server sends {kind}, the SDK reads {sorted(readers)}")
        elif kind == "object":
            problems += _object_compatible(readers[kind], branch, where, lookups)
        elif kind == "array":
            problems += compatible(readers[kind].get("items", {}), branch.get("items", {}),
                                   f"{where}[]", lookups)
    return problems


def _object_compatible(client: Schema, server: Schema, where: str,
                       lookups: tuple[Lookup, Lookup]) -> list[str]:
    fields = server.get("properties", {})
    problems = []
    for name, field in client.get("properties", {}).items():
        open_type = OPEN_FIELDS.get(name)
        if name in fields and open_type is not None and "properties" not in fields[name]:
            field_lookups = (lookups[0], _lookup_in(open_type.get("$defs", {})))
            problems += compatible(field, open_type, f"{where}.{name}", field_lookups)
        elif name not in fields:
            problems.append(f"{where}.{name}: no such field in the server's schema")
        else:
            if name in client.get("required", []) and name not in server.get("required", []):
                problems.append(f"{where}.{name}: the SDK requires it, the server may omit it")
            problems += compatible(field, fields[name], f"{where}.{name}", lookups)
    client_values, server_values = (s.get("additionalProperties") for s in (client, server))
    if isinstance(client_values, dict) and isinstance(server_values, dict):
        problems += compatible(client_values, server_values, f"{where}{{}}", lookups)
    return problems


def _lookup_in(table: dict[str, Schema]) -> Lookup:
    return lambda ref: table[ref.rsplit("/", 1)[1]]


def sdk_problems(model: type[BaseModel], server_name: str) -> list[str]:
    client = model.model_json_schema(mode="validation")
    lookups = (_lookup_in(client.get("$defs", {})), _definition)
    return compatible(client, COMPONENTS[server_name], model.__name__, lookups)


@pytest.mark.parametrize("model", list(SDK_ROOTS), ids=lambda m: m.__name__)
def test_every_sdk_field_is_in_the_server_schema(model: type[BaseModel]) -> None:
    problems = sdk_problems(model, SDK_ROOTS[model])
    assert not problems, "\n".join(problems)


def test_every_sdk_model_is_checked() -> None:
    """A new SDK model must be reachable from a checked root, or be a root itself."""
    reached = {m.__name__ for m in SDK_ROOTS}
    for model in SDK_ROOTS:
        reached |= set(model.model_json_schema().get("$defs", {}))
    models = {name for name, value in vars(sdk).items() if isinstance(value, type)
              and issubclass(value, sdk._Model) and value is not sdk._Model}
    assert models <= reached, f"SDK models no contract covers: {sorted(models - reached)}"


def test_a_misspelt_nested_field_is_caught() -> None:
    class Timings(sdk._Model):
        ttft_sec: float | None = None  # the server calls it ttft_s

    class Generation(sdk.Generation):
        timings: Timings | None = None  # type: ignore[assignment]

    class Usage(sdk._Model):
        prompt_tokens: float  # the server sends an integer

    class Deep(sdk.Generation):
        usage: Usage  # type: ignore[assignment]

    assert sdk_problems(Generation, "GenerateResponse") == [
        "Generation.timings.ttft_sec: no such field in the server's schema"]
    assert sdk_problems(Deep, "GenerateResponse") == [
        "Deep.usage.prompt_tokens: the server sends integer, the SDK reads ['number']"]
