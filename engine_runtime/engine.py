"""The engine interface every backend implements, and the lifecycle they share.

``Engine`` is the ``Protocol`` callers program against. ``BaseEngine`` is the
template (after Polygraphy's ``activate()``/``activate_impl()``): it owns lazy
initialisation, input checks, the call lock that makes mode switches wait for the
call in flight, the dynamic-mode acquisition sequence (admission, then memory, then
release in ``finally``) and the accounting. Backends fill in the ``_*_impl`` hooks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from engine_runtime.errors import (
    ContextMemoryUnavailable,
    EbbInternalError,
    EngineBrokenError,
    EngineClosedError,
    InvalidInputError,
    WeightsUpdateError,
    is_out_of_memory,
    sticky_cuda_error,
)
from engine_runtime._dynamic_call import DynamicCall
from engine_runtime.memory import ContextBlock, ContextMechanism, MemoryMode
from engine_runtime.memory.admission import Admission, UnboundedAdmission
from engine_runtime.spec import EngineDescription, check_finite, validate_inputs
from engine_runtime.stats import EngineStats, StatsSnapshot
from engine_runtime.units import MiB
from engine_runtime.weights_tier import TieredWeights, WeightsTier

logger = logging.getLogger(__name__)

Tensors = Mapping[str, Any]

@runtime_checkable
class Engine(Protocol):
    """What every backend offers. Nothing touches the GPU before ``warm()`` or the first call."""

    name: str

    def describe(self) -> EngineDescription: ...

    def context_bytes(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Bytes of context memory a call with these input shapes needs."""
        ...

    def infer(self, inputs: Tensors, *, deadline_s: float | None = None,
              finite_checked: bool = False, inputs_checked: bool = False) -> dict[str, Any]:
        """Named tensors in (numpy or torch), named tensors out (numpy for numpy input).

        ``deadline_s``: how long this call may wait for context memory (and for a call
        in flight on this engine) before ``ContextMemoryUnavailable``; default the
        engine's admission deadline. ``finite_checked``: the caller has already refused
        NaN and infinity in these inputs, so the engine skips its own host pass.
        ``inputs_checked``: the caller ran ``validate_inputs`` against this engine's
        description (names, dtypes, shapes, value ranges), so the engine does not again;
        NaN/inf then still follow ``finite_checked``."""
        ...

    @property
    def mode(self) -> MemoryMode: ...

    def set_mode(self, mode: MemoryMode | str) -> MemoryMode:
        """Switch after the call in flight finishes; return the previous mode."""
        ...

    def using_mode(self, mode: MemoryMode | str) -> contextlib.AbstractContextManager[MemoryMode]:
        """Switch for a ``with`` block and restore the previous mode on exit."""
        ...

    @property
    def mechanism(self) -> ContextMechanism: ...

    @property
    def loaded(self) -> bool: ...

    @property
    def broken(self) -> str | None:
        """Why the engine refuses every call (a sticky CUDA error's text), or None."""
        ...

    def stats(self) -> StatsSnapshot: ...

    def update_weights(self, weights: Mapping[str, Any]) -> None:
        """Replace the weights in place between two calls (all of them or none)."""
        ...

    def warm(self) -> None: ...

    @property
    def weights_tier(self) -> WeightsTier: ...

    def page_out_weights(self, host: bool = True) -> int:
        """Move the weights off the device (to host memory, or drop them with everything
        loaded when ``host`` is false) after the call in flight; return the device bytes freed."""
        ...

    def page_in_weights(self) -> float:
        """Bring the weights back onto the device (loading the engine if unloaded); return seconds."""
        ...

    def prepare_host_tier(self) -> None:
        """Allocate ahead what a page-out to host memory needs (may do nothing)."""
        ...

    def close(self) -> None: ...


