"""Building TensorRT engines: ONNX or ``torch.nn.Module`` in, a serialized plan out, cached on disk.

``build_from_onnx`` parses an ONNX model, adds one optimisation profile (min/opt/max
per input) and builds for a target: the GPU present (``"current"``) or, with
TensorRT-RTX, any supported compute capability ahead of time on a machine without a
GPU (``"sm86"``). ``build_from_module`` exports a module to ONNX with a dynamic batch
axis first. Plans are cached under a key of model content, profiles, precision,
TensorRT flavour and version, and target, so a second build of the same thing is a
file read. ``main`` is the command line (``python -m engine_runtime.build``), which
``ebb build`` will call.

Precision and typing, honestly: TensorRT-RTX networks are always *strongly typed*,
so the ONNX graph's own types decide precision; asking for fp16 of an fp32 graph is
an error, and ``build_from_module`` casts the module before export instead. Full
TensorRT builds fp16/bf16 from an fp32 graph with its (weakly typed) builder flags
where the installed version still has them.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_runtime.backends import _trt
from engine_runtime.errors import EbbError, EngineBuildError
from engine_runtime.units import MiB
from engine_runtime.spec import ShapeProfile

logger = logging.getLogger(__name__)

#: Bumped when this module changes what it puts into a plan for the same inputs.
BUILDER_REVISION = 1


class Precision(str, enum.Enum):
    """The floating-point type an engine computes in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @classmethod
    def parse(cls, value: Precision | str) -> Precision:
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise EngineBuildError(f"unknown precision {value!r}; expected one of {[p.value for p in cls]}") from None

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[self]


#: ONNX TensorProto element types of the floating-point kinds we build.
_ONNX_FLOAT_TYPES = {1: Precision.FP32, 10: Precision.FP16, 16: Precision.BF16}


@dataclass(frozen=True)
class BuildResult:
    """A built (or cached) plan and how it came to be."""

    plan: bytes
    key: str
    cache_hit: bool
    build_s: float
    #: Where the plan lies on disk (the cache entry), or None without a cache.
    path: Path | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


# -- pure parts ------------------------------------------------------------------


def cache_key(model_digest: str, profiles: Mapping[str, ShapeProfile], precision: Precision,
              tensorrt_tag: str, target: str, refittable: bool = False) -> str:
    """A stable name for a plan: any change to what goes into the build changes it."""
    doc = {
        "model": model_digest,
        "profiles": {k: profiles[k].to_dict() for k in sorted(profiles)},
        "precision": precision.value,
        "tensorrt": tensorrt_tag,
        "target": target,
        "builder": BUILDER_REVISION,
    }
    if refittable:
        # Only when set, so plans cached before the option existed keep their keys.
        doc["refittable"] = True
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def onnx_digest(onnx_bytes: bytes) -> str:
    return "onnx:" + hashlib.sha256(onnx_bytes).hexdigest()


def module_digest(module: Any, *, input_name: str, input_dtype: str, output_name: str) -> str:
    """Content of a module: its class source, structure and every parameter and buffer.

    Hashing this instead of the exported ONNX lets a cache hit skip the export (seconds).
    The torch version is part of it because the exporter's output follows it.
    """
    import torch

    h = hashlib.sha256()
    cls = type(module)
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # classes made at run time have no source file
        source = f"{cls.__module__}.{cls.__qualname__}"
    for part in (source, repr(module), input_name, input_dtype, output_name, torch.__version__):
        h.update(part.encode())
        h.update(b"\0")
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return "module:" + h.hexdigest()


def parse_target(target: str) -> str:
    """``"sm86"``, ``"8.6"``, ``"86"`` -> ``"sm86"``; ``"current"`` stays."""
    t = str(target).strip().lower()
    if t == "current":
        return t
    digits = t.removeprefix("sm").removeprefix("_").replace(".", "")
    if not digits.isdigit() or len(digits) < 2:
        raise EngineBuildError(f"unknown target {target!r}; expected 'current' or a compute capability like sm86 or 8.6")
    return f"sm{digits}"


def parse_shape_arg(text: str) -> tuple[str, ShapeProfile]:
    """``input=1x3x224x224:8x3x224x224:32x3x224x224`` -> (``input``, profile)."""
    try:
        name, dims = text.split("=", 1)
        lo, opt, hi = (tuple(int(d) for d in part.split("x")) for part in dims.split(":"))
    except ValueError:
        raise EngineBuildError(f"bad --shape {text!r}; expected NAME=MINxDIMS:OPTxDIMS:MAXxDIMS, "
                               f"e.g. input=1x3x224x224:8x3x224x224:32x3x224x224") from None
    try:
        return name, ShapeProfile(lo, opt, hi)
    except ValueError as err:
        raise EngineBuildError(f"--shape {text!r}: {err}") from err


