"""A corpus of hostile requests: every kind of bad input the issue tracker has seen, and more.

Each case is sent to a real server process; none may get a 5xx, and the engine must serve a
normal request afterwards. `expect` is the class of status it must get: "4xx" for input that must
be refused, "2xx" for edge cases that are valid and must be accepted (e.g. a safetensors file
whose header length starts with byte 0x80), "any" where either is right (pydantic's lax mode takes
"5" for 5 and "yes" for true; JSON may come as UTF-16).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import save

DEEP = "[" * 100_000 + "]" * 100_000


@dataclass(frozen=True)
class Shape:
    """The served model's dimensions (prefixes are built for it)."""

    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    context: int


@dataclass
class Case:
    name: str
    method: str
    path: str
    key: str = "tenant"  # "tenant", "operator", "none" or a literal Authorization value
    json_body: Any = None
    content: bytes | None = None  # a raw body (with `content_type`)
    content_type: str = "application/json"
    data: dict[str, str] = field(default_factory=dict)  # multipart fields
    files: list[tuple[str, bytes]] = field(default_factory=list)  # multipart `file` parts
    headers: dict[str, str] = field(default_factory=dict)
    expect: str = "4xx"


def corpus(shape: Shape) -> list[Case]:
    cases = [*_generate(), *_openai(), *_bodies(), *_auth(), *_paths(), *_uploads(shape),
             *_archives(shape), *_tenants()]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


def _generate() -> Iterator[Case]:
    bad_fields: dict[str, list[Any]] = {
        "top_k": [9223372036854775808, 2**31, -1, 1.5, "5", 10**100],
        "seed": [2**64, -1, 2**200, 1.5, "7"],
        "max_new_tokens": [0, -1, 10**12, 2**63, None, 1.5],
        "temperature": [-0.1, 1e308, "hot", [1]],
        "top_p": [0, -1, 1.5, 1e308],
        "stop": [["x"] * 17, ["x" * 257], [""], [1], "", [None]],
        "prompt": ["", None, 5, {"a": 1}, ["a"], "x" * 1_000_001],
        "prefix_id": ["a@b", "../etc/passwd", "x" * 200, "name@0", "name@99999999999", "a b"],
        "stream": ["yes", 2],
        "unknown_field": [1],
    }
    lax = {("top_k", "5"), ("seed", "7"), ("stream", "yes")}
    for name, values in bad_fields.items():
        for i, value in enumerate(values):
            body = {"prompt": "hello", "max_new_tokens": 4, "temperature": 1.0, name: value}
            yield Case(f"generate.{name}.{i}", "POST", "/generate", json_body=body,
                       expect="any" if isinstance(value, str) and (name, value) in lax else "4xx")
    yield Case("generate.nan", "POST", "/generate",
               content=b'{"prompt": "hi", "temperature": NaN}')
    yield Case("generate.infinity", "POST", "/generate",
               content=b'{"prompt": "hi", "top_p": Infinity}')
    yield Case("generate.surrogate", "POST", "/generate", content=b'{"prompt": "\\ud800"}')
    yield Case("generate.surrogate_stop", "POST", "/generate",
               content=b'{"prompt": "hi", "stop": ["\\udfff"]}')
    yield Case("generate.long_prompt_over_context", "POST", "/generate",
               json_body={"prompt": "word " * 150_000})
    yield Case("generate.unknown_prefix", "POST", "/generate",
               json_body={"prompt": "hi", "prefix_id": "nope"})
    yield Case("generate.valid_huge_top_k", "POST", "/generate", expect="2xx",
               json_body={"prompt": "hi", "max_new_tokens": 2, "temperature": 1.0,
                          "top_k": 2**20, "seed": 2**63 - 1})


