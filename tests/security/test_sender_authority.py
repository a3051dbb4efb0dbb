"""Who may say what to the master, and to a worker. An attacker holds one machine's key (any job
could have read the old shared key): it must not speak for another machine or another job, nor
create, take over or cancel jobs through the bus. Late messages of a machine a job has left are
genuine but stale: they are answered and change nothing. Every refused or ignored attempt leaves
the whole store as it was."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from cbas import authority
from cbas.local.blobs import FolderBlobStore
from cbas.local.bus import LocalMessageBus, string_to_sign
from cbas.messages import (
    MASTER, AddJob, CancelJob, CheckpointDone, CheckpointNow, JobDone, JobFailed, MessageType, Ping, SpotNotice,
    StartJob, WorkerStarted, envelope, worker_address,
)
from cbas.settings import Settings
from tests.security.conftest import AUTH, JDL, Cluster

NESTED = b"[" * 100_000 + b"]" * 100_000  # far deeper than any parser's recursion limit


def checkpoint(job_id: str, attempt: int, final: bool = False, n: int = 1) -> CheckpointDone:
    return CheckpointDone(job_id=job_id, attempt=attempt, checkpoint_id=f"a{attempt:04d}-n{n:05d}",
                          manifest_key=f"jobs/{job_id}/ckpt/a{attempt:04d}-n{n:05d}/manifest.json", size_bytes=10,
                          pause_seconds=0.1, upload_seconds=0.1, reason="notice" if final else "interval", final=final)


async def refused(cluster: Cluster, message: Any, fragment: str) -> None:
    before = await cluster.store_state()
    status, answer = await cluster.post(message)
    assert status == 403, (status, answer)
    assert fragment in answer["error"], answer
    assert await cluster.store_state() == before


# --- a machine speaks only for itself ------------------------------------------------------------------
def claims_of_b(cluster: Cluster) -> list[tuple[str, Any]]:
    """What machine A's key holder would like to say about machine B and its job."""
    a, b = cluster.machines["a"], cluster.machines["b"]
    m = cluster.message
    return [
        ("sender B, A's key: B's job done",
         m(a, MessageType.JOB_DONE, JobDone(job_id=b.job_id, attempt=1), sender=b.address)),
        ("sender B, A's key: B preempted",
         m(a, MessageType.CHECKPOINT_DONE, checkpoint(b.job_id, 1, final=True), sender=b.address)),
        ("sender B, A's key: B's checkpoints bad",
         m(a, MessageType.PING, Ping(instance_id=b.instance_id, job_id=b.job_id, attempt=1, phase="running",
                                     bad_checkpoints=["a0001-n00001"]), sender=b.address)),
        ("sender A, about machine B: a spot notice",
         m(a, MessageType.SPOT_NOTICE, SpotNotice(instance_id=b.instance_id, job_id=b.job_id, action="terminate",
                                                  action_time=datetime.now(timezone.utc)))),
        ("sender A, about machine B: a ping",
         m(a, MessageType.PING, Ping(instance_id=b.instance_id, job_id=b.job_id, attempt=1, phase="running"))),
        ("sender A, about machine B: it started",
         m(a, MessageType.WORKER_STARTED, WorkerStarted(instance_id=b.instance_id))),
    ]


@pytest.mark.parametrize("case", range(6))
async def test_a_machine_key_cannot_speak_for_another_machine(cluster: Cluster, case: int) -> None:
    name, message = claims_of_b(cluster)[case]
    await refused(cluster, message, "machine")


@pytest.mark.parametrize("kind", ["done", "failed", "checkpoint", "final checkpoint", "ping"])
async def test_a_machine_cannot_report_for_a_job_it_does_not_run(cluster: Cluster, kind: str) -> None:
    a, b = cluster.machines["a"], cluster.machines["b"]
    bodies = {
        "done": (MessageType.JOB_DONE, JobDone(job_id=b.job_id, attempt=1)),
        "failed": (MessageType.JOB_FAILED, JobFailed(job_id=b.job_id, attempt=1, reason="sabotage")),
        "checkpoint": (MessageType.CHECKPOINT_DONE, checkpoint(b.job_id, 1)),
        "final checkpoint": (MessageType.CHECKPOINT_DONE, checkpoint(b.job_id, 1, final=True)),
        "ping": (MessageType.PING, Ping(instance_id=a.instance_id, job_id=b.job_id, attempt=1, phase="running",
                                        bad_checkpoints=["a0001-n00001"])),
    }
    type_, body = bodies[kind]
    await refused(cluster, cluster.message(a, type_, body), f"job {b.job_id}")