# -- ONNX inspection ---------------------------------------------------------------


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


# -- the cache ---------------------------------------------------------------------


class EngineCache:
    """Plans on disk as ``<key>.plan`` with a ``<key>.json`` beside it; writes are atomic."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def plan_path(self, key: str) -> Path:
        return self.root / f"{key}.plan"

    def get(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        plan_path, meta_path = self.plan_path(key), self.root / f"{key}.json"
        try:
            plan = plan_path.read_bytes()
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("plan_sha256") != hashlib.sha256(plan).hexdigest():
            # A torn or tampered entry: rebuild rather than hand TensorRT a bad plan.
            logger.warning("engine cache entry %s does not match its checksum; rebuilding", plan_path)
            return None
        return plan, meta

    def put(self, key: str, plan: bytes, meta: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {**meta, "plan_sha256": hashlib.sha256(plan).hexdigest(), "plan_bytes": len(plan)}
        path = self.plan_path(key)
        # Plan first, metadata second: an entry without (matching) metadata is a miss.
        _write_atomic(path, plan)
        _write_atomic(self.root / f"{key}.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        return path


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- TensorRT ------------------------------------------------------------------------


def resolve_target(trt: _trt.TensorRT, target: str) -> str:
    """The concrete compute capability a build is for (``"current"`` becomes the GPU's)."""
    t = parse_target(target)
    if t != "current":
        if not trt.is_rtx:
            raise EngineBuildError(
                f"{trt.flavour} {trt.version} builds only for the GPU it runs on; target {t} needs TensorRT-RTX "
                f"(pip install tensorrt-rtx-cu13) or a build on that GPU with target 'current'")
        return t
    from engine_runtime import _cuda

    if not _cuda.available():
        raise EngineBuildError("target 'current' needs a visible GPU; on a machine without one, name the "
                               "compute capability to build for, e.g. --compute-capability sm86 (TensorRT-RTX)")
    err, props = _cuda.runtime().cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise EngineBuildError(f"cannot read the GPU's compute capability: {err}")
    return f"sm{props.major}{props.minor}"


def _set_target(trt: _trt.TensorRT, config: Any, target: str, requested: str) -> None:
    if not trt.is_rtx:
        return  # full TensorRT always targets the GPU present
    caps = trt.module.ComputeCapability
    name = "CURRENT" if requested == "current" else target.upper()
    cap = getattr(caps, name, None)
    if cap is None:
        valid = sorted(n.lower() for n in caps.__members__ if n.startswith("SM"))
        raise EngineBuildError(f"{trt.flavour} {trt.version} cannot build for {target}; it supports {valid}")
    config.num_compute_capabilities = 1
    if not config.set_compute_capability(cap, 0):
        raise EngineBuildError(f"{trt.flavour} refused compute capability {target}")


def _progress_monitor(trt: _trt.TensorRT) -> Any:
    """A tqdm bar per build phase, nested as TensorRT nests them; None if unsupported."""
    base = getattr(trt.module, "IProgressMonitor", None)
    if base is None:
        return None
    from tqdm import tqdm

    class TqdmProgress(base):
        def __init__(self) -> None:
            base.__init__(self)
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, unit="step",
                                          position=len(self._bars), leave=parent_phase is None)

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.n = min(step + 1, bar.total or step + 1)
                bar.refresh()
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return TqdmProgress()


def _build_plan(trt: _trt.TensorRT, onnx_bytes: bytes, profiles: Mapping[str, ShapeProfile],
                precision: Precision, target: str, requested_target: str, progress: bool,
                onnx_path: Path | None, refittable: bool = False) -> bytes:
    mod = trt.module
    log = _trt.make_logger(trt)
    builder = mod.Builder(log)
    if builder is None:
        raise EngineBuildError("TensorRT could not create a builder: " + "; ".join(log.take_errors()))
    network = builder.create_network(0)
    parser = mod.OnnxParser(network, log)
    ok = parser.parse_from_file(str(onnx_path)) if onnx_path is not None else parser.parse(onnx_bytes)
    if not ok:
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{trt.flavour} could not parse the ONNX model: {errors or log.take_errors()}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profiles):
        raise EngineBuildError(f"profiles are given for inputs {sorted(profiles)}, but the model's inputs are {sorted(names)}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in names:
        p = profiles[name]
        network_rank = len(network.get_input(names.index(name)).shape)
        if len(p.min) != network_rank:
            raise EngineBuildError(f"profile for {name!r} has rank {len(p.min)}, the model's input has rank {network_rank}")
        profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    _set_precision(trt, config, onnx_bytes, precision)
    _set_target(trt, config, target, requested_target)
    if refittable:
        _set_refittable(trt, config)
    if progress:
        monitor = _progress_monitor(trt)
        if monitor is not None:
            config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{trt.flavour} {trt.version} failed to build for {target}: "
                               + " | ".join(log.take_errors() or ["no error logged"]))
    return bytes(plan)


