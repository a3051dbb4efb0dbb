"""kill -9 at each step of a job's life: the master (then started again), a worker, or both at
once. The job must complete with the right output and leave no machine or process behind."""

from __future__ import annotations

import pytest

from tests.integration.conftest import CALM, Cluster, expected_counter

pytestmark = pytest.mark.integration

MASTER_POINTS = ["launch-ledger-written", "launch-machine-started", "start-recorded", "checkpoint-recorded",
                 "job-finished-recorded"]
WORKER_POINTS = ["worker-job-started", "worker-checkpoint-uploaded", "worker-job-exited"]


def crash_once(cluster: Cluster, *points: str) -> None:
    cluster.env["CBAS_CRASH_AT"] = ",".join(points)
    cluster.env["CBAS_CRASH_MARKER"] = str(cluster.home / "crashed")


def run_to_the_end(cluster: Cluster, job_id: str, master_dies: bool) -> dict:  # type: ignore[type-arg]
    if master_dies:
        first = cluster.masters[-1]
        first.wait(timeout=60)  # it kills itself at its crash point
        assert first.returncode == -9
        cluster.start_master()
    job = cluster.wait(job_id, timeout=120)
    assert job["state"] == "COMPLETED", job["events"]
    assert (cluster.fetch(job_id) / "output.txt").read_text() == expected_counter(40)
    cluster.assert_nothing_left()
    return job


def submit(cluster: Cluster) -> str:
    return cluster.submit(cluster.job_dir("crashy", n=40, delay=0.05, interval=1))


@pytest.mark.parametrize("point", MASTER_POINTS)
def test_the_master_killed_at_each_step_loses_nothing(cluster: Cluster, point: str) -> None:
    cluster.market(CALM)
    crash_once(cluster, point)
    cluster.start_master()
    job_id = submit(cluster)
    del cluster.env["CBAS_CRASH_AT"]  # the master started again does not crash
    run_to_the_end(cluster, job_id, master_dies=True)
    assert (cluster.home / f"crashed.{point}").exists()  # it really died there


@pytest.mark.parametrize("point", WORKER_POINTS)
def test_a_worker_killed_at_each_step_loses_nothing(cluster: Cluster, point: str) -> None:
    cluster.market(CALM)
    crash_once(cluster, point)
    cluster.start_master()
    job = run_to_the_end(cluster, submit(cluster), master_dies=False)
    assert (cluster.home / f"crashed.{point}").exists()
    assert job["restarts"] >= 1  # its machine was given up and the job restarted on another


def test_master_and_worker_killed_together(cluster: Cluster) -> None:
    cluster.market(CALM)
    crash_once(cluster, "checkpoint-recorded", "worker-checkpoint-uploaded")
    cluster.start_master()
    job_id = submit(cluster)
    del cluster.env["CBAS_CRASH_AT"]
    run_to_the_end(cluster, job_id, master_dies=True)
    assert (cluster.home / "crashed.checkpoint-recorded").exists()


def test_a_worker_killed_after_recording_its_end_but_before_reporting_it_is_not_run_again(
        cluster: Cluster) -> None:
    """Its end is in the blob store before it is sent: the master, giving the silent machine up,
    reads it there instead of running the job again from its last checkpoint."""
    cluster.market(CALM)
    crash_once(cluster, "worker-end-recorded")
    cluster.start_master()
    job = run_to_the_end(cluster, submit(cluster), master_dies=False)
    assert (cluster.home / "crashed.worker-end-recorded").exists()
    assert job["restarts"] == 0, job["events"]
    assert any("recorded" in event["detail"] for event in job["events"] if event["kind"] == "completed"), job["events"]


def test_a_worker_killed_after_recording_a_checkpoint_but_before_reporting_it_restarts_from_it(
        cluster: Cluster) -> None:
    """Its checkpoint's report is in the blob store before it is sent: the master, giving the
    silent machine up, counts it there and restarts the job from it, not from the start."""
    cluster.market(CALM)
    crash_once(cluster, "worker-checkpoint-recorded")
    cluster.start_master()
    job = run_to_the_end(cluster, submit(cluster), master_dies=False)
    assert (cluster.home / "crashed.worker-checkpoint-recorded").exists()
    starts = [event["detail"] for event in job["events"] if event["kind"] == "starting"]
    assert len(starts) == 2 and "restoring a0001-n00001" in starts[1], job["events"]
