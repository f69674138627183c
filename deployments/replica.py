"""What every replica process does, grouped or not: what it holds beside its engines
(``ReplicaBase``: its GPU thread, the process's CUDA setup before any engine, the GPU's
admission budget and context pool, got in one order and given back in the other),
numpy in and out, inputs checked once, logging to the replica's file, and the batch
runner that merges compatible requests into one engine call and hands each group's
failure to its own requests only.

``deployments.model`` (one engine per replica) and ``deployments.group`` (an
``EngineGroup`` per replica) both build on it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deployments.batcher import DynamicBatcher
from deployments.call_path import CallPath
from deployments.config import AppConfig, CudaConfig, ModelConfig
from deployments.engine_factory import plan_replica_context
from deployments.gpu_identity import current_replica_gpu
from deployments.protocol import CheckedInputs
from engine_runtime import ContextMemoryUnavailable, InvalidInputError
from engine_runtime.spec import check_finite

logger = logging.getLogger(__name__)

#: ``(arrays, arrival time on the monotonic clock, whether NaN/inf were checked on the host)``
Queued = tuple[dict[str, np.ndarray], float, bool]
#: ``call(merged arrays, deadline_s, finite_checked) -> outputs``: one engine call (blocking).
EngineCall = Callable[[dict[str, np.ndarray], float, bool], dict[str, np.ndarray]]


def to_numpy_inputs(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Numpy in, numpy out; torch tensors are accepted and converted here."""
    if not isinstance(inputs, Mapping):
        raise InvalidInputError(f"inputs must be a mapping of name to array, got {type(inputs).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            out[name] = value
        elif hasattr(value, "detach") and hasattr(value, "cpu"):
            try:
                value = value.detach().cpu()
                out[name] = value.numpy() if str(value.dtype) != "torch.bfloat16" else value.float().numpy()
            except (TypeError, RuntimeError, NotImplementedError) as err:
                # Sparse, quantized or meta tensors have no numpy view: the caller's
                # mistake (a 4xx through the ingress), not a bug of the replica.
                raise InvalidInputError(f"input {name!r}: a {value.layout} tensor of {value.dtype} cannot be "
                                        f"read as an array ({err}); send a numpy array or a dense tensor with data") from err
        else:
            raise InvalidInputError(f"input {name!r}: expected a numpy array or torch tensor, "
                                    f"got {type(value).__name__}")
    return out


def checked_arrays(inputs: Any, desc: Any, key: Any, host_finite: bool,
                   validate: Callable[..., Any]) -> dict[str, np.ndarray]:
    """A request's arrays, checked once against its model's description ``desc``.

    Inputs the ingress already checked against this description (``CheckedInputs`` with
    ``key``, the description's ``validation_key``) are taken as they are: only the
    model's NaN/inf rule is left, where the ingress did not apply it. Anything else (a
    handle caller's dict, or an ingress holding another description) is converted and
    checked here, alone before batching, so one bad request fails alone. ``validate`` is
    ``spec.validate_inputs`` (passed in, as for :func:`run_batch`); ``host_finite``:
    whether NaN/inf are refused on the host (where the engine cannot check them on the
    device)."""
    if isinstance(inputs, CheckedInputs) and inputs.validated_against == key:
        if host_finite and not inputs.finite_checked:
            check_finite(desc, inputs.arrays)
        return inputs.arrays
    arrays = to_numpy_inputs(inputs.arrays if isinstance(inputs, CheckedInputs) else inputs)
    validate(desc, arrays, reject_non_finite=host_finite)
    return arrays


def parse_pin(raw: Any) -> str:
    """``user_config.pin``: ``auto`` (the coordinator decides), ``static`` or ``dynamic``."""
    pin = str(raw).lower()
    if pin not in ("auto", "static", "dynamic"):
        raise ValueError(f"user_config.pin must be auto, static or dynamic, got {pin!r}")
    return pin


def group_for_engine(requests: list[dict[str, np.ndarray]], max_batch: int) -> list[list[int]]:
    """Indices of requests merged into one engine call: same per-sample shapes and a
    total batch within the engine profile's maximum."""
    groups: list[list[int]] = []
    current: list[int] = []
    key = None
    total = 0
    for i, req in enumerate(requests):
        k = tuple((n, a.shape[1:]) for n, a in sorted(req.items()))
        b = next(iter(req.values())).shape[0]
        if current and (k != key or total + b > max_batch):
            groups.append(current)
            current, total = [], 0
        current.append(i)
        key = k
        total += b
    if current:
        groups.append(current)
    return groups


def gpu_thread(name: str) -> ThreadPoolExecutor:
    """The one thread a replica runs its engine work on: its start (loads, warm-ups,
    graph capture) and every engine call.

    PyTorch keeps cuBLAS and cuDNN handles, and the device memory behind them, per host
    thread. Calls on asyncio's default executor land on whichever of its threads is
    free (up to 32), and every thread that ran an eager warm-up (a model loaded on its
    first call) kept a set of its own. On one thread there is one set. Nothing runs less
    concurrently: a replica's batcher (``deployments.batcher``) runs one batch at a time, and an
    engine runs one call at a time.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ebb-gpu-{name}")


async def run_batch(queued: list[Queued], *, call: EngineCall, desc: Any, admission_deadline_s: float,
                    validate: Callable[..., Any], executor: Executor | None = None,
                    path: CallPath | None = None) -> list[dict[str, np.ndarray] | Exception]:
    """One engine call per group of compatible requests (all of one model). A group's
    failure is handed to its own requests only (as the item, for the caller to raise):
    raised from the batch handler, every request of the batch would fail.
    ``validate`` is ``spec.validate_inputs`` (passed in so that callers and their tests
    choose it). Calls run on ``executor`` (the replica's :func:`gpu_thread`; default:
    asyncio's), with the caller's context variables, as ``asyncio.to_thread`` runs them.
    ``path``: where the stages' times are recorded (``deployments.call_path``)."""
    loop = asyncio.get_running_loop()
    timed = _timed_call(call, path)
    requests = [arrays for arrays, _, _ in queued]
    results: list[dict[str, np.ndarray] | Exception | None] = [None] * len(requests)
    groups = group_for_engine(requests, desc.max_batch)
    while groups:
        group = groups.pop(0)
        if len(group) == 1:
            merged = requests[group[0]]
        else:
            merged = {n: np.concatenate([requests[i][n] for i in group]) for n in requests[group[0]]}
        # The admission deadline is a request's, from its arrival: time spent queued
        # for the batch, or behind earlier groups, counts against it (a request
        # behind a refused call does not wait a second full deadline).
        oldest = min(queued[i][1] for i in group)
        deadline_s = admission_deadline_s - (time.monotonic() - oldest)
        checked = all(queued[i][2] for i in group)
        handed = time.monotonic()
        if path is not None:
            for i in group:
                path.record("queued", handed - queued[i][1])
        try:
            out, ended = await loop.run_in_executor(executor, functools.partial(
                contextvars.copy_context().run, timed, merged, deadline_s, checked, handed))
            if path is not None:
                path.record("from_thread", time.monotonic() - ended)
        except InvalidInputError as err:
            if len(group) == 1:
                results[group[0]] = err
                continue
            # The merged batch was refused on the device (NaN/inf): find the request(s)
            # on the host, fail those alone, and run the others again.
            good = []
            for i in group:
                try:
                    validate(desc, requests[i], reject_non_finite=True)
                    good.append(i)
                except InvalidInputError as own:
                    results[i] = own
            if len(good) == len(group):  # none to blame alone: the group shares the error
                for i in group:
                    results[i] = err
            elif good:
                groups.insert(0, good)
            continue
        except ContextMemoryUnavailable as err:
            # Say how long the request waited in all, not only this call's share (a
            # subclass, such as a group's weights budget, keeps its own message).
            failed = err
            if type(err) is ContextMemoryUnavailable:
                failed = ContextMemoryUnavailable(err.requested_bytes, err.free_bytes, time.monotonic() - oldest,
                                                  err.where)
                failed.__cause__ = err
            for i in group:
                results[i] = failed
            continue
        except Exception as err:  # noqa: BLE001 - handed to this group's requests, raised there
            for i in group:
                results[i] = err
            continue
        start = 0
        for i in group:
            b = next(iter(requests[i].values())).shape[0]
            results[i] = {k: v[start:start + b] for k, v in out.items()}
            start += b
    return results  # type: ignore[return-value]


def _timed_call(call: EngineCall, path: CallPath | None) -> Callable[..., tuple[dict[str, np.ndarray], float]]:
    """``call`` run on the GPU thread, returning its outputs and the time it ended, with
    the wait to start and its own duration recorded in ``path``."""

    def timed(merged: dict[str, np.ndarray], deadline_s: float, checked: bool, handed: float
              ) -> tuple[dict[str, np.ndarray], float]:
        began = time.monotonic()
        try:
            return call(merged, deadline_s, checked), time.monotonic()
        finally:
            if path is not None:
                path.record("to_thread", began - handed)
                path.record("engine", time.monotonic() - began)

    return timed


def log_to_replica_file() -> None:
    """Send Ebb's own loggers to this replica's Serve log file.

    In a replica Serve configures only its ``ray.serve`` logger (a file handler, no
    propagation); records of other loggers below WARNING were dropped, so mode
    switches, memory releases and the engine's close left no trace in any log.
    """
    serve_handlers = logging.getLogger("ray.serve").handlers
    for name in ("deployments", "engine_runtime"):
        ebb_logger = logging.getLogger(name)
        if ebb_logger.level == logging.NOTSET or ebb_logger.level > logging.INFO:
            ebb_logger.setLevel(logging.INFO)
        for handler in serve_handlers:
            if handler not in ebb_logger.handlers:
                ebb_logger.addHandler(handler)
        # Serve sends stderr, where the root logger's last-resort handler writes, to the
        # same file: propagating would log every warning twice.
        ebb_logger.propagate = not serve_handlers


@dataclass(frozen=True)
class ProcessSetup:
    """What :func:`setup_cuda_process` did, for the status view (plain data)."""

    #: The limit asked for (``cuda.stack_limit_bytes``); None: left at CUDA's default.
    stack_limit_bytes: int | None
    #: CUDA's limit before Ebb set it; None where it was not set (no GPU, not asked, failed).
    stack_limit_previous_bytes: int | None
    #: This process's NVML memory right after CUDA initialised and the limit, before any engine.
    floor_bytes: int | None
    #: Why the limit or the floor is missing, where it is.
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def setup_cuda_process(cfg: CudaConfig, cuda_index: int | None) -> ProcessSetup:
    """First thing in a replica process, before any engine: set CUDA's stack limit
    (``cuda.stack_limit_bytes``) and measure the process's floor.

    Never raises: a replica whose limit could not be set serves with CUDA's default
    (larger floor, same outputs), and says why in its status.
    """
    if cuda_index is None:
        return ProcessSetup(cfg.stack_limit_bytes, None, None, None)
    from engine_runtime import process_floor_bytes, set_cuda_stack_limit

    previous, error = None, None
    if cfg.stack_limit_bytes is not None:
        try:
            previous = set_cuda_stack_limit(cfg.stack_limit_bytes, cuda_index)
        except Exception as err:  # noqa: BLE001 - reported; the replica serves with the default limit
            error = f"stack limit not set: {err}"
            logger.warning("CUDA stack limit %d bytes not set on cuda:%d: %s", cfg.stack_limit_bytes, cuda_index,
                           err)
    try:
        floor = process_floor_bytes()
    except Exception as err:  # noqa: BLE001 - a floor we cannot read is reported as unknown
        floor, error = None, "; ".join(e for e in (error, f"floor not measured: {err}") if e)
    if floor is not None:
        logger.info("replica process floor on cuda:%d: %.0f MiB (stack limit %s bytes, was %s)", cuda_index,
                    floor / 2**20, cfg.stack_limit_bytes, previous)
    return ProcessSetup(cfg.stack_limit_bytes, previous, floor, error)


def release_in_order(steps: list[Callable[[], None] | None]) -> None:
    """Run every release step in order, each even when an earlier one raised (a failing
    engine close must not keep the pool's chunks imported or the budget's slot taken);
    ``None`` steps are skipped. The first failure is raised once all have run; later
    ones are logged, so none is lost."""
    first: BaseException | None = None
    for step in steps:
        if step is None:
            continue
        try:
            step()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other steps
            if first is None:
                first = err
            else:
                logger.error("release step %s also failed: %r", getattr(step, "__qualname__", step), err)
    if first is not None:
        raise first


class ReplicaBase:
    """What a replica deployment (``ModelDeployment``, ``GroupDeployment``) holds beside
    its engines, and the order it gets and gives them back in.

    A subclass's ``__init__`` calls :meth:`_open` with its start, which calls
    :meth:`_open_process` before building any engine; its ``shutdown`` calls
    :meth:`_release` with what closes its engines.
    """

    #: The replica's one thread for engine work (:func:`gpu_thread`); None until _open made it.
    _gpu = None
    #: Where calls spend their time in this replica (``status()["call_path"]``).
    call_path: CallPath

    def _open(self, name: str, start: Callable[[], None]) -> None:
        """Run ``start`` on the replica's new GPU thread. A start that fails gives back
        exactly what it got (a joined pool, the engines built so far, the budget's slot)
        and raises."""
        # What _release() gives back; each is set as it is acquired.
        self.client = self.pool = self.admission = None
        self._shut_down = False
        self.call_path = CallPath()
        self._gpu = gpu_thread(name)
        try:
            self._gpu.submit(start).result()
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    #: What items of one batch share (``deployments.batcher``); None: any two may share one.
    _batch_key: Callable[[Any], Any] | None = None

    @property
    def _batched(self) -> DynamicBatcher:
        """This replica's batch queue (``deployments.batcher``), made on first use, with
        ``_run_batch`` as its handler; ``_configure_batching`` sets its size and wait."""
        batcher = self.__dict__.get("_batcher")
        if batcher is None:
            batcher = self.__dict__["_batcher"] = DynamicBatcher(
                self._run_batch, max_batch_size=8, max_queue_delay_s=0.005, key=self._batch_key,
                name=f"batcher of {type(self).__name__}")
        return batcher

    async def _run_batch(self, queued: list[Any]) -> list[Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _close_batcher(self) -> None:
        """Requests still queued fail; the worker stops (before the engines close)."""
        batcher = self.__dict__.get("_batcher")
        if batcher is not None:
            batcher.close()

    def timings(self, reset: bool = False) -> dict[str, dict[str, float | int]]:
        """Where this replica's calls spent their time (``deployments.call_path``), over
        the samples since the last reset; ``reset`` starts a new window after reading."""
        summary = self.call_path.summary()
        if reset:
            self.call_path.reset()
        return summary

    def _open_process(self, first_model: ModelConfig, app: AppConfig) -> Any:
        """The process's part of a start, before any engine: which GPU, CUDA's stack limit
        and the floor it leaves, the replica's id, the GPU's admission budget, and the
        context pool (joined where the config asks). Returns the context plan
        (``engine_factory.plan_replica_context``) every engine of the replica follows."""
        from ray import serve

        from deployments.coordinator_client import admission_for
        from deployments.heap import keep_heap_for_requests

        keep_heap_for_requests()  # requests' buffers reuse the heap's pages (deployments.heap)
        self.gpu = current_replica_gpu()
        # Before any engine exists: the stack limit cannot change under captured graphs.
        self.process = setup_cuda_process(app.cuda, self.gpu.cuda_index)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id if ctx else f"local-{os.getpid()}"
        self.admission = admission_for(self.gpu)
        self.pool, plan = plan_replica_context(first_model, app, self.gpu.cuda_index)
        self.pool_status = plan.pool_status
        return plan

    def _release(self, close_engines: Callable[[], None] | None, *threads: Executor | None) -> None:
        """Give back every byte the replica holds, in order: the batch queue (its waiting
        requests fail), the coordinator client, the
        engines (their arenas unmap and return every lease), the pool, the admission
        budget (the last replica on the GPU removes the budget's file), then the GPU
        thread and ``threads``, on which nothing runs any more. Idempotent; each step runs
        even when an earlier one raised (:func:`release_in_order`)."""
        if getattr(self, "_shut_down", True):
            return  # shut down already, or __init__ never got as far as _open
        self._shut_down = True
        executors = [self._gpu, *threads]
        release_in_order([self._close_batcher, None if self.client is None else self.client.stop,
                          close_engines,
                          None if self.pool is None else self.pool.close,
                          None if self.admission is None else self.admission.close,
                          *(functools.partial(e.shutdown, wait=False) for e in executors if e is not None)])
