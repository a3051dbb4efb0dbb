"""The master's endpoint and API with real local backends (its loops are not started, so no
machine is launched)."""

from __future__ import annotations

import asyncio
import json
import time
import types
from pathlib import Path

import pytest

from cbas import authority
from cbas.authority import Credential
from cbas.local.bus import LocalMessageBus
from cbas.master import inbox
from cbas.master.app import create_app
from cbas.master.service import Master
from cbas.messages import AddJob, CancelJob, Envelope, JobDone, MessageType, Ping, envelope
from cbas.models import LedgerEntry, LedgerState
from cbas.settings import Settings
from cbas.state import JobState
from cbas.wiring import open_master_backends

TOKEN = "secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def setup(tmp_path: Path, aiohttp_client):
    settings = Settings(home=tmp_path)
    backends = open_master_backends(settings)
    master = Master(settings, backends)
    client = await aiohttp_client(create_app(master, TOKEN))
    yield master, client
    await backends.bus.close()
    await backends.store.close()


def signed(master: Master, message: Envelope) -> bytes:
    bus = master.bus
    assert isinstance(bus, LocalMessageBus)
    return bus.sign(message)


async def snapshot(master: Master) -> list[tuple[str, str, int]]:
    return [(j.id, j.state.value, j.version) for j in await master.store.list_jobs()]


async def new_job(client) -> str:
    resp = await client.post("/api/jobs", json={"name": "t"}, headers=AUTH)
    assert resp.status == 201
    return (await resp.json())["job_id"]


async def submit(client, job_id: str, text: str):  # type: ignore[no-untyped-def]
    return await client.post(f"/api/jobs/{job_id}/submit", json={"jdl": text}, headers=AUTH)


async def machine_for(master: Master, job_id: str, instance_id: str = "i-1") -> Credential:
    """The job placed on a machine (as the scheduler and the cloud would): the machine's credential."""
    entry = await master.store.put_ledger(LedgerEntry(id=f"l-{instance_id}", job_id=job_id, instance_id=instance_id,
                                                      state=LedgerState.RUNNING))
    await master.store.mutate_job(job_id, lambda j: j.model_copy(update={"instance_id": instance_id}))
    return master.keys.credential(entry.id)


def from_worker(credential: Credential, instance_id: str, type_: MessageType, body: object) -> Envelope:
    """A message as the worker's outbox sends it: signed with its machine's key."""
    return authority.sign(envelope(type_, body, f"worker/{instance_id}", "master"), credential)  # type: ignore[arg-type]


async def test_the_api_needs_the_token(setup) -> None:
    _, client = setup
    assert (await client.get("/api/health")).status == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        resp = await client.get("/api/jobs", headers=headers)
        assert resp.status == 401
        assert "API token" in (await resp.json())["error"]
    assert (await client.get("/api/jobs", headers=AUTH)).status == 200


async def test_submit_queues_a_job_once_even_when_asked_twice(setup) -> None:
    master, client = setup
    job_id = await new_job(client)
    resp = await submit(client, job_id, 'Executable = "/bin/true";')
    assert resp.status == 200 and (await resp.json())["state"] == "QUEUED", await resp.text()
    after_first = await snapshot(master)
    assert after_first == [(job_id, "QUEUED", 1)]
    assert (await submit(client, job_id, 'Executable = "/bin/true";')).status == 200  # the CLI retried
    assert (await submit(client, job_id, 'Executable = "/bin/false";')).status == 200  # too late to change it
    assert await snapshot(master) == after_first
    job = await master.store.get_job(job_id)
    assert job.jdl == 'Executable = "/bin/true";'
    assert (await client.post(f"/api/jobs/{job_id}/submit", json={"jdl": 'Executable = "x";'})).status == 401


