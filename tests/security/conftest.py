"""A master on the real local backends with two jobs running on two machines, A and B. The test
plays both workers (and an attacker holding one machine's key); the cloud is an in-memory double."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from cbas import authority, jdl
from cbas.authority import Credential
from cbas.local.bus import LocalMessageBus
from cbas.master.app import create_app
from cbas.master.credentials import MachineKeys, load_master_key
from cbas.master.service import Master
from cbas.messages import MASTER, Envelope, MessageType, Ping, WorkerStarted, envelope, worker_address
from cbas.models import LaunchSpec, Machine
from cbas.settings import Settings
from cbas.wiring import open_master_backends
from tests.faults.test_message_chaos import MemoryCloud

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JDL = jdl.write(jdl.JobDescription(executable="/bin/true", name="victim"))


class CountingCloud(MemoryCloud):
    """MemoryCloud whose every launch is a new instance id (an attack needs a second machine)."""

    async def launch(self, spec: LaunchSpec) -> Machine:
        for machine in self.machines.values():
            if machine.tags["cbas:ledger"] == spec.ledger_id:
                return machine
        instance_id = f"i-{len(self.machines) + 1:016d}"
        machine = Machine(instance_id=instance_id, zone=spec.zone, instance_type=spec.instance_type,
                          market=spec.market, price=0.03,
                          tags={"cbas:cluster": "default", "cbas:ledger": spec.ledger_id, "cbas:job": spec.job_id})
        self.machines[instance_id] = machine
        return machine

    async def console_output(self, instance_id: str) -> bytes | None:
        return None


@dataclass
class PlayedMachine:
    instance_id: str
    job_id: str
    credential: Credential

    @property
    def address(self) -> str:
        return worker_address(self.instance_id)


class Cluster:
    def __init__(self, master: Master, client: Any, cloud: CountingCloud, aiohttp_client: Any) -> None:
        self.master, self.client, self.cloud, self.aiohttp_client = master, client, cloud, aiohttp_client
        self.inboxes: dict[str, list[Envelope]] = {}  # what the master sent each machine
        self.keys = MachineKeys(load_master_key(master.settings.home))
        self.machines: dict[str, PlayedMachine] = {}

    @property
    def bus(self) -> LocalMessageBus:
        assert isinstance(self.master.bus, LocalMessageBus)
        return self.master.bus

    def message(self, signer: PlayedMachine | None, type_: MessageType, body: Any, sender: str | None = None,
                recipient: str = MASTER) -> Envelope:
        """An envelope as a worker makes it, signed with `signer`'s machine key (None: unsigned)."""
        message = envelope(type_, body, sender or (signer.address if signer else "cli"), recipient)
        return authority.sign(message, signer.credential) if signer else message

    async def post(self, message: Envelope) -> tuple[int, dict[str, Any]]:
        response = await self.client.post("/messages", data=self.bus.sign(message))
        return response.status, await response.json()

    async def machine_for(self, job_id: str) -> PlayedMachine:
        job = await self.master.store.get_job(job_id)
        [entry] = [e for e in await self.master.store.list_ledger(live_only=True) if e.job_id == job_id]
        assert entry.instance_id == job.instance_id
        return PlayedMachine(entry.instance_id, job_id, self.keys.credential(entry.id))

    async def boot(self, job_id: str) -> PlayedMachine:
        """The job's machine: its worker announces itself and runs the job (attempt as the master says)."""
        machine = await self.machine_for(job_id)
        if machine.instance_id not in self.inboxes:
            await self.subscribe(machine.instance_id)
        status, answer = await self.post(self.message(machine, MessageType.WORKER_STARTED,
                                                      WorkerStarted(instance_id=machine.instance_id)))
        assert status == 200, answer
        job = await self.master.store.get_job(job_id)
        status, answer = await self.post(self.message(machine, MessageType.PING, Ping(
            instance_id=machine.instance_id, job_id=job_id, attempt=job.attempt, phase="running")))
        assert status == 200, answer
        assert (await self.master.store.get_job(job_id)).state.value == "RUNNING"
        return machine

    async def subscribe(self, instance_id: str) -> None:
        """An endpoint for the machine that keeps what the master sends it."""
        inbox = self.inboxes.setdefault(instance_id, [])

        async def endpoint(request: web.Request) -> web.Response:
            message = self.bus.parse_delivery(await request.read())
            inbox.append(message)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/messages", endpoint)
        server = await self.aiohttp_client(app)
        await self.master.bus.subscribe(worker_address(instance_id), str(server.make_url("/messages")))

    async def store_state(self) -> dict[str, Any]:
        store = self.master.store
        jobs = await store.list_jobs()
        return {
            "jobs": sorted(json.dumps(j.model_dump(mode="json"), sort_keys=True) for j in jobs),
            "ledger": sorted(json.dumps(e.model_dump(mode="json"), sort_keys=True)
                             for e in await store.list_ledger(live_only=False)),
            "checkpoints": {j.id: [c.model_dump(mode="json") for c in await store.list_checkpoints(j.id)] for j in jobs},
            "events": {j.id: [(e.kind, e.detail) for e in await store.list_events(j.id)] for j in jobs},
            "machines": sorted((m.instance_id, m.state) for m in self.cloud.machines.values()),
        }


@pytest.fixture
async def cluster(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[Cluster]:
    (tmp_path / "home").mkdir(mode=0o700)
    settings = Settings(home=tmp_path / "home", batch_window=0.0)
    backends = open_master_backends(settings)
    cloud = CountingCloud()
    backends.cloud = cloud
    master = Master(settings, backends)
    client = await aiohttp_client(create_app(master, TOKEN))
    await master.recover()
    result = Cluster(master, client, cloud, aiohttp_client)
    try:
        jobs = [await master.create_job(name) for name in ("a", "b")]
        for job in jobs:
            await master.add_job(job.id, JDL)
        await master.schedule()
        for job in jobs:
            result.machines[job.name or ""] = await result.boot(job.id)
        yield result
    finally:
        await master.bus.close()
        await master.store.close()

