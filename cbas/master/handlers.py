"""One thin handler per message type a worker sends: validate (done by the registry), call the
Master. The gate (gate.py) has checked the sender and the claims first. ADD_JOB and CANCEL_JOB have
no handler: jobs are created, submitted and cancelled only through the API."""

from __future__ import annotations

import structlog

from cbas import authority
from cbas.master.recorded_ends import end_of
from cbas.master.service import Master
from cbas.messages import (
    CheckpointDone, CheckpointFailure, Envelope, JobDone, JobFailed, MessageRegistry, MessageType, Ping, SpotNotice,
    WorkerStarted,
)
from cbas.master.worker_events import checkpoint_record

registry: MessageRegistry[Master] = MessageRegistry()


@registry.handler(MessageType.WORKER_STARTED)
async def on_worker_started(master: Master, message: Envelope, body: WorkerStarted) -> None:
    await master.worker_started(body.instance_id, announcement=message.id)
    await master.forget_key_drop(authority.claimed_ledger_id(message))  # its worker has the key now


@registry.handler(MessageType.PING)
async def on_ping(master: Master, message: Envelope, body: Ping) -> None:
    await master.pinged(body)


@registry.handler(MessageType.CHECKPOINT_DONE)
async def on_checkpoint_done(master: Master, message: Envelope, body: CheckpointDone) -> None:
    structlog.contextvars.bind_contextvars(job_id=body.job_id)
    await master.checkpoint_done(checkpoint_record(body), body.final, instance_id=message.sender.removeprefix("worker/"))


@registry.handler(MessageType.CHECKPOINT_FAILED)
async def on_checkpoint_failed(master: Master, message: Envelope, body: CheckpointFailure) -> None:
    structlog.contextvars.bind_contextvars(job_id=body.job_id)
    await master.checkpoint_failed(body)


@registry.handler(MessageType.SPOT_NOTICE)
async def on_spot_notice(master: Master, message: Envelope, body: SpotNotice) -> None:
    await master.spot_notice(body.instance_id, body.action_time.timestamp())


@registry.handler(MessageType.JOB_DONE)
async def on_job_done(master: Master, message: Envelope, body: JobDone) -> None:
    structlog.contextvars.bind_contextvars(job_id=body.job_id)
    ok, update, detail = end_of(body)
    await master.job_finished(body.job_id, body.attempt, ok=ok, update=update, detail=detail,
                              instance_id=message.sender.removeprefix("worker/"))


@registry.handler(MessageType.JOB_FAILED)
async def on_job_failed(master: Master, message: Envelope, body: JobFailed) -> None:
    structlog.contextvars.bind_contextvars(job_id=body.job_id)
    ok, update, detail = end_of(body)
    await master.job_finished(body.job_id, body.attempt, ok=ok, update=update, detail=detail,
                              instance_id=message.sender.removeprefix("worker/"))