def _set_precision(trt: _trt.TensorRT, config: Any, onnx_bytes: bytes, precision: Precision) -> None:
    graph = onnx_precision(onnx_bytes)
    if graph is None or graph is precision:
        return
    flag = {Precision.FP16: "FP16", Precision.BF16: "BF16"}.get(precision)
    builder_flag = getattr(trt.module.BuilderFlag, flag, None) if flag else None
    if builder_flag is None:
        # Strongly typed (TensorRT-RTX always; full TensorRT without the weak-typing flags):
        # TensorRT keeps the graph's types, so the precision must be in the graph already.
        raise EngineBuildError(
            f"{trt.flavour} {trt.version} builds strongly typed networks: the ONNX graph's weights are "
            f"{graph.value}, so it cannot build a {precision.value} engine from it; export the model in "
            f"{precision.value} (build_from_module / --arch does this) or build with precision {graph.value}")
    config.set_flag(builder_flag)


def _set_refittable(trt: _trt.TensorRT, config: Any) -> None:
    """REFIT: the plan keeps its weights replaceable in place (``TensorRTEngine.update_weights``)."""
    flag = getattr(trt.module.BuilderFlag, "REFIT", None)
    if flag is None:
        raise EngineBuildError(f"{trt.flavour} {trt.version} has no REFIT builder flag: it cannot build "
                               f"refittable engines; build without refittable and redeploy to change weights")
    config.set_flag(flag)


def _default_progress() -> bool:
    return sys.stderr.isatty()


def build_from_onnx(
    onnx: str | os.PathLike[str] | bytes,
    *,
    profiles: Mapping[str, ShapeProfile],
    precision: Precision | str | None = None,
    target: str = "current",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    refittable: bool = False,
) -> BuildResult:
    """Build (or fetch from ``cache_dir``) a plan for an ONNX model.

    ``precision`` None means the graph's own (strongly typed builds keep it anyway).
    External-data ONNX files are parsed from their path, but only the ``.onnx`` file
    itself goes into the cache key.
    """
    onnx_path = None if isinstance(onnx, (bytes, bytearray)) else Path(onnx)
    try:
        onnx_bytes = bytes(onnx) if onnx_path is None else onnx_path.read_bytes()
    except OSError as err:
        raise EngineBuildError(f"cannot read ONNX model {onnx_path}: {err}") from err
    prec = Precision.parse(precision) if precision is not None else (onnx_precision(onnx_bytes) or Precision.FP32)
    return _build_cached(onnx_digest(onnx_bytes), lambda: onnx_bytes, profiles=profiles, precision=prec,
                         target=target, cache_dir=cache_dir, progress=progress, onnx_path=onnx_path,
                         refittable=refittable)


def build_from_module(
    module: Any,
    *,
    input_name: str,
    input_dtype: str,
    profile: ShapeProfile,
    output_name: str = "output",
    precision: Precision | str = Precision.FP32,
    target: str = "current",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    refittable: bool = False,
) -> BuildResult:
    """Export a single-input module to ONNX with a dynamic batch axis, then build it.

    The module is cast to ``precision`` before export (so strongly typed builds get the
    precision asked for); a floating-point input takes that type too, and callers then
    send tensors of it (``describe()`` of the engine says so).
    """
    prec = Precision.parse(precision)
    digest = module_digest(module, input_name=input_name, input_dtype=input_dtype, output_name=output_name)

    def export() -> bytes:
        return export_onnx(module, input_name=input_name, input_dtype=input_dtype, profile=profile,
                           output_name=output_name, precision=prec)

    return _build_cached(digest, export, profiles={input_name: profile}, precision=prec, target=target,
                         cache_dir=cache_dir, progress=progress, onnx_path=None, refittable=refittable)


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


