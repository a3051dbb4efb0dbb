"""A job's end that its worker recorded in the blob store before its machine was lost, unheard:
the master reads it before it restarts the job (cbas.master.recorded_ends), and only a genuine
one counts: signed with that machine's key, sent by it, about the job's current attempt.

The cluster (tests/security/conftest.py) has jobs a and b running on machines A and B."""

from __future__ import annotations

from typing import Any

import pytest

from cbas.messages import CheckpointDone, Envelope, JobDone, JobFailed, MessageType, Ping, checkpoint_record_key, end_record_key
from cbas.models import Job
from tests.security.conftest import Cluster, PlayedMachine


def record(cluster: Cluster, job_id: str, attempt: int, message: Envelope | bytes) -> None:
    data = message if isinstance(message, bytes) else message.model_dump_json().encode()
    cluster.master.blobs.put_bytes(end_record_key(job_id, attempt), data)


def done(cluster: Cluster, machine: PlayedMachine, attempt: int = 1, job_id: str | None = None) -> Envelope:
    return cluster.message(machine, MessageType.JOB_DONE, JobDone(job_id=job_id or machine.job_id, attempt=attempt))


async def lose(cluster: Cluster, machine: PlayedMachine) -> Job:
    await cluster.master.machine_lost(machine.job_id, machine.instance_id, "spot capacity reclaimed", spot=True)
    return await cluster.master.store.get_job(machine.job_id)


def restarted(job: Job) -> bool:
    return job.state.value in ("QUEUED", "PROVISIONING") and job.preemptions == 1 and job.instance_id != "i-1"


async def test_a_machine_lost_after_recording_its_end_ends_the_job_instead_of_running_it_again(
        cluster: Cluster) -> None:
    a = cluster.machines["a"]
    record(cluster, a.job_id, 1, done(cluster, a))
    job = await lose(cluster, a)
    assert job.state.value == "COMPLETED" and job.exit_code == 0, job
    assert job.preemptions == 0 and job.restarts == 0
    assert cluster.cloud.machines[a.instance_id].state == "terminated"  # its machine is not held
    events = [(e.kind, e.detail) for e in await cluster.master.store.list_events(a.job_id)]
    assert any(kind == "completed" and "recorded" in detail for kind, detail in events), events


async def test_a_recorded_failure_is_the_jobs_failure(cluster: Cluster) -> None:
    a = cluster.machines["a"]
    failed = cluster.message(a, MessageType.JOB_FAILED, JobFailed(
        job_id=a.job_id, attempt=1, exit_code=3, reason="exited with code 3", stderr_tail="boom"))
    record(cluster, a.job_id, 1, failed)
    job = await lose(cluster, a)
    assert job.state.value == "FAILED" and job.exit_code == 3 and job.stderr_tail == "boom", job


async def test_a_master_that_finds_the_machine_gone_at_its_start_reads_the_record(cluster: Cluster) -> None:
    a = cluster.machines["a"]
    record(cluster, a.job_id, 1, done(cluster, a))
    await cluster.cloud.terminate(a.instance_id)  # reclaimed while the master was down
    await cluster.master.recover()
    assert (await cluster.master.store.get_job(a.job_id)).state.value == "COMPLETED"


def forged(cluster: Cluster) -> dict[str, Any]:
    a, b = cluster.machines["a"], cluster.machines["b"]
    tampered = done(cluster, a).model_dump(mode="json")
    tampered["body"]["exit_code"] = 0
    tampered["body"]["missing_outputs"] = ["forged"]  # changed after signing
    return {
        "signed by the other machine": done(cluster, b, job_id=a.job_id),
        "sent as the other machine": done(cluster, b).model_copy(update={"sender": a.address}),
        "changed after signing": Envelope.model_validate(tampered),
        "unsigned": done(cluster, a).model_copy(update={"auth": None}),
        "of an older attempt": done(cluster, a, attempt=0),
        "not an end": cluster.message(a, MessageType.PING, Ping(instance_id=a.instance_id)),
        "not JSON": b"\x00garbage",
        "too deep": b"[" * 5000 + b"]" * 5000,
        "too big": b'{"pad": "' + b"x" * 100_000 + b'"}',
    }


@pytest.mark.parametrize("kind", ["signed by the other machine", "sent as the other machine", "changed after signing",
                                  "unsigned", "of an older attempt", "not an end", "not JSON", "too deep", "too big"])
