"""ONNX in and out: read a graph's precision and batch profiles, export a module with a
dynamic batch axis."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from engine_runtime.build.precision import _ONNX_FLOAT_TYPES, Precision
from engine_runtime.errors import EngineBuildError
from engine_runtime.spec import ShapeProfile
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)


def _onnx_model(onnx_bytes: bytes) -> Any:
    import onnx

    try:
        return onnx.load_model_from_string(onnx_bytes)
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError and others
        raise EngineBuildError(f"not an ONNX model ({len(onnx_bytes)} bytes): {err}") from err


def onnx_precision(onnx_bytes: bytes) -> Precision | None:
    """The floating type holding most of the graph's weights, or None without float weights."""
    counts: dict[Precision, int] = {}
    for init in _onnx_model(onnx_bytes).graph.initializer:
        p = _ONNX_FLOAT_TYPES.get(init.data_type)
        if p is not None:
            counts[p] = counts.get(p, 0) + math.prod(init.dims)
    return max(counts, key=counts.get) if counts else None


def profiles_from_onnx(onnx_bytes: bytes, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, ShapeProfile]:
    """Profiles for a graph whose only dynamic dimension is the batch (axis 0)."""
    model = _onnx_model(onnx_bytes)
    weights = {i.name for i in model.graph.initializer}
    out: dict[str, ShapeProfile] = {}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        dims = inp.type.tensor_type.shape.dim
        fixed = []
        for axis, d in enumerate(dims):
            if axis > 0 and not d.HasField("dim_value"):
                raise EngineBuildError(
                    f"input {inp.name!r} has a dynamic dimension at axis {axis} ({d.dim_param or '?'}); "
                    f"give its profile with --shape {inp.name}=MIN:OPT:MAX")
            fixed.append(d.dim_value if d.HasField("dim_value") else None)
        if not fixed:
            raise EngineBuildError(f"input {inp.name!r} is a scalar; Ebb's engines take batched tensors")
        if fixed[0] is not None and not (min_batch <= fixed[0] <= max_batch):
            raise EngineBuildError(f"input {inp.name!r} has a fixed batch of {fixed[0]}, "
                                   f"outside the requested {min_batch}..{max_batch}")
        rest = tuple(fixed[1:])
        if fixed[0] is not None:
            out[inp.name] = ShapeProfile((fixed[0], *rest), (fixed[0], *rest), (fixed[0], *rest))
        else:
            out[inp.name] = ShapeProfile((min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    return out


def export_onnx(module: Any, *, input_name: str, input_dtype: str, profile: ShapeProfile,
                output_name: str = "output", precision: Precision | str = Precision.FP32) -> bytes:
    """ONNX bytes of ``module`` in ``precision``, batch axis dynamic within the profile."""
    import copy

    import torch

    prec = Precision.parse(precision)
    dtype = getattr(torch, input_dtype)
    if dtype.is_floating_point:
        dtype = prec.torch_dtype
    model = copy.deepcopy(module).eval().to(prec.torch_dtype)
    # torch.export specialises a dimension whose sample is 0 or 1, so the sample batch is
    # at least 2 whenever the profile allows a batch range.
    lo, hi = profile.min[0], profile.max[0]
    batch = min(max(2, profile.opt[0]), hi)
    sample = torch.zeros((batch, *profile.opt[1:]), dtype=dtype)
    dynamic = ({0: torch.export.Dim("batch", min=lo, max=hi)},) if hi > lo else None
    t0 = time.perf_counter()
    try:
        # The dynamo exporter: the TorchScript one is deprecated and slated for removal.
        program = torch.onnx.export(model, (sample,), None, input_names=[input_name], output_names=[output_name],
                                    dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter raises many unrelated types
        raise EngineBuildError(f"exporting {type(module).__name__} to ONNX failed: {err}") from err
    data = program.model_proto.SerializeToString()
    logger.info("exported %s to ONNX (%.1f MiB, %s) in %.1f s", type(module).__name__,
                len(data) / MiB, prec.value, time.perf_counter() - t0)
    return data