async def test_a_message_delivered_twice_is_handled_once(setup) -> None:
    master, client = setup
    job_id = await new_job(client)
    credential = await machine_for(master, job_id)
    message = from_worker(credential, "i-1", MessageType.PING, Ping(instance_id="i-1"))
    assert (await (await client.post("/messages", data=signed(master, message))).json()) == {"ok": True}
    resp = await client.post("/messages", data=signed(master, message))  # the same message again
    assert (await resp.json()) == {"ok": True, "duplicate": True}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"", 403, "not JSON"),
        (b"{\"Type\": \"Notification\"}", 403, "lacks"),
        (b"\xff\xfe garbage", 403, "not JSON"),
        (json.dumps({"Type": "Notification", "MessageId": "m" * 12, "Message": "{}", "Timestamp": "2026-01-01T00:00:00Z",
                     "Signature": "AAAA", "SignatureVersion": "local-hmac-sha256"}).encode(), 403, "bad signature"),
    ],
)
async def test_malformed_or_forged_messages_are_refused_and_change_nothing(setup, body: bytes, status: int, fragment: str) -> None:
    master, client = setup
    await new_job(client)
    before = await snapshot(master)
    resp = await client.post("/messages", data=body)
    assert resp.status == status
    assert fragment in (await resp.json())["error"]
    assert await snapshot(master) == before


async def test_wrong_submissions_get_a_clear_4xx(setup) -> None:
    master, client = setup
    job_id = await new_job(client)
    before = await snapshot(master)
    cases = [
        (f"/api/jobs/{job_id}/submit", {"jdl": "Executable = "}, 400, "expected a value"),
        (f"/api/jobs/{job_id}/submit", {"jdl": 5}, 400, "jdl must be"),
        (f"/api/jobs/{job_id}/submit", {"jdl": 'Executable = "x"; InputSandbox = {"in.txt"};'}, 400,
         "no uploaded input archive"),
        ("/api/jobs/nope/submit", {"jdl": 'Executable = "x";'}, 404, "job nope"),
        ("/api/jobs/nope/cancel", {}, 404, "job nope"),
    ]
    for path, payload, status, fragment in cases:
        resp = await client.post(path, json=payload, headers=AUTH)
        assert resp.status == status, (path, await resp.text())
        assert fragment in (await resp.json())["error"]
    assert await snapshot(master) == before


async def test_signed_but_wrong_messages_get_a_clear_4xx(setup) -> None:
    master, client = setup
    job_id = await new_job(client)
    credential = await machine_for(master, job_id)
    before = await snapshot(master)
    cases = [
        (authority.sign(Envelope(type=MessageType.PING, sender="worker/i-1", recipient="master",
                                 body={"instance_id": 5}), credential), 400, "instance_id"),
        (from_worker(credential, "i-1", MessageType.JOB_DONE, JobDone(job_id=job_id, attempt=0)).model_copy(
            update={"recipient": "worker/i-2"}), 400, "delivered to the master"),
        # types only workers handle, or that come only through the API
        (authority.sign(Envelope(type=MessageType.STOP_JOB, sender="worker/i-1", recipient="master",
                                 body={"job_id": job_id}), credential), 403, "may not send STOP_JOB"),
        (envelope(MessageType.ADD_JOB, AddJob(job_id=job_id, jdl='Executable = "x";'), "cli", "master"), 403,
         "only through the API"),
        (envelope(MessageType.CANCEL_JOB, CancelJob(job_id=job_id), "cli", "master"), 403, "only through the API"),
    ]
    for message, status, fragment in cases:
        resp = await client.post("/messages", data=signed(master, message))
        assert resp.status == status, (message.type, await resp.text())
        assert fragment in (await resp.json())["error"]
    assert await snapshot(master) == before


async def test_a_refused_submission_is_accepted_when_sent_again(setup) -> None:
    master, client = setup
    assert (await submit(client, "later", 'Executable = "x";')).status == 404
    from cbas.models import Job

    await master.store.create_job(Job(id="later"))
    resp = await submit(client, "later", 'Executable = "x";')
    assert (await resp.json()) == {"ok": True, "state": "QUEUED"}
    assert (await master.store.get_job("later")).state == JobState.QUEUED


