"""Every validation rule refuses what it should, with a message that names the problem."""

from __future__ import annotations

import pytest
import torch

from prefix_registry.artifact import PrefixArtifact
from prefix_registry.errors import InvalidPrefixError, PrefixTooLargeError
from prefix_registry.validation import Limits, parse_ref, validate_name, validate_tensors
from tests.registry.conftest import FP, make_tensors

L, H, HD, D = FP.num_layers, FP.num_kv_heads, FP.head_dim, FP.hidden_size


def kv(shape_k: tuple[int, ...], shape_v: tuple[int, ...] | None = None,
       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {"keys": torch.zeros(shape_k, dtype=dtype),
            "values": torch.zeros(shape_v or shape_k, dtype=dtype)}


@pytest.mark.parametrize("name", ["a", "style-2", "A.b_c", "9" * 64])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".x", "a@1", "a:b", "a/b", "a b", "é", "x" * 65, 3])
def test_bad_names(name: object) -> None:
    with pytest.raises(InvalidPrefixError, match="invalid prefix name"):
        validate_name(name)


def test_refs() -> None:
    assert parse_ref("style") == ("style", None)
    assert parse_ref("style@12") == ("style", 12)
    for bad in ("style@", "style@0", "style@-1", "style@1.5", "style@1@2", "@3"):
        with pytest.raises(InvalidPrefixError):
            parse_ref(bad)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"p_theta": torch.zeros(L + 1, 3, D)}, r"num_layers is 3, not 2"),
        ({"p_theta": torch.zeros(L, 3, D - 1)}, r"d_model is 63, not 64"),
        ({"p_theta": torch.zeros(L, 3)}, r"p_theta has shape \[2, 3\]"),
        (kv((L, H + 1, 3, HD)), r"num_kv_heads is 3, not 2"),
        (kv((L, H, 3, HD * 2)), r"head_dim is 32, not 16"),
        (kv((L, H, 3, HD), (L, H, 4, HD)), r"must have the same shape"),
        (kv((L, H, 3)), r"keys/values have shape"),
        ({"p_theta": torch.zeros(L, 0, D)}, r"prefix length is 0"),
        ({"p_theta": torch.zeros(L, 513, D)}, r"prefix length 513 is over the limit of 512"),
        ({"keys": torch.zeros(1)}, r"found: keys"),
        ({"p_theta": torch.zeros(1), "keys": torch.zeros(1)}, r"found: keys, p_theta"),
        ({}, r"found: none"),
        ({"p_theta": torch.zeros(L, 3, D, dtype=torch.float64)}, r"dtype torch.float64"),
        ({"p_theta": torch.zeros(L, 3, D, dtype=torch.int32)}, r"dtype torch.int32"),
        ({"keys": torch.zeros(L, H, 3, HD),
          "values": torch.zeros(L, H, 3, HD, dtype=torch.float16)}, r"different dtypes"),
        ({"p_theta": [[0.0]]}, r"'p_theta' is not a tensor"),
    ],
)
def test_bad_tensors(tensors: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(InvalidPrefixError, match=message):
        validate_tensors(tensors, FP, Limits())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_values(bad: float, dtype: torch.dtype) -> None:
    tensors = make_tensors("kv", dtype=dtype)
    tensors["values"][1, 0, 2, 5] = bad
    with pytest.raises(InvalidPrefixError, match="'values' holds NaN or infinite"):
        validate_tensors(tensors, FP, Limits())


def test_limits_are_configurable() -> None:
    tensors = make_tensors("kv", prefix_len=5)  # 2 tensors * 2*2*5*16 floats = 2560 bytes
    assert validate_tensors(tensors, FP, Limits()) == ("kv", 5, "float32")
    with pytest.raises(InvalidPrefixError, match="over the limit of 4 tokens"):
        validate_tensors(tensors, FP, Limits(max_prefix_len=4))
    with pytest.raises(PrefixTooLargeError, match="2560 bytes, over the limit of 2000"):
        validate_tensors(tensors, FP, Limits(max_prefix_bytes=2000))


def test_create_checks_names_and_training_metadata() -> None:
    tensors = make_tensors("p_theta")
    with pytest.raises(InvalidPrefixError, match="invalid prefix name"):
        PrefixArtifact.create(name="a@b", tenant="acme", tensors=tensors, model=FP)
    with pytest.raises(InvalidPrefixError, match="invalid tenant name"):
        PrefixArtifact.create(name="ok", tenant="a:b", tensors=tensors, model=FP)
    with pytest.raises(InvalidPrefixError, match="plain JSON"):
        PrefixArtifact.create(name="ok", tenant="acme", tensors=tensors, model=FP,
                              training={"loss": torch.tensor(1.0)})
    with pytest.raises(InvalidPrefixError, match="plain JSON"):
        PrefixArtifact.create(name="ok", tenant="acme", tensors=tensors, model=FP,
                              training={"loss": float("nan")})
    with pytest.raises(InvalidPrefixError, match="description is 5000 characters"):
        PrefixArtifact.create(name="ok", tenant="acme", tensors=tensors, model=FP,
                              description="x" * 5000)
    with pytest.raises(InvalidPrefixError, match="training metadata is"):
        PrefixArtifact.create(name="ok", tenant="acme", tensors=tensors, model=FP,
                              training={"log": "x" * 70000})
