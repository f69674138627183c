"""Which GPU a replica is on, as one stable id the coordinator can group by.

A real GPU is named by its NVML UUID (Ray's ``CUDA_VISIBLE_DEVICES`` may hold
indexes or UUIDs, and NVML ignores it, so the mapping goes through
``engine_runtime.pressure.cuda_visible_to_nvml_uuids``). On hosts without a GPU,
Ray's logical GPUs become virtual devices named by node and logical index.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuIdentity:
    #: NVML UUID for a real GPU, ``vgpu-<node>-<index>`` for a logical one, ``cpu-<node>`` for none.
    uuid: str
    #: CUDA ordinal inside this process (always 0 under Ray's CUDA_VISIBLE_DEVICES), None without CUDA.
    cuda_index: int | None
    virtual: bool
    node_id: str


def current_replica_gpu() -> GpuIdentity:
    """Resolve the calling Ray worker's GPU."""
    import ray

    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    uuid = _real_gpu_uuid()
    if uuid is not None:
        return GpuIdentity(uuid, 0, False, node_id)
    if gpu_ids:
        return GpuIdentity(f"vgpu-{node_id[:12]}-{gpu_ids[0]}", None, True, node_id)
    return GpuIdentity(f"cpu-{node_id[:12]}", None, True, node_id)


def _real_gpu_uuid() -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        import pynvml

        from engine_runtime.pressure import cuda_visible_to_nvml_uuids

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        uuids = []
        for i in range(count):
            raw = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            uuids.append(raw.decode() if isinstance(raw, bytes) else raw)
        visible = cuda_visible_to_nvml_uuids(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
        return visible[0] if visible else None
    except Exception as err:  # noqa: BLE001 - no NVML means we cannot name the card: treat as virtual
        logger.warning("could not map this replica's GPU to NVML (%s); treating it as virtual", err)
        return None
