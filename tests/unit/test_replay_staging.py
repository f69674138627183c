"""The graph path's per-call pieces made once (issue 14), run on the CPU with stand-ins
for the stream and the graph: pinned staging in and out, the NaN check's reused
scalar, and the bucket found by bisection. The same code runs on the GPU in
tests/gpu/test_pytorch_gpu.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine_runtime.backends._pytorch_graphs import _Bucket
from engine_runtime.backends.pytorch import PyTorchEngine
from engine_runtime.errors import EbbInternalError, InputValueError


class _Stream:
    def synchronize(self) -> None:
        pass


class _Graph:
    """Replays "output = 2 * the first 10 input values", reading the static input."""

    def __init__(self, bucket: _Bucket) -> None:
        self.bucket = bucket

    def replay(self) -> None:
        self.bucket.static_output.copy_(self.bucket.static_input.flatten(1)[:, :10] * 2)


@pytest.fixture
def engine_and_bucket(monkeypatch):
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    engine = PyTorchEngine.from_architecture("t", "resnet18", max_batch=4, image_size=32, device="cpu")
    engine._stream = _Stream()
    static_in, static_out = torch.zeros(4, 3, 32, 32), torch.zeros(4, 10)
    bucket = _Bucket(4, None, static_in, static_out, None, 0, 0, host_input=torch.empty_like(static_in),
                     host_output=torch.empty_like(static_out), check_sum=torch.empty(()))
    bucket.graph = _Graph(bucket)
    engine._bucket_list, engine._bucket_sizes = [bucket], [4]
    return engine, bucket


def test_replay_stages_through_reused_buffers_and_returns_a_copy(engine_and_bucket):
    engine, bucket = engine_and_bucket
    x = torch.rand(2, 3, 32, 32)
    first = engine._replay(bucket, x)
    torch.testing.assert_close(first, x.flatten(1)[:, :10] * 2)
    assert first.data_ptr() != bucket.host_output.data_ptr()
    engine._replay(bucket, torch.rand(2, 3, 32, 32))  # the next call reuses the staging...
    torch.testing.assert_close(first, x.flatten(1)[:, :10] * 2)  # ...and leaves the first answer alone


def test_replay_refuses_nan_through_the_reused_scalar(engine_and_bucket):
    engine, bucket = engine_and_bucket
    x = torch.rand(1, 3, 32, 32)
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(InputValueError, match="NaN"):
        engine._replay(bucket, x)


def test_bucket_by_bisection(engine_and_bucket):
    engine, bucket = engine_and_bucket
    assert engine._bucket_for(1) is bucket and engine._bucket_for(4) is bucket
    with pytest.raises(EbbInternalError, match="above every bucket"):
        engine._bucket_for(5)


#: What the padding rows held before the call: memory the context pool last lent to
#: another process (an out-of-range token id for an embedding, a huge pixel for an image).
GARBAGE = 10**9
VOCAB = 30522


class _WatchingGraph(_Graph):
    """Records the static input every replay reads, whole (padding rows included), and
    refuses an id outside the vocabulary as BERT's embedding kernel does: with a
    device-side assert (on the GPU that poisons the whole CUDA context)."""

    def __init__(self, bucket: _Bucket) -> None:
        super().__init__(bucket)
        self.seen: list[torch.Tensor] = []

    def replay(self) -> None:
        static_input = self.bucket.static_input
        self.seen.append(static_input.clone())
        if not static_input.dtype.is_floating_point and bool((static_input >= VOCAB).any()):
            raise RuntimeError("CUDA error: device-side assert triggered")
        super().replay()


@pytest.mark.parametrize(("dtype", "shape"), [(torch.float32, (3, 32, 32)), (torch.int64, (16,))],
                         ids=["image", "token-ids"])
def test_a_batch_below_its_bucket_replays_on_zeroed_padding_rows(engine_and_bucket, dtype, shape):
    """The graph runs on every row of its bucket: rows past the call's batch must hold a
    valid value (0) at the replay, not what the arena window's memory held before."""
    engine, _ = engine_and_bucket
    static_in = torch.full((4, *shape), GARBAGE, dtype=dtype)
    static_out = torch.zeros(4, 10)
    bucket = _Bucket(4, None, static_in, static_out, None, 0, 0, host_input=torch.empty_like(static_in),
                     host_output=torch.empty_like(static_out),
                     check_sum=torch.empty((), dtype=dtype) if dtype.is_floating_point else None)
    bucket.graph = graph = _WatchingGraph(bucket)
    x = torch.rand(1, *shape) if dtype.is_floating_point else torch.randint(0, VOCAB, (1, *shape))
    out = engine._replay(bucket, x)  # on the garbage ids, the stand-in kernel asserts
    (seen,) = graph.seen
    torch.testing.assert_close(seen[:1], x)
    assert bool((seen[1:] == 0).all()), "padding rows replayed with what the window held before"
    torch.testing.assert_close(out, (x.flatten(1)[:, :10] * 2).float())
    bucket.static_input.fill_(GARBAGE)  # memory lent elsewhere between calls
    engine._replay(bucket, x.repeat(3, *([1] * len(shape))))
    assert bool((graph.seen[-1][3:] == 0).all()) and bool((graph.seen[-1][:3] != 0).any())
