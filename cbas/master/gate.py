"""Who may tell the master what, checked before a delivered message reaches its handler.

In order: the type is one a worker sends (jobs are created and cancelled only through the API);
the auth is made with the key of the ledger entry it names; the sender is that entry's machine;
the body speaks of that machine and of the job it was launched for. Any of these failing is a
refusal (403). Then fencing: a genuine message from a machine the job has left, or of an attempt
that is not the job's current one, is answered and changes nothing. A machine whose launch has
not been recorded yet (its instance id unknown) is asked to send again (503).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cbas import authority
from cbas.authority import Unauthorized
from cbas.backends import JobStore, NotFound
from cbas.master.credentials import MachineKeys
from cbas.master.resource_manager import ResourceManager
from cbas.messages import Envelope, MessageRegistry, MessageType, worker_address
from cbas.models import Job, LedgerEntry, LedgerState

WORKER_TYPES = frozenset({
    MessageType.WORKER_STARTED, MessageType.PING, MessageType.CHECKPOINT_DONE, MessageType.CHECKPOINT_FAILED,
    MessageType.SPOT_NOTICE, MessageType.JOB_DONE, MessageType.JOB_FAILED,
})
API_ONLY = frozenset({MessageType.ADD_JOB, MessageType.CANCEL_JOB})


class Refused(Exception):
    """A message its sender may not send; `reason` is a short label for the metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotYet(Exception):
    """The sender's machine is being launched: its instance id is not recorded yet."""


@dataclass(frozen=True)
class Stale:
    reason: str  # a short label for the metrics
    why: str


def check_type(message: Envelope) -> None:
    if message.type in API_ONLY:
        raise Refused("api-only", f"{message.type} comes only through the API (POST /api/jobs/<id>/submit or "
                                  f"/api/jobs/<id>/cancel, with the API token), never through the bus")
    if message.type not in WORKER_TYPES:
        raise Refused("type", f"a worker may not send {message.type} to the master; it sends "
                              f"{', '.join(sorted(WORKER_TYPES))}")


def check_sender(message: Envelope, entry: LedgerEntry) -> None:
    assert entry.instance_id is not None
    if message.sender != worker_address(entry.instance_id):
        raise Refused("sender", f"{message.type} from {message.sender!r} is signed with the key of machine "
                                f"{entry.instance_id} (ledger {entry.id}): a machine speaks only for itself")


def check_claims(message: Envelope, body: Any, entry: LedgerEntry) -> None:
    """The body speaks of the sender's machine and of its job, nothing else."""
    claimed = getattr(body, "instance_id", None)
    if claimed is not None and claimed != entry.instance_id:
        raise Refused("instance", f"{message.type} from machine {entry.instance_id} speaks of machine {claimed}")
    job_id = getattr(body, "job_id", None)
    if job_id is not None and job_id != entry.job_id:
        raise Refused("job", f"{message.type} from machine {entry.instance_id} is about job {job_id}, which it "
                             f"does not run (it was launched for job {entry.job_id})")


def staleness(message: Envelope, body: Any, entry: LedgerEntry, job: Job | None) -> Stale | None:
    """Why a genuine message is too late to change anything (a fencing token: machine, attempt)."""
    if entry.state == LedgerState.TERMINATED:
        return Stale("released", f"machine {entry.instance_id} was let go ({entry.reason or 'terminated'})")
    if message.type == MessageType.WORKER_STARTED:
        return None  # a live machine announcing itself: the master decides what it is for
    if job is None:
        return Stale("unknown-job", f"job {entry.job_id} is unknown")
    if job.instance_id != entry.instance_id:
        return Stale("moved", f"job {job.id} is no longer on machine {entry.instance_id}")
    attempt = getattr(body, "attempt", None)
    if getattr(body, "job_id", None) is not None and attempt is not None and attempt != job.attempt:
        return Stale("attempt", f"attempt {attempt} is not job {job.id}'s current attempt ({job.attempt})")
    return None


class Gate:
    def __init__(self, keys: MachineKeys, resources: ResourceManager, store: JobStore,
                 registry: MessageRegistry[Any]) -> None:
        self.keys, self.resources, self.store, self.registry = keys, resources, store, registry

    async def admit(self, message: Envelope) -> Stale | None:
        """Raise Refused or NotYet; else None (handle it), or why it is stale (answer, change nothing).
        A body that is not of its type is an UnroutableMessage (400), once the sender is known."""
        check_type(message)
        try:
            ledger_id = authority.claimed_ledger_id(message)
            authority.verify(message, self.keys.credential(ledger_id))
        except Unauthorized as exc:
            raise Refused("auth", str(exc)) from None
        entry = await self.resources.entry_for(message.sender.removeprefix("worker/"))  # (an index)
        if entry is None or entry.id != ledger_id:  # a launch under way, a machine let go, or a lie
            entry = await self.resources.entry_by_id(ledger_id)
        if entry is None:
            raise Refused("sender", f"{message.type}: no machine of ledger entry {ledger_id} was ever launched")
        if entry.instance_id is None:
            if entry.state == LedgerState.TERMINATED:
                return Stale("released", f"the launch of {ledger_id} failed ({entry.reason})")
            raise NotYet(f"the launch of machine {ledger_id} is not recorded yet: send {message.type} again")
        check_sender(message, entry)
        body = self.registry.parse_body(message)
        check_claims(message, body, entry)
        job = None
        if entry.state != LedgerState.TERMINATED and message.type != MessageType.WORKER_STARTED:
            try:
                job = await self.store.get_job(entry.job_id)
            except NotFound:
                job = None
        return staleness(message, body, entry, job)
