"""What the master does when a worker speaks: a machine that announces itself gets its job
(START_JOB), pings move a job to RUNNING, checkpoints count, a notice is remembered, a job's end is
recorded. An attempt these end early (a final checkpoint, a worker that restarted, a restart that
failed) is handed to restarts.py.

The gate (gate.py) has checked sender, machine and attempt before any of this runs; the state
changes fence again (transition's attempt / instance_id), as the job may change meanwhile.

A part of the Master (cbas.master.service), built on its restarts (and so its transitions).
"""

from __future__ import annotations

from typing import Any

import structlog

from cbas.backends import ACCESS_REFRESH_BEFORE, AccessNotGranted, DeliveryError, MessageRejected
from cbas.faults import crash_point
from cbas.master.restarts import Restarts
from cbas.master.views import where
from cbas.master.work import checkpointed_work, resumed_from
from cbas.messages import (
    MASTER, CheckpointDone, CheckpointFailure, DataAccess, MessageType, Ping, StartJob, envelope, worker_address,
)
from cbas.models import CheckpointRecord, Job, JobEvent, LedgerEntry, from_epoch, utcnow
from cbas.state import JobState

log = structlog.get_logger(__name__)
COUNTED_KEPT = 16  # a fact is sent again within seconds of a lost ACK, long before 16 newer checkpoints


def measured_restart(job: Job) -> float | None:
    """Launch to running, averaged over the job's starts (exponentially, the newest weighing most)."""
    if job.provisioned_at is None:
        return job.restart_seconds
    sample = (utcnow() - job.provisioned_at).total_seconds()
    return sample if job.restart_seconds is None else 0.5 * job.restart_seconds + 0.5 * sample


def checkpoint_record(body: CheckpointDone) -> CheckpointRecord:
    """What the master keeps of a worker's CHECKPOINT_DONE (delivered, or read where it recorded it)."""
    return CheckpointRecord(
        job_id=body.job_id, id=body.checkpoint_id, attempt=body.attempt, manifest_key=body.manifest_key,
        size_bytes=body.size_bytes, new_bytes=body.new_bytes, pause_seconds=body.pause_seconds,
        upload_seconds=body.upload_seconds, reason=body.reason, deadline_margin_seconds=body.deadline_margin_seconds,
        snapshot_id=body.snapshot_id,
    )


def checkpoint_detail(record: CheckpointRecord) -> str:
    detail = (f"{record.id} ({record.reason}): {record.size_bytes} bytes, {record.new_bytes} new, "
              f"pause {record.pause_seconds:.2f}s, upload {record.upload_seconds:.2f}s")
    if record.snapshot_id:
        detail += f", disk snapshot {record.snapshot_id}"
    if record.deadline_margin_seconds is not None:
        detail += f", {record.deadline_margin_seconds:.1f}s before the machine is reclaimed"
    return detail


def counted(job: Job, record: CheckpointRecord) -> dict[str, Any]:
    """The job's checkpoint statistics with a new checkpoint in them; a checkpoint of its own
    for the current attempt is its progress (and ends any run of stalled attempts)."""
    took = record.pause_seconds + record.upload_seconds
    return {
        "counted_checkpoints": (job.counted_checkpoints + [record.id])[-COUNTED_KEPT:],
        "checkpoint_seconds": took if job.checkpoint_seconds is None else 0.5 * (job.checkpoint_seconds + took),
        "last_checkpoint_at": record.created_at,
        "checkpoints": job.checkpoints + 1,
        "attempt_checkpoints": job.attempt_checkpoints + (1 if job.attempt == record.attempt else 0),
        "last_checkpoint": max(record.id, job.last_checkpoint or ""),
        "stalled_attempts": 0, "last_checkpoint_error": None,
        # the newest checkpoint is what a restart resumes from
        "saved_work_seconds": record.work_seconds if record.work_seconds is not None
        and record.id >= (job.last_checkpoint or "") else job.saved_work_seconds,
    }


def uncounted(job: Job, record: CheckpointRecord, fresh: bool) -> bool:
    """Whether the job has yet to count this recorded checkpoint. One recorded just now has not;
    an older one has, if the job remembers counting it, or if it is older than all the job
    remembers (its newest counted, or the job's newest checkpoint, came after it)."""
    if record.id in job.counted_checkpoints:
        return False
    if fresh:
        return True
    if len(job.counted_checkpoints) >= COUNTED_KEPT:  # it remembers the newest only
        return record.id > min(job.counted_checkpoints)
    # a job counted before it remembered any (an older master's) has counted up to its newest
    return bool(job.counted_checkpoints) or record.id > (job.last_checkpoint or "")


