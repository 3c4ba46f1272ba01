"""Where bulk prediction's model actors go and what they hold, decided from the cluster's
resources before any work (no Ray started here)."""

from __future__ import annotations

import pytest

from pipelines import inference, predict
from pipelines.config import PredictConfig
from pipelines.errors import StageError


def _cfg(**kw) -> PredictConfig:
    return PredictConfig(model="models:/m@a", source="/src", out="/out", **kw)


def test_a_lone_actor_on_cpus_holds_none_and_runs_a_thread_per_cpu_of_its_node():
    assert inference.actor_cpus(1, False, None) == (0, None)  # None: as many threads as its node's CPUs
    assert inference.actor_cpus(3, False, None) == (1, 1)  # several on CPUs: one core each
    assert inference.actor_cpus(1, True, None) == (1, 1)  # on a GPU one CPU feeds it
    assert inference.actor_cpus(1, False, 4) == (4, 4)  # --cpus-per-worker sets both


def test_placement_takes_the_gpus_or_one_actor_and_refuses_what_the_cluster_cannot_hold():
    assert predict._placement(_cfg(), {"CPU": 1.0}) == (False, 1)  # the lone actor holds no CPU
    assert predict._placement(_cfg(), {"CPU": 16.0, "GPU": 4.0}) == (True, 4)
    assert predict._placement(_cfg(gpu=False), {"CPU": 16.0, "GPU": 4.0}) == (False, 1)
    with pytest.raises(StageError, match=r"--workers 5 --gpu: the Ray cluster has 4 GPUs; give --workers 4"):
        predict._placement(_cfg(workers=5), {"CPU": 16.0, "GPU": 4.0})
    with pytest.raises(StageError, match=r"--gpu: the Ray cluster has no GPU"):
        predict._placement(_cfg(gpu=True), {"CPU": 16.0})
    with pytest.raises(StageError, match=r"2 model actor\(s\) of 1 CPU\(s\) and a decode task need 3 CPUs; .* has 2"):
        predict._placement(_cfg(workers=2), {"CPU": 2.0})
    with pytest.raises(StageError, match=r"1 model actor\(s\) of 2 CPU\(s\) .* need 3 CPUs"):
        predict._placement(_cfg(cpus_per_worker=2), {"CPU": 2.0})
