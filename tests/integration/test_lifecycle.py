"""Jobs through the whole system: real master, real machines, real checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import CALM, TWO_PREEMPTIONS, Cluster, expected_counter
from tests.processes import wait_until_gone

pytestmark = pytest.mark.integration


def scrape_metrics(cluster: Cluster) -> dict[str, float]:
    url = json.loads((cluster.home / "master.json").read_text())["url"] + "/metrics"
    token = (cluster.home / "api-token").read_text().strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_a_job_completes_and_its_output_can_be_fetched(cluster: Cluster) -> None:
    cluster.market(CALM)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("quick", n=20, delay=0.02))
    job = cluster.wait(job_id)
    assert job["state"] == "COMPLETED", job
    assert (job["restarts"], job["preemptions"]) == (0, 0)
    out = cluster.fetch(job_id)
    assert (out / "output.txt").read_text() == expected_counter(20)
    assert "done: counted to 20" in (out / "stdout").read_text()
    logs = cluster.cli("logs", job_id)
    assert logs.returncode == 0 and "done: counted to 20" in logs.stdout
    status = cluster.cli("status", job_id, "--json")
    assert '"state": "COMPLETED"' in status.stdout
    table = cluster.cli("status")
    assert job_id in table.stdout and "COMPLETED" in table.stdout
    assert job["cost_so_far"] > 0
    cluster.assert_nothing_left()
    secrets = [(cluster.home / name).read_bytes().strip() for name in ("api-token", "bus.key", "master.key")]
    logs = [p.read_bytes() for p in [*cluster.home.glob("*.log"), *cluster.home.glob("machines/*/console.log")]]
    assert logs and not any(secret in log for secret in secrets for log in logs)  # no secret in any log
    lines = [json.loads(line) for line in (cluster.home / "master-0.log").read_text().splitlines()
             if line.startswith("{")]
    about_the_job = [line for line in lines if job_id in json.dumps(line)]
    assert about_the_job and all(line.get("job_id") == job_id for line in about_the_job), \
        [line for line in about_the_job if "job_id" not in line]  # every line about a job names it


def test_a_job_preempted_twice_resumes_from_its_checkpoints(cluster: Cluster) -> None:
    cluster.market(TWO_PREEMPTIONS)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("survivor", n=250, delay=0.1, interval=1))
    job = cluster.wait(job_id, timeout=120)
    assert job["state"] == "COMPLETED", job["events"]
    assert job["preemptions"] == 2 and job["restarts"] == 2
    zones = [e["detail"] for e in job["events"] if e["kind"] == "provisioning"]
    assert [z.split(" in ")[1].split()[0] for z in zones] == ["z1", "z2", "z3"]
    notices = [e for e in job["events"] if e["kind"] == "preempted"]
    assert all("checkpointed" in e["detail"] for e in notices)
    margins = [float(re.search(r"([\d.]+)s before the machine is reclaimed", e["detail"]).group(1))
               for e in job["events"] if e["kind"] == "checkpoint" and "(notice)" in e["detail"]]
    assert len(margins) == 2 and all(m > 0 for m in margins)  # uploaded inside the notice window
    out = cluster.fetch(job_id)
    assert (out / "output.txt").read_text() == expected_counter(250)
    resumed = [int(n) for n in re.findall(r"resuming at (\d+)", (out / "stdout").read_text())]
    assert len(resumed) == 2 and 0 < resumed[0] < resumed[1] < 250  # never from zero
    assert job["restored_from"] is not None
    metrics = scrape_metrics(cluster)
    assert metrics["cbas_preemptions_total"] == 2 and metrics["cbas_restarts_total"] == 2
    assert metrics["cbas_checkpoint_seconds_count"] >= 2 and metrics['cbas_jobs{state="COMPLETED"}'] == 1
    cluster.assert_nothing_left()


def test_a_failing_job_reports_its_exit_code_and_stderr(cluster: Cluster) -> None:
    cluster.market(CALM)
    cluster.start_master()
    folder = cluster.home / "failing"
    folder.mkdir()
    (folder / "job.jdl").write_text('Executable = "/bin/sh"; Arguments = "-c \'echo almost >&2; echo broken >&2; exit 4\'";')
    job_id = cluster.submit(folder / "job.jdl")
    job = cluster.wait(job_id)
    assert job["state"] == "FAILED"
    assert job["exit_code"] == 4
    assert job["stderr_tail"].splitlines()[-2:] == ["almost", "broken"]
    shown = cluster.cli("status", job_id)
    assert "exit code 4" in shown.stdout and "broken" in shown.stdout
    assert cluster.cli("fetch", job_id, "-o", str(cluster.home / "f")).returncode == 1  # fetched, but failed
    cluster.assert_nothing_left()


def test_cancel_while_running_terminates_the_machine_and_every_process(cluster: Cluster) -> None:
    cluster.market(CALM)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("long", n=10000, delay=0.1))
    cluster.wait(job_id, ("RUNNING",))
    groups = cluster.process_groups()
    assert len(groups) == 2  # the machine and the job
    result = cluster.cli("cancel", job_id)
    assert result.returncode == 0, result.stderr
    job = cluster.wait(job_id)
    assert job["state"] == "CANCELLED"
    assert wait_until_gone(groups) == []
    cluster.assert_nothing_left()
    assert all(m["state"] == "TERMINATED" for m in job["machines"])


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_master_killed_and_restarted_mid_job_loses_nothing(cluster: Cluster, stop: int) -> None:
    cluster.market(CALM)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("durable", n=80, delay=0.1, interval=1))
    cluster.wait(job_id, ("RUNNING",))
    machines = cluster.running_machines()
    cluster.kill_master(stop)
    time.sleep(1.0)  # the job goes on without a master
    cluster.start_master()
    job = cluster.wait(job_id)
    assert job["state"] == "COMPLETED", job["events"]
    assert job["restarts"] == 0  # the running machine was adopted, not replaced
    assert [m["instance_id"] for m in job["machines"]] == machines
    out = cluster.fetch(job_id)
    assert (out / "output.txt").read_text() == expected_counter(80)
    cluster.assert_nothing_left()


def test_a_job_that_finishes_while_the_master_is_away_longer_than_the_bus_retries_completes(
    cluster: Cluster,
) -> None:
    # the bus gives up on an unreachable master after its retries (SNS's default: 3, ~20 s apart;
    # here 1 after 0.3 s), so the JOB_DONE sent meanwhile is dropped; the worker keeps the fact and
    # sends it again until the master acknowledges it
    cluster.env.update(CBAS_BUS_DELIVERY_RETRIES="1", CBAS_BUS_RETRY_SECONDS="0.3")
    cluster.market(CALM)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("away", n=20, delay=0.1, interval=1))
    cluster.wait(job_id, ("RUNNING",))
    [record] = [r for r in cluster.records() if r.machine.instance_id in cluster.running_machines()]
    cluster.kill_master(signal.SIGKILL)
    console = Path(record.disk) / "console.log"
    deadline = time.monotonic() + 30
    def dropped_job_done() -> bool:
        lines = console.read_text().splitlines() if console.exists() else []
        return any("bus.delivery_dropped" in line and "JOB_DONE" in line for line in lines)

    while not dropped_job_done():
        assert time.monotonic() < deadline, "the worker's JOB_DONE was never dropped while the master was away"
        time.sleep(0.2)
    time.sleep(1.0)
    cluster.start_master()
    job = cluster.wait(job_id, timeout=60)
    assert job["state"] == "COMPLETED", job["events"]
    assert job["restarts"] == 0
    assert (cluster.fetch(job_id) / "output.txt").read_text() == expected_counter(20)
    cluster.assert_nothing_left()


def test_a_machine_launched_before_a_master_crash_is_not_leaked(cluster: Cluster) -> None:
    """A machine the ledger does not know (as after a crash inside launch) is terminated."""
    cluster.market(CALM)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("leak", n=10000, delay=0.1))
    cluster.wait(job_id, ("RUNNING",))
    cluster.kill_master(signal.SIGKILL)
    import sqlite3

    with sqlite3.connect(cluster.home / "cbas.db") as db:  # forget the machine, as a lost write would
        db.execute("DELETE FROM ledger")
    [stray] = cluster.running_machines()
    cluster.start_master()
    deadline = time.monotonic() + 20
    while stray in cluster.running_machines() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stray not in cluster.running_machines()
    job = cluster.wait(job_id, ("RUNNING",), timeout=30)  # and the job runs again elsewhere
    assert job["instance_id"] != stray
    cluster.cli("cancel", job_id)
    cluster.wait(job_id)
    cluster.assert_nothing_left()


def test_a_worker_that_stops_pinging_is_declared_dead_and_the_job_restarts(cluster: Cluster) -> None:
    cluster.market(CALM)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("frozen", n=60, delay=0.1, interval=1))
    job = cluster.wait(job_id, ("RUNNING",))
    first = job["instance_id"]
    [record] = [r for r in cluster.records() if r.machine.instance_id == first]
    groups = cluster.process_groups()
    os.killpg(record.pgid, signal.SIGSTOP)  # the worker freezes; its job goes on, unheard
    job = cluster.wait(job_id)
    assert job["state"] == "COMPLETED", job["events"]
    lost = [e for e in job["events"] if e["kind"] == "machine-lost"]
    assert lost and "stopped answering" in lost[0]["detail"]
    assert job["restarts"] == 1 and job["instance_id"] != first
    assert wait_until_gone(groups) == []  # the frozen machine and its job were killed
    out = cluster.fetch(job_id)
    assert (out / "output.txt").read_text() == expected_counter(60)
    cluster.assert_nothing_left()


def test_a_volume_job_restarts_on_a_disk_made_from_its_snapshot(cluster: Cluster) -> None:
    cluster.market({
        ("z1", "c5.large"): (0.020, 0.085, [(0.0, True), (10.0, False)]),
        ("z2", "c5.large"): (0.040, 0.085, [(0.0, True)]),
    })
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("on-a-volume", n=150, delay=0.1, interval=1,
                                            extra='CheckpointStrategy = "volume";\n'))
    job = cluster.wait(job_id, timeout=120)
    assert job["state"] == "COMPLETED", job["events"]
    assert job["preemptions"] == 1 and job["restarts"] == 1
    snapshots = [e["detail"].rsplit("disk snapshot ", 1)[1] for e in job["events"] if e["kind"] == "checkpoint"]
    assert snapshots and all(s.startswith("snap-") for s in snapshots)
    out = cluster.fetch(job_id)
    assert (out / "output.txt").read_text() == expected_counter(150)
    resumed = [int(n) for n in re.findall(r"resuming at (\d+)", (out / "stdout").read_text())]
    assert len(resumed) == 1 and 0 < resumed[0] < 150  # from the snapshot, not from zero
    # every snapshot goes with the finished job (deleted just after its end is recorded)
    deadline = time.monotonic() + 30
    while list((cluster.home / "snapshots").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list((cluster.home / "snapshots").iterdir()) == []
    cluster.assert_nothing_left()
