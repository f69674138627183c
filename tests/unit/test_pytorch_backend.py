"""The PyTorch backend on a CPU: real models, both modes, accounted context memory.

On a CPU, "context memory" is an accounted estimate (PyTorch's CPU allocator owns the
host memory); these tests check the accounting behaves as it does on a card, and that
the model's outputs do not depend on the mode.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from engine_runtime import ContextMechanism, ContextMemoryUnavailable, Engine, EngineClosedError, MemoryMode
from engine_runtime.backends.pytorch import PyTorchEngine, batch_buckets
from engine_runtime.errors import BatchTooLargeError, InputDtypeError, InputValueError

IMAGE = 32  # small images keep ResNet-18 fast on a 2-core machine
MAX_BATCH = 4
SEQ = 16


def _resnet(mode="dynamic", seed: int = 0, **kwargs) -> PyTorchEngine:
    return PyTorchEngine.from_architecture("r18", "resnet18", max_batch=MAX_BATCH, image_size=IMAGE,
                                           seed=seed, mode=mode, device="cpu", **kwargs)


def _bert(mode="dynamic", seed: int = 0) -> PyTorchEngine:
    return PyTorchEngine.from_architecture("bt", "bert-tiny", max_batch=MAX_BATCH, seq_len=SEQ,
                                           seed=seed, mode=mode, device="cpu")


def _images(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, IMAGE, IMAGE), dtype=np.float32)


def _tokens(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 30522, (batch, SEQ), dtype=np.int64))


@contextlib.contextmanager
def _closing(*engines):
    try:
        yield engines if len(engines) > 1 else engines[0]
    finally:
        for e in engines:
            e.close()


@pytest.mark.parametrize(
    "lo, hi, expected",
    [(1, 1, [1]), (1, 8, [1, 2, 4, 8]), (1, 32, [1, 2, 4, 8, 16, 32]), (1, 100, [1, 2, 4, 8, 16, 32, 64, 100]),
     (3, 10, [4, 8, 10]), (5, 6, [6]), (32, 32, [32])],
)
def test_batch_buckets(lo, hi, expected):
    buckets = batch_buckets(lo, hi)
    assert buckets == expected
    # Every allowed batch has a bucket at least as large.
    assert all(any(b >= n for b in buckets) for n in range(lo, hi + 1))


def test_description_without_loading():
    with _closing(_resnet()) as eng:
        assert isinstance(eng, Engine)
        desc = eng.describe()
        assert not eng.loaded
        assert desc.input_names == ["input"] and desc.output_names == ["output"]
        assert desc.inputs[0].shape == (-1, 3, IMAGE, IMAGE)
        assert desc.max_batch == MAX_BATCH
        params = sum(p.numel() for p in eng._module_cpu().parameters())
        assert 11_000_000 < params < 12_000_000  # ResNet-18
        assert desc.weights_bytes >= params * 4
        assert eng.mechanism is ContextMechanism.HOST_ACCOUNTING
        per_one = eng.context_bytes({"input": (1, 3, IMAGE, IMAGE)})
        assert per_one > 0
        assert eng.context_bytes({"input": (3, 3, IMAGE, IMAGE)}) == 3 * per_one
        assert not eng.loaded


def test_resnet_static_and_dynamic_outputs_equal():
    x = _images(MAX_BATCH)
    with _closing(_resnet("static"), _resnet("dynamic")) as (static, dynamic):
        a = static.infer({"input": x})["output"]
        b = dynamic.infer({"input": x})["output"]
        assert a.shape == (MAX_BATCH, 1000)
        np.testing.assert_array_equal(a, b)
        # One engine switched between modes gives the same answer too.
        with static.using_mode("dynamic"):
            np.testing.assert_array_equal(static.infer({"input": x})["output"], a)
        assert static.mode is MemoryMode.STATIC


def test_partial_batch_matches_the_full_batch_rows():
    x = _images(MAX_BATCH)
    with _closing(_resnet()) as eng:
        full = eng.infer({"input": x})["output"]
        part = eng.infer({"input": x[:3]})["output"]
        np.testing.assert_allclose(part, full[:3], rtol=1e-4, atol=1e-4)


def test_outputs_deterministic_for_a_seed():
    x = _images(2)
    with _closing(_resnet(seed=7), _resnet(seed=7), _resnet(seed=8)) as (a, b, c):
        out_a = a.infer({"input": x})["output"]
        np.testing.assert_array_equal(out_a, b.infer({"input": x})["output"])
        np.testing.assert_array_equal(out_a, a.infer({"input": x})["output"])
        assert not np.allclose(out_a, c.infer({"input": x})["output"])


def test_bert_tiny_encoder():
    with _closing(_bert("static"), _bert("dynamic")) as (static, dynamic):
        desc = static.describe()
        assert desc.inputs[0].dtype == "int64" and desc.inputs[0].shape == (-1, SEQ)
        ids = _tokens(3)
        out = static.infer({"input_ids": ids})["output"]
        assert isinstance(out, torch.Tensor)
        assert out.shape == (3, 128)
        assert torch.isfinite(out).all()
        assert out.abs().max() <= 1.0  # tanh-pooled
        torch.testing.assert_close(dynamic.infer({"input_ids": ids})["output"], out, rtol=0, atol=0)
        with pytest.raises(InputDtypeError, match="expected dtype int64, got float32"):
            static.infer({"input_ids": ids.float()})
        # Token ids outside the vocabulary are the caller's mistake, refused before the
        # embedding (on a GPU an out-of-range index would be a device-side assert).
        assert desc.inputs[0].value_range == (0, 30521)
        for bad in (-1, 30522):
            with pytest.raises(InputValueError, match="values must lie in 0..30521"):
                static.infer({"input_ids": torch.full((1, SEQ), bad, dtype=torch.int64)})


def test_numpy_in_numpy_out_torch_in_torch_out():
    x = _images(2)
    with _closing(_resnet()) as eng:
        out_np = eng.infer({"input": x})["output"]
        out_t = eng.infer({"input": torch.from_numpy(x)})["output"]
        assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
        assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
        np.testing.assert_array_equal(out_t.numpy(), out_np)


def test_dynamic_accounts_context_only_during_calls():
    with _closing(_resnet()) as eng:
        eng.warm()
        seen: list[int] = []
        eng._module_cpu().register_forward_hook(lambda m, i, o: seen.append(eng.stats().context_bytes_held))
        assert eng.stats().context_bytes_held == 0
        eng.infer({"input": _images(3)})
        expected = eng.context_bytes({"input": (3, 3, IMAGE, IMAGE)})
        assert seen == [expected] and expected > 0
        snap = eng.stats()
        assert snap.context_bytes_held == 0
        assert snap.peak_context_bytes == expected and snap.acquisitions == 1
        assert snap.weights_bytes == eng.describe().weights_bytes


def test_static_holds_context_for_the_largest_batch():
    with _closing(_resnet("static")) as eng:
        eng.warm()
        held = eng.stats().context_bytes_held
        assert held == eng.context_bytes({"input": (MAX_BATCH, 3, IMAGE, IMAGE)}) > 0
        eng.infer({"input": _images(1)})
        assert eng.stats().context_bytes_held == held
        eng.set_mode("dynamic")
        assert eng.stats().context_bytes_held == 0


def test_refused_admission_on_the_pytorch_backend():
    class Refuse:
        @contextlib.contextmanager
        def reserve(self, nbytes, deadline_s):
            raise ContextMemoryUnavailable(nbytes, 0, deadline_s)
            yield  # pragma: no cover

    with _closing(_resnet(admission=Refuse(), admission_deadline_s=0.0)) as eng:
        with pytest.raises(ContextMemoryUnavailable) as info:
            eng.infer({"input": _images(2)})
        assert info.value.requested_bytes == eng.context_bytes({"input": (2, 3, IMAGE, IMAGE)})
        snap = eng.stats()
        assert snap.calls_unavailable == 1 and snap.context_bytes_held == 0


def test_batch_over_max_and_close():
    eng = _resnet()
    with pytest.raises(BatchTooLargeError, match=f"over the profile's maximum {MAX_BATCH}"):
        eng.infer({"input": _images(MAX_BATCH + 1)})
    assert not eng.loaded
    eng.infer({"input": _images(1)})
    eng.close()
    eng.close()
    with pytest.raises(EngineClosedError):
        eng.infer({"input": _images(1)})
    assert eng.stats().context_bytes_held == 0


# -- weights updated in place ------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_update_weights_switches_answers_in_place(mode):
    from engine_runtime.architectures import build

    old, reference = _bert(mode, seed=0), _bert(mode, seed=1)
    tokens = _tokens(2)
    before = old.infer({"input_ids": tokens})["output"].clone()
    params_before = {n: p.data_ptr() for n, p in old._module.named_parameters()}
    old.update_weights(build("bert-tiny", seed=1, seq_len=SEQ).module.state_dict())
    after = old.infer({"input_ids": tokens})["output"]
    torch.testing.assert_close(after, reference.infer({"input_ids": tokens})["output"])
    assert not torch.allclose(before, after)
    # Same tensors, new values: what a captured CUDA graph needs.
    assert {n: p.data_ptr() for n, p in old._module.named_parameters()} == params_before
    old.close()
    reference.close()


def test_refused_weights_update_names_every_problem_and_changes_nothing():
    from engine_runtime.errors import WeightsUpdateError

    engine = _bert()
    tokens = _tokens(1)
    before = engine.infer({"input_ids": tokens})["output"].clone()
    bad = dict(engine._module.state_dict())
    first, second = list(bad)[:2]
    del bad[first]
    bad[second] = torch.zeros(3)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsUpdateError) as err:
        engine.update_weights(bad)
    assert (err.value.missing, err.value.unexpected) == ([first], ["extra.weight"])
    assert err.value.mismatched[0].startswith(second)
    torch.testing.assert_close(engine.infer({"input_ids": tokens})["output"], before)
    engine.close()
