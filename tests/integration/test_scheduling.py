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


def test_a_job_moves_to_a_cheaper_zone_once_a_launch_shows_it_is_back(cluster: Cluster) -> None:
    # z2 is much cheaper and has no capacity until 20 s; z1, dearer, has it throughout. As on
    # EC2, the master learns capacity only by launching: the mover's tries in z2 are refused, it
    # sits out z1's price while its slack allows and then runs on z1. A second job launched in z2
    # at 21 s shows z2 is back; then the mover moves there (a move
    # stops the job first, so it is never made into a market only presumed up).
    cluster.market({
        ("z1", "c5.large"): (0.060, 0.085, [(0.0, True)]),
        ("z2", "c5.large"): (0.010, 0.085, [(0.0, False), (20.0, True)]),
    })
    cluster.start_master()
    mover = cluster.submit(cluster.job_dir("mover", n=200, delay=0.1, interval=1,
                                           extra='Deadline = "36s"; Runtime = "20s"; InstanceTypes = {"c5.large"};\n'))
    time.sleep(21.0)
    probe = cluster.submit(cluster.job_dir("probe", n=5, delay=0.1, interval=1, extra='InstanceTypes = {"c5.large"};\n'))
    assert zones_used(cluster.wait(probe, timeout=60)) == ["z2"]
    job = cluster.wait(mover, timeout=90)
    assert job["state"] == "COMPLETED", job["events"]
    kinds = [e["kind"] for e in job["events"]]
    assert kinds.index("waiting") < kinds.index("provisioning")
    assert zones_used(job) == ["z1", "z2"], job["events"]
    moved = [e["detail"] for e in job["events"] if e["kind"] == "moved"]
    assert moved and "moving to c5.large in z2" in moved[0] and "checkpointed" in moved[0]
    assert job["preemptions"] == 0 and job["restarts"] == 1
    took = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["submitted_at"])
    assert took.total_seconds() < 36  # the deadline held
    assert (cluster.fetch(mover) / "output.txt").read_text() == expected_counter(200)
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
