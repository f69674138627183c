"""TensorRTEngine against a stand-in of the TensorRT runtime API (``trt_fake``), no GPU.

Checks the dynamic-mode call sequence and its order, that nothing stays held between
dynamic calls, STATIC's default-strategy context, mode switches, input errors, plan
errors, and the import shim.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import trt_fake
from engine_runtime.backends import _trt
from engine_runtime.backends.tensorrt import TensorRTEngine
from engine_runtime.errors import (
    BatchTooLargeError,
    ContextMemoryUnavailable,
    EbbInternalError,
    EngineLoadError,
    InputDtypeError,
    InputShapeError,
    PlanIncompatibleError,
    UnknownInputError,
    WeightsUpdateError,
)
from engine_runtime.memory import ContextMechanism, MemoryMode

PER = trt_fake.PER_SAMPLE_BYTES


@pytest.fixture
def world(monkeypatch):
    w = trt_fake.World()
    monkeypatch.setitem(sys.modules, "tensorrt", trt_fake.make_module(w))
    _trt.load.cache_clear()
    yield w
    _trt.load.cache_clear()


@pytest.fixture
def device(world):
    return trt_fake.FakeDevice(world)


def make_engine(device, mode=MemoryMode.DYNAMIC, plan=trt_fake.GOOD_PLAN) -> TensorRTEngine:
    return TensorRTEngine("fake", plan, mode=mode, device=device)


def x(batch: int, dtype=np.float32) -> np.ndarray:
    return np.arange(batch * 4, dtype=dtype).reshape(batch, 4)


def call_events(world: trt_fake.World, start: int) -> list[tuple]:
    return world.events[start:]


# -- the shim ----------------------------------------------------------------------


def test_shim_prefers_tensorrt_and_reports_flavour(world):
    t = _trt.load()
    assert (t.flavour, t.version, t.is_rtx) == ("tensorrt", "10.99.0-fake", False)
    assert t.tag == "tensorrt-10.99.0-fake"


def test_shim_falls_back_to_rtx(monkeypatch):
    fake = trt_fake.make_module(trt_fake.World())
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", fake)
    _trt.load.cache_clear()
    try:
        assert _trt.load().flavour == "tensorrt_rtx"
    finally:
        _trt.load.cache_clear()


def test_shim_without_any_tensorrt_is_a_clear_load_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    _trt.load.cache_clear()
    try:
        with pytest.raises(EngineLoadError, match="no TensorRT is importable.*tensorrt-rtx"):
            _trt.load()
    finally:
        _trt.load.cache_clear()


@pytest.mark.parametrize("trt_name,numpy_name", [("FLOAT", "float32"), ("HALF", "float16"), ("INT64", "int64")])
def test_dtype_mapping(trt_name, numpy_name):
    assert _trt.numpy_name(trt_fake.DataType[trt_name]) == numpy_name


def test_unsupported_dtype_names_the_supported_ones():
    with pytest.raises(EngineLoadError, match="FP8.*supported"):
        _trt.numpy_name(trt_fake.DataType.FP8)


# -- laziness and description ------------------------------------------------------


def test_constructing_touches_nothing(world, device):
    make_engine(device)
    assert world.events == []


def test_describe_deserialises_but_creates_no_context_stream_or_memory(world, device):
    engine = make_engine(device)
    desc = engine.describe()
    assert world.names() == ["runtime", "validity", "deserialize"]
    assert desc.input_names == ["input"] and desc.output_names == ["output"]
    assert desc.inputs[0].dtype == "float32" and desc.inputs[0].shape == (-1, 4)
    p = desc.profiles["input"]
    assert (p.min, p.opt, p.max) == ((1, 4), (4, 4), (8, 4))
    assert desc.weights_bytes == trt_fake.WEIGHTS_BYTES
    assert desc.extra["weights_bytes_source"] == "engine-stat"
    assert desc.extra["max_context_bytes"] == trt_fake.MAX_BATCH * PER
    assert desc.backend == "tensorrt" and not engine.loaded


def test_context_bytes_are_exact_for_the_shapes(world, device):
    engine = make_engine(device)
    assert engine.context_bytes({"input": (3, 4)}) == 3 * PER
    assert engine.context_bytes({"input": (8, 4)}) == 8 * PER


# -- dynamic mode ------------------------------------------------------------------


def test_dynamic_call_sequence_in_order(world, device):
    engine = make_engine(device)
    engine.warm()
    assert engine.mechanism is ContextMechanism.VMM_ARENA
    assert ("allocator", trt_fake.MAX_BATCH * PER) in world.events  # arena sized for the largest shapes
    start = len(world.events)
    out = engine.infer({"input": x(3)})
    np.testing.assert_array_equal(out["output"], trt_fake.expected(x(3)))
    ev = [e for e in call_events(world, start) if e[0] != "create_context"]
    assert ev == [
        ("set_input_shape", "input", (3, 4)),
        ("update_device_memory_size_for_shapes", 3 * PER),
        ("acquire", 3 * PER),  # exact bytes for batch 3, not the profile maximum
        ("set_device_memory", trt_fake.ARENA_BASE, 3 * PER),
        ("set_tensor_address", "input"),
        ("set_tensor_address", "output"),
        ("execute_async_v3", trt_fake.FakeStream.handle),  # queued, not run
        ("work_done", trt_fake.FakeStream.handle),  # the GPU finishes when the stream is synchronised
        ("synchronize", trt_fake.FakeStream.handle),
        ("release", 3 * PER),  # only after the stream has finished
    ]
    assert trt_fake.FakeStream.handle != 0  # never the legacy default stream
    assert ("create_context", "USER_MANAGED") in call_events(world, start)
    engine.close()


def test_nothing_stays_held_between_dynamic_calls(world, device):
    engine = make_engine(device)
    sizes = []
    for batch in (1, 8, 5, 2):
        engine.infer({"input": x(batch)})
        snap = engine.stats()
        assert snap.context_bytes_held == 0
        assert device.allocators[0].outstanding == 0
        sizes.append(snap.last_context_bytes)
    assert sizes == [PER, 8 * PER, 5 * PER, 2 * PER]
    snap = engine.stats()
    assert snap.acquisitions == 4 and snap.peak_context_bytes == 8 * PER and snap.calls_ok == 4
    assert world.live_strategies() == ["USER_MANAGED"]
    engine.close()
    assert device.allocators[0].closed


def test_failed_enqueue_still_synchronises_before_release(world, device):
    engine = make_engine(device)
    engine.warm()
    world.fail_enqueue = True
    start = len(world.events)
    with pytest.raises(EbbInternalError, match="execute_async_v3 failed"):
        engine.infer({"input": x(2)})
    names = [e[0] for e in call_events(world, start)]
    assert names.index("synchronize") < names.index("release")
    assert engine.stats().context_bytes_held == 0 and engine.stats().calls_failed == 1
    engine.close()


def test_torch_input_gives_torch_output(world, device):
    engine = make_engine(device)
    out = engine.infer({"input": torch.ones(2, 4)})
    assert isinstance(out["output"], torch.Tensor)
    assert torch.equal(out["output"], torch.full((2, trt_fake.OUT_FEATURES), 4.0))
    engine.close()


# -- static mode and switches ------------------------------------------------------


def test_static_uses_a_default_strategy_context_and_no_per_call_memory(world, device):
    engine = make_engine(device, mode=MemoryMode.STATIC)
    engine.warm()
    assert ("create_context", "STATIC") in world.events
    assert engine.stats().context_bytes_held == trt_fake.MAX_BATCH * PER
    start = len(world.events)
    np.testing.assert_array_equal(engine.infer({"input": x(4)})["output"], trt_fake.expected(x(4)))
    names = [e[0] for e in call_events(world, start)]
    assert "acquire" not in names and "set_device_memory" not in names
    assert "update_device_memory_size_for_shapes" not in names
    assert names.index("execute_async_v3") < names.index("synchronize")
    engine.close()
    assert engine.stats().context_bytes_held == 0


def test_switches_create_and_destroy_the_matching_context(world, device):
    engine = make_engine(device)
    engine.infer({"input": x(2)})
    assert world.live_strategies() == ["USER_MANAGED"]
    assert engine.set_mode("static") is MemoryMode.DYNAMIC
    assert world.live_strategies() == ["STATIC"]
    assert engine.stats().context_bytes_held == trt_fake.MAX_BATCH * PER
    engine.infer({"input": x(2)})
    assert engine.set_mode(MemoryMode.DYNAMIC) is MemoryMode.STATIC
    assert world.live_strategies() == []  # the static context (and its memory) is gone
    assert engine.stats().context_bytes_held == 0
    np.testing.assert_array_equal(engine.infer({"input": x(3)})["output"], trt_fake.expected(x(3)))
    assert world.live_strategies() == ["USER_MANAGED"]
    engine.close()
    assert world.live_strategies() == []


def test_using_mode_restores_the_previous_mode_even_on_error(world, device):
    engine = make_engine(device)
    engine.warm()
    with engine.using_mode("static") as mode:
        assert mode is MemoryMode.STATIC and engine.stats().context_bytes_held > 0
    assert engine.mode is MemoryMode.DYNAMIC and engine.stats().context_bytes_held == 0
    with pytest.raises(RuntimeError, match="boom"):
        with engine.using_mode(MemoryMode.STATIC):
            raise RuntimeError("boom")
    assert engine.mode is MemoryMode.DYNAMIC and engine.stats().context_bytes_held == 0
    engine.close()


def test_static_context_that_cannot_be_had_is_context_memory_unavailable(world, device):
    world.fail_static_context = True
    engine = make_engine(device)
    engine.warm()
    with pytest.raises(ContextMemoryUnavailable) as info:
        engine.set_mode("static")
    assert info.value.requested_bytes == trt_fake.MAX_BATCH * PER
    assert info.value.free_bytes == 123 * 2**20
    assert engine.mode is MemoryMode.DYNAMIC and engine.stats().context_bytes_held == 0
    engine.close()


# -- input errors ------------------------------------------------------------------


@pytest.mark.parametrize("inputs,error,fragments", [
    ({"images": x(2)}, UnknownInputError, ["'images'", "['input']"]),
    ({"input": x(2, np.float64)}, InputDtypeError, ["float32", "float64"]),
    ({"input": np.zeros((2, 5), np.float32)}, InputShapeError, ["[1..8, 4]", "[2, 5]"]),
    ({"input": np.zeros((2, 4, 1), np.float32)}, InputShapeError, ["rank 3", "expected 2"]),
    ({"input": x(9)}, BatchTooLargeError, ["batch 9", "maximum 8"]),
])
def test_input_errors_name_expected_and_got(world, device, inputs, error, fragments):
    engine = make_engine(device)
    with pytest.raises(error) as info:
        engine.infer(inputs)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "acquire" not in world.names()
    assert engine.stats().calls_invalid == 1
    engine.close()


# -- plan errors -------------------------------------------------------------------


def test_corrupt_plan_is_plan_incompatible_with_tensorrts_words_and_nothing_allocated(world, device):
    engine = make_engine(device, plan=b"\x00garbage")
    with pytest.raises(PlanIncompatibleError, match="magicTag") as info:
        engine.warm()
    assert "10.99.0-fake" in str(info.value) and "8 bytes" in str(info.value)
    assert not engine.loaded and engine._engine is None and engine._runtime is None
    assert device.streams == [] and device.allocators == [] and len(world.contexts) == 0
    assert engine.stats().context_bytes_held == 0
    engine.close()


def test_plan_for_another_gpu_is_refused_before_deserialising(world, device):
    engine = make_engine(device, plan=b"OTHERGPU" + trt_fake.GOOD_PLAN)
    with pytest.raises(PlanIncompatibleError, match="UNSUPPORTED_CC.*compute capability 9.0"):
        engine.describe()
    assert "deserialize" not in world.names()


def test_plan_file_is_read_from_a_path(world, device, tmp_path):
    path = tmp_path / "trt_fake.plan"
    path.write_bytes(trt_fake.GOOD_PLAN)
    engine = TensorRTEngine("fake", path, device=device)
    assert engine.describe().extra["plan_bytes"] == len(trt_fake.GOOD_PLAN)
    missing = TensorRTEngine("fake", tmp_path / "absent.plan", device=device)
    with pytest.raises(EngineLoadError, match="cannot read plan"):
        missing.describe()


def test_without_validity_query_deserialisation_decides(monkeypatch):
    w = trt_fake.World()
    monkeypatch.setitem(sys.modules, "tensorrt", trt_fake.make_module(w, with_validity=False))
    _trt.load.cache_clear()
    try:
        engine = make_engine(trt_fake.FakeDevice(w), plan=b"junk")
        with pytest.raises(PlanIncompatibleError, match="magicTag"):
            engine.describe()
    finally:
        _trt.load.cache_clear()


def test_no_gpu_is_a_clear_load_error(world):
    engine = make_engine(trt_fake.FakeDevice(world, available=False))
    with pytest.raises(EngineLoadError, match="no CUDA device is visible"):
        engine.infer({"input": x(1)})
    assert world.events == []


# -- weights updated in place (refit) --------------------------------------------


def test_refit_sequence_then_calls_use_new_weights(world, device):
    world.refittable = True
    engine = make_engine(device)
    np.testing.assert_array_equal(engine.infer({"input": x(2)})["output"], trt_fake.expected(x(2)))
    start = len(world.events)
    engine.update_weights({"scale": np.array([3.0], dtype=np.float32)})
    names = [e[0] for e in world.events[start:]]
    # All weights set before the refit, the stream drained before the engine changes.
    assert names == ["refitter", "set_named_weights", "synchronize", "refit_cuda_engine"]
    np.testing.assert_array_equal(engine.infer({"input": x(2)})["output"], trt_fake.expected(x(2), 3.0))
    # Contexts survive: the dynamic context made before the refit is the one used after.
    assert world.names().count("create_context") == 1
    engine.close()


def test_refit_of_a_plan_not_built_refittable_is_a_clear_error(world, device):
    engine = make_engine(device)
    with pytest.raises(WeightsUpdateError, match="not built refittable.*REFIT"):
        engine.update_weights({"scale": np.array([3.0], dtype=np.float32)})
    assert "refitter" not in world.names()
    np.testing.assert_array_equal(engine.infer({"input": x(1)})["output"], trt_fake.expected(x(1)))
    engine.close()


@pytest.mark.parametrize("weights, field", [
    ({"scale": np.array([3.0], dtype=np.float32), "bias": np.zeros(1, np.float32)}, "unexpected"),
    ({}, "missing"),
    ({"scale": np.array([3.0, 4.0], dtype=np.float32)}, "mismatched"),
    ({"scale": np.array([3.0], dtype=np.float64)}, "mismatched"),
])
def test_refused_refit_leaves_the_engine_unchanged(world, device, weights, field):
    world.refittable = True
    engine = make_engine(device)
    with pytest.raises(WeightsUpdateError) as err:
        engine.update_weights(weights)
    assert getattr(err.value, field)
    assert "refit_cuda_engine" not in world.names()
    np.testing.assert_array_equal(engine.infer({"input": x(1)})["output"], trt_fake.expected(x(1)))
    engine.close()


def test_refit_accepts_torch_tensors(world, device):
    world.refittable = True
    engine = make_engine(device)
    engine.update_weights({"scale": torch.tensor([0.5])})
    np.testing.assert_array_equal(engine.infer({"input": x(2)})["output"], trt_fake.expected(x(2), 0.5))
    engine.close()


# -- the stand-in catches what a GPU would not say ------------------------------------------


def test_outputs_have_the_engine_s_shape_not_the_input_s(world, device):
    engine = make_engine(device)
    desc = engine.describe()
    assert desc.outputs[0].shape == (-1, trt_fake.OUT_FEATURES) and desc.inputs[0].shape == (-1, trt_fake.IN_FEATURES)
    assert engine.infer({"input": x(5)})["output"].shape == (5, trt_fake.OUT_FEATURES)
    engine.close()


def test_a_release_before_the_stream_finished_is_caught(world, device, monkeypatch):
    """The backend's order (synchronise, then release) matters: skipping the synchronise
    must fail, which a synchronous stand-in could never show."""
    engine = make_engine(device)
    engine.warm()
    monkeypatch.setattr(device, "synchronize", lambda stream: None)  # the bug: no wait for the GPU
    with pytest.raises(trt_fake.StreamRaceError, match="released while queued work uses it"):
        engine.infer({"input": x(2)})
    assert ("release", 2 * PER) not in world.events
    monkeypatch.undo()
    device.synchronize(engine._stream)  # the GPU catches up; the engine can close
    engine.close()


def test_close_destroys_the_engine_s_stream_after_its_work(world, device):
    engine = make_engine(device)
    engine.infer({"input": x(1)})
    assert world.live_streams == {trt_fake.FakeStream.handle}
    engine.close()
    assert world.live_streams == set()
    names = world.names()
    assert names.index("destroy_stream") > max(i for i, n in enumerate(names) if n == "synchronize")


def test_close_releases_the_allocator_even_when_destroying_the_stream_fails(world, device, monkeypatch):
    engine = make_engine(device)
    engine.warm()

    def failing(stream):
        raise RuntimeError("cudaStreamDestroy failed (injected)")

    monkeypatch.setattr(device, "destroy_stream", failing)
    with pytest.raises(RuntimeError, match="injected"):
        engine.close()
    assert device.allocators[0].closed and engine.closed
