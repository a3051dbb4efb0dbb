"""Message envelope, one body model per message type, and the handler registry.

Handlers are idempotent on the envelope id: the dispatcher drops an id it has already seen.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any, Awaitable, Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from cbas.models import utcnow

MASTER = "master"


def worker_address(instance_id: str) -> str:
    return f"worker/{instance_id}"


def checkpoint_record_key(job_id: str, checkpoint_id: str) -> str:
    """Where a worker leaves its signed CHECKPOINT_DONE before it reports it, beside the
    checkpoint's manifest: a machine lost before the master heard it (a notice checkpoint's
    report, the last thing it sends) does not make its job restart from an older one."""
    return f"jobs/{job_id}/ckpt/{checkpoint_id}/report.json"


def end_record_key(job_id: str, attempt: int) -> str:
    """Where a worker leaves its attempt's end (the signed JOB_DONE or JOB_FAILED) before it reports
    it: a machine lost before the master heard it does not take the job's end with it."""
    return f"jobs/{job_id}/ends/attempt-{attempt}.json"


class MessageType(StrEnum):
    # ADD_JOB and CANCEL_JOB are refused on the bus (cbas/master/gate.py): jobs are submitted and
    # cancelled only through the token-protected API; the types stay so the refusal can name them
    ADD_JOB = "ADD_JOB"
    CANCEL_JOB = "CANCEL_JOB"
    WORKER_STARTED = "WORKER_STARTED"
    START_JOB = "START_JOB"
    PING = "PING"
    CHECKPOINT_DONE = "CHECKPOINT_DONE"
    CHECKPOINT_FAILED = "CHECKPOINT_FAILED"
    SPOT_NOTICE = "SPOT_NOTICE"
    JOB_DONE = "JOB_DONE"
    JOB_FAILED = "JOB_FAILED"
    STOP_JOB = "STOP_JOB"
    CHECKPOINT_NOW = "CHECKPOINT_NOW"
    DATA_ACCESS = "DATA_ACCESS"
    ACK = "ACK"


# what a worker keeps and sends again until the master acknowledges it (cbas.worker.outbox):
# the facts a master that was away must still learn; a PING is only the latest word
FACT_TYPES = frozenset({
    MessageType.WORKER_STARTED, MessageType.CHECKPOINT_DONE, MessageType.CHECKPOINT_FAILED,
    MessageType.SPOT_NOTICE, MessageType.JOB_DONE, MessageType.JOB_FAILED,
})


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: secrets.token_hex(12), min_length=8, max_length=64)
    type: MessageType
    sender: str = Field(max_length=128)
    recipient: str = Field(max_length=128)
    sent_at: datetime = Field(default_factory=utcnow)
    body: dict[str, Any] = Field(default_factory=dict)
    # "v1:<ledger id>:<hmac>" made with the sending or receiving machine's key (cbas.authority)
    auth: str | None = Field(default=None, max_length=256)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AddJob(_Body):
    job_id: str
    jdl: str


class CancelJob(_Body):
    job_id: str


class WorkerStarted(_Body):
    instance_id: str


class StartJob(_Body):
    job_id: str
    attempt: int
    jdl: str
    checkpoints: list[str] = Field(default_factory=list)  # good ones to restore, newest first
    ping_interval: float
    prologue_in_image: bool = False  # the machine's image has the prologue built in: skip it
    # the key that seals the job's checkpoint manifests, sealed for this machine (cbas.authority)
    checkpoint_key: str = Field(default="", max_length=256)
    # access to the job's files (AWS: S3 credentials for jobs/<id>/ only), sealed for this machine;
    # "" where the worker needs none (backends.JobCredentials)
    data_access: str = Field(default="", max_length=16384)
    _opened_key: bytes | None = PrivateAttr(default=None)  # never serialised, never logged

    def with_checkpoint_key(self, key: bytes) -> StartJob:
        """This START_JOB with its checkpoint key opened (by the worker, with its machine key)."""
        opened = self.model_copy()
        opened._opened_key = key
        return opened

    def opened_checkpoint_key(self) -> bytes:
        if self._opened_key is None:
            raise ValueError(f"START_JOB of job {self.job_id}: its checkpoint key was not opened with the machine key")
        return self._opened_key


class Ping(_Body):
    instance_id: str
    job_id: str | None = None
    attempt: int = 0
    phase: str = "idle"  # idle | starting | running | finishing
    restored_from: str | None = None  # the checkpoint this attempt really started from
    bad_checkpoints: list[str] = Field(default_factory=list)  # failed verification on restore
    data_access_expires: datetime | None = None  # the job's file access runs out then: renew before