def _openai() -> Iterator[Case]:
    base = {"model": "BASE", "prompt": "hello", "max_tokens": 2}
    variations: list[dict[str, Any]] = [
        {"n": 2}, {"n": 10**30}, {"best_of": 3}, {"logprobs": 3}, {"echo": True},
        {"presence_penalty": 5}, {"logit_bias": {"1": 100}}, {"suffix": "x"},
        {"max_tokens": 10**12}, {"max_tokens": 0}, {"seed": 2**64}, {"temperature": 3},
        {"prompt": [2**63]}, {"prompt": [-1]}, {"prompt": [10**9]}, {"prompt": []},
        {"prompt": ["a", None]}, {"prompt": None}, {"stop": ["x"] * 17}, {"model": ""},
        {"model": "x" * 300}, {"model": "nope"}, {"stream_options": {"include_usage": "x"}},
    ]
    for i, change in enumerate(variations):
        yield Case(f"completions.{i}", "POST", "/v1/completions", json_body={**base, **change})
    # Several prompts in one request are served (each its own engine request).
    yield Case("completions.several_prompts", "POST", "/v1/completions", expect="2xx",
               json_body={**base, "prompt": ["a", "b"]})
    chat = {"model": "BASE", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    chat_variations: list[dict[str, Any]] = [
        {"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"messages": [{"role": "user", "content": "hi"}] * 5000},
        {"tools": [{"type": "function"}]}, {"max_completion_tokens": -1}, {"top_logprobs": 99},
    ]
    for i, change in enumerate(chat_variations):
        yield Case(f"chat.{i}", "POST", "/v1/chat/completions", json_body={**chat, **change})
    yield Case("chat.surrogate_part", "POST", "/v1/chat/completions", content=(
        b'{"model": "BASE", "messages": [{"role": "user", "content": '
        b'[{"type": "text", "text": "\\ud800"}]}]}'))
    yield Case("completions.surrogate", "POST", "/v1/completions",
               content=b'{"model": "BASE", "prompt": "\\ud800"}')


def _bodies() -> Iterator[Case]:
    yield Case("body.truncated_json", "POST", "/generate", content=b'{"prompt": "hi"')
    yield Case("body.not_json", "POST", "/generate", content=b"prompt=hi")
    yield Case("body.empty", "POST", "/generate", content=b"")
    yield Case("body.array", "POST", "/generate", content=b"[1, 2, 3]")
    yield Case("body.deep_json", "POST", "/generate",
               content=('{"prompt": "hi", "x": ' + DEEP + "}").encode())
    yield Case("body.over_limit", "POST", "/generate",
               content=b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}')
    yield Case("body.wrong_content_type", "POST", "/generate", content=b'{"prompt": "hi"}',
               content_type="text/plain")
    yield Case("body.binary_garbage", "POST", "/generate", content=bytes(range(256)) * 16)
    yield Case("body.utf16", "POST", "/generate", expect="any",
               content='{"prompt": "hi", "max_new_tokens": 2}'.encode("utf-16"))


def _auth() -> Iterator[Case]:
    body = {"prompt": "hi", "max_new_tokens": 2}
    for i, value in enumerate(["", "Bearer", "Bearer  \t psk", "Basic dXNlcjpwYXNz",
                               "Bearer psk-nope", "Bearer " + "k" * 10_000, "bearer\tx",
                               "Bearer \xff"]):
        yield Case(f"auth.{i}", "POST", "/generate", key=value, json_body=body)
    yield Case("auth.none", "POST", "/generate", key="none", json_body=body)
    yield Case("auth.tenant_on_operator_route", "GET", "/admin/tenants")
    yield Case("auth.tenant_names_other_tenant", "GET", "/admin/prefixes?tenant=default")
    for i, value in enumerate(["t" * 10_000, "nope", "../x", "a\xffb"]):
        yield Case(f"auth.x_tenant.{i}", "POST", "/generate", key="operator", json_body=body,
                   headers={"X-Tenant": value})
    yield Case("auth.request_id_huge", "POST", "/generate", json_body=body, expect="2xx",
               headers={"X-Request-ID": "r" * 10_000})


def _paths() -> Iterator[Case]:
    for i, path in enumerate([f"/admin/prefixes/{'p' * 5000}", "/admin/prefixes/a%00b",
                              "/admin/prefixes/%2e%2e", f"/admin/prefixes/x?version={10**30}",
                              "/admin/prefixes/x?version=-1", "/admin/prefixes?limit=0",
                              "/admin/prefixes?limit=1000000", "/admin/prefixes?cursor=%00",
                              "/admin/prefixes?cursor=" + "c" * 5000, "/nope" * 1000]):
        yield Case(f"path.get.{i}", "GET", path)
    yield Case("path.delete_unknown", "DELETE", "/admin/prefixes/unknown")
    yield Case("path.method", "PUT", "/generate", json_body={"prompt": "hi"})


def _p_theta(shape: Shape, length: int = 4, value: float | None = None) -> bytes:
    array = np.random.default_rng(0).normal(0, 0.5, (shape.layers, length, shape.hidden))
    if value is not None:
        array = np.full_like(array, value)
    return save({"p_theta": array.astype(np.float32)})


def _with_header(header: Any, tail: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + tail


def _padded_to_0x80(shape: Shape) -> bytes:
    """A valid p_theta file whose 8-byte header length starts with byte 0x80."""
    data = _p_theta(shape)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    target = ((n // 256) + 1) * 256 + 128
    header["__metadata__"] = {"pad": ""}
    raw = json.dumps(header, separators=(",", ":")).encode()
    header["__metadata__"]["pad"] = "x" * (target - len(raw))
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _upload(case: str, files: list[tuple[str, bytes]], expect: str = "4xx",
            **data: str) -> Case:
    return Case(f"upload.{case}", "POST", "/admin/prefixes", data={"name": "h", **data},
                files=files, expect=expect)


def _uploads(shape: Shape) -> Iterator[Case]:
    good = _p_theta(shape)
    meta_tail = _p_theta(shape)
    n = struct.unpack("<Q", meta_tail[:8])[0]
    tensors_header = json.loads(meta_tail[8 : 8 + n])
    for i, meta in enumerate(['"5"', 5, "[1]", DEEP, {"a": 1}]):
        header = {**tensors_header, "__metadata__": {"prefix-serve": meta}}
        yield _upload(f"metadata.{i}", [("p.safetensors", _with_header(header, meta_tail[8 + n:]))])
    yield _upload("deep_header", [("p.safetensors", _with_header(('{"a":' + DEEP + "}").encode()))])
    yield _upload("header_not_object", [("p.safetensors", _with_header(b"[1,2,3]"))])
    yield _upload("header_length_lies", [("p.safetensors", struct.pack("<Q", 2**60) + b"{}")])
    yield _upload("pickle", [("p.safetensors", pickle.dumps({"a": 1}, protocol=4))])
    yield _upload("pickle_name", [("adapter_model.bin", good)])
    torch_zip = io.BytesIO()
    with zipfile.ZipFile(torch_zip, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps([1]))
    yield _upload("torch_checkpoint", [("p.safetensors", torch_zip.getvalue())])
    yield _upload("header_0x80_is_valid", [("p.safetensors", _padded_to_0x80(shape))], "2xx")
    yield _upload("too_long_for_context", [("p.safetensors", _p_theta(shape, shape.context - 1))])
    yield _upload("huge_values", [("p.safetensors", _p_theta(shape, value=3e38))])
    yield _upload("nan", [("p.safetensors", _p_theta(shape, value=float("nan")))])
    yield _upload("wrong_shape", [("p.safetensors", save({"p_theta": np.zeros((1, 2, 3),
                                                                               np.float32)}))])
    yield _upload("int_dtype", [("p.safetensors", save({"p_theta": np.zeros(
        (shape.layers, 2, shape.hidden), np.int32)}))])
    yield _upload("empty_file", [("p.safetensors", b"")])
    yield _upload("garbage", [("p.safetensors", bytes(range(256)) * 64)])
    yield _upload("two_files", [("a.safetensors", good), ("b.safetensors", good)])
    yield _upload("no_files", [])
    yield _upload("bad_name", [("p.safetensors", good)], name="../../etc")
    yield _upload("long_name", [("p.safetensors", good)], name="n" * 10_000)
    yield _upload("missing_tenant", [("p.safetensors", good)], tenant="no-such-tenant")
    yield _upload("long_filename", [("x" * 5000 + "\x1b.safetensors", good)])
    deep_config = ('{"peft_type": "PREFIX_TUNING", "x": ' + DEEP + "}").encode()
    yield _upload("deep_adapter_config", [("adapter_config.json", deep_config),
                                          ("adapter_model.safetensors", good)])
    yield _upload("adapter_not_peft", [("adapter_config.json", b'{"a": 1}'),
                                       ("adapter_model.safetensors", good)])
    bad_peft = json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2,
                           "num_layers": 10**9, "num_attention_heads": 1, "token_dim": 1})
    yield _upload("adapter_wrong_shape", [("adapter_config.json", bad_peft.encode()),
                                          ("adapter_model.safetensors", good)])
    yield Case("upload.no_boundary", "POST", "/admin/prefixes", content=b"--x\r\n",
               content_type="multipart/form-data")
    yield Case("upload.json_instead", "POST", "/admin/prefixes", json_body={"name": "h"})
    parts = b"".join(b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\nh\r\n'
                     for _ in range(100)) + b"--B--\r\n"
    yield Case("upload.too_many_parts", "POST", "/admin/prefixes", content=parts,
               content_type="multipart/form-data; boundary=B")


def _tar(members: dict[str, int | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            data = content if isinstance(content, bytes) else b"\0" * content
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _archives(shape: Shape) -> Iterator[Case]:
    yield _upload("bomb_macosx", [("a.tar.gz", _tar({"__MACOSX/bomb": 48 * 2**20}))])
    yield _upload("bomb_dot_underscore", [("a.tar.gz", _tar({"a/._bomb": 48 * 2**20}))])
    yield _upload("many_members", [("a.tar.gz", _tar({f"__MACOSX/{i}": b"" for i in range(200)}))])
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(5000):
            zf.writestr(f"__MACOSX/{i}", b"")
    yield _upload("zip_many_entries", [("a.zip", many.getvalue())])
    yield _upload("traversal", [("a.tar.gz", _tar({"../evil/adapter_config.json": b"{}"}))])
    yield _upload("absolute", [("a.tar.gz", _tar({"/etc/adapter_config.json": b"{}"}))])
    yield _upload("nested", [("a.tar.gz", _tar({"inner.tar.gz": _tar({"x": b"y"})}))])
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as tf:
        info = tarfile.TarInfo("adapter_config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    yield _upload("symlink", [("a.tar", link.getvalue())])
    yield _upload("truncated_archive", [("a.tar.gz", _tar({"x": b"y" * 5000})[:50])])


def _tenants() -> Iterator[Case]:
    for i, name in enumerate(["", "-bad", "a" * 65, "a/b", "a:b", None, 5]):
        yield Case(f"tenant.create.{i}", "POST", "/admin/tenants", key="operator",
                   json_body={"name": name})
    yield Case("tenant.delete_unknown", "DELETE", "/admin/tenants/nope", key="operator")
    yield Case("tenant.delete_long", "DELETE", f"/admin/tenants/{'t' * 5000}", key="operator")
    yield Case("tenant.revoke_unknown", "DELETE", f"/admin/tenants/hostile/keys/{'k' * 5000}",
               key="operator")
    yield Case("tenant.keys_unknown", "POST", "/admin/tenants/nope/keys", key="operator")
    yield Case("tenant.delete_as_tenant", "DELETE", "/admin/tenants/hostile")