class BaseEngine(TieredWeights, ABC):
    """Shared lifecycle. Subclasses implement the ``_*_impl`` hooks only."""

    def __init__(
        self,
        name: str,
        *,
        mode: MemoryMode | str = MemoryMode.DYNAMIC,
        admission: Admission | None = None,
        admission_deadline_s: float = 5.0,
        reject_non_finite: bool = True,
    ) -> None:
        self.name = name
        self._mode = MemoryMode.parse(mode)
        self.admission: Admission = admission or UnboundedAdmission()
        self.admission_deadline_s = admission_deadline_s
        self.reject_non_finite = reject_non_finite
        self._init_lock = threading.Lock()
        # One call at a time per engine: an execution context (TensorRT) or a captured
        # graph (PyTorch) is not re-entrant, and a mode switch must wait for the call
        # in flight so its memory is never pulled out from under it.
        self._call_lock = threading.RLock()
        self._loaded = False
        self._closed = False
        # The first sticky CUDA error's text once one happened (``broken``), else None.
        self._broken: str | None = None
        self._static_block: ContextBlock | None = None
        self._static_held = False
        self._stats = EngineStats()
        # When the call in flight must have its context memory by (monotonic seconds).
        self._call_deadline: float | None = None
        self._description: EngineDescription | None = None
        # Weights tiers: loaded with the weights in host memory (the device's given back).
        self._weights_on_host = False
        self._ever_loaded = False
        self._page_ins = 0
        self._page_outs = 0
        self._page_in_s = 0.0

    # -- public surface ---------------------------------------------------------

    @property
    def mode(self) -> MemoryMode:
        return self._mode

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def broken(self) -> str | None:
        """The first sticky CUDA error's text (``errors.sticky_cuda_error``) once a call
        met one, else None. A broken engine refuses every call with ``EngineBrokenError``:
        its process's CUDA context is unusable, and only a new process recovers (the
        deployments' ``check_health`` raises, so Serve replaces the replica)."""
        return self._broken

    @property
    def mechanism(self) -> ContextMechanism:
        return self._mechanism_impl()

    def describe(self) -> EngineDescription:
        # Built once per state: what a description says (device, mechanism, weights)
        # changes only when the engine loads or closes, not per call.
        desc = self._description
        if desc is None:
            desc = self._description = self._describe_impl()
        return desc

    def context_bytes(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        return int(self._context_bytes_impl({k: tuple(v) for k, v in shapes.items()}))

    def stats(self) -> StatsSnapshot:
        return self._stats.snapshot()

    def acquisition_durations_since(self, seen: int) -> tuple[int, list[float]]:
        """Acquisitions so far and the durations (s) of those after the first ``seen``."""
        return self._stats.acquisition_durations_since(seen)

    def warm(self) -> None:
        self._ensure_loaded()

    def update_weights(self, weights: Mapping[str, Any]) -> None:
        """Replace the weights in place, between two calls: a call sees all old or all new.

        Holds the call lock, so the call in flight finishes first and the next waits
        for the update. Raises ``WeightsUpdateError`` (engine unchanged) when the names,
        shapes or dtypes do not match the engine's, or the backend cannot update.
        """
        with self._call_lock:
            self._check_open()
            if self._weights_on_host:
                self._page_in_locked()  # the update writes into the device tensors
            t0 = time.perf_counter()
            self._update_weights_impl(dict(weights))
            logger.info("engine %s: updated %d weight tensors in %.0f ms", self.name, len(weights),
                        (time.perf_counter() - t0) * 1e3)

    def set_mode(self, mode: MemoryMode | str) -> MemoryMode:
        new = MemoryMode.parse(mode)
        with self._call_lock:
            self._check_open()
            old = self._mode
            if new is old:
                return old
            if self._loaded and not self._weights_on_host:
                if new is MemoryMode.STATIC:
                    self._enter_static()
                else:
                    self._leave_static()
            self._mode = new
            logger.info("engine %s: mode %s -> %s", self.name, old.value, new.value)
            return old

    @contextlib.contextmanager
    def using_mode(self, mode: MemoryMode | str) -> Iterator[MemoryMode]:
        previous = self.set_mode(mode)
        try:
            yield self._mode
        finally:
            # Restore what was there before, even when the block raised
            # (Torch-TensorRT's ResourceAllocationStrategy does not: pytorch/TensorRT#4356).
            if not self._closed:
                self.set_mode(previous)

    def infer(self, inputs: Tensors, *, deadline_s: float | None = None,
              finite_checked: bool = False, inputs_checked: bool = False) -> dict[str, Any]:
        # The deadline runs from now: waiting behind a call in flight on this engine
        # counts against it, as it does for the request that is waiting.
        deadline_at = time.monotonic() + (self.admission_deadline_s if deadline_s is None else max(0.0, deadline_s))
        self._check_open()
        self._check_not_broken()
        self._stats.call_started()
        started = time.perf_counter()
        mode: MemoryMode | None = None
        outcome = "failed"
        try:
            host_finite = self.reject_non_finite and not finite_checked and not self._checks_finite_on_device()
            if inputs_checked:
                shapes = {name: tuple(value.shape) for name, value in inputs.items()}
                if host_finite:
                    check_finite(self.describe(), inputs)
            else:
                shapes = validate_inputs(self.describe(), inputs, reject_non_finite=host_finite)
            self._ensure_loaded()
            want_numpy = any(isinstance(v, np.ndarray) for v in inputs.values())
            with self._call_lock:
                self._check_open()
                self._check_not_broken()  # broken by the call this one waited behind
                if not self._loaded:  # unloaded (weights tier) since the check above
                    self._load_locked()
                if self._weights_on_host:
                    # A graph replayed over unmapped weights would fault the whole context.
                    self._page_in_locked()
                mode = self._mode
                if mode is MemoryMode.STATIC:
                    self._enter_static()
                self._call_deadline = deadline_at
                try:
                    outputs = self._execute_impl(dict(inputs), shapes, mode)
                finally:
                    self._call_deadline = None
            result = {k: _to_numpy(v) if want_numpy else v for k, v in outputs.items()}
            outcome = "ok"
            return result
        except InvalidInputError:
            outcome = "invalid"
            raise
        except ContextMemoryUnavailable as err:
            outcome = "unavailable"
            self._note_sticky(err)  # one raised from a sticky error (a failed unmap, say)
            raise
        except Exception as err:
            if self._note_sticky(err) or not is_out_of_memory(err):
                # A sticky CUDA error is raised as it is (a bug: 500); the calls after it
                # get EngineBrokenError (503) until the replica is replaced.
                raise
            # The device ran out outside the lease or budget (PyTorch's caching allocator,
            # a graph's first launch, a lazy load on a full card): as much a lack of memory
            # in time as a refused lease, so the caller gets 503 + Retry-After, not a 500.
            outcome = "unavailable"
            logger.warning("engine %s: out of device memory outside the context lease: %s", self.name, err)
            raise ContextMemoryUnavailable(self._oom_requested_bytes(inputs), 0, time.perf_counter() - started,
                                           where=f"engine {self.name} (device out of memory: "
                                                 f"{type(err).__name__})") from err
        finally:
            self._stats.call_finished(outcome, mode, time.perf_counter() - started)

    def _note_sticky(self, err: BaseException) -> bool:
        """Mark the engine broken if ``err`` is (or was raised from) a sticky CUDA error;
        whether it was. The first such error's text is kept."""
        sticky = sticky_cuda_error(err)
        if sticky is None:
            return False
        if self._broken is None:
            lines = [line for line in str(sticky).splitlines() if line.strip()]
            # Its first line: PyTorch adds advice (CUDA_LAUNCH_BLOCKING...) on the next ones.
            self._broken = f"{type(sticky).__name__}: {(lines[0] if lines else '')[:500]}"
            logger.error("engine %s: sticky CUDA error, the engine refuses every later call and its "
                         "replica must be restarted: %s", self.name, self._broken)
        return True

    def _check_not_broken(self) -> None:
        if self._broken is not None:
            raise EngineBrokenError(self.name, self._broken)

    def _oom_requested_bytes(self, inputs: Tensors) -> int:
        """The call's context bytes, for the message of an out-of-memory failure (0 if unknown)."""
        try:
            return self.context_bytes({k: tuple(getattr(v, "shape", ())) for k, v in inputs.items()})
        except Exception:  # noqa: BLE001 - only a figure for a message
            return 0

    def close(self) -> None:
        with self._call_lock:
            if self._closed:
                return
            self._closed = True
            if self._loaded:
                try:
                    self._leave_static()
                finally:
                    self._close_impl()
            self._loaded = False
            self._description = None
            logger.info("engine %s closed", self.name)

    def __del__(self) -> None:
        # Only warn: freeing GPU memory from a finaliser is unsafe at interpreter exit.
        if getattr(self, "_loaded", False) and not getattr(self, "_closed", True):
            logger.warning("engine %s was not closed; call close() to release its GPU memory", self.name)

    # -- helpers for backends ---------------------------------------------------

    def mapping_counts(self) -> dict[str, int | bool] | None:
        """The arena's mapping counters (``VmmArena.mapping_counts``); None without an arena."""
        return None

    @property
    def checks_finite_on_device(self) -> bool:
        """Whether calls refuse NaN/inf with a reduction on the device (no host pass over
        the inputs) now; False before the engine has loaded."""
        return self.reject_non_finite and self._loaded and self._checks_finite_on_device()

    @property
    def call_deadline_s(self) -> float:
        """Seconds the call in flight may still wait for context memory (the engine's
        admission deadline outside a call). Backends pass it to their allocators."""
        at = self._call_deadline
        return self.admission_deadline_s if at is None else max(0.0, at - time.monotonic())

    def dynamic_context(self, nbytes: int, allocate) -> contextlib.AbstractContextManager[ContextBlock]:
        """Admission, then memory, for one call; both released when the ``with`` block ends.

        ``allocate(nbytes) -> ContextBlock`` is the backend's allocator. The caller must
        have finished (synchronised) its GPU work before the ``with`` block ends.

        Release stays on the caller's path on purpose: moving it to a helper thread was
        measured slower back to back on an H200 (ResNet-152 b100: +4.9 ms per call
        instead of +2.5 ms), the helper contending for the GIL with the next call.
        """
        return DynamicCall(self.admission, self._stats, nbytes, self.call_deadline_s, allocate)

    def _enter_static(self) -> None:
        """Hold static context memory (idempotent; cheap when already held)."""
        if self._static_held:
            return
        t0 = time.perf_counter()
        block = self._acquire_static_impl()
        self._static_block = block
        self._static_held = True
        if block is not None:
            self._stats.acquired(block.nbytes, time.perf_counter() - t0)
            logger.info("engine %s: holding %.1f MiB of static context memory", self.name, block.nbytes / MiB)

    def _leave_static(self) -> None:
        if not self._static_held:
            return
        block, self._static_block = self._static_block, None
        self._static_held = False
        self._release_static_impl(block)
        if block is not None and not block.released:
            block.release()
            self._stats.released(block.nbytes)
            logger.info("engine %s: released %.1f MiB of static context memory", self.name, block.nbytes / MiB)

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        # The call lock too, for the whole load: a close() racing the first load must
        # wait for it (or it would miss what the load allocates), and a set_mode(DYNAMIC)
        # must not land between "loaded" and "enter static" (or static memory would stay
        # held in dynamic mode, and the next dynamic call would find the arena mapped).
        with self._init_lock, self._call_lock:
            if self._loaded:
                return
            self._load_locked()

    def _load_locked(self) -> None:
        """Load (the call lock held). A load after an unload counts as a page-in."""
        self._check_open()
        t0 = time.perf_counter()
        try:
            self._load_impl()
        finally:
            self._description = None  # loading fixes the device and the mechanism
        self._stats.weights_bytes = self.describe().weights_bytes
        self._loaded = True
        self._weights_on_host = False
        if self._ever_loaded:
            self._page_ins += 1
            self._page_in_s += time.perf_counter() - t0
        self._ever_loaded = True
        if self._mode is MemoryMode.STATIC:
            self._enter_static()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(self.name)

    # -- hooks ------------------------------------------------------------------

    @abstractmethod
    def _describe_impl(self) -> EngineDescription: ...

    @abstractmethod
    def _mechanism_impl(self) -> ContextMechanism: ...

    @abstractmethod
    def _context_bytes_impl(self, shapes: dict[str, tuple[int, ...]]) -> int: ...

    @abstractmethod
    def _load_impl(self) -> None:
        """Touch the device: load weights, build contexts. Must leave nothing behind on failure."""

    @abstractmethod
    def _execute_impl(self, inputs: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                      mode: MemoryMode) -> dict[str, Any]:
        """Run one call. In DYNAMIC mode use ``self.dynamic_context``; in STATIC mode
        ``self._static_block`` (if the backend uses one) is held."""

    def _acquire_static_impl(self) -> ContextBlock | None:
        """Allocate static context memory; None if the backend manages it otherwise."""
        return None

    def _checks_finite_on_device(self) -> bool:
        """True when the backend checks inputs for NaN/inf itself, on the device (cheaper
        than a host pass over a large batch); it must then raise ``InputValueError``."""
        return False

    def _release_static_impl(self, block: ContextBlock | None) -> None:
        """Give up static memory the backend manages itself; ``block`` (if any) is
        released by the caller right after."""

    def _update_weights_impl(self, weights: dict[str, Any]) -> None:
        """Write new weights into the loaded (or not yet loaded) model; the call lock is held."""
        raise WeightsUpdateError(self.name, f"the {type(self).__name__} backend cannot update weights in place")

    @abstractmethod
    def _close_impl(self) -> None: ...


@functools.cache
def _torch() -> Any:
    """torch, imported once on first use (engine_runtime's spec and engine import
    without it), not on every output of every call."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        raise EbbInternalError("torch is required to convert outputs") from None
    return torch


def _to_numpy(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value
    torch = _torch()
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)
