"""Which TensorRT this process uses, and the pieces every TensorRT user here shares.

Full TensorRT (``tensorrt``, 10.x/11.x) is preferred when it imports; TensorRT for
RTX (``tensorrt_rtx``) otherwise. Both expose the same engine/context API, so the
backend and the builder program against whichever :func:`load` returns. The
TensorRT-to-numpy dtype mapping and the message-capturing logger live here so there
is exactly one of each.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

from engine_runtime.errors import EngineLoadError

logger = logging.getLogger(__name__)

#: Import order: the full runtime first, the RTX one second.
FLAVOURS = ("tensorrt", "tensorrt_rtx")

#: TensorRT ``DataType`` member names -> Ebb's numpy dtype names. Keyed by name, not by
#: enum value, so the same table serves both flavours (their enums are distinct types).
_NUMPY_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorRT:
    """The imported module and what it is."""

    module: Any
    #: ``"tensorrt"`` or ``"tensorrt_rtx"``.
    flavour: str
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt_rtx"

    @property
    def tag(self) -> str:
        """``tensorrt_rtx-1.7.1.116``: goes into cache keys and descriptions."""
        return f"{self.flavour}-{self.version}"


@functools.cache
def load() -> TensorRT:
    """Import ``tensorrt`` or, failing that, ``tensorrt_rtx``; cached for the process.

    Tests inject a stand-in by putting it into ``sys.modules`` under one of
    :data:`FLAVOURS` and calling ``load.cache_clear()``.
    """
    failures: list[str] = []
    for name in FLAVOURS:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - PyPI's `tensorrt` stub raises more than ImportError
            failures.append(f"{name}: {type(err).__name__}: {err}")
            continue
        version = str(getattr(module, "__version__", "unknown"))
        logger.info("using %s %s", name, version)
        return TensorRT(module, name, version)
    raise EngineLoadError(
        "no TensorRT is importable; install `pip install ebb[tensorrt]` (needs NVIDIA's index) "
        "or `pip install ebb[tensorrt-rtx]`. Tried: " + "; ".join(failures)
    )


def numpy_name(dtype: Any) -> str:
    """Ebb's numpy name for a TensorRT ``DataType``; ``EngineLoadError`` if Ebb cannot serve it."""
    key = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
    try:
        return _NUMPY_NAMES[key]
    except KeyError:
        raise EngineLoadError(
            f"TensorRT dtype {key} has no numpy equivalent Ebb serves; supported: {sorted(_NUMPY_NAMES)}"
        ) from None


def make_logger(trt: TensorRT) -> Any:
    """A TensorRT ``ILogger`` that forwards to Python logging and keeps error messages.

    TensorRT reports why a plan failed to deserialise only through its logger (the
    call itself returns None), so callers read :meth:`take_errors` to put TensorRT's
    own words into the exception they raise.
    """
    return _logger_class(trt.module)()


@functools.cache
def _logger_class(module: Any) -> type:
    severity = module.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.ERROR,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,  # TensorRT's INFO is chatty (per-layer sizes)
        severity.VERBOSE: logging.DEBUG - 5,
    }
    errors = {severity.INTERNAL_ERROR, severity.ERROR}

    class CapturingLogger(module.ILogger):
        def __init__(self) -> None:
            module.ILogger.__init__(self)
            self._lock = threading.Lock()
            self._errors: list[str] = []

        def log(self, sev: Any, msg: str) -> None:
            level = levels.get(sev, logging.INFO)
            logger.log(level, "TensorRT: %s", msg)
            if sev in errors:
                with self._lock:
                    self._errors.append(str(msg))

        def take_errors(self) -> list[str]:
            """The error messages logged since the last call, oldest first."""
            with self._lock:
                out, self._errors = self._errors, []
            return out

    return CapturingLogger
