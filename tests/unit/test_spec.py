"""Input checks, shape profiles and memory-mode parsing: pure functions, tables of cases."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine_runtime.errors import (
    BatchTooLargeError,
    InputDtypeError,
    InputShapeError,
    InputValueError,
    InvalidInputError,
    MissingInputError,
    UnknownInputError,
)
from engine_runtime.memory import MemoryMode
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec, nbytes_of, validate_inputs

IMAGE = ShapeProfile((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))
# A second input with a bounded dynamic dimension (sequence 4..16).
MASK = ShapeProfile((1, 4), (4, 16), (8, 16))


def _desc() -> EngineDescription:
    return EngineDescription(
        name="two-inputs",
        inputs=(TensorSpec("image", "float32", (-1, 3, 8, 8)), TensorSpec("mask", "int64", (-1, -1))),
        outputs=(TensorSpec("out", "float32", (-1, 10)),),
        profiles={"image": IMAGE, "mask": MASK},
        weights_bytes=1234,
        backend="test",
    )


def _ok(batch: int = 2, seq: int = 8) -> dict[str, np.ndarray]:
    return {"image": np.zeros((batch, 3, 8, 8), np.float32), "mask": np.ones((batch, seq), np.int64)}


def _with(**changes) -> dict:
    inputs = _ok()
    inputs.update(changes)
    return {k: v for k, v in inputs.items() if v is not None}


def _nan_image() -> np.ndarray:
    x = np.zeros((2, 3, 8, 8), np.float32)
    x[1, 2, 3, 4] = np.nan
    return x


def _inf_image_torch() -> torch.Tensor:
    x = torch.zeros((2, 3, 8, 8))
    x[0, 0, 0, 0] = float("-inf")
    return x


# (case id, inputs, expected exception, fragments the message must contain: expected and got)
INVALID = [
    ("unknown input", _with(extra=np.zeros((2, 3), np.float32)), UnknownInputError,
     ["'extra'", "['image', 'mask']"]),
    ("missing input", _with(mask=None), MissingInputError, ["['mask']"]),
    ("numpy dtype", _with(image=np.zeros((2, 3, 8, 8), np.float64)), InputDtypeError,
     ["'image'", "expected dtype float32", "got float64"]),
    ("torch dtype", _with(mask=torch.ones((2, 8), dtype=torch.int32)), InputDtypeError,
     ["'mask'", "expected dtype int64", "got int32"]),
    ("rank too low", _with(image=np.zeros((2, 3, 8), np.float32)), InputShapeError,
     ["'image'", "[1..8, 3, 8, 8]", "got [2, 3, 8]", "rank 3, expected 4"]),
    ("rank too high", _with(mask=np.ones((2, 8, 1), np.int64)), InputShapeError,
     ["'mask'", "rank 3, expected 2"]),
    ("fixed dim wrong", _with(image=np.zeros((2, 3, 8, 9), np.float32)), InputShapeError,
     ["'image'", "got [2, 3, 8, 9]", "dim 3 is 9, allowed 8..8"]),
    ("dynamic dim above max", _with(mask=np.ones((2, 17), np.int64)), InputShapeError,
     ["'mask'", "[1..8, 4..16]", "dim 1 is 17, allowed 4..16"]),
    ("dynamic dim below min", _with(mask=np.ones((2, 3), np.int64)), InputShapeError,
     ["dim 1 is 3, allowed 4..16"]),
    ("empty batch", {"image": np.zeros((0, 3, 8, 8), np.float32), "mask": np.ones((0, 8), np.int64)},
     InputShapeError, ["dim 0 is 0, allowed 1..8"]),
    ("mixed batch", _with(mask=np.ones((3, 8), np.int64)), InputShapeError,
     ["'mask'", "batch 2 like the other inputs", "got [3, 8]"]),
    ("NaN", _with(image=_nan_image()), InputValueError, ["'image'", "NaN or infinity"]),
    ("torch inf", _with(image=_inf_image_torch()), InputValueError, ["'image'", "NaN or infinity"]),
    ("not a tensor", _with(image=[[1.0]]), InvalidInputError, ["'image'", "got list"]),
]


@pytest.mark.parametrize("inputs, exc, fragments", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_inputs_name_expected_and_got(inputs, exc, fragments):
    with pytest.raises(exc) as info:
        validate_inputs(_desc(), inputs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, ValueError), "input errors are ValueErrors too, for callers that catch those"


def test_inputs_must_be_a_mapping():
    with pytest.raises(InvalidInputError, match="mapping of name to tensor, got list"):
        validate_inputs(_desc(), [np.zeros(1)])


def test_batch_over_max_carries_the_numbers():
    with pytest.raises(BatchTooLargeError) as info:
        validate_inputs(_desc(), _ok(batch=9))
    err = info.value
    assert (err.name, err.max_batch, err.got) == ("image", 8, (9, 3, 8, 8))
    assert "batch 9 is over the profile's maximum 8" in str(err)
    assert "expected shape batch <= 8" in str(err)


def test_non_finite_allowed_when_the_engine_accepts_them():
    shapes = validate_inputs(_desc(), _with(image=_nan_image()), reject_non_finite=False)
    assert shapes["image"] == (2, 3, 8, 8)


@pytest.mark.parametrize("batch, seq", [(1, 4), (8, 16), (3, 9)])
def test_valid_inputs_return_shapes(batch, seq):
    assert validate_inputs(_desc(), _ok(batch, seq)) == {"image": (batch, 3, 8, 8), "mask": (batch, seq)}


def test_valid_torch_inputs():
    inputs = {"image": torch.zeros((2, 3, 8, 8)), "mask": torch.ones((2, 8), dtype=torch.int64)}
    assert validate_inputs(_desc(), inputs)["mask"] == (2, 8)


def test_integer_inputs_skip_the_finite_check():
    # Integer tensors cannot hold NaN; the check must not choke on them.
    assert validate_inputs(_desc(), _with(mask=np.full((2, 8), -1, np.int64)))["mask"] == (2, 8)


@pytest.mark.parametrize("value", [-1, 100, 2**62, -(2**63)])
@pytest.mark.parametrize("as_torch", [False, True])
def test_integer_values_outside_the_range_are_refused(value, as_torch):
    desc = _desc()
    ranged = replace(desc, inputs=(desc.inputs[0], replace(desc.inputs[1], value_range=(0, 99))))
    ids = np.zeros((2, 8), np.int64)
    ids[1, 3] = value
    inputs = _with(mask=torch.from_numpy(ids) if as_torch else ids)
    with pytest.raises(InputValueError, match=rf"'mask': values must lie in 0\.\.99, got .*{value}"):
        validate_inputs(ranged, inputs)
    ids[1, 3] = 99
    assert validate_inputs(ranged, _with(mask=ids))["mask"] == (2, 8)


def test_value_range_needs_an_integer_dtype():
    with pytest.raises(ValueError, match="integer dtype"):
        TensorSpec("x", "float32", (-1, 4), value_range=(0, 1))


@pytest.mark.parametrize(
    "lo, mid, hi, fragment",
    [
        ((1, 3), (2,), (4, 3), "profile ranks differ"),
        ((2, 3), (1, 3), (4, 3), "1 <= min <= opt <= max"),
        ((1, 3), (4, 3), (2, 3), "1 <= min <= opt <= max"),
        ((0, 3), (1, 3), (2, 3), "1 <= min <= opt <= max"),
    ],
)
def test_bad_profiles_are_refused(lo, mid, hi, fragment):
    with pytest.raises(ValueError, match=fragment):
        ShapeProfile(lo, mid, hi)


def test_profile_and_description_views():
    desc = _desc()
    assert IMAGE.max_batch == 8
    assert IMAGE.describe() == "[1..8, 3, 8, 8]"
    assert desc.max_batch == 8
    assert desc.input_names == ["image", "mask"]
    assert desc.output_names == ["out"]
    assert desc.opt_shapes() == {"image": (4, 3, 8, 8), "mask": (4, 16)}
    assert desc.max_shapes() == {"image": (8, 3, 8, 8), "mask": (8, 16)}
    assert desc.to_dict()["profiles"]["mask"] == {"min": [1, 4], "opt": [4, 16], "max": [8, 16]}
    with pytest.raises(UnknownInputError, match="'nope'"):
        desc.input("nope")


def test_tensor_spec_refuses_unsupported_dtypes():
    with pytest.raises(ValueError, match="'complex64' not in"):
        TensorSpec("x", "complex64", (-1,))


@pytest.mark.parametrize("shape, dtype, expected", [((2, 3), "float32", 24), ((4,), "bfloat16", 8), ((5,), "bool", 5)])
def test_nbytes_of(shape, dtype, expected):
    assert nbytes_of(shape, dtype) == expected


@pytest.mark.parametrize(
    "value, expected",
    [("static", MemoryMode.STATIC), ("DYNAMIC", MemoryMode.DYNAMIC), (MemoryMode.STATIC, MemoryMode.STATIC)],
)
def test_memory_mode_parse(value, expected):
    assert MemoryMode.parse(value) is expected


@pytest.mark.parametrize("value", ["dyn", "", "0", 1, None])
def test_memory_mode_parse_errors_list_the_valid_modes(value):
    with pytest.raises(ValueError) as info:
        MemoryMode.parse(value)
    assert repr(value) in str(info.value)
    assert "['static', 'dynamic']" in str(info.value)
