"""What a worker recorded in the blob store but the master never heard: the worker leaves the
signed JOB_DONE or JOB_FAILED (cbas.messages.end_record_key) and each CHECKPOINT_DONE
(checkpoint_record_key) there before it sends it, so a machine lost before the report arrived
(reclaimed, dead, its outbox gone with it) does not make a finished job run again, nor a job
restart from an older checkpoint than the one its last attempt stored (a notice checkpoint's
report is the last thing a reclaimed machine sends). A lost machine's records are read first,
each checked as the gate checks a delivered message; only then is the job restarted.

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
from cbas.master.worker_events import WorkerEvents, checkpoint_record, uncounted
from cbas.messages import (
    CheckpointDone, Envelope, JobDone, JobFailed, MessageType, checkpoint_record_key, end_record_key, worker_address,
)
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
        if instance_id:
            await self._learn_recorded_checkpoints(job_id, instance_id)
            if await self._learn_recorded_end(job_id, instance_id):
                return
        await super().machine_lost(job_id, instance_id, reason, spot=spot)

    async def _current_on(self, job_id: str, instance_id: str) -> Job | None:
        """The job, if its current attempt is on instance_id."""
        try:
            job = await self.store.get_job(job_id)
        except NotFound:
            return None
        if job.instance_id != instance_id or not job.state.has_machine() or job.attempt < 1:
            return None
        return job

    async def _read_record(self, job_id: str, key: str) -> bytes | None:
        try:
            if await asyncio.to_thread(self.blobs.size, key) > MAX_RECORD_BYTES:
                log.warning("worker_record.refused", job_id=job_id, why=f"{key} is over {MAX_RECORD_BYTES} bytes")
                return None
            return await asyncio.to_thread(self.blobs.get_bytes, key)
        except NotFound:
            return None
        except Exception as exc:  # the blob store fails: the loss is certain, a restart loses no data
            log.warning("worker_record.unreadable", job_id=job_id, key=key, error=f"{type(exc).__name__}: {exc}")
            return None

    async def _learn_recorded_checkpoints(self, job_id: str, instance_id: str) -> None:
        """The current attempt's checkpoints its worker recorded and the master never heard of
        (the newest few), and those the master recorded but died before counting, counted before
        the job is restarted, so that it restarts from them."""
        job = await self._current_on(job_id, instance_id)
        if job is None:
            return
        known = {record.id for record in await self.store.list_checkpoints(job_id)}
        mine = f"a{job.attempt:04d}-"
        try:
            keys = await asyncio.to_thread(self.blobs.list, f"jobs/{job_id}/ckpt/{mine}")
        except Exception as exc:
            log.warning("worker_record.unreadable", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            return
        reports = {checkpoint_record_key(job_id, cid) for cid in {key.split("/")[3] for key in keys} - known}
        unheard = sorted(reports.intersection(keys))  # the reports of checkpoints it has no record of
        for key in unheard[-self.settings.checkpoints_kept:]:
            raw = await self._read_record(job_id, key)
            if raw is None:
                continue
            try:
                body = await self._genuine(raw, job, instance_id, {MessageType.CHECKPOINT_DONE: CheckpointDone})
                if not isinstance(body, CheckpointDone) or checkpoint_record_key(job_id, body.checkpoint_id) != key:
                    raise NotTheEnd(f"{key} holds another checkpoint's report")
            except NotTheEnd as exc:
                log.warning("checkpoint_record.refused", job_id=job_id, instance_id=instance_id, why=str(exc))
                continue
            log.info("checkpoint_record.learned", job_id=job_id, instance_id=instance_id, checkpoint=body.checkpoint_id)
            await self.checkpoint_done(checkpoint_record(body), final=False, instance_id=instance_id)
        job = await self.store.get_job(job_id)
        for record in await self.store.list_checkpoints(job_id):  # recorded, and the master died before counting it
            if record.attempt == job.attempt and uncounted(job, record, fresh=False):
                await self._count_checkpoint(job, record, fresh=False)

    async def _learn_recorded_end(self, job_id: str, instance_id: str) -> bool:
        """True if the job's current attempt on instance_id had ended, as its worker recorded."""
        job = await self._current_on(job_id, instance_id)
        if job is None:
            return False
        raw = await self._read_record(job_id, end_record_key(job_id, job.attempt))
        if raw is None:
            return False
        try:
            body = await self._genuine(raw, job, instance_id, {MessageType.JOB_DONE: JobDone,
                                                               MessageType.JOB_FAILED: JobFailed})
            assert isinstance(body, (JobDone, JobFailed))
        except NotTheEnd as exc:
            log.warning("end_record.refused", job_id=job_id, instance_id=instance_id, why=str(exc))
            return False
        ok, update, detail = end_of(body)
        log.info("end_record.learned", job_id=job_id, instance_id=instance_id, attempt=job.attempt, ok=ok)
        await self.job_finished(job_id, body.attempt, ok=ok, update=update, instance_id=instance_id,
                                detail=f"{detail} (from the end its worker recorded; its machine was lost before "
                                       f"reporting it)")
        return True

    async def _genuine(self, raw: bytes, job: Job, instance_id: str,
                       kinds: dict[MessageType, type[JobDone] | type[JobFailed] | type[CheckpointDone]],
                       ) -> JobDone | JobFailed | CheckpointDone:
        """The record's message body, checked as the gate checks a delivered one: signed with the
        key of the machine's ledger entry, sent by that machine, one of `kinds`, about this job's
        current attempt."""
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
        if message.sender != worker_address(instance_id) or message.type not in kinds:
            raise NotTheEnd(f"{message.type} from {message.sender!r} is not a {'/'.join(kinds)} from machine "
                            f"{instance_id}")
        model = kinds[message.type]
        try:
            body = model.model_validate(message.body)
        except ValidationError as exc:
            raise NotTheEnd(f"{message.type} body is invalid: {exc.errors()[0]['msg']}") from None
        if body.job_id != job.id or body.attempt != job.attempt:
            raise NotTheEnd(f"about job {body.job_id}'s attempt {body.attempt}, not job {job.id}'s "
                            f"current attempt {job.attempt}")
        return body
