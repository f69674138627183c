"""The CUDA stack limit (set first, refused once graphs were captured) and the process floor, no GPU.

CUDA's runtime is replaced by a stand-in that keeps the limit, so the order of calls
and the refusal are checked here; the GPU test checks the real limit and outputs.
"""

from __future__ import annotations

import enum
import types

import pytest

from engine_runtime import StackLimitError, _cuda, cuda_process, set_cuda_stack_limit


class FakeRuntime:
    class cudaLimit(enum.Enum):
        cudaLimitStackSize = 0

    def __init__(self) -> None:
        self.limit = 1024
        self.sets: list[int] = []

    def cudaGetDevice(self):
        return 0, 0

    def cudaSetDevice(self, index):
        return (0,)

    def cudaDeviceGetLimit(self, which):
        assert which is self.cudaLimit.cudaLimitStackSize
        return 0, self.limit

    def cudaDeviceSetLimit(self, which, value):
        assert which is self.cudaLimit.cudaLimitStackSize
        self.sets.append(value)
        self.limit = value
        return (0,)


@pytest.fixture
def runtime(monkeypatch):
    rt = FakeRuntime()
    monkeypatch.setattr(_cuda, "runtime", lambda: rt)
    cuda_process._reset_for_tests()
    yield rt
    cuda_process._reset_for_tests()


def test_set_returns_the_previous_value_and_sets_the_new(runtime):
    assert set_cuda_stack_limit(256) == 1024
    assert runtime.limit == 256
    assert cuda_process.get_cuda_stack_limit() == 256
    assert set_cuda_stack_limit() == 256  # the default is the measured 256
    assert cuda_process.DEFAULT_STACK_LIMIT_BYTES == 256


def test_refused_once_graphs_were_captured_and_the_limit_untouched(runtime):
    set_cuda_stack_limit(512)
    cuda_process.note_graphs_captured(3)
    with pytest.raises(StackLimitError) as info:
        set_cuda_stack_limit(256)
    assert runtime.limit == 512 and runtime.sets == [512]
    msg = str(info.value)
    assert "256" in msg and "512 bytes" in msg and "3 CUDA graph(s)" in msg
    assert info.value.requested_bytes == 256 and info.value.current_bytes == 512


def test_non_positive_limits_are_refused(runtime):
    with pytest.raises(StackLimitError, match="positive"):
        set_cuda_stack_limit(0)
    assert runtime.sets == []


def test_floor_is_none_without_a_gpu_and_not_measured_after_an_engine_loaded(monkeypatch):
    cuda_process._reset_for_tests()
    try:
        class NoNvml:
            def __init__(self):
                raise RuntimeError("no NVML here")

        monkeypatch.setattr(cuda_process, "ProcessMemory", NoNvml)
        assert cuda_process.process_floor_bytes() is None
        cuda_process.note_engine_loaded()
        monkeypatch.setattr(cuda_process, "ProcessMemory", lambda: types.SimpleNamespace(read=lambda: 1, source="x"))
        assert cuda_process.measure_process_floor() is None  # an engine is there: not a floor
    finally:
        cuda_process._reset_for_tests()
