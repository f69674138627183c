"""Every out-of-memory path of a call surfaces as ``ContextMemoryUnavailable`` (HTTP 503
with ``Retry-After``), never as a bare ``RuntimeError`` (HTTP 500).

Under pressure the device can run out *outside* the context lease: PyTorch's caching
allocator (an eager fallback, a host->device copy, a reduction's scalar), a CUDA
graph's first launch, a lazy load on a full card. Each is injected here and must
reach the caller as a lack of memory in time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import RecordingEngine
from torch import nn

from deployments.protocol import http_status_for
from engine_runtime.backends.pytorch import PyTorchEngine
from engine_runtime.errors import (
    ContextMemoryUnavailable,
    EbbInternalError,
    is_out_of_memory,
)
from engine_runtime.spec import ShapeProfile


class _FailingFirst(nn.Module):
    """Raises ``error`` on the first ``times`` forwards, then doubles its input."""

    def __init__(self, error: BaseException, times: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.error, self.times = error, times

    def forward(self, x):
        if self.times > 0:
            self.times -= 1
            raise self.error
        return x * 2


OOMS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
                           "139.81 GiB of which 4.00 MiB is free."),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
]


@pytest.mark.parametrize("err", OOMS, ids=["torch-oom", "cuda-error", "cublas-alloc"])
def test_out_of_memory_in_a_pytorch_call_is_a_503(err):
    module = _FailingFirst(err, times=0)
    engine = PyTorchEngine("m", module, input_name="x", input_dtype="float32",
                           profile=ShapeProfile((1, 4), (2, 4), (4, 4)), output_shape=(4,), device="cpu",
                           mode="dynamic")
    try:
        engine.warm()
        module.times = 1
        x = np.ones((2, 4), np.float32)
        with pytest.raises(ContextMemoryUnavailable) as got:
            engine.infer({"x": x})
        assert got.value.__cause__ is err and "device out of memory" in got.value.where
        status, _, headers = http_status_for(got.value)
        assert status == 503 and "Retry-After" in headers
        assert engine.stats().calls_unavailable == 1 and engine.stats().calls_failed == 0
        # Nothing stuck: the next call runs.
        np.testing.assert_array_equal(engine.infer({"x": x})["output"], x * 2)
    finally:
        engine.close()


def test_out_of_memory_while_loading_lazily_is_a_503_and_the_next_call_loads():
    class OomOnLoad(RecordingEngine):
        fail = True

        def _load_impl(self):
            if self.fail:
                self.fail = False
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 98.00 MiB")
            super()._load_impl()

    engine = OomOnLoad(mode="static")
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ContextMemoryUnavailable):
        engine.infer({"x": x})
    assert not engine.loaded
    assert engine.infer({"x": x})["y"].shape == (2, 4)
    engine.close()


def test_other_errors_stay_what_they_are():
    err = RuntimeError("shape mismatch in matmul")
    engine = RecordingEngine(hook=lambda e, mode: (_ for _ in ()).throw(err))
    with pytest.raises(RuntimeError) as got:
        engine.infer({"x": np.ones((1, 4), np.float32)})
    assert got.value is err
    assert http_status_for(got.value)[0] == 500
    engine.close()


@pytest.mark.parametrize("exc, oom", [
    *[(e, True) for e in OOMS],
    (type("CudaError", (EbbInternalError,), {"oom": True})("cuMemCreate failed"), True),
    (EbbInternalError("arena is already mapped"), False),
    (ContextMemoryUnavailable(1, 0), False),
    (ValueError("CUDA error: out of memory"), False),  # only the types CUDA's errors come as
    (RuntimeError("expected scalar type Float"), False),
])
def test_is_out_of_memory_table(exc, oom):
    assert is_out_of_memory(exc) is oom
