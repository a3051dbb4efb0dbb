"""The world around a master, as a model: a clock, a cloud whose machines exist as records, the
workers on them (following the protocol the real worker follows: facts kept until ACKed, ends and
checkpoints recorded in the blob store before they are sent, a
START_JOB it already has ignored, a STOP_JOB with a checkpoint taken as a spot notice), and a
network between them that the test drives message by message: in any order, twice, late, or
never. Nothing here decides for the master; the real Master on the real SQLite store does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from cbas import authority
from cbas.authority import Credential
from cbas.backends import BlobStore, Leftover
from cbas.messages import (
    MASTER, Ack, CheckpointDone, CheckpointNow, Envelope, JobDone, MessageType, Ping, SpotNotice, StartJob,
    StopJob, WorkerStarted, checkpoint_record_key, end_record_key, envelope, worker_address,
)
from cbas.models import LaunchSpec, Machine, Offer

BUS_RETRIES = 3  # SNS (and the local bus) give up on a recipient after this many failed tries


class Clock:
    """Seconds since the epoch, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class InFlight:
    message: Envelope
    tries_left: int = BUS_RETRIES


@dataclass
class Network:
    to_master: list[InFlight] = field(default_factory=list)
    to_workers: list[Envelope] = field(default_factory=list)


@dataclass
class Result:
    """What a finished attempt reported: the test knows which worker produced which result."""

    instance_id: str
    attempt: int


class ModelWorker:
    def __init__(self, instance_id: str, job_id: str, credential: Credential, network: Network, clock: Clock,
                 blobs: BlobStore) -> None:
        self.instance_id, self.job_id, self.credential = instance_id, job_id, credential
        self.network, self.clock, self.blobs = network, clock, blobs
        self.address = worker_address(instance_id)
        self.attempt: int | None = None
        self.phase = "idle"  # idle | running | done
        self.checkpoints = 0
        self.unacknowledged: dict[str, Envelope] = {}
        self.alive = True
        self.reclaim_at: float | None = None
        self._fact(MessageType.WORKER_STARTED, WorkerStarted(instance_id=instance_id))

    def _send(self, kind: MessageType, body: object, record_at: str | None = None) -> Envelope:
        message = authority.sign(envelope(kind, body, self.address, MASTER), self.credential)  # type: ignore[arg-type]
        if record_at is not None:  # kept in the blob store before it is sent (cbas.worker.job_run)
            self.blobs.put_bytes(record_at, message.model_dump_json().encode())
        self.network.to_master.append(InFlight(message))
        return message

    def _fact(self, kind: MessageType, body: object, record_at: str | None = None) -> None:
        message = self._send(kind, body, record_at)
        self.unacknowledged[message.id] = message

    def ping(self) -> None:
        """A ping, then every fact not yet acknowledged, again (cbas.worker.outbox)."""
        if not self.alive:
            return
        self._send(MessageType.PING, Ping(instance_id=self.instance_id, job_id=self.job_id if self.attempt else None,
                                          attempt=self.attempt or 0, phase=self.phase))
        for message in self.unacknowledged.values():
            self.network.to_master.append(InFlight(message))

    def checkpoint(self, final: bool = False) -> bool:
        if not self.alive or self.phase != "running":
            return False
        assert self.attempt is not None
        self.checkpoints += 1
        checkpoint_id = f"a{self.attempt:04d}-n{self.checkpoints:05d}"
        self._fact(MessageType.CHECKPOINT_DONE, CheckpointDone(
            job_id=self.job_id, attempt=self.attempt, checkpoint_id=checkpoint_id,
            manifest_key=f"jobs/{self.job_id}/ckpt/{checkpoint_id}/manifest.json", size_bytes=1000, new_bytes=10,
            pause_seconds=0.1, upload_seconds=0.2, reason="notice" if final else "interval", final=final),
            record_at=checkpoint_record_key(self.job_id, checkpoint_id))
        if final:
            self.phase = "done"  # the job is stopped after a final checkpoint
        return True

    def notice(self) -> None:
        """EC2 gives two minutes: the worker says so, checkpoints at once, and stops."""
        self.reclaim_at = self.clock() + 120.0
        when = datetime.fromtimestamp(self.reclaim_at, timezone.utc)
        self._fact(MessageType.SPOT_NOTICE, SpotNotice(instance_id=self.instance_id, job_id=self.job_id,
                                                       action="terminate", action_time=when))
        self.checkpoint(final=True)

    def finish(self) -> Result | None:
        if not self.alive or self.phase != "running":
            return None
        assert self.attempt is not None
        self.phase = "done"
        # which attempt produced the result travels in it (as a real job's output would)
        self._fact(MessageType.JOB_DONE, JobDone(job_id=self.job_id, attempt=self.attempt, exit_code=0,
                                                 missing_outputs=[f"{self.instance_id}/{self.attempt}"]),
                   record_at=end_record_key(self.job_id, self.attempt))
        return Result(self.instance_id, self.attempt)

    def receive(self, message: Envelope) -> None:
        if not self.alive or message.recipient != self.address:
            return
        authority.verify(message, self.credential)  # the real worker takes nothing else
        if message.type == MessageType.START_JOB:
            start = StartJob.model_validate(message.body)
            if self.attempt is None and self.phase == "idle":
                self.attempt, self.phase = start.attempt, "running"
        elif message.type == MessageType.STOP_JOB:
            stop = StopJob.model_validate(message.body)
            if stop.checkpoint:
                self.checkpoint(final=True)
            elif self.phase == "running":
                self.phase = "done"
        elif message.type == MessageType.CHECKPOINT_NOW:
            CheckpointNow.model_validate(message.body)
            self.checkpoint()
        elif message.type == MessageType.ACK:
            for message_id in Ack.model_validate(message.body).message_ids:
                self.unacknowledged.pop(message_id, None)


