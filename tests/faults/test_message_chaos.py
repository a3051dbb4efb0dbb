"""At-least-once messages, exactly-once effects. A job's message log (as its worker sends it) is
delivered to a master through its signed HTTP endpoint, once cleanly and then with chaos:
duplicates, deliveries whose answer was lost and that come again later, pings out of order, a
worker that re-sends a checkpoint under a new message id, late pings from the machine after it
was let go. The store must end as after the clean run. Real master, store and bus; the cloud is
an in-memory double (no machine needs to run: the test plays the worker)."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cbas import authority, jdl
from cbas.authority import Credential
from cbas.backends import Leftover
from cbas.local.bus import LocalMessageBus
from cbas.master.app import create_app
from cbas.master.service import Master
from cbas.messages import (
    CheckpointDone, Envelope, JobDone, MessageType, Ping, WorkerStarted, envelope, worker_address,
)
from cbas.models import LaunchSpec, Machine, Offer
from cbas.settings import Settings
from cbas.wiring import open_master_backends

TOKEN = "t"
INSTANCE = "i-0000000000000001"
WORKER = worker_address(INSTANCE)
JDL = jdl.write(jdl.JobDescription(executable="/bin/true", name="chaos"))


class MemoryCloud:
    """One market, machines that exist as records: enough for the master to place one job."""

    def __init__(self) -> None:
        self.machines: dict[str, Machine] = {}

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def launch(self, spec: LaunchSpec) -> Machine:
        machine = Machine(instance_id=INSTANCE, zone=spec.zone, instance_type=spec.instance_type, market=spec.market,
                          price=0.03, tags={"cbas:cluster": "default", "cbas:ledger": spec.ledger_id,
                                            "cbas:job": spec.job_id})
        self.machines[INSTANCE] = machine
        return machine

    async def terminate(self, instance_id: str) -> None:
        if instance_id in self.machines:
            self.machines[instance_id] = self.machines[instance_id].model_copy(update={"state": "terminated"})

    async def list_machines(self) -> list[Machine]:
        return [m for m in self.machines.values() if m.state != "terminated"]

    async def offers(self) -> list[Offer]:
        return [Offer(zone="z1", instance_type="c5.large", spot_price=0.03, ondemand_price=0.085, available=True)]

    async def delete_snapshot(self, snapshot_id: str) -> None: ...

    async def leftovers(self) -> list[Leftover]:
        return []

    async def remove(self, leftover: Leftover) -> None: ...


def job_log(job_id: str, credential: Credential) -> list[Envelope]:
    """What the worker of a job with two checkpoints sends, in the order it sends it (each message
    signed with its machine's key, as its outbox does)."""
    def send(kind: MessageType, body: Any) -> Envelope:
        return authority.sign(envelope(kind, body, WORKER, "master"), credential)

    def checkpoint(n: int) -> Envelope:
        return send(MessageType.CHECKPOINT_DONE, CheckpointDone(
            job_id=job_id, attempt=1, checkpoint_id=f"a0001-n{n:05d}", manifest_key=f"jobs/{job_id}/ckpt/a0001-n{n:05d}",
            size_bytes=1000 * n, new_bytes=100, pause_seconds=0.01, upload_seconds=0.02, reason="interval"))

    def ping(phase: str) -> Envelope:
        return send(MessageType.PING, Ping(instance_id=INSTANCE, job_id=job_id, attempt=1, phase=phase))

    return [send(MessageType.WORKER_STARTED, WorkerStarted(instance_id=INSTANCE)),
            ping("running"), ping("running"), checkpoint(1), ping("running"), checkpoint(2), ping("running"),
            send(MessageType.JOB_DONE, JobDone(job_id=job_id, attempt=1, exit_code=0))]


def chaos(messages: list[Envelope], rng: random.Random, credential: Credential) -> list[Envelope]:
    """The same log as the bus might deliver it. A worker sends its checkpoints and its end one
    after another (each waits for the last to be answered), but pings run beside them; an answer
    lost makes a delivery come again, maybe much later."""
    pings = [m for m in messages[1:] if m.type == MessageType.PING]
    ordered = [m for m in messages[1:] if m.type != MessageType.PING]
    out = [messages[0]]
    for message in ordered:  # pings slip in anywhere before the end
        while pings and rng.random() < 0.5:
            out.append(pings.pop(rng.randrange(len(pings))))
        out.append(message)
    out[-1:-1] = pings
    delivered: list[Envelope] = []
    for message in out:
        delivered.append(message)
        for _ in range(rng.randrange(3)):  # duplicates, now or later
            delivered.insert(rng.randrange(len(delivered) - 1, len(delivered) + 1), message)
    for message in [m for m in out if rng.random() < 0.4]:  # answers lost: these come again, later
        first = delivered.index(message)
        delivered.insert(rng.randrange(first + 1, len(delivered) + 1), message)
    resent = [m for m in out if m.type == MessageType.CHECKPOINT_DONE][rng.randrange(2)]
    renamed = authority.sign(resent.model_copy(update={"id": resent.id + "-again"}), credential)  # re-sent by a worker that lost track
    end = delivered.index(out[-1])  # the first JOB_DONE
    delivered.insert(rng.randrange(delivered.index(resent) + 1, end + 1), renamed)
    stray_ping = authority.sign(envelope(MessageType.PING, Ping(instance_id=INSTANCE, phase="idle"), WORKER, "master"),
                                credential)
    return delivered + [stray_ping]


async def machine_credential(master: Master, job_id: str) -> Credential:
    """The key of the machine the master launched for the job (what its worker finds on its disk)."""
    job = await master.store.get_job(job_id)
    [entry] = [e for e in await master.store.list_ledger(live_only=True) if e.instance_id == job.instance_id]
    return master.keys.credential(entry.id)


async def master_with_worker(home: Path, aiohttp_client: Any, cloud: MemoryCloud) -> tuple[Master, Any, list[bytes]]:
    """A master on the real local backends but `cloud`, its HTTP client, and what reaches the
    worker's endpoint (the test plays the worker). The master has recovered (as at its start)."""
    settings = Settings(home=home, batch_window=0.0)
    backends = open_master_backends(settings)
    backends.cloud = cloud
    master = Master(settings, backends)
    client = await aiohttp_client(create_app(master, TOKEN))
    received: list[bytes] = []

    async def worker_endpoint(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"ok": True})

    worker_app = web.Application()
    worker_app.router.add_post("/messages", worker_endpoint)
    worker = await aiohttp_client(worker_app)
    for _ in range(3):  # as systemd would start it again, if a cloud fault stopped its start
        try:
            await master.recover()
            break
        except Exception:
            continue
    await master.bus.subscribe(WORKER, str(worker.make_url("/messages")))  # the machine boots later
    return master, client, received


