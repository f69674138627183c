"""Every exception Ebb raises, under one root.

User errors (bad input, bad plan files, no memory in time) carry the numbers that
explain them; :class:`EbbInternalError` is reserved for bugs, so that callers (the
HTTP layer) can map the first kind to 4xx/503 and the second to 500.
"""

from __future__ import annotations


__all__ = [
    "BatchTooLargeError",
    "ContextMemoryUnavailable",
    "EbbError",
    "EbbInternalError",
    "EngineBrokenError",
    "EngineBuildError",
    "EngineClosedError",
    "EngineLoadError",
    "InputDtypeError",
    "InputShapeError",
    "InputValueError",
    "InvalidInputError",
    "MissingInputError",
    "PlanIncompatibleError",
    "PoolUnavailableError",
    "UnknownInputError",
    "WeightsUpdateError",
]


class EbbError(Exception):
    """Root of every exception raised by Ebb.

    Subclasses take structured arguments; ``__reduce__`` re-creates them from those,
    so they survive pickling across Ray processes with their numbers intact.
    """

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args)
        self._init_args = args
        self._init_kwargs = kwargs
        return self

    def __reduce__(self):
        return (_rebuild, (type(self), self._init_args, self._init_kwargs))


def _rebuild(cls, args, kwargs):
    return cls(*args, **kwargs)


class EbbInternalError(EbbError):
    """A bug in Ebb, not a mistake of the caller."""


class InvalidInputError(EbbError, ValueError):
    """A request's tensors do not match what the engine accepts."""


class UnknownInputError(InvalidInputError):
    def __init__(self, got: str, expected: list[str]):
        self.got = got
        self.expected = list(expected)
        super().__init__(f"unknown input {got!r}; this engine's inputs are {self.expected}")


class MissingInputError(InvalidInputError):
    def __init__(self, missing: list[str]):
        self.missing = list(missing)
        super().__init__(f"missing input(s) {self.missing}")


class InputDtypeError(InvalidInputError):
    def __init__(self, name: str, expected: str, got: str):
        self.name, self.expected, self.got = name, expected, got
        super().__init__(f"input {name!r}: expected dtype {expected}, got {got}")


class InputShapeError(InvalidInputError):
    def __init__(self, name: str, expected: str, got: tuple[int, ...], why: str = ""):
        self.name, self.expected, self.got = name, expected, tuple(got)
        extra = f" ({why})" if why else ""
        super().__init__(f"input {name!r}: expected shape {expected}, got {_short_shape(self.got)}{extra}")


def _short_shape(shape: tuple[int, ...], limit: int = 8) -> str:
    """A shape for a message, cut short: a client may send a thousand dimensions."""
    shown = ", ".join(str(d) for d in shape[:limit])
    return f"[{shown}, ... ({len(shape)} dims)]" if len(shape) > limit else f"[{shown}]"


class BatchTooLargeError(InputShapeError):
    def __init__(self, name: str, max_batch: int, got: tuple[int, ...]):
        self.max_batch = max_batch
        super().__init__(
            name,
            f"batch <= {max_batch}",
            got,
            f"batch {got[0] if got else '?'} is over the profile's maximum {max_batch}",
        )


class InputValueError(InvalidInputError):
    """Values the engine refuses (NaN or infinities when the model forbids them)."""

    def __init__(self, name: str, why: str):
        self.name = name
        super().__init__(f"input {name!r}: {why}")


class EngineLoadError(EbbError):
    """An engine could not be loaded; nothing it allocated is left behind."""


class PlanIncompatibleError(EngineLoadError):
    """A TensorRT plan is corrupt or built for another GPU or TensorRT version."""


class EngineBuildError(EbbError):
    """An engine could not be built: the model, a profile, the precision or the target is refused."""


class EngineClosedError(EbbError):
    def __init__(self, name: str):
        super().__init__(f"engine {name!r} is closed")


class EngineBrokenError(EbbError):
    """The engine's CUDA context hit a sticky error (``sticky_cuda_error``) and can run
    nothing more: every later CUDA call of the process fails the same way, so the engine
    refuses calls at once instead. Only a new process (Serve replaces the replica, whose
    ``check_health`` raises) recovers. Maps to HTTP 503 with ``Retry-After``: another
    replica can answer.

    ``engine``: the engine's name; ``cause``: the first sticky error's text.
    """

    def __init__(self, engine: str, cause: str):
        self.engine = engine
        self.cause = cause
        super().__init__(f"engine {engine!r} is broken and must be restarted; its CUDA context failed with: {cause}")


