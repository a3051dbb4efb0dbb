"""The I/O boundaries of CBAS. Each has a local (cbas/local) and an AWS (cbas/aws) twin."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Protocol

from pydantic import BaseModel, ValidationError

from cbas import jsonlimits

from cbas.messages import Envelope
from cbas.models import CheckpointRecord, Job, JobEvent, LaunchSpec, LedgerEntry, Machine, Offer
from cbas.state import JobState

Progress = Callable[[int], None]  # called with the number of bytes just moved


class BlobNotFound(KeyError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no blob {self.key!r}"


class StaleWrite(RuntimeError):
    """A conditional write lost: the record changed since it was read."""


class NotFound(KeyError):
    def __str__(self) -> str:
        return f"not found: {self.args[0]}"


class CapacityError(RuntimeError):
    """The cloud has no capacity for this launch (EC2's InsufficientInstanceCapacity and kin)."""


class PriceTooLow(CapacityError):
    """The spot price is above the launch's MaxPrice (EC2's SpotMaxPriceTooLow): it says nothing of
    the market's capacity, which a launch without that MaxPrice may still find."""


class DeliveryError(RuntimeError):
    """A message could not be delivered now; sending again later may work."""


class MessageRejected(RuntimeError):
    """The recipient refused the message; sending it again will not help."""


class InvalidMessage(ValueError):
    """A delivery that is malformed, unsigned, badly signed or stale."""


def envelope_of(text: str) -> Envelope:
    """The envelope a verified notification carries (its Message); InvalidMessage if it is none,
    TooDeep (a 400) if it nests deeper than any envelope."""
    try:
        document = jsonlimits.loads(text)
    except jsonlimits.TooDeep:
        raise
    except ValueError:
        raise InvalidMessage("the notification's Message is not JSON") from None
    try:
        return Envelope.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "envelope"
        raise InvalidMessage(f"envelope is invalid at {where}: {first['msg']}") from None


class AccessNotGranted(RuntimeError):
    """A job's machine cannot be given access to the job's files (or was given none)."""


async def mutate_with_retries(store: JobStore, job_id: str, change: JobMutation, event: JobEvent | None = None,
                              attempts: int = 20) -> Job | None:
    """JobStore.mutate_job, the same for every store: read, change, write conditionally (with the
    event, in the same write), again on StaleWrite, until it lands or the change declines
    (returns None). Writers that lost back off at random, or the same ones keep colliding (seen
    with eight at once on DynamoDB)."""
    for lost in range(attempts):
        if lost:
            await asyncio.sleep(random.uniform(0, 0.001 * 2 ** min(lost, 7)))
        job = await store.get_job(job_id)
        changed = change(job)
        if changed is None:
            return None
        try:
            return await store.update_job(changed, event)
        except StaleWrite:
            continue
    raise StaleWrite(f"job {job_id}: too many concurrent writers")


class BlobStore(Protocol):
    """Keys are '/'-separated paths such as jobs/<id>/input.tar.zst. Synchronous: run in threads."""

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def list_modified(self, prefix: str) -> dict[str, float]:
        """The keys under prefix, each with when it was written (seconds since the epoch)."""
        ...
    def delete(self, key: str) -> None: ...


JobMutation = Callable[[Job], Job | None]


class JobStore(Protocol):
    async def create_job(self, job: Job) -> Job: ...
    async def get_job(self, job_id: str) -> Job: ...
    async def list_jobs(self, states: set[JobState] | None = None) -> list[Job]: ...
    async def update_job(self, job: Job, event: JobEvent | None = None) -> Job:
        """Write job if its stored version is still job.version; raise StaleWrite otherwise. The
        event is added in the same atomic write: both land, or neither (a master killed between
        two writes lost the event of a state it had written)."""
        ...
    async def mutate_job(self, job_id: str, change: JobMutation, event: JobEvent | None = None) -> Job | None:
        """Read, apply change (None: leave as is), write conditionally with the event; retry on
        StaleWrite."""
        ...

    async def put_ledger(self, entry: LedgerEntry) -> LedgerEntry: ...
    async def list_ledger(self, live_only: bool = True) -> list[LedgerEntry]: ...

    async def add_checkpoint(self, record: CheckpointRecord) -> bool: ...
    async def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]: ...
    async def mark_checkpoint_bad(self, job_id: str, checkpoint_id: str) -> None: ...
    async def mark_snapshot_deleted(self, job_id: str, checkpoint_id: str) -> None: ...

    async def add_event(self, event: JobEvent) -> None: ...
    async def list_events(self, job_id: str) -> list[JobEvent]: ...

    async def first_sighting(self, message_id: str, window_seconds: float) -> bool:
        """Record a message id; False if it was seen within the window (a duplicate)."""
        ...

    async def seen(self, message_id: str, window_seconds: float) -> bool:
        """Whether the id was recorded within the window (reads only)."""
        ...

    async def close(self) -> None: ...


