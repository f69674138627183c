"""The backends' weights-tier hooks (``BaseEngine``'s ``_page_*_impl``), kept beside them.

PyTorch: on a GPU with VMM the weights live at stable addresses (``_weights_store``)
and page-out/page-in move them to pinned host memory and back, captured graphs
untouched; on a CPU they move into one host buffer and back. Without VMM on a GPU
there is no host tier: page-out unloads and the next call reloads (graphs recaptured).

TensorRT: its API offers no stable address for an engine's weights, so the host tier
keeps the serialized plan in host memory (re-serialised if the engine was refitted,
so refits survive) and destroys the engine and its execution contexts; page-in
deserialises the plan again. That is a rebuild, correct but slower than a copy
(deserialisation costs tens of milliseconds for a ResNet-50 plan, not ~2 ms).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from engine_runtime.errors import ContextMemoryUnavailable
from engine_runtime.memory import ContextMechanism
from engine_runtime.units import MiB

logger = logging.getLogger("engine_runtime.backends.pytorch")


class PyTorchTiers:
    """Weights-tier hooks of ``PyTorchEngine``."""

    def _place_weights(self, module: Any, index: int) -> Any:
        """Put the module's weights on cuda:``index``: in one VMM range at stable addresses
        where the GPU has VMM (the host tier keeps captured graphs valid), else ``module.to``."""
        from engine_runtime import _cuda
        from engine_runtime.backends._weights_store import VmmWeights

        if _cuda.vmm_supported(index):
            try:
                self._weights = VmmWeights(module, index, self._stream)
                return module
            except _cuda.CudaError as err:
                if err.oom:
                    raise
                self.stable_weights_error = str(err)
            except Exception as err:  # noqa: BLE001 - the engine still serves, without a host tier
                self.stable_weights_error = f"{type(err).__name__}: {err}"
            logger.warning("engine %s: weights not at stable addresses (%s); page-out will unload",
                           self.name, self.stable_weights_error)
        return module.to(self._device)

    def _host_tier_supported(self) -> bool:
        return self._mech is ContextMechanism.HOST_ACCOUNTING or self._weights is not None

    def _page_out_impl(self) -> None:
        if self._weights is not None:
            self._weights.page_out()
            return
        from engine_runtime.backends._weights_store import HostWeights

        if self._host_weights is None:
            self._host_weights = HostWeights(self._module)
        self._host_weights.page_out()

    def _prepare_host_tier_impl(self) -> None:
        if self._weights is not None:
            self._weights.prepare_host()

    def _page_in_impl(self) -> None:
        if self._weights is None:
            self._host_weights.page_in()
            return
        from engine_runtime import _cuda

        # Out of device memory is retried until the deadline (a neighbour's call ending is the
        # usual way out), then a 503-kind ContextMemoryUnavailable; the weights stay on the host.
        start = time.monotonic()
        delay = 0.0005
        while True:
            try:
                self._weights.page_in()
                return
            except _cuda.CudaError as err:
                waited = time.monotonic() - start
                if not err.oom:
                    raise
                if waited >= self.call_deadline_s:
                    free = _cuda.mem_get_info(self._weights.device)[0]
                    raise ContextMemoryUnavailable(self._weights.mapped_bytes, free, waited,
                                                   f"cuda:{self._weights.device} (weights of {self.name})") from err
                time.sleep(min(delay, max(self.call_deadline_s - waited, 0)))
                delay = min(delay * 2, 0.02)

    def _unload_impl(self) -> None:
        from torch import nn

        # A module given as an object, or updated in place, cannot be built again: keep it
        # (on the CPU). Otherwise the factory builds it again on the next load, and nothing
        # is kept in host memory while unloaded.
        keep = isinstance(self._module_or_factory, nn.Module) or self._weights_updated
        if self._device is not None and self._device.type == "cuda":
            self._unload_cuda(restore=keep)
        elif keep and self._host_weights is not None and self._host_weights.paged_out:
            self._host_weights.page_in()
        self._host_weights = None
        if not keep:
            self._module = None

    def _weights_device_bytes_impl(self) -> int:
        from engine_runtime.backends._weights_store import WeightsLayout

        if self._weights is not None:
            return self._weights.mapped_bytes
        module = self._module_cpu()
        if self._will_run_on_cpu():
            return self._weights_bytes
        # VMM rounds the flat range up to its granularity (2 MiB on every NVIDIA GPU seen so far).
        return -(-WeightsLayout(module).total_bytes // (2 * MiB)) * (2 * MiB)

    def _set_physical_source_impl(self, source: Any) -> None:
        self._physical_source = source

    def _will_run_on_cpu(self) -> bool:
        if self._device is not None:
            return self._device.type == "cpu"
        import torch

        spec = self._device_spec
        if spec == "auto":
            return not torch.cuda.is_available()
        return torch.device(spec).type == "cpu"


class TensorRTTiers:
    """Weights-tier hooks of ``TensorRTEngine``: the plan kept on the host, the engine rebuilt."""

    def _host_tier_supported(self) -> bool:
        return True

    def _page_out_impl(self) -> None:
        engine = self._engine
        if getattr(self, "_refitted", False) and engine is not None:
            # The plan on disk has the old weights: keep the refitted engine's own.
            self._plan = bytes(engine.serialize())
        elif self._plan is None:
            self._plan = self._read_plan()  # page-in must not depend on the file still being there
        if self._stream is not None:
            self._device.synchronize(self._stream)
        # Reverse order of creation; the stream and the context allocator (an address
        # range, no memory between calls) stay for page-in.
        self._static_ctx = None
        self._dynamic_ctx = None
        self._engine = None
        self._runtime = None

    def _page_in_impl(self) -> None:
        self._deserialized()

    def _weights_device_bytes_impl(self) -> int:
        return int(self.describe().weights_bytes)

    def _set_physical_source_impl(self, source: Any) -> None:
        self._physical_source = source
