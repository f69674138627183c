"""Two cards of one host: pressure on one card moves only that card's replicas.

The Serve application with 2 replicas each of ResNet-18 and BERT-tiny at
``num_gpus: 0.5`` (so Ray must use both cards), the context pool on, every replica
``pin: auto`` and static. A client loop calls both models throughout. A separate
process (``CUDA_VISIBLE_DEVICES`` = the second card's UUID, ``torch.empty`` there)
fills the second card to 96% in steps, holds, frees. Asserted (the scenario is
``scripts/two_gpu_scenario.py``, shared with ``scripts/bench_two_gpu.py``):

- placement: 4 replicas, two per card, each card named by its NVML UUID;
- the first card's replicas stay static in every sample of ``/ebb/status`` and the
  coordinator decides nothing there; the second card's go dynamic, then static again
  after the free (each wait has a deadline and fails the test when it passes);
- identity: NVML lists every replica's pid on the card the replica reports, and on no
  other; each card's pool has its own owner process, on that card alone, holding
  chunks (status ``pool_bytes`` per UUID; its lease table file exists); the ballast is
  on the second card alone;
- 0 failed requests (an answer unlike the model's first one counts as failed).

Run on a host with two GPUs (the nvidia-h200-x2 machine):
    .venv/bin/pytest -m gpu tests/gpu/test_two_gpu.py -s
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


@pytest.fixture(scope="module")
def two_cards():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pynvml")
    pytest.importorskip("ray")
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"needs two CUDA devices (the nvidia-h200-x2 machine); this host sees {count}")
    return count


def test_pressure_on_the_second_card_moves_only_its_replicas(two_cards):
    import bench_two_gpu
    import two_gpu_scenario as scenario

    result = scenario.run(scenario.ScenarioConfig.gpu(), strict=True)
    print("\n" + bench_two_gpu.report(result))
    found = scenario.problems(result)
    assert not found, "\n".join(found)