async def test_a_message_without_auth_is_refused(cluster: Cluster) -> None:
    a = cluster.machines["a"]
    unsigned = envelope(MessageType.JOB_DONE, JobDone(job_id=a.job_id, attempt=1), a.address, MASTER)
    await refused(cluster, unsigned, "auth")


async def test_a_tampered_message_is_refused(cluster: Cluster) -> None:
    a = cluster.machines["a"]
    genuine = cluster.message(a, MessageType.JOB_FAILED, JobFailed(job_id=a.job_id, attempt=1, reason="oom"))
    changed = genuine.model_copy(update={"body": {**genuine.body, "reason": "something else"}})
    await refused(cluster, changed, "auth")


async def test_a_made_up_machine_is_refused(cluster: Cluster) -> None:
    a = cluster.machines["a"]
    stranger = authority.Credential("l-madeup", authority.machine_key(b"not the master's key", "l-madeup"))
    message = authority.sign(envelope(MessageType.JOB_DONE, JobDone(job_id=a.job_id, attempt=1), a.address, MASTER),
                             stranger)
    await refused(cluster, message, "machine")


@pytest.mark.parametrize("type_", [MessageType.START_JOB, MessageType.STOP_JOB, MessageType.CHECKPOINT_NOW])
async def test_master_typed_messages_sent_to_the_master_are_refused(cluster: Cluster, type_: MessageType) -> None:
    a = cluster.machines["a"]
    bodies = {
        MessageType.START_JOB: StartJob(job_id=a.job_id, attempt=1, jdl=JDL, ping_interval=1),
        MessageType.STOP_JOB: CheckpointNow(job_id=a.job_id),  # (the body does not matter)
        MessageType.CHECKPOINT_NOW: CheckpointNow(job_id=a.job_id),
    }
    message = envelope(type_, bodies[type_], a.address, MASTER)
    await refused(cluster, authority.sign(message, a.credential), "may not send")


async def test_a_machine_whose_launch_is_not_recorded_yet_is_asked_to_send_again(cluster: Cluster) -> None:
    from cbas.models import LedgerEntry

    job = await cluster.master.create_job("booting")
    entry = await cluster.master.store.put_ledger(LedgerEntry(id="l-booting", job_id=job.id))  # launch under way
    early = authority.sign(envelope(MessageType.WORKER_STARTED, WorkerStarted(instance_id="i-early"),
                                    worker_address("i-early"), MASTER), cluster.keys.credential(entry.id))
    before = await cluster.store_state()
    status, answer = await cluster.post(early)
    assert status == 503 and "send WORKER_STARTED again" in answer["error"], answer
    assert await cluster.store_state() == before


async def test_a_failed_checkpoint_of_the_current_machine_is_recorded(cluster: Cluster) -> None:
    from cbas.messages import CheckpointFailure

    a = cluster.machines["a"]
    failure = CheckpointFailure(job_id=a.job_id, attempt=1, checkpoint_id="a0001-n00002", reason="interval",
                                error="upload failed: disk full")
    status, answer = await cluster.post(cluster.message(a, MessageType.CHECKPOINT_FAILED, failure))
    assert status == 200 and answer == {"ok": True}, answer
    events = [(e.kind, e.detail) for e in await cluster.master.store.list_events(a.job_id)]
    assert events[-1] == ("checkpoint-failed", "a0001-n00002 (interval): upload failed: disk full")
    b = cluster.machines["b"]  # and never one about another machine's job
    await refused(cluster, cluster.message(a, MessageType.CHECKPOINT_FAILED,
                                           failure.model_copy(update={"job_id": b.job_id})), f"job {b.job_id}")


# --- jobs are created and cancelled only through the API -------------------------------------------------
async def test_add_job_and_cancel_job_on_the_bus_are_refused(cluster: Cluster) -> None:
    a, b = cluster.machines["a"], cluster.machines["b"]
    response = await cluster.client.post("/api/jobs", json={"name": "someone else's"}, headers=AUTH)
    theirs = (await response.json())["job_id"]
    hijack = AddJob(job_id=theirs, jdl='Executable = "/bin/sh"; Arguments = "-c evil";')
    for message in [
        envelope(MessageType.ADD_JOB, hijack, "cli", MASTER),
        cluster.message(a, MessageType.ADD_JOB, hijack, sender="cli"),
        cluster.message(a, MessageType.ADD_JOB, hijack),
        envelope(MessageType.CANCEL_JOB, CancelJob(job_id=b.job_id), "cli", MASTER),
        cluster.message(a, MessageType.CANCEL_JOB, CancelJob(job_id=b.job_id)),
    ]:
        await refused(cluster, message, "only through the API")
    assert (await cluster.master.store.get_job(theirs)).state.value == "SUBMITTING"
    assert (await cluster.master.store.get_job(b.job_id)).state.value == "RUNNING"


