"""Real TensorRT-RTX engines built on this CPU-only machine, ahead of time for sm86.

No mocks: a small torch model goes through the ONNX exporter and TensorRT-RTX's
builder; the cache is a temporary directory. Loading the plan here must fail with an
Ebb error, since deserialising needs a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from engine_runtime import _cuda
from engine_runtime.backends import _trt
from engine_runtime.backends.tensorrt import CudaDevice, TensorRTEngine
from engine_runtime.build import (
    Precision,
    build_from_module,
    build_from_onnx,
    cache_key,
    export_onnx,
    main,
    onnx_precision,
    profiles_from_onnx,
)
from engine_runtime.errors import EngineBuildError, EngineLoadError, PlanIncompatibleError
from engine_runtime.spec import ShapeProfile

TARGET = "sm86"
PROFILE = ShapeProfile((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def rtx():
    trt = _trt.load()
    if not trt.is_rtx:
        pytest.skip(f"{trt.tag} is installed: it builds only for the GPU present, not ahead of time")
    return trt


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def onnx_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "trt_tiny.onnx"
    path.write_bytes(export_onnx(tiny, input_name="input", input_dtype="float32", profile=PROFILE))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def built(rtx, tiny, cache_dir):
    """One export and build per module: exporting is the slow part (seconds)."""
    return build_from_module(tiny, input_name="input", input_dtype="float32", profile=PROFILE,
                             target=TARGET, cache_dir=cache_dir, progress=False)


def test_module_to_engine_then_cache_hit(rtx, tiny, built, cache_dir):
    first = built
    assert not first.cache_hit and len(first.plan) > 10_000
    assert first.path is not None and first.path.read_bytes() == first.plan
    assert first.meta["target"] == TARGET and first.meta["tensorrt"] == rtx.tag
    t0 = time.perf_counter()
    second = build_from_module(tiny, input_name="input", input_dtype="float32", profile=PROFILE,
                               target=TARGET, cache_dir=cache_dir, progress=False)
    assert second.cache_hit and second.plan == first.plan and second.key == first.key
    assert time.perf_counter() - t0 < 1.0  # no export, no build: a file read and a hash


def test_fp16_module_build_is_its_own_engine(rtx, tiny, built, cache_dir):
    fp16 = build_from_module(tiny, input_name="input", input_dtype="float32", profile=PROFILE,
                             precision="fp16", target=TARGET, cache_dir=cache_dir, progress=False)
    assert fp16.key != built.key and not fp16.cache_hit and fp16.meta["precision"] == "fp16"
    assert {f"{built.key}.plan", f"{fp16.key}.plan"} <= {p.name for p in cache_dir.glob("*.plan")}


def test_onnx_cache_key_follows_profile_precision_and_target(rtx, onnx_file, tmp_path):
    other = ShapeProfile((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))
    a = build_from_onnx(onnx_file, profiles={"input": PROFILE}, target=TARGET, cache_dir=tmp_path, progress=False)
    b = build_from_onnx(onnx_file, profiles={"input": other}, target=TARGET, cache_dir=tmp_path, progress=False)
    c = build_from_onnx(onnx_file, profiles={"input": PROFILE}, target="sm89", cache_dir=tmp_path, progress=False)
    assert len({a.key, b.key, c.key}) == 3 and not (a.cache_hit or b.cache_hit or c.cache_hit)
    again = build_from_onnx(onnx_file, profiles={"input": PROFILE}, target="8.6", cache_dir=tmp_path, progress=False)
    assert again.cache_hit and again.plan == a.plan
    digest = a.meta["model"]
    assert cache_key(digest, {"input": PROFILE}, Precision.FP32, rtx.tag, TARGET) == a.key
    assert cache_key(digest, {"input": PROFILE}, Precision.FP16, rtx.tag, TARGET) != a.key


def test_strongly_typed_precision_is_refused_honestly(rtx, onnx_file):
    assert onnx_precision(onnx_file.read_bytes()) is Precision.FP32
    with pytest.raises(EngineBuildError, match="strongly typed.*fp32.*fp16"):
        build_from_onnx(onnx_file, profiles={"input": PROFILE}, precision="fp16", target=TARGET, progress=False)


def test_build_errors_name_what_is_wrong(rtx, onnx_file):
    with pytest.raises(EngineBuildError, match=r"inputs \['images'\].*\['input'\]"):
        build_from_onnx(onnx_file, profiles={"images": PROFILE}, target=TARGET, progress=False)
    with pytest.raises(EngineBuildError, match="cannot build for sm90.*sm86"):
        build_from_onnx(onnx_file, profiles={"input": PROFILE}, target="sm90", progress=False)
    with pytest.raises(EngineBuildError, match="not an ONNX model"):
        build_from_onnx(b"not onnx", profiles={"input": PROFILE}, target=TARGET, progress=False)


def test_command_line_builds_and_then_reads_the_cache(rtx, onnx_file, tmp_path, capsys):
    assert profiles_from_onnx(onnx_file.read_bytes(), 1, 4, 8) == {"input": PROFILE}
    out = tmp_path / "trt_tiny.plan"
    argv = ["--onnx", str(onnx_file), "--max-batch", "8", "--opt-batch", "4", "--compute-capability", TARGET,
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("built ") and out.stat().st_size > 10_000
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("cached ")
    assert main(["--onnx", str(onnx_file), "--compute-capability", "sm1"]) == 2
    assert "unknown target" in capsys.readouterr().err


@pytest.mark.skipif(_cuda.available(), reason="a GPU is visible: loading would succeed")
def test_loading_without_a_gpu_is_a_clear_ebb_error(rtx, built):
    plan = built.path
    engine = TensorRTEngine("tiny", plan)
    with pytest.raises(EngineLoadError, match="no CUDA device is visible"):
        engine.describe()
    assert not engine.loaded

    class PretendGpu(CudaDevice):
        """Skip Ebb's own check so TensorRT-RTX itself is asked, and must fail cleanly."""

        def available(self) -> bool:
            return True

        def scope(self):
            import contextlib

            return contextlib.nullcontext()

    for source in (plan, b"\x00" * 512):
        engine = TensorRTEngine("tiny", source, device=PretendGpu())
        with pytest.raises(PlanIncompatibleError, match=f"{rtx.flavour} .* cannot run here|refused plan"):
            engine.warm()
        assert engine._engine is None and engine._runtime is None and not engine.loaded
