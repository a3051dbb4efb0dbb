"""A job's end that its worker recorded in the blob store but the master never heard: the worker
leaves the signed JOB_DONE or JOB_FAILED there before it sends it (cbas.messages.end_record_key),
so a machine lost before the report arrived (reclaimed, dead, its outbox gone with it) does not
make a finished job run again. A lost machine's record is read first; only without one (or with
one that is not the genuine end of the job's current attempt on that machine) is the job
restarted.

A part of the Master (cbas.master.service), built on its worker events: its machine_lost comes
before restarts.py's for every caller (the watchdog, recovery, the cloud's word).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from pydantic import ValidationError

from cbas import authority, jsonlimits
from cbas.authority import Unauthorized
from cbas.backends import NotFound
from cbas.master.worker_events import WorkerEvents
from cbas.messages import Envelope, JobDone, JobFailed, MessageType, end_record_key, worker_address
from cbas.models import Job

log = structlog.get_logger(__name__)

MAX_RECORD_BYTES = 64 * 1024  # an end is a few hundred bytes, a stderr tail at most a few KiB


def end_of(body: JobDone | JobFailed) -> tuple[bool, dict[str, Any], str]:
    """What a worker's end says: ok, the job's fields it sets, and the event's detail."""
    if isinstance(body, JobDone):
        missing = f"; missing outputs: {', '.join(body.missing_outputs)}" if body.missing_outputs else ""
        return True, {"exit_code": body.exit_code, "missing_outputs": body.missing_outputs}, f"exit code 0{missing}"
    return False, {"exit_code": body.exit_code, "error": body.reason, "stderr_tail": body.stderr_tail}, body.reason


class NotTheEnd(ValueError):
    """A record that is not the genuine end of the job's current attempt on the machine."""


class RecordedEnds(WorkerEvents):
    async def machine_lost(self, job_id: str, instance_id: str | None, reason: str, spot: bool = False) -> None:
        if instance_id and await self._learn_recorded_end(job_id, instance_id):
            return
        await super().machine_lost(job_id, instance_id, reason, spot=spot)

    async def _learn_recorded_end(self, job_id: str, instance_id: str) -> bool:
        """True if the job's current attempt on instance_id had ended, as its worker recorded."""
        try:
            job = await self.store.get_job(job_id)
        except NotFound:
            return False
        if job.instance_id != instance_id or not job.state.has_machine() or job.attempt < 1:
            return False
        key = end_record_key(job_id, job.attempt)
        try:
            if await asyncio.to_thread(self.blobs.size, key) > MAX_RECORD_BYTES:
                log.warning("end_record.refused", job_id=job_id, why=f"{key} is over {MAX_RECORD_BYTES} bytes")
                return False
            raw = await asyncio.to_thread(self.blobs.get_bytes, key)
        except NotFound:
            return False
        except Exception as exc:  # the blob store fails: the loss is certain, a restart loses no data
            log.warning("end_record.unreadable", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            return False
        try:
            body = await self._genuine_end(raw, job, instance_id)
        except NotTheEnd as exc:
            log.warning("end_record.refused", job_id=job_id, instance_id=instance_id, why=str(exc))
            return False
        ok, update, detail = end_of(body)
        log.info("end_record.learned", job_id=job_id, instance_id=instance_id, attempt=job.attempt, ok=ok)
        await self.job_finished(job_id, body.attempt, ok=ok, update=update, instance_id=instance_id,
                                detail=f"{detail} (from the end its worker recorded; its machine was lost before "
                                       f"reporting it)")
        return True

    async def _genuine_end(self, raw: bytes, job: Job, instance_id: str) -> JobDone | JobFailed:
        """The record's end, checked as the gate checks a delivered one: signed with the key of the
        machine's ledger entry, sent by that machine, about this job's current attempt."""
        try:
            message = Envelope.model_validate(jsonlimits.loads(raw))
            ledger_id = authority.claimed_ledger_id(message)
        except (ValueError, Unauthorized) as exc:  # (ValidationError and TooDeep are ValueErrors)
            raise NotTheEnd(f"not a signed message: {exc}") from None
        entry = await self.resources.entry_by_id(ledger_id)
        if entry is None or entry.instance_id != instance_id or entry.job_id != job.id:
            raise NotTheEnd(f"signed for ledger entry {ledger_id!r}, not machine {instance_id}'s for job {job.id}")
        try:
            authority.verify(message, self.keys.credential(ledger_id))
        except Unauthorized as exc:
            raise NotTheEnd(str(exc)) from None
        if message.sender != worker_address(instance_id) or message.type not in (MessageType.JOB_DONE,
                                                                                   MessageType.JOB_FAILED):
            raise NotTheEnd(f"{message.type} from {message.sender!r} is not an end from machine {instance_id}")
        model = JobDone if message.type == MessageType.JOB_DONE else JobFailed
        try:
            body = model.model_validate(message.body)
        except ValidationError as exc:
            raise NotTheEnd(f"{message.type} body is invalid: {exc.errors()[0]['msg']}") from None
        if body.job_id != job.id or body.attempt != job.attempt:
            raise NotTheEnd(f"the end of job {body.job_id}'s attempt {body.attempt}, not of job {job.id}'s "
                            f"current attempt {job.attempt}")
        return body
