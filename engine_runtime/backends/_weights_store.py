"""A PyTorch module's weights at stable device addresses, and their trip to host memory.

``WeightsLayout`` lays every parameter and buffer of a module out in one flat byte
range (each tensor 256-byte aligned) and points the module's tensors at views of
whatever flat buffer it is given. ``VmmWeights`` gives it a flat buffer on the GPU at a
virtual address reserved once per engine (CUDA VMM): page-out copies the range to one
pinned host buffer and unmaps and releases the physical memory; page-in creates new
physical memory, maps it at the *same* address and copies back. Every parameter's
``data_ptr()`` is unchanged, so CUDA graphs captured over the weights stay valid (as
the context arena keeps graphs valid over its activations, and as vLLM's sleep mode
keeps its weights). ``HostWeights`` is the same trip on a CPU: the weights move into
one host buffer and the module's own storage is freed; page-in copies them back into
new storage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Every tensor starts at a multiple of this (cuDNN and vectorised kernels like 16+; 256 is CUDA's malloc alignment).
ALIGN = 256


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass
class _Slot:
    """One distinct tensor (tied weights are one slot with several owners)."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: (module, attribute, is_parameter) of every place the tensor is reachable from.
    owners: list[tuple[nn.Module, str, bool]] = field(default_factory=list)

    def current(self) -> torch.Tensor:
        module, attr, is_param = self.owners[0]
        t = module._parameters[attr] if is_param else module._buffers[attr]
        return t.data if is_param else t

    def set(self, tensor: torch.Tensor) -> None:
        done_params: set[int] = set()
        for module, attr, is_param in self.owners:
            if is_param:
                p = module._parameters[attr]
                if id(p) not in done_params:  # one Parameter object, possibly in several modules
                    p.data = tensor
                    done_params.add(id(p))
            else:
                module._buffers[attr] = tensor


class WeightsLayout:
    """Offsets of every parameter and buffer of ``module`` in one flat byte range."""

    def __init__(self, module: nn.Module) -> None:
        by_id: dict[int, _Slot] = {}
        offset = 0
        for mod in module.modules():
            entries = [(a, t, True) for a, t in mod._parameters.items() if t is not None]
            entries += [(a, t, False) for a, t in mod._buffers.items() if t is not None]
            for attr, tensor, is_param in entries:
                slot = by_id.get(id(tensor))
                if slot is None:
                    nbytes = tensor.numel() * tensor.element_size()
                    slot = _Slot(offset, nbytes, tuple(tensor.shape), tensor.dtype)
                    by_id[id(tensor)] = slot
                    offset = _round_up(offset + nbytes, ALIGN)
                slot.owners.append((mod, attr, is_param))
        self.slots = list(by_id.values())
        #: Bytes of the flat range (alignment gaps included).
        self.total_bytes = max(offset, 1)
        #: Bytes of the tensors themselves (what ``describe().weights_bytes`` counts).
        self.tensor_bytes = sum(s.nbytes for s in self.slots)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each slot's tensor as a view of ``flat`` (a 1-D uint8 tensor of ``total_bytes``)."""
        out = []
        for s in self.slots:
            raw = flat[s.offset:s.offset + s.nbytes]
            out.append(raw.view(s.dtype).view(s.shape) if s.nbytes else
                       torch.empty(s.shape, dtype=s.dtype, device=flat.device))
        return out

    def copy_into(self, flat: torch.Tensor, non_blocking: bool = False) -> None:
        """Copy the module's current tensors into ``flat`` at their offsets."""
        with torch.no_grad():
            for s, view in zip(self.slots, self.views(flat)):
                if s.nbytes:
                    view.copy_(s.current(), non_blocking=non_blocking)

    def point_at(self, flat: torch.Tensor) -> None:
        """Make the module's parameters and buffers views of ``flat``."""
        for s, view in zip(self.slots, self.views(flat)):
            s.set(view)

    def point_at_copies(self, flat: torch.Tensor) -> None:
        """Make the module's tensors independent copies of ``flat``'s contents (``flat`` may then go)."""
        for s, view in zip(self.slots, self.views(flat)):
            s.set(view.clone())

    def clear(self) -> None:
        """Point every tensor at empty storage (its old storage is freed if nothing else holds it)."""
        for s in self.slots:
            s.set(torch.empty(0, dtype=s.dtype, device=s.current().device))


