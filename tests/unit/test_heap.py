"""The serving processes keep their heap between requests (deployments.heap): a gRPC
ResNet request parsed and sized page-faults its buffers in every time under glibc's
defaults, and not once with Ebb's thresholds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deployments import heap

ROOT = Path(__file__).resolve().parents[2]

# One process per setting: glibc's thresholds, once fixed, stay for the process.
_REQUESTS = """
import resource, sys
import numpy as np
from deployments import grpc_service as g
from engine_runtime.spec import EngineDescription, ShapeProfile, TensorSpec
if sys.argv[1] == "tuned":
    from deployments.heap import keep_heap_for_requests
    assert keep_heap_for_requests()
x = np.ones((1, 3, 224, 224), np.float32)
req = g.pb.ModelInferRequest(model_name="r50")
req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
req.raw_input_contents.append(x.tobytes())
wire = req.SerializeToString()
desc = EngineDescription(name="r50", inputs=(TensorSpec("input", "float32", (-1, 3, 224, 224)),),
                         outputs=(TensorSpec("o", "float32", (-1, 1000)),),
                         profiles={"input": ShapeProfile((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))},
                         weights_bytes=0, backend="pytorch")
def request():
    # The ingress's gRPC parse as it was until 2026-12-08, which also sized the message
    # with upb's ByteSize (a serialization of it): a real pattern of buffers whose sum
    # passes glibc's dynamic trim threshold, as a handle's by-value arguments also do.
    req = g.pb.ModelInferRequest.FromString(wire)
    req.ByteSize()
    return g.parse_model_infer(req, desc)
for _ in range(20):
    request()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    request()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
"""


def _faults_per_request(setting: str) -> float:
    out = subprocess.run([sys.executable, "-c", _REQUESTS, setting], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(getattr(heap._libc(), "mallopt", None) is None, reason="glibc's mallopt")
def test_requests_reuse_the_heap_s_pages_instead_of_faulting_them_in():
    default, tuned = _faults_per_request("default"), _faults_per_request("tuned")
    # A 602 KB image is 147 pages: under the defaults each request takes them again.
    assert default > 100, f"glibc's defaults faulted only {default:.0f} pages a request: nothing to show"
    assert tuned < 5, f"{tuned:.1f} page faults a request with the heap kept"