class ModelCloud:
    """Machines as records; each launch boots a ModelWorker. `terminations` says who stopped what,
    and while the master handles a message, `handling` names its sender."""

    def __init__(self, network: Network, clock: Clock, blobs: BlobStore) -> None:
        self.network, self.clock, self.blobs = network, clock, blobs
        self.machines: dict[str, Machine] = {}
        self.workers: dict[str, ModelWorker] = {}
        self.handling: Envelope | None = None
        self.wrongly_stopped: list[str] = []
        self.terminations_failing = 0  # the next this many terminate calls fail (the cloud erred)
        self._launches = 0

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def launch(self, spec: LaunchSpec) -> Machine:
        for machine in self.machines.values():  # idempotent on the ledger id, as EC2's ClientToken
            if machine.tags["cbas:ledger"] == spec.ledger_id:
                return machine
        self._launches += 1
        instance_id = f"i-{self._launches:016x}"
        machine = Machine(instance_id=instance_id, zone=spec.zone, instance_type=spec.instance_type,
                          market=spec.market, price=0.03,
                          tags={"cbas:cluster": "default", "cbas:ledger": spec.ledger_id, "cbas:job": spec.job_id})
        self.machines[instance_id] = machine
        credential = Credential(spec.ledger_id, bytes.fromhex(spec.machine_key.get_secret_value()))
        self.workers[instance_id] = ModelWorker(instance_id, spec.job_id, credential, self.network, self.clock,
                                                   self.blobs)
        return machine

    def gone(self, instance_id: str) -> None:
        """The machine is no more (terminated, reclaimed, or it died)."""
        if instance_id in self.machines:
            self.machines[instance_id] = self.machines[instance_id].model_copy(update={"state": "terminated"})
            self.workers[instance_id].alive = False

    async def terminate(self, instance_id: str) -> None:
        if self.terminations_failing:
            self.terminations_failing -= 1
            raise RuntimeError("the cloud did not answer")
        handling = self.handling
        if handling is not None and handling.sender != worker_address(instance_id) and self.live(instance_id):
            self.wrongly_stopped.append(f"{instance_id} stopped while handling {handling.type} from {handling.sender}")
        self.gone(instance_id)

    def live(self, instance_id: str) -> bool:
        machine = self.machines.get(instance_id)
        return machine is not None and machine.state != "terminated"

    def live_workers(self) -> list[ModelWorker]:
        return [w for w in self.workers.values() if w.alive]

    async def list_machines(self) -> list[Machine]:
        return [m for m in self.machines.values() if m.state != "terminated"]

    async def offers(self) -> list[Offer]:
        return [Offer(zone="z1", instance_type="c5.large", spot_price=0.03, ondemand_price=0.085, available=True)]

    async def delete_snapshot(self, snapshot_id: str) -> None: ...
    async def console_output(self, instance_id: str) -> bytes | None:
        return None

    async def leftovers(self) -> list[Leftover]:
        return []

    async def remove(self, leftover: Leftover) -> None: ...


class ModelBus:
    """What the master sends goes into the network; nothing is delivered until the test says."""

    def __init__(self, network: Network) -> None:
        self.network = network

    async def send(self, message: Envelope) -> None:
        self.network.to_workers.append(message)

    async def subscribe(self, recipient: str, url: str) -> None: ...
    async def unsubscribe(self, recipient: str) -> None: ...

    async def unsubscribe_stale(self, keep: set[str]) -> list[str]:
        return []

    def parse_delivery(self, body: bytes) -> Envelope | None:
        raise AssertionError("the model delivers envelopes itself")

    async def receive(self, body: bytes) -> Envelope | None:
        raise AssertionError("the model delivers envelopes itself")

    async def close(self) -> None: ...