class HostWeights:
    """CPU engines: page-out moves the weights into one host buffer and frees the module's storage."""

    def __init__(self, module: nn.Module) -> None:
        self.layout = WeightsLayout(module)
        self._saved: torch.Tensor | None = None

    @property
    def paged_out(self) -> bool:
        return self._saved is not None

    def page_out(self) -> int:
        flat = torch.empty(self.layout.total_bytes, dtype=torch.uint8)
        self.layout.copy_into(flat)
        self.layout.clear()
        self._saved = flat
        return self.layout.tensor_bytes

    def page_in(self) -> None:
        # New storage for each tensor, as the module had before: nothing aliases the buffer.
        self.layout.point_at_copies(self._saved)
        self._saved = None


def _pinned(nbytes: int) -> torch.Tensor:
    """Page-locked host memory: copies from it run at the link's full speed (55 GB/s on an
    H200 host, against 19 GB/s from pageable memory)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _device_view(ptr: int, nbytes: int, device: int) -> torch.Tensor:
    """A uint8 tensor over ``[ptr, ptr + nbytes)`` of ``device`` that owns nothing."""
    return torch.as_tensor(_DeviceRange(ptr, nbytes), device=f"cuda:{device}")


class _DeviceRange:
    """``__cuda_array_interface__`` over a raw device range, for ``torch.as_tensor``."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None, "stream": None}


class VmmWeights:
    """A module's weights in one VMM range of the GPU, at addresses that never change."""

    def __init__(self, module: nn.Module, device: int, stream: torch.cuda.ExternalStream) -> None:
        from engine_runtime import _cuda

        self._cuda = _cuda
        self.device = device
        self.stream = stream
        self.layout = WeightsLayout(module)
        gran = _cuda.granularity(device)
        #: Device bytes while resident: the flat range rounded up to the VMM granularity.
        self.mapped_bytes = _cuda.round_up(self.layout.total_bytes, gran)
        with _cuda.device(device):
            self.base = _cuda.address_reserve(self.mapped_bytes, gran)
        self._handle = None
        self._host: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None
        try:
            self._map()
            # The view object holds no memory; it stays valid across unmap and remap.
            self._flat = _device_view(self.base, self.layout.total_bytes, device)
            if self._flat.data_ptr() != self.base or self._flat.dtype != torch.uint8 or \
                    tuple(self._flat.stride()) != (1,):
                raise RuntimeError(f"the device view of the weights range is not the range: ptr "
                                   f"0x{self._flat.data_ptr():x} vs 0x{self.base:x}, {self._flat.dtype}, "
                                   f"strides {self._flat.stride()}")
            with torch.cuda.stream(stream):
                self.layout.copy_into(self._flat, non_blocking=False)
            stream.synchronize()
            self.layout.point_at(self._flat)
        except BaseException:
            self.close()
            raise

    @property
    def resident(self) -> bool:
        return self._handle is not None

    def _map(self) -> None:
        cuda = self._cuda
        handle = cuda.mem_create(self.device, self.mapped_bytes)
        try:
            with cuda.device(self.device):
                cuda.mem_map(self.base, self.mapped_bytes, handle)
                try:
                    cuda.set_access(self.device, self.base, self.mapped_bytes)
                except BaseException:
                    cuda.mem_unmap(self.base, self.mapped_bytes)
                    raise
        except BaseException:
            cuda.mem_release(handle)
            raise
        self._handle = handle

    def _unmap(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        with self._cuda.device(self.device):
            self._cuda.mem_unmap(self.base, self.mapped_bytes)
        self._cuda.mem_release(handle)

    def prepare_host(self) -> None:
        """The pinned host buffer page-out copies into, made now (kept for the engine's life:
        later page-outs cost one copy and no host allocation)."""
        if self._host is None:
            self._host = _pinned(self.layout.total_bytes)

    def page_out(self) -> None:
        """Weights to pinned host memory; the physical memory goes back to the driver."""
        self.stream.synchronize()
        self.prepare_host()
        with torch.cuda.stream(self.stream):
            self._host.copy_(self._flat, non_blocking=True)
        self.stream.synchronize()
        self._unmap()

    def page_in(self) -> None:
        """New physical memory at the same address, the weights copied back (one pinned H2D copy).
        On failure nothing stays mapped and the weights stay on the host."""
        self._map()
        try:
            with torch.cuda.stream(self.stream):
                self._flat.copy_(self._host, non_blocking=True)
            self.stream.synchronize()
        except BaseException:
            self._unmap()
            raise

    def detach_to_cpu(self) -> None:
        """Point the module at CPU copies of the weights (from the device or the host copy)."""
        if self.resident:
            self.stream.synchronize()
            self.layout.point_at_copies(self._flat.cpu())
        elif self._host is not None:
            self.layout.point_at_copies(self._host)

    def close(self) -> None:
        self._flat = None
        self._unmap()
        if self.base:
            with self._cuda.device(self.device):
                self._cuda.address_free(self.base, self.mapped_bytes)
            self.base = 0
        self._host = None
