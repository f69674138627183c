"""Pressure probes without a GPU: the CUDA_VISIBLE_DEVICES → NVML UUID table, the
virtual probe fed by accounting and injected pressure, the static probe, and NVML
failing cleanly where there is no driver."""

from __future__ import annotations

import os

import pytest

from engine_runtime.errors import EbbError
from engine_runtime.pressure import (
    EXTERNAL_PID,
    GpuPressure,
    NvmlProbe,
    PressureProbe,
    ProbeUnavailable,
    StaticProbe,
    VirtualProbe,
    cuda_visible_to_nvml_uuids,
)
from engine_runtime.units import GiB

U0 = "GPU-1a2b3c4d-0000-1111-2222-333333333333"
U1 = "GPU-1a2b9999-0000-1111-2222-444444444444"
U2 = "GPU-77777777-0000-1111-2222-555555555555"
NVML = [U0, U1, U2]
MIG = "MIG-0f0e0d0c-aaaa-bbbb-cccc-dddddddddddd"

MAPPING = [
    ("unset: every device in NVML order", None, [U0, U1, U2]),
    ("empty: no device", "", []),
    ("one index", "2", [U2]),
    ("indexes reorder", "2,0", [U2, U0]),
    ("spaces are ignored", " 1 , 0 ", [U1, U0]),
    ("full UUID", U1, [U1]),
    ("UUIDs and indexes mixed", f"{U2},0", [U2, U0]),
    ("unique UUID prefix", "GPU-7777", [U2]),
    ("prefix without GPU-", "1a2b3c", [U0]),
    ("all digits is an index, never a UUID prefix", "77777777", []),
    ("prefix is case-insensitive", "gpu-1A2B3C", [U0]),
    ("ambiguous prefix ends the list", "2,GPU-1a2b,0", [U2]),
    ("unknown UUID ends the list", "1,GPU-ffff,0", [U1]),
    ("out-of-range index ends the list", "0,7,1", [U0]),
    ("negative index ends the list", "1,-1,0", [U1]),
    ("a repeated device ends the list", "0,0,1", [U0]),
    ("an empty entry ends the list", "0,,1", [U0]),
    ("MIG id passed through", MIG, [MIG]),
    ("MIG after a GPU", f"1,{MIG}", [U1, MIG]),
]


@pytest.mark.parametrize("env, expected", [row[1:] for row in MAPPING], ids=[row[0] for row in MAPPING])
def test_cuda_visible_to_nvml_uuids(env, expected):
    assert cuda_visible_to_nvml_uuids(env, NVML) == expected


def test_mapping_on_a_node_without_devices():
    assert cuda_visible_to_nvml_uuids("0", []) == []
    assert cuda_visible_to_nvml_uuids(None, []) == []


def test_virtual_probe_reads_accounting_and_injected_bytes():
    accounted = {"vgpu-0": 3 * GiB, "vgpu-1": GiB}
    probe = VirtualProbe({"vgpu-0": 16 * GiB, "vgpu-1": 8 * GiB}, accounted.__getitem__)
    assert isinstance(probe, PressureProbe)
    g0, g1 = probe.read()
    assert (g0.uuid, g0.index, g0.total_bytes, g0.used_bytes, g0.free_bytes) == ("vgpu-0", 0, 16 * GiB, 3 * GiB, 13 * GiB)
    assert g0.process_bytes == {os.getpid(): 3 * GiB}
    assert g1.index == 1 and g1.used_bytes == GiB

    probe.inject_external("vgpu-0", 10 * GiB)
    accounted["vgpu-0"] = 4 * GiB  # an engine took more context
    g0, g1 = probe.read()
    assert g0.used_bytes == 14 * GiB and g0.free_bytes == 2 * GiB
    assert g0.process_bytes == {os.getpid(): 4 * GiB, EXTERNAL_PID: 10 * GiB}
    assert g0.used_fraction == pytest.approx(14 / 16)
    assert g1.used_bytes == GiB  # the other device is untouched

    probe.inject_external("vgpu-0", 20 * GiB)  # more than the card: free clamps at 0
    assert probe.read()[0].free_bytes == 0
    probe.inject_external("vgpu-0", 0)
    assert probe.read()[0].used_bytes == 4 * GiB


def test_virtual_probe_rejects_bad_input():
    with pytest.raises(ValueError, match="> 0 bytes"):
        VirtualProbe({"vgpu-0": 0})
    probe = VirtualProbe({"vgpu-0": GiB})
    with pytest.raises(KeyError, match="vgpu-0"):
        probe.inject_external("vgpu-9", 1)
    with pytest.raises(ValueError, match=">= 0"):
        probe.inject_external("vgpu-0", -1)
    assert probe.read()[0].used_bytes == 0  # no accounting function: nothing used


def test_static_probe_sets_and_fails():
    reading = GpuPressure("GPU-x", 0, 80 * GiB, 10 * GiB, 0, 70 * GiB, 5.0, {123: 10 * GiB})
    probe = StaticProbe([reading])
    assert probe.read()[0].used_bytes == 10 * GiB
    probe.update("GPU-x", used_bytes=60 * GiB)
    (r,) = probe.read()
    assert r.used_bytes == 60 * GiB and r.free_bytes == 20 * GiB and r.timestamp_s > 0
    probe.fail("driver gone")
    with pytest.raises(ProbeUnavailable, match="driver gone"):
        probe.read()
    probe.fail(None)
    assert probe.read()
    with pytest.raises(KeyError):
        probe.update("GPU-y", used_bytes=1)


def test_nvml_probe_without_a_gpu_raises_probe_unavailable():
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this host has a GPU; NvmlProbe is exercised by tests/gpu")
    except ImportError:
        pass
    with pytest.raises(ProbeUnavailable) as info:
        NvmlProbe()
    assert isinstance(info.value, EbbError)
    assert "NVML" in str(info.value) or "pynvml" in str(info.value)
