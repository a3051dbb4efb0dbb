"""The master's endpoint and API with real local backends (its loops are not started, so no
machine is launched)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cbas.local.bus import LocalMessageBus
from cbas.master.app import create_app
from cbas.master.service import Master
from cbas.messages import AddJob, CancelJob, Envelope, MessageType, Ping, envelope
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


async def test_the_api_needs_the_token(setup) -> None:
    _, client = setup
    assert (await client.get("/api/health")).status == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        resp = await client.get("/api/jobs", headers=headers)
        assert resp.status == 401
        assert "API token" in (await resp.json())["error"]
    assert (await client.get("/api/jobs", headers=AUTH)).status == 200


async def test_add_job_queues_it_once_even_when_delivered_twice(setup) -> None:
    master, client = setup
    job_id = await new_job(client)
    message = envelope(MessageType.ADD_JOB, AddJob(job_id=job_id, jdl='Executable = "/bin/true";'), "cli", "master")
    resp = await client.post("/messages", data=signed(master, message))
    assert resp.status == 200, await resp.text()
    after_first = await snapshot(master)
    assert after_first == [(job_id, "QUEUED", 1)]
    resp = await client.post("/messages", data=signed(master, message))  # the same message again
    assert (await resp.json()) == {"ok": True, "duplicate": True}
    again = envelope(MessageType.ADD_JOB, AddJob(job_id=job_id, jdl='Executable = "/bin/false";'), "cli", "master")
    assert (await client.post("/messages", data=signed(master, again))).status == 200  # a new id, same job
    assert await snapshot(master) == after_first
    job = await master.store.get_job(job_id)
    assert job.jdl == 'Executable = "/bin/true";'


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


async def test_signed_but_wrong_messages_get_a_clear_4xx(setup) -> None:
    master, client = setup
    job_id = await new_job(client)
    before = await snapshot(master)
    cases = [
        (envelope(MessageType.ADD_JOB, AddJob(job_id=job_id, jdl="Executable = "), "cli", "master"), 400, "expected a value"),
        (envelope(MessageType.ADD_JOB, AddJob(job_id="nope", jdl='Executable = "x";'), "cli", "master"), 404, "job nope"),
        (envelope(MessageType.CANCEL_JOB, CancelJob(job_id="nope"), "cli", "master"), 404, "job nope"),
        (Envelope(type=MessageType.PING, sender="w", recipient="master", body={"instance_id": 5}), 400, "instance_id"),
        # a type only workers handle
        (Envelope(type=MessageType.STOP_JOB, sender="cli", recipient="master", body={"job_id": job_id}), 400,
         "does not handle STOP_JOB"),
        (envelope(MessageType.PING, Ping(instance_id="i-1"), "w", "worker/i-1"), 400, "delivered to the master"),
        (envelope(MessageType.ADD_JOB, AddJob(job_id=job_id, jdl='Executable = "x"; InputSandbox = {"in.txt"};'), "cli", "master"),
         400, "no uploaded input archive"),
    ]
    for message, status, fragment in cases:
        resp = await client.post("/messages", data=signed(master, message))
        assert resp.status == status, (message.type, await resp.text())
        assert fragment in (await resp.json())["error"]
    assert await snapshot(master) == before


async def test_a_failed_message_is_processed_when_delivered_again(setup) -> None:
    master, client = setup
    message = envelope(MessageType.ADD_JOB, AddJob(job_id="later", jdl='Executable = "x";'), "cli", "master")
    assert (await client.post("/messages", data=signed(master, message))).status == 404
    from cbas.models import Job

    await master.store.create_job(Job(id="later"))
    resp = await client.post("/messages", data=signed(master, message))
    assert (await resp.json()) == {"ok": True}
    assert (await master.store.get_job("later")).state == JobState.QUEUED


async def test_cancel_a_queued_job_and_view_it(setup) -> None:
    master, client = setup
    job_id = await new_job(client)
    await client.post("/messages", data=signed(master, envelope(
        MessageType.ADD_JOB, AddJob(job_id=job_id, jdl='Executable = "x";'), "cli", "master")))
    await client.post("/messages", data=signed(master, envelope(MessageType.CANCEL_JOB, CancelJob(job_id=job_id), "cli", "master")))
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


async def test_a_message_whose_handling_died_is_handled_when_it_comes_again(setup, monkeypatch) -> None:
    master, client = setup
    job_id = await new_job(client)
    message = envelope(MessageType.ADD_JOB, AddJob(job_id=job_id, jdl='Executable = "/bin/true";'), "cli", "master")
    real = master.add_job

    async def dies(*args: object) -> None:
        raise asyncio.CancelledError  # as if the process died mid-handling: nothing after runs

    monkeypatch.setattr(master, "add_job", dies)
    with pytest.raises(Exception):
        await client.post("/messages", data=signed(master, message))
    monkeypatch.setattr(master, "add_job", real)
    again = await client.post("/messages", data=signed(master, message))  # the sender's retry
    assert again.status == 200 and "duplicate" not in await again.json()
    assert (await master.store.get_job(job_id)).state == JobState.QUEUED
