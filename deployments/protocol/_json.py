"""JSON inside infer requests: decoding the body, and ``data`` into checked values.

Decoding is orjson's, with the json module behind it for what strict JSON refuses
(NaN and Infinity literals) and for its error messages; integer literals too long
for any datatype are kept unconverted (``_HugeInteger``) so that the check that meets
them names where they were. ``data`` is flat row-major or nested exactly as the shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # pragma: no cover - a host without it parses with the json module alone
    orjson = None

from deployments.protocol.datatypes import datatype_for, numpy_dtype
from deployments.protocol.status import ProtocolError

__all__ = ["dumps", "flatten", "json_type", "json_values_to_array", "load_json", "short"]

#: Past 309 digits an integer is out of range of every datatype, FP64 included: such a
#: literal is refused while parsing, before Python converts it (quadratic in its length,
#: and refused past 4300 digits with a hint about sys.set_int_max_str_digits).
_MAX_INTEGER_DIGITS = 309


def load_json(raw: memoryview) -> Any:
    if orjson is not None:
        try:
            # orjson parses several times faster than json; it refuses what strict JSON
            # refuses (NaN and Infinity literals, nesting past 1024), and those requests go
            # on to the json module below, which accepts NaN and Infinity (the engine's rule
            # decides about them) and words every error the same way as before.
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolError(400, f"request JSON is not valid UTF-8 at byte {err.start}") from err
    try:
        return json.loads(text, parse_int=_parse_int)
    except RecursionError as err:
        raise ProtocolError(400, "request JSON is nested too deeply") from err
    except ValueError as err:  # JSONDecodeError
        raise ProtocolError(400, f"malformed JSON in request body: {str(err)[:200]}") from err


class _HugeInteger:
    """An integer literal too long for any datatype, kept unconverted so that the check
    that meets it names where it was (an input's data, a shape)."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(literal: str) -> int | _HugeInteger:
    digits = len(literal) - literal.startswith("-")
    return _HugeInteger(digits) if digits > _MAX_INTEGER_DIGITS else int(literal)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, _HugeInteger):
        return f"an integer of {value.digits} digits (out of range of every datatype)"
    return "an object"


def short(shape: Sequence[Any], limit: int = 8) -> str:
    """A shape for a message, cut short: a client may send a thousand dimensions."""
    items = [str(d) if len(str(d)) <= 20 else str(d)[:20] + "..." for d in list(shape)[:limit]]
    return "[" + ", ".join(items) + (", ..." if len(shape) > limit else "") + "]"


def flatten(data: list[Any], shape: tuple[int, ...], name: str) -> list[Any]:
    """Row-major elements of ``data``: flat (KServe's row-major list) or nested exactly as ``shape``.

    Nested data must follow the shape at every level: a list of 150,527 values and one
    of 1 under ``[1, 3, 224, 224]`` holds the right count but is not that tensor.
    """
    count = math.prod(shape)
    if list not in set(map(type, data)):
        if len(data) != count:
            raise ProtocolError(
                400, f"input {name!r}: shape {short(shape)} needs {count} elements, 'data' has {len(data)}")
        return data
    if not shape:
        raise ProtocolError(400, f"input {name!r}: shape [] is a scalar; 'data' must be a flat list of one element")
    level: list[Any] = [data]
    for depth, dim in enumerate(shape):
        last = depth == len(shape) - 1
        below: list[Any] = []
        for node in level:
            if type(node) is not list or len(node) != dim:
                got = f"a list of {len(node)}" if type(node) is list else json_type(node)
                raise ProtocolError(
                    400, f"input {name!r}: nested 'data' does not match shape {short(shape)}: at depth {depth} "
                         f"found {got} where the shape has {dim}; send 'data' flat (row-major) or nested "
                         f"exactly as the shape")
            below.extend(node)  # at C speed; the last level's elements are checked as values
        level = below
        if last:
            return level
    return level


def json_values_to_array(flat: list[Any], name: str, numpy_name: str) -> np.ndarray:
    """Checked JSON values (bools, integers in range, numbers) as an array of ``numpy_name``."""
    where = f"input {name!r}"
    kinds = set(map(type, flat))
    dtype = numpy_dtype(numpy_name)
    if numpy_name == "bool":
        if not kinds <= {bool}:
            raise ProtocolError(400, f"{where}: BOOL data must be true or false, got {_kinds(kinds)}")
        return np.array(flat, dtype=bool)
    if dtype.kind in "iu":
        if not kinds <= {int}:
            raise ProtocolError(400, f"{where}: {datatype_for(numpy_name)} data must be integers, got {_kinds(kinds)}")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise ProtocolError(
                400, f"{where}: values must lie in {info.min}..{info.max} for {datatype_for(numpy_name)}"
            )
        return np.array(flat, dtype=dtype)
    if not kinds <= {int, float}:
        raise ProtocolError(400, f"{where}: {datatype_for(numpy_name)} data must be numbers, got {_kinds(kinds)}")
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError as err:
        raise ProtocolError(400, f"{where}: an integer in 'data' is too large for a float") from err
    # Values past the type's range become infinities, which validate_inputs reports.
    with np.errstate(over="ignore"):
        return wide.astype(dtype)


_JSON_KIND_NAMES = {type(None): "null", bool: "booleans", int: "integers", float: "floats", str: "strings",
                    list: "lists", dict: "objects", _HugeInteger: f"integers of over {_MAX_INTEGER_DIGITS} digits"}


def _kinds(kinds: set[type]) -> str:
    return ", ".join(sorted(_JSON_KIND_NAMES.get(k, k.__name__) for k in kinds))


def dumps(obj: Any) -> bytes:
    """Compact JSON of ``obj``, numpy arrays included (orjson's at C speed where installed)."""
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, separators=(",", ":"), default=_plain).encode("utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