class Leftover(BaseModel):
    """Something CBAS made in the cloud that may outlive its use (for the reaper)."""

    kind: str  # machine | volume | snapshot | image | queue | job-files
    id: str
    job_id: str | None = None
    ledger_id: str | None = None  # machines: the ledger entry they were launched for
    created_at: datetime | None = None


class Cloud(Protocol):
    async def start(self) -> None: ...
    async def launch(self, spec: LaunchSpec) -> Machine: ...
    async def terminate(self, instance_id: str) -> None: ...
    async def list_machines(self) -> list[Machine]: ...
    async def offers(self) -> list[Offer]: ...
    async def delete_snapshot(self, snapshot_id: str) -> None: ...
    async def console_output(self, instance_id: str) -> bytes | None:
        """What the machine printed on its console (its boot and its worker), also once it is gone."""
        ...

    async def leftovers(self) -> list[Leftover]:
        """Everything of this cluster's that the reaper may judge: machines, volumes, snapshots..."""
        ...

    async def remove(self, leftover: Leftover) -> None: ...
    async def close(self) -> None: ...


ACCESS_REFRESH_BEFORE = timedelta(minutes=20)  # a worker whose job access expires sooner gets fresh access


class JobCredentials(Protocol):
    """The master's side of a job's file access: what the one machine running the job needs to
    reach that job's files and no other's, sealed with that machine's key (cbas.authority), so it
    travels in START_JOB and DATA_ACCESS. "" where the worker needs nothing (local: it reads the
    folder store as root). On AWS: short-lived S3 credentials scoped to jobs/<id>/."""

    async def sealed_for(self, machine_key: bytes, job_id: str) -> str:
        """Raise AccessNotGranted if the cloud refuses."""
        ...


class JobBlobs(Protocol):
    """The worker's side: the blob store through which it reaches one job's files."""

    def accept(self, machine_key: bytes, job_id: str, sealed: str) -> None:
        """New (or fresher) access for the job, as JobCredentials.sealed_for made it."""
        ...

    def blobs_for(self, job_id: str) -> BlobStore:
        """Raise AccessNotGranted if the job's access never came."""
        ...

    def expires_at(self, job_id: str) -> datetime | None:
        """When the job's newest access runs out (the worker's PING says it); None: never."""
        ...


class NoJobCredentials:
    """Locally: workers reach the (folder) blob store themselves."""

    async def sealed_for(self, machine_key: bytes, job_id: str) -> str:
        return ""


class SharedJobBlobs:
    """Locally: every job's files through the worker's own blob store."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    def accept(self, machine_key: bytes, job_id: str, sealed: str) -> None:
        pass

    def blobs_for(self, job_id: str) -> BlobStore:
        return self.blobs

    def expires_at(self, job_id: str) -> datetime | None:
        return None


class ImageBuilder(Protocol):
    """Builds a job's prologue into a machine image once; the same files give the same image."""

    async def image_for(self, job_id: str, prologue: list[tuple[str, bytes]]) -> str: ...


class VolumeSnapshots(Protocol):
    """The worker's side of the `volume` strategy: snapshot the job's data disk."""

    def snapshot(self, job_id: str, checkpoint_id: str) -> str:
        """Take a point-in-time snapshot (the job may go on once this returns); its id."""
        ...

    def wait(self, snapshot_id: str) -> None:
        """Block until the snapshot is complete and can make a volume; raise if it failed."""
        ...


class MessageBus(Protocol):
    async def send(self, message: Envelope) -> None: ...
    async def subscribe(self, recipient: str, url: str) -> None: ...
    async def unsubscribe(self, recipient: str) -> None: ...
    async def unsubscribe_stale(self, keep: set[str]) -> list[str]:
        """Drop worker endpoints not in `keep` (their machines are gone); returns them."""
        ...
    def parse_delivery(self, body: bytes) -> Envelope | None:
        """Verify and unwrap one HTTP delivery; raise InvalidMessage if it is not genuine.
        None: a control message (a subscription confirmation) the bus has handled itself."""
        ...

    async def receive(self, body: bytes) -> Envelope | None:
        """parse_delivery without blocking the event loop (certificate fetches, confirmations)."""
        ...

    async def close(self) -> None: ...

