"""The TensorRT builder: ONNX bytes and profiles in, a (cached) serialized plan out.

Targets: the GPU present (``"current"``) or, with TensorRT-RTX, any supported compute
capability ahead of time on a machine without a GPU (``"sm86"``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine_runtime.backends import _trt
from engine_runtime.build.cache import BuildResult, EngineCache, cache_key, module_digest, onnx_digest
from engine_runtime.build.onnx_graph import export_onnx, onnx_precision
from engine_runtime.build.precision import Precision
from engine_runtime.errors import EngineBuildError
from engine_runtime.spec import ShapeProfile
from engine_runtime.units import MiB

logger = logging.getLogger(__name__)


def parse_target(target: str) -> str:
    """``"sm86"``, ``"8.6"``, ``"86"`` -> ``"sm86"``; ``"current"`` stays."""
    t = str(target).strip().lower()
    if t == "current":
        return t
    digits = t.removeprefix("sm").removeprefix("_").replace(".", "")
    if not digits.isdigit() or len(digits) < 2:
        raise EngineBuildError(f"unknown target {target!r}; expected 'current' or a compute capability like sm86 or 8.6")
    return f"sm{digits}"


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
