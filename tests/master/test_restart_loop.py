"""No endless restarts: attempts that keep ending without a new checkpoint are a restart loop,
whatever ends them. The master says why and fails the job (cost bounded), or, when no checkpoint
failure is to blame (each machine was lost before its first checkpoint), runs it on demand.

Through the master's message endpoint; the test plays the job's workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from cbas.master.app import create_app
from cbas.master.service import Master
from cbas.messages import CheckpointDone, CheckpointFailure, MessageType
from cbas.settings import Settings
from cbas.wiring import open_master_backends
from tests.security.conftest import JDL, TOKEN, Cluster, CountingCloud


@pytest.fixture
async def cluster(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[Cluster]:
    (tmp_path / "home").mkdir(mode=0o700)
    settings = Settings(home=tmp_path / "home", batch_window=0.0)
    backends = open_master_backends(settings)
    backends.cloud = CountingCloud()
    master = Master(settings, backends)
    client = await aiohttp_client(create_app(master, TOKEN))
    await master.recover()
    try:
        yield Cluster(master, client, backends.cloud, aiohttp_client)  # type: ignore[arg-type]
    finally:
        await master.bus.close()
        await master.store.close()


async def an_attempt(cluster: Cluster, job_id: str, fail_checkpoint: bool, checkpoint: bool = False) -> None:
    """One machine for the job: it starts, maybe reports a failed (or a good) checkpoint, is lost."""
    await cluster.master.schedule()
    machine = await cluster.boot(job_id)
    job = await cluster.master.store.get_job(job_id)
    if fail_checkpoint:
        status, _ = await cluster.post(cluster.message(machine, MessageType.CHECKPOINT_FAILED, CheckpointFailure(
            job_id=job_id, attempt=job.attempt, checkpoint_id=f"a{job.attempt:04d}-n00001", reason="interval",
            error="UnsupportedFile: dmtcp_restart_script.sh is a symbolic link")))
        assert status == 200
    if checkpoint:
        status, _ = await cluster.post(cluster.message(machine, MessageType.CHECKPOINT_DONE, CheckpointDone(
            job_id=job_id, attempt=job.attempt, checkpoint_id=f"a{job.attempt:04d}-n00002", size_bytes=10,
            manifest_key="k", pause_seconds=0.1, upload_seconds=0.1, reason="interval")))
        assert status == 200
    await cluster.master.machine_lost(job_id, machine.instance_id, "spot capacity reclaimed", spot=True)


async def a_job(cluster: Cluster) -> str:
    job = await cluster.master.create_job("looping")
    await cluster.master.add_job(job.id, JDL)
    return job.id


async def test_attempts_whose_checkpoints_all_fail_end_in_a_failed_job_saying_why(cluster: Cluster) -> None:
    job_id = await a_job(cluster)
    for _ in range(Settings().max_stalled_attempts):
        await an_attempt(cluster, job_id, fail_checkpoint=True)
    job = await cluster.master.store.get_job(job_id)
    assert job.state.value == "FAILED"
    assert job.error is not None and "restart loop" in job.error and "symbolic link" in job.error
    assert job.attempt == 3  # bounded: no fourth machine is bought
    await cluster.master.schedule()
    assert len(cluster.cloud.machines) == 3
    kinds = [e.kind for e in await cluster.master.store.list_events(job_id)]
    assert kinds.count("checkpoint-failed") == 3 and kinds[-1] == "failed"


async def test_a_checkpoint_that_counts_ends_the_count(cluster: Cluster) -> None:
    job_id = await a_job(cluster)
    await an_attempt(cluster, job_id, fail_checkpoint=True)
    await an_attempt(cluster, job_id, fail_checkpoint=True, checkpoint=True)  # progress after all
    await an_attempt(cluster, job_id, fail_checkpoint=True)
    job = await cluster.master.store.get_job(job_id)
    assert job.state.value == "QUEUED" and job.stalled_attempts == 1


async def test_machines_lost_before_any_checkpoint_move_the_job_on_demand(cluster: Cluster) -> None:
    job_id = await a_job(cluster)
    for _ in range(3):
        await an_attempt(cluster, job_id, fail_checkpoint=False)
    job = await cluster.master.store.get_job(job_id)
    assert job.state.value == "QUEUED" and job.stalled_attempts == 3
    await cluster.master.schedule()
    [entry] = [e for e in await cluster.master.store.list_ledger(live_only=True) if e.job_id == job_id]
    assert entry.market == "on-demand"
    events = await cluster.master.store.list_events(job_id)
    assert "attempts in a row were lost before a checkpoint" in events[-1].detail



async def test_a_dead_machine_whose_release_fails_stays_watched_and_its_job_is_requeued_later(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the watchdog's deadline was popped before machine_lost ran: one failing terminate left the
    # job RUNNING on a dead machine with no timer at all, for ever
    job_id = await a_job(cluster)
    await cluster.master.schedule()
    machine = await cluster.boot(job_id)
    assert (await cluster.master.store.get_job(job_id)).state.value == "RUNNING"
    clock = [cluster.master.workers.clock() + 3600]  # long past its ping deadline
    monkeypatch.setattr(cluster.master.workers, "clock", lambda: clock[0])
    real_terminate, calls = cluster.cloud.terminate, []

    async def terminate_fails_once(instance_id: str) -> None:
        calls.append(instance_id)
        if len(calls) == 1:
            raise RuntimeError("the cloud API timed out")
        await real_terminate(instance_id)

    monkeypatch.setattr(cluster.cloud, "terminate", terminate_fails_once)
    await cluster.master.check_workers()
    assert cluster.master.workers.watched() == 1  # still has a deadline
    clock[0] += 10
    await cluster.master.check_workers()
    job = await cluster.master.store.get_job(job_id)
    assert job.state.value == "QUEUED", job.state
    assert calls == [machine.instance_id, machine.instance_id]
    assert cluster.cloud.machines[machine.instance_id].state == "terminated"