async def test_a_record_that_is_not_the_genuine_end_is_ignored_and_the_job_restarts(
        cluster: Cluster, kind: str) -> None:
    a = cluster.machines["a"]
    record(cluster, a.job_id, 1, forged(cluster)[kind])
    job = await lose(cluster, a)
    assert restarted(job), (kind, job)
    assert (await cluster.master.store.get_job(cluster.machines["b"].job_id)).state.value == "RUNNING"


async def test_no_record_means_a_restart(cluster: Cluster) -> None:
    assert restarted(await lose(cluster, cluster.machines["a"]))


# --- checkpoints its worker recorded, unheard ----------------------------------------------------------
def stored(cluster: Cluster, machine: PlayedMachine, checkpoint_id: str = "a0001-n00007", attempt: int = 1,
           job_id: str | None = None) -> Envelope:
    job_id = job_id or machine.job_id
    return cluster.message(machine, MessageType.CHECKPOINT_DONE, CheckpointDone(
        job_id=job_id, attempt=attempt, checkpoint_id=checkpoint_id,
        manifest_key=f"jobs/{job_id}/ckpt/{checkpoint_id}/manifest.json", size_bytes=10, new_bytes=10,
        pause_seconds=0.1, upload_seconds=0.1, reason="notice", final=True))


def record_checkpoint(cluster: Cluster, job_id: str, checkpoint_id: str, message: Envelope | bytes) -> None:
    data = message if isinstance(message, bytes) else message.model_dump_json().encode()
    cluster.master.blobs.put_bytes(checkpoint_record_key(job_id, checkpoint_id), data)


async def test_a_checkpoint_recorded_before_the_machine_was_lost_is_what_the_job_restarts_from(
        cluster: Cluster) -> None:
    """The notice checkpoint stored, its report never heard (the machine was reclaimed with it in
    its outbox): the restart must not go back to an older checkpoint."""
    a = cluster.machines["a"]
    record_checkpoint(cluster, a.job_id, "a0001-n00007", stored(cluster, a))
    job = await lose(cluster, a)
    assert restarted(job) and job.last_checkpoint == "a0001-n00007" and job.checkpoints == 1, job
    assert [c.id for c in await cluster.master.store.list_checkpoints(a.job_id)] == ["a0001-n00007"]


def forged_checkpoints(cluster: Cluster) -> dict[str, Any]:
    a, b = cluster.machines["a"], cluster.machines["b"]
    tampered = stored(cluster, a).model_dump(mode="json")
    tampered["body"]["manifest_key"] = f"jobs/{b.job_id}/ckpt/a0001-n00001/manifest.json"  # after signing
    return {
        "signed by the other machine": stored(cluster, b, job_id=a.job_id),
        "changed after signing": Envelope.model_validate(tampered),
        "unsigned": stored(cluster, a).model_copy(update={"auth": None}),
        "of another checkpoint": stored(cluster, a, checkpoint_id="a0001-n00003"),
        "not a checkpoint": done(cluster, a),
        "not JSON": b"\x00garbage",
        "too big": b'{"pad": "' + b"x" * 100_000 + b'"}',
    }


@pytest.mark.parametrize("kind", ["signed by the other machine", "changed after signing", "unsigned",
                                  "of another checkpoint", "not a checkpoint", "not JSON", "too big"])
async def test_a_checkpoint_record_that_is_not_genuine_is_ignored(cluster: Cluster, kind: str) -> None:
    a = cluster.machines["a"]
    record_checkpoint(cluster, a.job_id, "a0001-n00007", forged_checkpoints(cluster)[kind])
    job = await lose(cluster, a)
    assert restarted(job) and job.last_checkpoint is None and job.checkpoints == 0, (kind, job)
    assert await cluster.master.store.list_checkpoints(a.job_id) == []


async def test_an_older_attempts_recorded_checkpoint_is_not_learned_for_the_current_one(cluster: Cluster) -> None:
    a = cluster.machines["a"]  # attempt 1: a record named for attempt 0 (a folder it may not claim)
    record_checkpoint(cluster, a.job_id, "a0000-n00007", stored(cluster, a, checkpoint_id="a0000-n00007", attempt=0))
    job = await lose(cluster, a)
    assert restarted(job) and job.checkpoints == 0, job