class ContextMemoryUnavailable(EbbError):
    """Context memory for a call could not be had before the deadline.

    Distinct from a CUDA out-of-memory error on purpose: it is raised *instead* of
    one, before anything is allocated, and maps to HTTP 503 with ``Retry-After``.
    """

    def __init__(self, requested_bytes: int, free_bytes: int, waited_s: float = 0.0, where: str = ""):
        self.requested_bytes = int(requested_bytes)
        self.free_bytes = int(free_bytes)
        self.waited_s = float(waited_s)
        self.where = where
        loc = f" on {where}" if where else ""
        super().__init__(
            f"context memory unavailable{loc}: requested {self.requested_bytes / 2**20:.1f} MiB, "
            f"free {self.free_bytes / 2**20:.1f} MiB after waiting {self.waited_s * 1e3:.0f} ms"
        )


class WeightsUpdateError(EbbError):
    """New weights were refused; the engine keeps serving its previous weights unchanged.

    ``missing``, ``unexpected`` and ``mismatched`` name the offending tensors (the last
    as ``name: expected vs got``), so a caller sees every problem at once.
    """

    def __init__(self, engine: str, why: str, *, missing: list[str] = (), unexpected: list[str] = (),
                 mismatched: list[str] = ()):
        self.engine = engine
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        parts = [why]
        for label, names in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("mismatched", self.mismatched)):
            if names:
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                parts.append(f"{label}: {shown}")
        super().__init__(f"engine {engine!r}: weights update refused: " + "; ".join(parts))


class PoolUnavailableError(EbbError):
    """The pool cannot be used here or its owner cannot be reached; use another mechanism."""

    def __init__(self, reason: str, where: str = "") -> None:
        self.reason = reason
        self.where = where
        super().__init__(f"context pool unavailable{f' on {where}' if where else ''}: {reason}")


class UnknownModelError(EbbError, LookupError):
    """A model name that the group (or replica) does not hold; the message lists those it does."""

    def __init__(self, name: str, known: list[str], where: str = ""):
        self.name = name
        self.known = sorted(known)
        self.where = where
        loc = f" in {where}" if where else ""
        shown = ", ".join(self.known[:20]) + (f", ... ({len(self.known)} in all)" if len(self.known) > 20 else "")
        super().__init__(f"unknown model {name!r}{loc}; known models: [{shown}]")


class WeightsPageError(EbbError):
    """Weights could not be moved between the GPU and the host; the engine is left in the
    tier it was in before (a page-in that failed can be retried)."""

    def __init__(self, engine: str, what: str, why: str):
        self.engine = engine
        self.what = what
        super().__init__(f"engine {engine!r}: {what} failed: {why}")


class WeightsBudgetUnavailable(ContextMemoryUnavailable):
    """A group could not make room for a model's weights within its GPU weights budget
    before the deadline (every resident model had a call in flight). Maps to 503 like
    ``ContextMemoryUnavailable``."""

    def __init__(self, model: str, needed_bytes: int, budget_bytes: int, resident_bytes: int,
                 waited_s: float = 0.0, where: str = ""):
        self.model = model
        self.needed_bytes = int(needed_bytes)
        self.budget_bytes = int(budget_bytes)
        self.resident_bytes = int(resident_bytes)
        super().__init__(needed_bytes, max(0, budget_bytes - resident_bytes), waited_s, where)
        self.args = (f"no room for model {model!r}'s weights ({needed_bytes / 2**20:.1f} MiB) in the GPU "
                     f"weights budget of {budget_bytes / 2**20:.1f} MiB ({resident_bytes / 2**20:.1f} MiB "
                     f"resident, every resident model busy) after waiting {waited_s * 1e3:.0f} ms"
                     + (f" in {where}" if where else ""),)


