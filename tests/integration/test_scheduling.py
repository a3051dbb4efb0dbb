"""Deadline-aware scheduling in the master: moves, on-demand near the deadline, costs shown."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from tests.integration.conftest import Cluster, expected_counter

pytestmark = pytest.mark.integration


def zones_used(job: dict) -> list[str]:
    return [re.search(r" in (\S+) at", e["detail"]).group(1) for e in job["events"] if e["kind"] == "provisioning"]


def test_a_job_moves_to_a_cheaper_zone_when_one_comes_back(cluster: Cluster) -> None:
    # z2 is much cheaper: it has capacity for the first 10 s (long against a restart of a second
    # or two), then none until 30 s; z1, dearer, has capacity throughout. The job waits for z2
    # while its slack is ample (sitting out the dear price), runs on z1 once half the slack is
    # gone, and moves to z2 when z2 comes back.
    cluster.market({
        ("z1", "c5.large"): (0.060, 0.085, [(0.0, True)]),
        ("z2", "c5.large"): (0.010, 0.085, [(0.0, True), (10.0, False), (30.0, True)]),
    })
    cluster.start_master()
    time.sleep(10.5)  # the master sees z2's period end
    jdl_path = cluster.job_dir("mover", n=100, delay=0.1, interval=1,
                               extra='Deadline = "34s"; Runtime = "10s"; InstanceTypes = {"c5.large"};\n')
    job_id = cluster.submit(jdl_path)
    job = cluster.wait(job_id, timeout=90)
    assert job["state"] == "COMPLETED", job["events"]
    kinds = [e["kind"] for e in job["events"]]
    assert kinds.index("waiting") < kinds.index("provisioning")
    assert zones_used(job) == ["z1", "z2"]
    moved = [e["detail"] for e in job["events"] if e["kind"] == "moved"]
    assert moved and "moving to c5.large in z2" in moved[0] and "checkpointed" in moved[0]
    assert job["preemptions"] == 0 and job["restarts"] == 1
    took = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["submitted_at"])
    assert took.total_seconds() < 34  # the deadline held
    assert (cluster.fetch(job_id) / "output.txt").read_text() == expected_counter(100)
    cluster.assert_nothing_left()


def test_without_spot_capacity_it_waits_then_runs_on_demand_and_meets_the_deadline(cluster: Cluster) -> None:
    cluster.market({("z1", "c5.large"): (0.03, 0.085, [(0.0, False)])})
    cluster.start_master()
    jdl_path = cluster.job_dir("deadline", n=60, delay=0.1, interval=1,
                               extra='Deadline = "20s"; Runtime = "6s"; InstanceTypes = {"c5.large"};\n')
    job_id = cluster.submit(jdl_path)
    job = cluster.wait(job_id, timeout=60)
    assert job["state"] == "COMPLETED", job["events"]
    kinds = [e["kind"] for e in job["events"]]
    assert "waiting" in kinds and kinds.index("waiting") < kinds.index("provisioning")
    [placement] = [e["detail"] for e in job["events"] if e["kind"] == "provisioning"]
    assert placement.startswith("on-demand c5.large in z1") and "slack left only covers" in placement
    submitted = datetime.fromisoformat(job["submitted_at"])
    finished = datetime.fromisoformat(job["finished_at"])
    assert (finished - submitted).total_seconds() < 20  # the deadline held
    assert job["predicted_cost"] is not None and job["cost_so_far"] > 0
    shown = cluster.cli("status", job_id).stdout
    assert "predicted $" in shown
    cluster.assert_nothing_left()
