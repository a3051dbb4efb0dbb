"""Restarts that fail or stall fall back to older checkpoints; a restart loop ends the job."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.integration.conftest import CALM, COUNTER, Cluster, expected_counter
from tests.processes import kill_groups

pytestmark = pytest.mark.integration

CRASH_ON_RESUME = """#!/bin/sh
# resuming from a state of {threshold} or more crashes, as if that checkpoint were subtly broken
if [ -f counter.state ] && [ "$(cat counter.state)" -ge {threshold} ]; then
  echo "cannot resume from $(cat counter.state)" >&2
  exit 9
fi
exec /bin/sh counter.sh "$@"
"""

STALL_ON_RESUME = """#!/bin/sh
# a signal-strategy counter that, resumed from 40 or more, never answers a checkpoint signal again
d="$CBAS_CHECKPOINT_DIR"
i=0
if [ -f "$d/count" ]; then i=$(cat "$d/count"); fi
if [ "$i" -ge 40 ]; then echo "stuck at $i"; trap '' USR1; sleep 600; fi
trap 'echo $i > "$d/count"; touch "$d/.done"' USR1
while [ "$i" -lt 100 ]; do i=$((i + 1)); echo "$i" > count.txt; sleep 0.1; done
echo "finished at $i"
"""


def job_with_wrapper(cluster: Cluster, name: str, wrapper: str, jdl: str) -> Path:
    folder = cluster.home / "jobs-src" / name
    folder.mkdir(parents=True)
    shutil.copy(COUNTER / "counter.sh", folder)
    (folder / "input.txt").write_text("3\n")
    (folder / "wrapper.sh").write_text(wrapper)
    (folder / "job.jdl").write_text(jdl)
    return folder / "job.jdl"


def kill_machine_when(cluster: Cluster, job_id: str, file: str, at_least: int, checkpointed_from: int,
                      timeout: float = 60) -> None:
    """Wait until the job's <file> in its working directory counts to at_least and two checkpoints
    were reported after it counted checkpointed_from (the newest holds a count at least that, however
    slow checkpoints are on a loaded machine), then kill its machine."""
    deadline = time.monotonic() + timeout
    reported_before: int | None = None
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        record = next((r for r in cluster.records() if r.machine.instance_id == job["instance_id"]), None)
        if record is not None:
            path = Path(record.disk) / "job" / "work" / file
            try:
                value = int(path.read_text().split()[-1]) if path.exists() else 0
            except (ValueError, IndexError):
                value = 0
            reported = len(job.get("checkpoint_list") or [])
            if value >= checkpointed_from and reported_before is None:
                reported_before = reported
            if value >= at_least and reported_before is not None and reported >= reported_before + 2:
                groups = [record.pgid] + [int(x) for x in (Path(record.disk) / "job-pgids").read_text().split()]
                kill_groups(groups)  # the machine dies without a notice
                return
        time.sleep(0.1)
    raise AssertionError(f"{file} never reached {at_least}")


def test_a_restart_that_crashes_falls_back_to_an_older_checkpoint(cluster: Cluster) -> None:
    cluster.market(CALM)
    cluster.start_master()
    jdl = ('Executable = "wrapper.sh"; Arguments = "150 input.txt"; InputSandbox = {"counter.sh", "input.txt"};\n'
           'OutputSandbox = {"output.txt"}; CheckpointInterval = 1; Environment = {COUNTER_DELAY = "0.1"};')
    job_id = cluster.submit(job_with_wrapper(cluster, "crashy", CRASH_ON_RESUME.format(threshold=40), jdl))
    cluster.wait(job_id, ("RUNNING",))
    kill_machine_when(cluster, job_id, "counter.state", 48, checkpointed_from=40)
    job = cluster.wait(job_id, timeout=120)
    assert job["state"] == "COMPLETED", job["events"]
    fallbacks = [e["detail"] for e in job["events"] if e["kind"] == "fallback"]
    assert fallbacks and all("exited with code 9" in detail for detail in fallbacks)
    assert job["fallbacks"] == len(fallbacks)
    assert any(c["bad"] for c in job["checkpoint_list"])
    assert (cluster.fetch(job_id) / "output.txt").read_text() == expected_counter(150)
    cluster.assert_nothing_left()


def test_a_restart_that_stalls_falls_back(cluster: Cluster) -> None:
    cluster.env.update(CBAS_RESTART_STALL_TIMEOUT="4", CBAS_SIGNAL_CHECKPOINT_TIMEOUT="1")
    cluster.market(CALM)
    cluster.start_master()
    jdl = 'Executable = "wrapper.sh"; CheckpointStrategy = "signal"; CheckpointInterval = 1;'
    job_id = cluster.submit(job_with_wrapper(cluster, "stally", STALL_ON_RESUME, jdl))
    cluster.wait(job_id, ("RUNNING",))
    kill_machine_when(cluster, job_id, "count.txt", 48, checkpointed_from=40)
    job = cluster.wait(job_id, timeout=120)
    assert job["state"] == "COMPLETED", job["events"]
    stalls = [e["detail"] for e in job["events"] if e["kind"] == "fallback"]
    assert stalls and "no new checkpoint within 4s" in stalls[0]
    logs = cluster.cli("logs", job_id).stdout
    assert "finished at 100" in logs
    cluster.assert_nothing_left()


def test_a_restart_loop_fails_the_job_with_the_reason(cluster: Cluster) -> None:
    cluster.env.update(CBAS_MAX_FALLBACKS="1")
    cluster.market(CALM)
    cluster.start_master()
    jdl = ('Executable = "wrapper.sh"; Arguments = "1000 input.txt"; InputSandbox = {"counter.sh", "input.txt"};\n'
           'CheckpointInterval = 1; Environment = {COUNTER_DELAY = "0.1"};')
    job_id = cluster.submit(job_with_wrapper(cluster, "loopy", CRASH_ON_RESUME.format(threshold=1), jdl))
    cluster.wait(job_id, ("RUNNING",))
    kill_machine_when(cluster, job_id, "counter.state", 25, checkpointed_from=1)
    job = cluster.wait(job_id, timeout=120)
    assert job["state"] == "FAILED"
    assert job["error"].startswith("restart loop: 2 restarts from checkpoints made no progress")
    shown = cluster.cli("status", job_id).stdout
    assert "restart loop" in shown and "fallback" in shown
    cluster.assert_nothing_left()