class StackLimitError(EbbError):
    """The CUDA stack limit cannot be changed now (graphs were captured in this process:
    lowering it under captured graphs made the next replay fail on an H200)."""

    def __init__(self, requested_bytes: int, current_bytes: int | None, why: str):
        self.requested_bytes = int(requested_bytes)
        self.current_bytes = current_bytes
        cur = "unknown" if current_bytes is None else f"{current_bytes} bytes"
        super().__init__(f"cannot set the CUDA stack limit to {requested_bytes} bytes (now {cur}): {why}")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory, however a library said it.

    PyTorch's caching allocator raises ``torch.OutOfMemoryError``; a CUDA call outside
    it (a graph's first launch, a cuBLAS workspace, a copy) surfaces as a
    ``RuntimeError``/``AcceleratorError`` saying "CUDA error: out of memory"; the CUDA
    wrappers here raise ``CudaError`` with ``oom`` set. Matched by type where a type
    exists, by CUDA's own wording otherwise (no error code reaches Python there).
    """
    if isinstance(exc, ContextMemoryUnavailable):
        return False
    if getattr(exc, "oom", False) is True:
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError / torch.cuda.OutOfMemoryError
        return True
    if isinstance(exc, (RuntimeError, MemoryError)) and not isinstance(exc, EbbError):
        text = str(exc)
        return any(s in text for s in ("CUDA out of memory", "CUDA error: out of memory",
                                       "cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY",
                                       "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"))
    return False


#: CUDA's sticky errors, by what each says: once one happened, the process's CUDA context
#: is corrupt and every later CUDA call fails (cudaGetErrorString's text as PyTorch's
#: ``torch.AcceleratorError``/``RuntimeError`` "CUDA error: ..." carries it; the runtime's
#: and the driver's names as ``engine_runtime._cuda.CudaError`` carries them):
#: cudaErrorAssert / CUDA_ERROR_ASSERT (710, a device-side assert), cudaErrorIllegalAddress
#: / CUDA_ERROR_ILLEGAL_ADDRESS (700), cudaErrorLaunchFailure / CUDA_ERROR_LAUNCH_FAILED
#: (719), cudaErrorLaunchTimeout (702), cudaErrorHardwareStackError (714),
#: cudaErrorIllegalInstruction (715), cudaErrorMisalignedAddress (716),
#: cudaErrorInvalidAddressSpace (717), cudaErrorInvalidPc (718), cudaErrorECCUncorrectable
#: (214), cudaErrorNvlinkUncorrectable (220). Out of memory is not sticky: later calls can work.
STICKY_CUDA_ERROR_TEXTS = (
    "device-side assert triggered", "cudaErrorAssert", "CUDA_ERROR_ASSERT",
    "an illegal memory access", "cudaErrorIllegalAddress", "CUDA_ERROR_ILLEGAL_ADDRESS",
    "unspecified launch failure", "cudaErrorLaunchFailure", "CUDA_ERROR_LAUNCH_FAILED",
    "the launch timed out and was terminated", "cudaErrorLaunchTimeout", "CUDA_ERROR_LAUNCH_TIMEOUT",
    "hardware stack error", "cudaErrorHardwareStackError", "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "an illegal instruction was encountered", "cudaErrorIllegalInstruction", "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "misaligned address", "cudaErrorMisalignedAddress", "CUDA_ERROR_MISALIGNED_ADDRESS",
    "operation not supported on global/shared address space", "cudaErrorInvalidAddressSpace",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "invalid program counter", "cudaErrorInvalidPc", "CUDA_ERROR_INVALID_PC",
    "uncorrectable ECC error encountered", "cudaErrorECCUncorrectable", "CUDA_ERROR_ECC_UNCORRECTABLE",
    "uncorrectable NVLink error", "cudaErrorNvlinkUncorrectable", "CUDA_ERROR_NVLINK_UNCORRECTABLE",
)


def sticky_cuda_error(exc: BaseException) -> BaseException | None:
    """The sticky CUDA error in ``exc`` or the exceptions it was raised from, else None.

    A sticky error (``STICKY_CUDA_ERROR_TEXTS``: a device-side assert, an illegal
    address, an unspecified launch failure...) leaves the process's CUDA context unusable:
    an engine that met one must stop taking calls. PyTorch raises it as
    ``torch.AcceleratorError`` (a ``RuntimeError``) or ``RuntimeError`` saying
    "CUDA error: ...", the wrappers in ``engine_runtime._cuda`` as ``CudaError`` naming the
    error; no error code reaches Python from PyTorch, so it is matched by CUDA's own
    wording (as ``is_out_of_memory`` is). Errors raised while handling one, or from one
    (``__context__``, ``__cause__``), are followed: a cleanup that failed after an assert
    hides the assert otherwise.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 16:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, (RuntimeError, EbbInternalError)) and not isinstance(err, EngineBrokenError):
            text = str(err)
            if any(s in text for s in STICKY_CUDA_ERROR_TEXTS):
                return err
        todo.extend(e for e in (err.__cause__, err.__context__) if e is not None)
    return None