def _build_cached(model_digest: str, get_onnx, *, profiles: Mapping[str, ShapeProfile], precision: Precision,
                  target: str, cache_dir: str | os.PathLike[str] | None, progress: bool | None,
                  onnx_path: Path | None, refittable: bool = False) -> BuildResult:
    trt = _trt.load()
    requested = parse_target(target)
    concrete = resolve_target(trt, requested)
    key = cache_key(model_digest, profiles, precision, trt.tag, concrete, refittable)
    cache = EngineCache(cache_dir) if cache_dir is not None else None
    t0 = time.perf_counter()
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            plan, meta = hit
            logger.info("engine cache hit %s (%.1f MiB)", key, len(plan) / MiB)
            return BuildResult(plan, key, True, time.perf_counter() - t0, cache.plan_path(key), meta)
    onnx_bytes = get_onnx()
    plan = _build_plan(trt, onnx_bytes, profiles, precision, concrete, requested,
                       _default_progress() if progress is None else progress, onnx_path, refittable)
    seconds = time.perf_counter() - t0
    meta = {
        "key": key, "model": model_digest, "precision": precision.value, "target": concrete,
        "tensorrt": trt.tag, "profiles": {k: v.to_dict() for k, v in profiles.items()},
        "build_s": round(seconds, 3), "refittable": refittable,
    }
    logger.info("built %s engine for %s with %s in %.1f s (%.1f MiB)", precision.value, concrete, trt.tag,
                seconds, len(plan) / MiB)
    path = cache.put(key, plan, meta) if cache is not None else None
    return BuildResult(plan, key, False, seconds, path, meta)


# -- command line ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine_runtime.build",
                                description="Build a TensorRT engine from ONNX or a built-in architecture.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, help="an ONNX model file")
    src.add_argument("--arch", help="a built-in architecture (engine_runtime.architectures), e.g. resnet18")
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch of the profile")
    p.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT tunes for (default: max)")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of the profile")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=MIN:OPT:MAX",
                   help="a full profile for one ONNX input, dims joined by x (overrides the batch options)")
    p.add_argument("--precision", choices=[x.value for x in Precision], default=None,
                   help="fp32/fp16/bf16 (default: fp32 for --arch, the graph's own for --onnx)")
    p.add_argument("--compute-capability", "--target", dest="target", default="current",
                   help="GPU to build for: 'current' or e.g. sm86 (TensorRT-RTX builds ahead of time without a GPU)")
    p.add_argument("--image-size", type=int, default=224, help="image side for vision --arch")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for text --arch")
    p.add_argument("--seed", type=int, default=0, help="seed of the --arch weights")
    p.add_argument("--out", type=Path, default=None, help="also write the plan to this file")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("EBB_ENGINE_CACHE", "~/.cache/ebb/engines")),
                   help="engine cache directory (env EBB_ENGINE_CACHE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--refittable", action="store_true",
                   help="build with TensorRT's REFIT flag, so replicas can take new weights in place")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Our own progress at INFO; the exporter's libraries (onnxscript, onnx_ir) are chatty there.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("engine_runtime").setLevel(logging.INFO)
    opt = args.opt_batch or args.max_batch
    progress = not args.no_progress
    try:
        shapes = dict(parse_shape_arg(s) for s in args.shape)
        if args.onnx is not None:
            onnx_bytes = args.onnx.read_bytes()
            profiles = {**profiles_from_onnx(onnx_bytes, args.min_batch, opt, args.max_batch), **shapes}
            result = build_from_onnx(args.onnx, profiles=profiles, precision=args.precision, target=args.target,
                                     cache_dir=args.cache_dir, progress=progress, refittable=args.refittable)
        else:
            from engine_runtime.architectures import build as build_model

            model = build_model(args.arch, seed=args.seed, image_size=args.image_size, seq_len=args.seq_len)
            profile = shapes.get(model.input_name) or ShapeProfile(
                (args.min_batch, *model.sample_shape), (opt, *model.sample_shape),
                (args.max_batch, *model.sample_shape))
            result = build_from_module(model.module, input_name=model.input_name, input_dtype=model.input_dtype,
                                       profile=profile, output_name=model.output_name,
                                       precision=args.precision or Precision.FP32, target=args.target,
                                       cache_dir=args.cache_dir, progress=progress, refittable=args.refittable)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(args.out, result.plan)
    except (EbbError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    where = args.out or result.path
    print(f"{'cached' if result.cache_hit else 'built'} {result.key}: {len(result.plan) / MiB:.1f} MiB "
          f"in {result.build_s:.2f} s -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