# --- fencing: a machine the job has left --------------------------------------------------------------
async def moved(cluster: Cluster) -> tuple[Any, Any]:
    """Job a's machine stops answering; the job is placed on a new machine (not yet booted)."""
    a = cluster.machines["a"]
    await cluster.master.machine_lost(a.job_id, a.instance_id, "worker stopped answering")
    await cluster.master.schedule()
    job = await cluster.master.store.get_job(a.job_id)
    assert job.state.value == "PROVISIONING" and job.instance_id not in (None, a.instance_id)
    return a, job


@pytest.mark.parametrize("kind", ["final checkpoint", "checkpoint", "done", "notice", "ping"])
async def test_late_messages_of_a_machine_the_job_left_change_nothing(cluster: Cluster, kind: str) -> None:
    old, job = await moved(cluster)
    bodies = {
        "final checkpoint": (MessageType.CHECKPOINT_DONE, checkpoint(old.job_id, 1, final=True, n=7)),
        "checkpoint": (MessageType.CHECKPOINT_DONE, checkpoint(old.job_id, 1, n=8)),
        "done": (MessageType.JOB_DONE, JobDone(job_id=old.job_id, attempt=1)),
        "notice": (MessageType.SPOT_NOTICE, SpotNotice(instance_id=old.instance_id, job_id=old.job_id,
                                                       action="terminate", action_time=datetime.now(timezone.utc))),
        "ping": (MessageType.PING, Ping(instance_id=old.instance_id, job_id=old.job_id, attempt=1, phase="running",
                                        bad_checkpoints=["a0001-n00001"])),
    }
    type_, body = bodies[kind]
    before = await cluster.store_state()
    status, answer = await cluster.post(cluster.message(old, type_, body))
    new_machine = await cluster.master.resources.entry_for(job.instance_id)
    assert new_machine is not None and new_machine.state.value == "RUNNING"  # the new machine is untouched
    assert await cluster.store_state() == before
    assert status == 200 and answer["ok"] is True and answer.get("ignored"), answer
    await cluster.boot(old.job_id)  # and the job runs there


async def test_a_late_message_of_a_machine_not_yet_let_go_changes_nothing(cluster: Cluster) -> None:
    a = cluster.machines["a"]
    # the job is being moved: its record names the new machine, the old one is still held
    await cluster.master.store.mutate_job(a.job_id, lambda j: j.model_copy(update={"instance_id": "i-new"}))
    before = await cluster.store_state()
    status, answer = await cluster.post(cluster.message(a, MessageType.CHECKPOINT_DONE,
                                                        checkpoint(a.job_id, 1, final=True)))
    assert await cluster.store_state() == before
    assert status == 200 and answer.get("ignored"), answer


async def test_a_late_message_of_an_older_attempt_on_the_same_machine_changes_nothing(cluster: Cluster) -> None:
    a = cluster.machines["a"]
    # the worker restarted on its machine: the master restarts the job (a new attempt) elsewhere
    await cluster.master.store.mutate_job(a.job_id, lambda j: j.model_copy(update={"attempt": 2}))
    before = await cluster.store_state()
    status, answer = await cluster.post(cluster.message(a, MessageType.JOB_DONE, JobDone(job_id=a.job_id, attempt=1)))
    assert await cluster.store_state() == before
    assert status == 200 and "attempt" in answer.get("ignored", ""), answer


# --- deeply nested JSON is a clear 400, never a 500 ---------------------------------------------------------
def signed_delivery(bus: LocalMessageBus, message_text: str) -> bytes:
    fields = json.loads(bus.sign(envelope(MessageType.PING, Ping(instance_id="i-x"), "worker/i-x", MASTER)))
    fields["Message"] = message_text
    fields["Signature"] = base64.b64encode(
        hmac.new(bus._key, string_to_sign(fields), hashlib.sha256).digest()).decode()
    return json.dumps(fields).encode()


