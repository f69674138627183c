"""The command line: ``python -m engine_runtime.build`` (and ``ebb build``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from engine_runtime.build.builder import build_from_module, build_from_onnx
from engine_runtime.build.cache import _write_atomic
from engine_runtime.build.onnx_graph import profiles_from_onnx
from engine_runtime.build.precision import Precision
from engine_runtime.errors import EbbError, EngineBuildError
from engine_runtime.spec import ShapeProfile
from engine_runtime.units import MiB


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
