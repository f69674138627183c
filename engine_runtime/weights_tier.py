"""Where a model's weights are: on its device, in (pinned) host memory, or not loaded.

Plain names shared by the engines (which move their own weights) and by
``engine_runtime.group`` (which decides whose weights move, by bytes and last use).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

from engine_runtime.errors import ContextMemoryUnavailable, EbbInternalError, WeightsPageError
from engine_runtime.memory import MemoryMode
from engine_runtime.units import MiB

logger = logging.getLogger("engine_runtime.engine")


class WeightsTier(str, enum.Enum):
    #: On the engine's device (the GPU; on a CPU host, the engine's own tensors): calls run now.
    GPU = "gpu"
    #: Copied to host memory (pinned on a GPU host), the device memory given back; a call
    #: copies them back first (one host-to-device copy), at the same device addresses.
    HOST = "host"
    #: Nothing on the device and no host copy kept by the engine; a call loads the model.
    UNLOADED = "unloaded"


@dataclass(frozen=True)
class ModelTierStatus:
    """One model of a group, for the status view and the metrics."""

    name: str
    tier: WeightsTier
    #: What the weights take on the device when resident (VMM-rounded on a GPU).
    weights_bytes: int
    #: ``time.time()`` of the last call (or page-in request); None before any.
    last_used_s: float | None
    page_ins: int
    page_in_seconds_total: float
    page_outs: int
    calls: int


@dataclass(frozen=True)
class GroupBudget:
    #: The most bytes of weights the group keeps on the GPU at once; None: no limit beyond the card.
    gpu_weights_budget_bytes: int | None = None
    #: Cold weights go to pinned host memory (True) or are unloaded (False).
    host_tier: bool = True


class TieredWeights:
    """``BaseEngine``'s side of weights tiers: moving its own weights, after the call in flight.

    Uses the engine's call lock, load path and static-memory helpers; backends fill in
    the ``_page_*_impl`` hooks (without them, page-out unloads and page-in reloads).
    """

    # -- weights tiers ----------------------------------------------------------

    @property
    def weights_tier(self) -> WeightsTier:
        if not self._loaded:
            return WeightsTier.UNLOADED
        return WeightsTier.HOST if self._weights_on_host else WeightsTier.GPU

    def weights_device_bytes(self) -> int:
        """What the weights take on the device when resident (rounded as the backend maps
        them); before loading, the description's figure rounded the same way."""
        return int(self._weights_device_bytes_impl())

    def tier_counts(self) -> dict[str, float]:
        """Page-ins (host-to-device copies and reloads), their seconds, and page-outs."""
        return {"page_ins": self._page_ins, "page_in_seconds_total": self._page_in_s,
                "page_outs": self._page_outs}

    def attach_context_source(self, admission, physical_source=None) -> None:
        """Draw per-call context memory through ``admission`` (and, where the backend maps
        physical memory, from ``physical_source``) from now on: how a group makes its
        engines share one source. The physical source only takes effect before loading."""
        with self._call_lock:
            self.admission = admission
            if physical_source is not None:
                if self._loaded:
                    raise EbbInternalError(f"engine {self.name!r}: physical source attached after loading")
                self._set_physical_source_impl(physical_source)

    def page_out_weights(self, host: bool = True) -> int:
        """After the call in flight: weights to host memory (``host``) or everything unloaded.

        Static context memory is given back too (taken again on page-in). Returns the
        device bytes freed (0 when there was nothing on the device). On failure the engine
        stays as it was (``WeightsPageError``).
        """
        with self._call_lock:
            self._check_open()
            if not self._loaded:
                return 0
            if self._weights_on_host and host:
                return 0
            on_device = 0 if self._weights_on_host else self.weights_device_bytes()
            self._leave_static()
            if host and self._host_tier_supported():
                t0 = time.perf_counter()
                try:
                    self._page_out_impl()
                except WeightsPageError:
                    raise
                except Exception as err:
                    raise WeightsPageError(self.name, "page-out to host memory", str(err)) from err
                self._weights_on_host = True
                logger.debug("engine %s: weights to host memory (%.1f MiB) in %.1f ms", self.name,
                             on_device / MiB, (time.perf_counter() - t0) * 1e3)
            else:
                self._unload_impl()
                self._loaded = False
                self._description = None  # what a loaded engine said (device, mechanism) no longer holds
                self._weights_on_host = False
                logger.debug("engine %s: unloaded (%.1f MiB of weights freed)", self.name, on_device / MiB)
            self._page_outs += 1
            return on_device

    def page_in_weights(self) -> float:
        """Weights back on the device (loading the engine if unloaded); seconds it took, 0 if resident."""
        t0 = time.perf_counter()
        if not self._loaded:
            self._ensure_loaded()
            return time.perf_counter() - t0
        with self._call_lock:
            self._check_open()
            if not self._loaded:
                self._load_locked()
            elif self._weights_on_host:
                self._page_in_locked()
            else:
                return 0.0
        return time.perf_counter() - t0

    def prepare_host_tier(self) -> None:
        """Allocate now what a page-out to host memory needs (pinned host memory), so the first
        page-out under traffic allocates nothing (pinning is slow and may wait for the device)."""
        with self._call_lock:
            if self._loaded and not self._closed:
                self._prepare_host_tier_impl()

    def _page_in_locked(self) -> None:
        t0 = time.perf_counter()
        try:
            self._page_in_impl()
        except (WeightsPageError, ContextMemoryUnavailable):
            raise
        except Exception as err:
            # The backend left the weights on the host: a later call retries.
            raise WeightsPageError(self.name, "page-in from host memory", str(err)) from err
        self._weights_on_host = False
        self._page_ins += 1
        self._page_in_s += time.perf_counter() - t0
        if self._mode is MemoryMode.STATIC:
            self._enter_static()

    def _host_tier_supported(self) -> bool:
        """Whether ``_page_out_impl`` can keep the weights in host memory (else page-out unloads)."""
        return False

    def _page_out_impl(self) -> None:
        """Copy the weights to host memory and give their device memory back (the call lock
        is held, static memory released). Must leave the weights on the device on failure."""
        raise EbbInternalError(f"the {type(self).__name__} backend has no host tier")

    def _page_in_impl(self) -> None:
        """Bring the weights back from host memory; on failure leave them on the host."""
        raise EbbInternalError(f"the {type(self).__name__} backend has no host tier")

    def _prepare_host_tier_impl(self) -> None:
        """Allocate the host copy's memory ahead of a page-out (optional)."""

    def _unload_impl(self) -> None:
        """Give back everything loading made, keeping what a later load needs."""
        self._close_impl()

    def _weights_device_bytes_impl(self) -> int:
        return int(self.describe().weights_bytes)

    def _set_physical_source_impl(self, source) -> None:
        """Take context memory's physical backing from ``source`` (before loading)."""