@pytest.mark.parametrize("where", ["/messages", "/messages (inside)", "/api/jobs", "submit", "cancel"])
async def test_deeply_nested_json_is_a_400(cluster: Cluster, where: str) -> None:
    a = cluster.machines["a"]
    paths = {"/messages": "/messages", "/messages (inside)": "/messages", "/api/jobs": "/api/jobs",
             "submit": f"/api/jobs/{a.job_id}/submit", "cancel": f"/api/jobs/{a.job_id}/cancel"}
    body = signed_delivery(cluster.bus, NESTED.decode()) if where == "/messages (inside)" else NESTED
    before = await cluster.store_state()
    response = await cluster.client.post(paths[where], data=body, headers=AUTH)
    assert response.status == 400, (response.status, await response.text())
    assert "nested" in (await response.json())["error"]
    assert await cluster.store_state() == before


# --- a worker takes orders only signed with its own key ------------------------------------------------------
@pytest.fixture
async def worker(tmp_path: Path, aiohttp_client: Any):  # type: ignore[no-untyped-def]
    from cbas.worker.daemon import Worker
    from cbas.worker.imds import MetadataClient

    home = tmp_path / "worker-home"
    home.mkdir()
    bus = LocalMessageBus(home, home / "cbas.db")
    mine = authority.Credential("l-mine", authority.machine_key(b"master", "l-mine"))
    other = authority.Credential("l-other", authority.machine_key(b"master", "l-other"))
    daemon = Worker(Settings(home=home), "i-1", tmp_path, MetadataClient("http://127.0.0.1:9"),
                    FolderBlobStore(home / "blobs"), bus, credential=mine)
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/messages", daemon.receive)
    client = await aiohttp_client(app)
    yield daemon, client, bus, mine, other
    await bus.close()


def start_job(credential: authority.Credential | None, key_for: authority.Credential) -> Any:
    body = StartJob(job_id="j1", attempt=1, jdl=JDL, ping_interval=1,
                    checkpoint_key=authority.seal_checkpoint_key(key_for.key, "j1", b"k" * 32))
    message = envelope(MessageType.START_JOB, body, MASTER, worker_address("i-1"))
    return authority.sign(message, credential) if credential else message


async def test_a_worker_refuses_orders_not_signed_with_its_own_key(worker) -> None:  # type: ignore[no-untyped-def]
    daemon, client, bus, mine, other = worker
    forged_key = authority.Credential(mine.ledger_id, other.key)  # claims this machine, another key
    for message in [start_job(other, mine), start_job(forged_key, mine), start_job(None, mine),
                    authority.sign(envelope(MessageType.STOP_JOB, CheckpointNow(job_id="j1"), MASTER,
                                            worker_address("i-1")), other)]:
        response = await client.post("/messages", data=bus.sign(message))
        assert response.status == 403, await response.text()
        assert daemon.job is None
    stale = authority.sign(envelope(MessageType.CHECKPOINT_NOW, CheckpointNow(job_id="j1"), MASTER,
                                    worker_address("i-1")), mine)
    assert (await client.post("/messages", data=bus.sign(stale))).status == 200  # its own key: accepted


async def test_a_worker_refuses_a_checkpoint_key_sealed_for_another_machine(worker) -> None:  # type: ignore[no-untyped-def]
    daemon, client, bus, mine, other = worker
    response = await client.post("/messages", data=bus.sign(start_job(mine, other)))
    assert response.status == 403 and "checkpoint key" in (await response.json())["error"]
    assert daemon.job is None


async def test_deeply_nested_json_to_a_worker_is_a_400(worker) -> None:  # type: ignore[no-untyped-def]
    daemon, client, bus, mine, other = worker
    for body in (NESTED, signed_delivery(bus, NESTED.decode())):
        response = await client.post("/messages", data=body)
        assert response.status == 400, await response.text()
        assert "nested" in (await response.json())["error"]
    assert daemon.job is None


async def test_the_master_signs_each_order_with_its_machines_key_and_seals_the_job_key_for_it(cluster: Cluster) -> None:
    for machine in cluster.machines.values():
        [start] = [m for m in cluster.inboxes[machine.instance_id] if m.type == MessageType.START_JOB]
        authority.verify(start, machine.credential)  # the worker's own check
        other = next(m for m in cluster.machines.values() if m is not machine)
        with pytest.raises(authority.Unauthorized):
            authority.verify(start, other.credential)
        sealed = start.body["checkpoint_key"]
        assert authority.open_checkpoint_key(machine.credential.key, machine.job_id, sealed) == \
            cluster.keys.checkpoint_key(machine.job_id)
        with pytest.raises(authority.Unauthorized):
            authority.open_checkpoint_key(other.credential.key, machine.job_id, sealed)