class CheckpointDone(_Body):
    job_id: str
    attempt: int
    checkpoint_id: str
    manifest_key: str
    size_bytes: int  # the whole state
    new_bytes: int = 0  # what this checkpoint had to store
    pause_seconds: float  # how long the job was held still
    upload_seconds: float
    reason: str  # interval | notice
    final: bool = False  # taken on a spot notice; the job is stopped after it
    deadline_margin_seconds: float | None = None  # notice checkpoints: time left when it counted
    snapshot_id: str | None = None  # volume strategy: the snapshot that holds the state


class CheckpointFailure(_Body):
    """A checkpoint that does not count, and why: the master shows it and judges restart loops."""

    job_id: str
    attempt: int
    checkpoint_id: str
    reason: str  # interval | notice | rebalance | scheduler | validation
    error: str = Field(max_length=2000)


class SpotNotice(_Body):
    instance_id: str
    job_id: str | None = None
    action: str
    action_time: datetime


class JobDone(_Body):
    job_id: str
    attempt: int
    exit_code: int = 0
    missing_outputs: list[str] = Field(default_factory=list)


class JobFailed(_Body):
    job_id: str
    attempt: int
    exit_code: int | None = None
    reason: str
    stderr_tail: str = ""


class StopJob(_Body):
    job_id: str
    reason: str = ""
    checkpoint: bool = False  # checkpoint first (the job moves elsewhere), or just stop


class CheckpointNow(_Body):
    job_id: str
    reason: str = ""


class DataAccess(_Body):
    """Fresh access to the job's files, sealed for the machine (the master's answer to a PING
    whose access expires soon)."""

    job_id: str
    attempt: int
    sealed: str = Field(min_length=1, max_length=16384)


class Ack(_Body):
    """The master has these facts of the worker's (handled, a duplicate, or of an attempt that
    is over): the worker stops sending them."""

    message_ids: list[str] = Field(min_length=1, max_length=64)


BODY_MODELS: dict[MessageType, type[_Body]] = {
    MessageType.ADD_JOB: AddJob,
    MessageType.CANCEL_JOB: CancelJob,
    MessageType.WORKER_STARTED: WorkerStarted,
    MessageType.START_JOB: StartJob,
    MessageType.PING: Ping,
    MessageType.CHECKPOINT_DONE: CheckpointDone,
    MessageType.CHECKPOINT_FAILED: CheckpointFailure,
    MessageType.SPOT_NOTICE: SpotNotice,
    MessageType.JOB_DONE: JobDone,
    MessageType.JOB_FAILED: JobFailed,
    MessageType.STOP_JOB: StopJob,
    MessageType.CHECKPOINT_NOW: CheckpointNow,
    MessageType.DATA_ACCESS: DataAccess,
    MessageType.ACK: Ack,
}


def envelope(type_: MessageType, body: _Body, sender: str, recipient: str) -> Envelope:
    return Envelope(type=type_, sender=sender, recipient=recipient, body=body.model_dump(mode="json"))


class UnroutableMessage(ValueError):
    """A message this endpoint has no handler for, or whose body is not of its type."""


BodyT = TypeVar("BodyT", bound=_Body)
ContextT = TypeVar("ContextT")
Handler = Callable[[ContextT, Envelope, Any], Awaitable[None]]


class MessageRegistry(Generic[ContextT]):
    """Maps each message type to one handler; filled with the @registry.handler decorator."""

    def __init__(self) -> None:
        self._handlers: dict[MessageType, Handler[ContextT]] = {}

    def handler(self, type_: MessageType) -> Callable[[Handler[ContextT]], Handler[ContextT]]:
        def register(func: Handler[ContextT]) -> Handler[ContextT]:
            if type_ in self._handlers:
                raise ValueError(f"two handlers for {type_}")
            self._handlers[type_] = func
            return func

        return register

    def types(self) -> frozenset[MessageType]:
        return frozenset(self._handlers)

    def parse_body(self, message: Envelope) -> _Body:
        if message.type not in self._handlers:
            raise UnroutableMessage(f"this endpoint does not handle {message.type} messages")
        try:
            return BODY_MODELS[message.type].model_validate(message.body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise UnroutableMessage(f"{message.type} body is invalid at {where}: {first['msg']}") from None

    async def dispatch(self, context: ContextT, message: Envelope) -> None:
        body = self.parse_body(message)
        await self._handlers[message.type](context, message, body)