async def test_cancel_a_queued_job_and_view_it(setup) -> None:
    master, client = setup
    job_id = await new_job(client)
    assert (await submit(client, job_id, 'Executable = "x";')).status == 200
    resp = await client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)
    assert resp.status == 200 and (await resp.json())["state"] == "CANCELLED"
    view = await (await client.get(f"/api/jobs/{job_id}", headers=AUTH)).json()
    assert view["state"] == "CANCELLED"
    assert [e["kind"] for e in view["events"]] == ["queued", "cancelled"]
    resp = await client.get("/api/jobs/zzz", headers=AUTH)
    assert resp.status == 404 and "job zzz" in (await resp.json())["error"]
    resp = await client.get("/api/jobs?state=bogus", headers=AUTH)
    assert resp.status == 400 and "unknown state" in (await resp.json())["error"]


async def test_bodies_over_the_limit_are_refused(setup) -> None:
    _, client = setup
    resp = await client.post("/messages", data=b"x" * (300 * 1024))
    assert resp.status == 413


async def running_job(master: Master, client) -> tuple[str, Credential]:  # type: ignore[no-untyped-def]
    """A job RUNNING its first attempt on machine i-1, and that machine's credential."""
    job_id = await new_job(client)
    await master.add_job(job_id, 'Executable = "/bin/true";')
    credential = await machine_for(master, job_id)
    for target in (JobState.PROVISIONING, JobState.STARTING, JobState.RUNNING):
        await master.transition(job_id, target, event=target.lower(), update=lambda j: {"attempt": 1})
    return job_id, credential


async def test_a_message_whose_handling_died_is_handled_when_it_comes_again(setup, monkeypatch) -> None:
    master, client = setup
    job_id, credential = await running_job(master, client)
    message = from_worker(credential, "i-1", MessageType.JOB_DONE, JobDone(job_id=job_id, attempt=1))
    real = master.job_finished

    async def dies(*args: object, **kwargs: object) -> None:
        raise asyncio.CancelledError  # as if the process died mid-handling: nothing after runs

    monkeypatch.setattr(master, "job_finished", dies)
    with pytest.raises(Exception):
        await client.post("/messages", data=signed(master, message))
    monkeypatch.setattr(master, "job_finished", real)
    again = await client.post("/messages", data=signed(master, message))  # the sender's retry
    assert again.status == 200 and "duplicate" not in await again.json()
    assert (await master.store.get_job(job_id)).state == JobState.COMPLETED


async def test_a_fact_is_acknowledged_to_its_worker_when_handled_and_again_when_it_comes_twice(setup, monkeypatch) -> None:
    master, client = setup
    job_id, credential = await running_job(master, client)
    acks: list[Envelope] = []

    async def send(message: Envelope) -> None:
        acks.append(message)

    master.bus.send = send  # type: ignore[method-assign]  # what the master sends to the worker
    fact = from_worker(credential, "i-1", MessageType.JOB_DONE, JobDone(job_id=job_id, attempt=1))
    clock = [1000.0]  # the inbox's clock, moved by the test (a slow machine must not make a burst two)
    monkeypatch.setattr(inbox, "time", types.SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter))
    assert (await client.post("/messages", data=signed(master, fact))).status == 200
    assert (await client.post("/messages", data=signed(master, fact))).status == 200  # a burst of copies:
    clock[0] += inbox.ACK_AGAIN_AFTER + 0.1  # one ACK
    assert (await client.post("/messages", data=signed(master, fact))).status == 200  # the worker's resend
    ping = from_worker(credential, "i-1", MessageType.PING, Ping(instance_id="i-1"))
    assert (await client.post("/messages", data=signed(master, ping))).status == 200
    forged = from_worker(master.keys.credential("l-other"), "i-1", MessageType.JOB_DONE,
                         JobDone(job_id=job_id, attempt=1))
    assert (await client.post("/messages", data=signed(master, forged))).status == 403
    for _ in range(1000):  # acks go in the background (their tasks were made as the messages were handled)
        if len(acks) >= 2:
            break
        await asyncio.sleep(0.01)
    for _ in range(10):
        await asyncio.sleep(0)  # any other ack's task has run too
    mine = [m for m in acks if m.type == MessageType.ACK]
    assert [m.body["message_ids"] for m in mine] == [[fact.id], [fact.id]]  # not the ping, not the forgery
    assert all(m.recipient == "worker/i-1" and m.auth for m in mine)  # signed for that machine alone
    assert (await master.store.get_job(job_id)).state == JobState.COMPLETED