async def run(tmp_path: Path, aiohttp_client: Any, seed: int | None) -> dict[str, Any]:
    home = tmp_path / (f"seed-{seed}" if seed is not None else "clean")
    home.mkdir()
    cloud = MemoryCloud()
    master, client, started = await master_with_worker(home, aiohttp_client, cloud)
    try:
        job = await master.create_job("chaos")
        await master.add_job(job.id, JDL)
        await master.schedule()
        credential = await machine_credential(master, job.id)
        log = job_log(job.id, credential)
        deliveries = log if seed is None else chaos(log, random.Random(seed), credential)
        bus = master.bus
        assert isinstance(bus, LocalMessageBus)
        for message in deliveries:
            response = await client.post("/messages", data=bus.sign(message))
            assert response.status == 200, await response.text()
        final = await master.store.get_job(job.id)
        return {
            "job": final.model_dump(include={"state", "attempt", "restarts", "preemptions", "checkpoints",
                                              "last_checkpoint", "exit_code", "error", "missing_outputs", "fallbacks"}),
            "checkpoints": [(c.id, c.size_bytes, c.bad) for c in await master.store.list_checkpoints(job.id)],
            "ledger": [(e.state.value, e.instance_id) for e in await master.store.list_ledger(live_only=False)],
            "events": sorted({e.kind for e in await master.store.list_events(job.id)}),
            "machines": [m.state for m in cloud.machines.values()],
            "start_jobs": len(started) > 0,
        }
    finally:
        await master.bus.close()
        await master.store.close()


@pytest.mark.parametrize("seed", range(8))
async def test_chaos_in_delivery_changes_nothing_in_the_end(tmp_path: Path, aiohttp_client: Any, seed: int) -> None:
    clean = await run(tmp_path, aiohttp_client, None)
    assert clean["job"]["state"] == "COMPLETED" and clean["job"]["checkpoints"] == 2
    assert clean["ledger"] == [("TERMINATED", INSTANCE)] and clean["machines"] == ["terminated"]
    assert await run(tmp_path, aiohttp_client, seed) == clean


async def test_a_job_done_after_a_cancel_changes_nothing(tmp_path: Path, aiohttp_client: Any) -> None:
    master, client, _ = await master_with_worker(tmp_path, aiohttp_client, MemoryCloud())
    try:
        job = await master.create_job("late")
        await master.add_job(job.id, JDL)
        await master.schedule()
        bus = master.bus
        assert isinstance(bus, LocalMessageBus)
        log = job_log(job.id, await machine_credential(master, job.id))
        await client.post("/messages", data=bus.sign(log[0]))  # started
        await master.cancel_job(job.id)
        for message in log[1:]:  # the worker had not heard yet
            assert (await client.post("/messages", data=bus.sign(message))).status == 200
        final = await master.store.get_job(job.id)
        assert final.state.value == "CANCELLED" and final.exit_code is None
        assert [e.state.value for e in await master.store.list_ledger(live_only=False)] == ["TERMINATED"]
        assert datetime.now(timezone.utc) >= final.finished_at  # type: ignore[operator]
    finally:
        await master.bus.close()
        await master.store.close()
