"""The serving processes keep their heap between requests (deployments.heap): a gRPC
ResNet request turned into the protocol's request object page-faults its buffers in
every time under glibc's defaults, and not once with Ebb's thresholds."""

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
if sys.argv[1] == "tuned":
    from deployments.heap import keep_heap_for_requests
    assert keep_heap_for_requests()
x = np.ones((1, 3, 224, 224), np.float32)
req = g.pb.ModelInferRequest(model_name="r50")
req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
req.raw_input_contents.append(x.tobytes())
wire = req.SerializeToString()
def request():
    return g.infer_request_object(g.pb.ModelInferRequest.FromString(wire))
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