class WorkerEvents(Restarts):
    """The Master's side of what its workers say."""

    # --- WORKER_STARTED: a machine's worker is up and asks what to run ----------------------------
    async def worker_started(self, instance_id: str, announcement: str | None = None) -> None:
        """`announcement`: the message's id. The same announcement again (the master died after
        starting the attempt, before its ACK) is the same worker: START_JOB goes again."""
        entry = await self.resources.entry_for(instance_id)
        if entry is None:  # no machine of ours (any more): let it go
            log.warning("worker.unknown_machine", instance_id=instance_id)
            await self.cloud.terminate(instance_id)
            return
        job = await self._with_placement(entry, instance_id)
        if self.workers.was_noticed(instance_id):
            return  # about to be reclaimed: the job is restarted elsewhere at the notice's end
        if announcement is not None and job.announcement == announcement and job.instance_id == instance_id \
                and job.state.has_machine():
            if job.state == JobState.STARTING:  # the worker ignores a START_JOB it has already
                await self._send_start(job, instance_id, await self._restorable(job.id))
            return
        if job.state != JobState.PROVISIONING or job.instance_id != instance_id:
            await self._not_to_start(job, instance_id)
            return
        await self._start_attempt(job, instance_id, announcement)

    async def _with_placement(self, entry: LedgerEntry, instance_id: str) -> Job:
        """The machine's job, with its placement on this machine recorded if the worker booted
        before the scheduler did (the launch was recorded, the placement not yet)."""
        job = await self.store.get_job(entry.job_id)
        if job.state != JobState.QUEUED:
            return job
        placed = await self.transition(job.id, JobState.PROVISIONING, event="provisioning",
                                       detail=where(entry), update=lambda _: {"instance_id": instance_id,
                                                                               "provisioned_at": utcnow()})
        return placed or await self.store.get_job(entry.job_id)  # None: changed meanwhile (placed, cancelled)

    async def _not_to_start(self, job: Job, instance_id: str) -> None:
        """A worker announcing itself when its job is not waiting for it on this machine."""
        if job.instance_id == instance_id and job.state.has_machine():
            # the job's current machine, past PROVISIONING: its worker restarted and lost the job
            await self.machine_lost(job.id, instance_id, "worker restarted on its machine")
        elif job.state.is_terminal() or job.instance_id != instance_id:
            await self._release(job.id, instance_id, reason="machine not needed")
        # else (the job names this machine but is not on one) nothing is done

    async def _start_attempt(self, job: Job, instance_id: str, announcement: str | None) -> None:
        """A new attempt: STARTING if the job is still PROVISIONING on this machine (a copy of the
        announcement handled at the same time finds it STARTING), then START_JOB with the
        checkpoints to restore, newest first."""
        restorable = await self._restorable_records(job.id)
        checkpoints = [c.id for c in restorable]
        started = await self.transition(
            job.id, JobState.STARTING, instance_id=instance_id, event="starting",
            detail=f"on {instance_id}" + (f", restoring {checkpoints[0]}" if checkpoints else ", fresh start"),
            update=lambda j: {
                "attempt": j.attempt + 1,  # the new fencing token: messages of older attempts are stale
                "restarts": j.restarts + (1 if j.attempt > 0 else 0),
                "restored_from": checkpoints[0] if checkpoints else None,
                "attempt_checkpoints": 0,
                "resumed_work_seconds": resumed_from(restorable),
                "announcement": announcement,
            },
        )
        if started is None:
            return
        crash_point("start-recorded")
        if started.attempt > 1:
            self.metrics.restarts.inc()
        self.workers.pinged(instance_id)  # its ping watchdog starts now
        await self._send_start(started, instance_id, checkpoints)

    async def _restorable_records(self, job_id: str) -> list[CheckpointRecord]:
        good = [c for c in reversed(await self.store.list_checkpoints(job_id)) if not c.bad]
        return good[: self.settings.checkpoints_kept]  # older ones are garbage-collected

    async def _restorable(self, job_id: str) -> list[str]:
        return [c.id for c in await self._restorable_records(job_id)]

    async def _send_start(self, job: Job, instance_id: str, checkpoints: list[str]) -> None:
        entry = await self.resources.entry_for(instance_id)
        try:
            access = await self._data_access(entry.id, job.id) if entry else ""
        except AccessNotGranted as exc:  # START_JOB goes again at the worker's next ping
            log.error("job_access.not_granted", job_id=job.id, instance_id=instance_id, error=str(exc))
            return
        body = StartJob(job_id=job.id, attempt=job.attempt, jdl=job.jdl, checkpoints=checkpoints,
                        ping_interval=self.settings.ping_interval, prologue_in_image=bool(job.image_id),
                        checkpoint_key=self.keys.sealed_checkpoint_key(entry.id, job.id) if entry else "",
                        data_access=access)
        try:
            start = envelope(MessageType.START_JOB, body, MASTER, worker_address(instance_id))
            await self.bus.send(await self._signed(start))
        except (DeliveryError, MessageRejected) as exc:
            await self.machine_lost(job.id, instance_id, f"cannot reach its worker: {exc}")

    async def _data_access(self, ledger_id: str, job_id: str) -> str:
        """Access to the job's files and no other's, sealed for the machine ("" if it needs none)."""
        return await self.job_credentials.sealed_for(self.keys.credential(ledger_id).key, job_id)

    # --- PING: the worker lives, and says how its job is -------------------------------------------
    async def pinged(self, ping: Ping) -> None:
        entry = await self.resources.entry_for(ping.instance_id)
        if entry is None:
            return  # a late ping from a machine already let go
        self.workers.pinged(ping.instance_id)
        if not ping.job_id:
            job = await self.store.get_job(entry.job_id)
            if job.state == JobState.STARTING and job.instance_id == ping.instance_id:
                # its START_JOB was lost (or the master died before sending it): send it again;
                # the worker ignores a START_JOB it already has
                log.info("start.resent", job_id=job.id, instance_id=ping.instance_id, attempt=job.attempt)
                await self._send_start(job, ping.instance_id, await self._restorable(job.id))
            return
        await self._renew_access(ping, entry)
        for bad in ping.bad_checkpoints:
            await self.store.mark_checkpoint_bad(ping.job_id, bad)
        if ping.phase == "running":
            detail = f"attempt {ping.attempt}, " + (f"restored from {ping.restored_from}" if ping.restored_from else "fresh start")
            if ping.bad_checkpoints:
                detail += f"; unusable checkpoints: {', '.join(ping.bad_checkpoints)}"
            offered: list[str | None] = []  # the checkpoint the start offered first (its work is assumed)

            def update(j: Job) -> dict[str, Any]:
                offered[:] = [j.restored_from]
                return {"restored_from": ping.restored_from, "restart_seconds": measured_restart(j)}

            running = await self.transition(ping.job_id, JobState.RUNNING, attempt=ping.attempt,
                                            instance_id=ping.instance_id, event="running", detail=detail, update=update)
            if running is not None:
                if offered != [ping.restored_from]:  # the worker restored another (the first did not verify)
                    await self._resumed_from(running, ping.restored_from)
                self._watch_progress(running)

    async def _resumed_from(self, job: Job, checkpoint_id: str | None) -> None:
        """The worker restored another checkpoint than the first offered (those before it did not
        verify): the work it resumed from, and what a restart would now find, are that one's."""
        newest_first = list(reversed(await self.store.list_checkpoints(job.id)))
        ids = [c.id for c in newest_first]
        work = resumed_from(newest_first[ids.index(checkpoint_id):] if checkpoint_id in ids else [])
        await self.store.mutate_job(job.id, lambda j: j.model_copy(update={
            "resumed_work_seconds": work, "saved_work_seconds": work}) if j.attempt == job.attempt else None)

    async def _renew_access(self, ping: Ping, entry: LedgerEntry) -> None:
        """Fresh access for a worker whose access runs out soon. Stateless: the worker's ping says
        when; until it says later, each ping gets new access (the gate has fenced machine and attempt)."""
        if ping.job_id is None or ping.data_access_expires is None:
            return
        if ping.data_access_expires - utcnow() > ACCESS_REFRESH_BEFORE:
            return
        try:
            sealed = await self._data_access(entry.id, ping.job_id)
        except AccessNotGranted as exc:  # tried again at the next ping
            log.error("job_access.not_renewed", job_id=ping.job_id, instance_id=ping.instance_id, error=str(exc))
            return
        if sealed:
            await self.send_quietly(envelope(MessageType.DATA_ACCESS, DataAccess(
                job_id=ping.job_id, attempt=ping.attempt, sealed=sealed), MASTER, worker_address(ping.instance_id)))

    # --- CHECKPOINT_DONE / CHECKPOINT_FAILED -------------------------------------------------------
    async def checkpoint_done(self, record: CheckpointRecord, final: bool, instance_id: str) -> None:
        job = await self.store.get_job(record.job_id)
        if job.attempt != record.attempt:
            log.info("checkpoint.stale", job_id=job.id, checkpoint=record.id)
            return
        recorded = next((r for r in await self.store.list_checkpoints(job.id) if r.id == record.id), None)
        if job.state.is_terminal():  # its end came first: only one recorded before the master died counts
            if recorded is not None:
                await self._count_checkpoint(job, recorded, fresh=False)
            return
        record = record.model_copy(update={"work_seconds": checkpointed_work(job, record)})
        fresh = recorded is None and await self.store.add_checkpoint(record)
        if not fresh:  # recorded already: counted, unless the master died in between
            record = recorded or next(r for r in await self.store.list_checkpoints(job.id) if r.id == record.id)
        await self._count_checkpoint(job, record, fresh)
        if final:  # the worker stopped the job after it: its attempt on the sender's machine is over
            await self._end_checkpointed_attempt(job, instance_id)

    async def _count_checkpoint(self, job: Job, record: CheckpointRecord, fresh: bool) -> None:
        """A recorded checkpoint, counted once: the job's statistics with its event (one write),
        and the restart it proves is making progress (its stall watchdog goes). `fresh`: recorded
        just now (else it may have been counted already)."""
        crash_point("checkpoint-recorded")
        now_counted = await self.store.mutate_job(
            job.id, lambda j: j.model_copy(update=counted(j, record)) if uncounted(j, record, fresh) else None,
            JobEvent(job_id=job.id, kind="checkpoint", detail=checkpoint_detail(record)))
        if now_counted is None:
            return  # a copy of one counted already
        self.metrics.checkpoint_seconds.observe(record.pause_seconds + record.upload_seconds)
        self.metrics.checkpoint_bytes.observe(record.new_bytes)
        self.progress.disarm(job.id)
        if record.snapshot_id and not now_counted.state.is_terminal():  # those beyond the kept ones go
            await self.drop_snapshots(job.id, keep=self.settings.checkpoints_kept)

    async def _end_checkpointed_attempt(self, job: Job, instance_id: str) -> None:
        """A final checkpoint ends the attempt: the stop a move asked for, or else a spot notice's.
        Only on the sender's machine: if the job has left it (it is placed elsewhere), the ending
        changes nothing there (both end in a transition fenced on the machine)."""
        if job.instance_id != instance_id:  # fenced: the sender is let go, a half-done ending finished
            log.info("checkpoint.final_from_old_machine", job_id=job.id, instance_id=instance_id)
            await self._restart_elsewhere(job.id, instance_id, "its attempt ended (final checkpoint)",
                                          event="machine-lost", update=lambda j: {})
            return
        if job.move_reason:
            await self._restart_elsewhere(job.id, instance_id, f"{job.move_reason} (checkpointed)", event="moved",
                                          update=lambda j: {})
        else:
            await self.machine_lost(job.id, instance_id, "spot interruption notice (checkpointed)", spot=True)

    async def checkpoint_failed(self, failure: CheckpointFailure) -> None:
        """A checkpoint that does not count (its sender is the job's current machine and attempt):
        shown with its reason, and remembered to judge a restart loop by."""
        detail = f"{failure.checkpoint_id} ({failure.reason}): {failure.error}"
        noted = await self.store.mutate_job(  # a copy of the same report changes nothing
            failure.job_id, lambda j: j.model_copy(update={"last_checkpoint_error": detail})
            if j.last_checkpoint_error != detail else None, JobEvent(job_id=failure.job_id, kind="checkpoint-failed",
                                                                     detail=detail))
        if noted is not None:
            self.metrics.checkpoint_failures.inc()

    # --- SPOT_NOTICE, JOB_DONE / JOB_FAILED --------------------------------------------------------
    async def spot_notice(self, instance_id: str, action_time: float) -> None:
        entry = await self.resources.entry_for(instance_id)
        if entry is None:
            return
        if await self.resources.record_notice(instance_id, from_epoch(action_time)):  # kept: a restarted master knows too
            crash_point("notice-recorded")
            await self.store.add_event(JobEvent(job_id=entry.job_id, kind="spot-notice", detail=f"on {instance_id}"))
            if entry.market == "spot":  # what the market's reliability is learned from
                self.adapter.preempted(entry.zone, entry.instance_type)
        self.workers.noticed(instance_id, action_time)  # the machine's deadline: the notice's end

    async def job_finished(self, job_id: str, attempt: int, ok: bool, update: dict[str, Any], detail: str,
                           instance_id: str) -> None:
        """The sender's attempt ended: the job's end, if the job is still that attempt on that machine."""
        target = JobState.COMPLETED if ok else JobState.FAILED
        job = await self.store.get_job(job_id)
        if job.instance_id != instance_id:  # the job was placed elsewhere meanwhile: not its end
            log.info("job_end.from_old_machine", job_id=job_id, instance_id=instance_id, attempt=attempt)
            return
        if (not ok and job.attempt == attempt and not job.state.is_terminal()
                and job.restored_from and job.attempt_checkpoints == 0):
            # a restart that fails before its first checkpoint blames the checkpoint, not the job
            await self.fall_back(job, f"the restart from {job.restored_from} failed: {detail}")
            return
        self.progress.disarm(job_id)
        new = await self.transition(job_id, target, attempt=attempt, instance_id=instance_id, event=target.lower(),
                                    detail=detail, update=lambda _: update)
        crash_point("job-finished-recorded")
        if new is not None:
            await self._release(job_id, instance_id, reason=f"job {target.lower()}")
