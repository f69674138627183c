"""Building TensorRT engines: ONNX or ``torch.nn.Module`` in, a serialized plan out, cached on disk.

``build_from_onnx`` parses an ONNX model, adds one optimisation profile (min/opt/max
per input) and builds for a target: the GPU present (``"current"``) or, with
TensorRT-RTX, any supported compute capability ahead of time on a machine without a
GPU (``"sm86"``). ``build_from_module`` exports a module to ONNX with a dynamic batch
axis first. Plans are cached under a key of model content, profiles, precision,
TensorRT flavour and version, and target, so a second build of the same thing is a
file read. ``main`` is the command line (``python -m engine_runtime.build``), which
``ebb build`` calls.

Precision and typing, honestly: TensorRT-RTX networks are always *strongly typed*,
so the ONNX graph's own types decide precision; asking for fp16 of an fp32 graph is
an error, and ``build_from_module`` casts the module before export instead. Full
TensorRT builds fp16/bf16 from an fp32 graph with its (weakly typed) builder flags
where the installed version still has them.

One concept per module: ``precision`` (``Precision``), ``onnx_graph`` (reading and
exporting ONNX), ``cache`` (keys and the on-disk cache), ``builder`` (TensorRT),
``cli`` (the command line).
"""

from engine_runtime.build.builder import build_from_module, build_from_onnx, parse_target, resolve_target
from engine_runtime.build.cache import BUILDER_REVISION, BuildResult, EngineCache, cache_key, module_digest, onnx_digest
from engine_runtime.build.cli import main, parse_shape_arg
from engine_runtime.build.onnx_graph import export_onnx, onnx_precision, profiles_from_onnx
from engine_runtime.build.precision import Precision

__all__ = [
    "BUILDER_REVISION",
    "BuildResult",
    "EngineCache",
    "Precision",
    "build_from_module",
    "build_from_onnx",
    "cache_key",
    "export_onnx",
    "main",
    "module_digest",
    "onnx_digest",
    "onnx_precision",
    "parse_shape_arg",
    "parse_target",
    "profiles_from_onnx",
    "resolve_target",
]
