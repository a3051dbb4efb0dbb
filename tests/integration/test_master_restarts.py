"""The master killed (kill -9) again and again while its jobs are preempted and moved, through
real processes on the local backend: each crash point below kills the master once, the test
starts it again each time, and the jobs must finish with their true output, their moves and
preemptions counted as what they were, and nothing left running."""

from __future__ import annotations

import time

import pytest

from cbas.client import MasterUnavailable

from tests.integration.conftest import TERMINAL, TWO_PREEMPTIONS, Cluster, expected_counter
from tests.integration.test_scheduling import zones_used

pytestmark = pytest.mark.integration


def run_through_crashes(cluster: Cluster, job_id: str, points: list[str], timeout: float = 150) -> dict:  # type: ignore[type-arg]
    """Start the master again whenever it dies at one of its crash points, until the job ends."""
    deadline = time.monotonic() + timeout
    while True:
        master = cluster.masters[-1]
        if master.poll() is not None:
            assert master.returncode == -9, f"the master ended with {master.returncode}"
            cluster.start_master()
            continue
        try:
            job = cluster.job(job_id)
        except MasterUnavailable:  # it died at a crash point while answering: started again above
            assert time.monotonic() < deadline, "the master never answered"
            time.sleep(0.2)
            continue
        if job["state"] in TERMINAL:
            break
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}: {job['events']}"
        time.sleep(0.2)
    died_at = [p for p in points if (cluster.home / f"crashed.{p}").exists()]
    assert died_at == points, (f"the master died at {died_at} of {points}: "
                               f"{[(e['kind'], e['detail']) for e in job['events']]}")
    assert len(cluster.masters) == len(points) + 1
    return job


def crash_at(cluster: Cluster, points: list[str]) -> None:
    cluster.env["CBAS_CRASH_AT"] = ",".join(points)
    cluster.env["CBAS_CRASH_MARKER"] = str(cluster.home / "crashed")  # each point kills one master only


def test_a_move_survives_the_master_dying_as_it_asks_for_it(cluster: Cluster) -> None:
    # the job runs on spot in z1 until z1's price rises above on-demand at 5 s, then moves to
    # on-demand; the master dies just after asking the worker to checkpoint and stop for the
    # move. The worker's final checkpoint is taken by the next master: a move (the job's own),
    # never a spot preemption.
    points = ["move-requested"]
    crash_at(cluster, points)
    cluster.market({("z1", "c5.large"): (0.030, 0.085, [(0.0, True), (5.0, True, 0.200)])})
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir(
        "mover", n=100, delay=0.1, interval=1,
        extra='Deadline = "34s"; Runtime = "10s"; InstanceTypes = {"c5.large"};\n'))
    job = run_through_crashes(cluster, job_id, points)
    assert job["state"] == "COMPLETED", job["events"]
    moved = [e["detail"] for e in job["events"] if e["kind"] == "moved"]
    assert moved and "checkpointed" in moved[0], job["events"]
    assert job["preemptions"] == 0, [e for e in job["events"] if e["kind"] == "preempted"]
    assert (cluster.fetch(job_id) / "output.txt").read_text() == expected_counter(100)
    cluster.assert_nothing_left()


def test_preemptions_survive_the_master_dying_around_them(cluster: Cluster) -> None:
    # two spot notices (z1 at 10 s, z2 at 20 s); the master dies as it records the first notice,
    # at a checkpoint, and once its machine is started
    points = ["notice-recorded", "checkpoint-recorded", "launch-machine-started"]
    crash_at(cluster, points)
    cluster.market(TWO_PREEMPTIONS)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("survivor", n=250, delay=0.1, interval=1))
    job = run_through_crashes(cluster, job_id, points)
    assert job["state"] == "COMPLETED", job["events"]
    assert zones_used(job)[-1] == "z3"
    assert job["preemptions"] == 2, job["events"]  # both notices counted, whichever master heard them
    assert (cluster.fetch(job_id) / "output.txt").read_text() == expected_counter(250)
    cluster.assert_nothing_left()
