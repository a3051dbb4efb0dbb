"""What the master does when a worker speaks, or goes silent: a machine that announces itself
gets its job (START_JOB), pings move a job to RUNNING, checkpoints count, a job's end is recorded,
and a lost machine's job goes back to the queue: from its newest good checkpoint, from an older
one when a restart makes no progress, or not at all when its attempts are a restart loop.

A mixin of the Master (cbas.master.service), which holds the state and the I/O it uses.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import structlog

from cbas.backends import ACCESS_REFRESH_BEFORE, AccessNotGranted, DeliveryError, MessageRejected
from cbas.faults import crash_point
from cbas.master.views import describe, where
from cbas.messages import MASTER, CheckpointFailure, DataAccess, MessageType, Ping, StartJob, envelope, worker_address
from cbas.models import CheckpointRecord, Job, JobEvent, LedgerEntry, utcnow
from cbas.state import JobState

if TYPE_CHECKING:
    from cbas.backends import Cloud, JobCredentials, JobStore, MessageBus
    from cbas.master.credentials import MachineKeys
    from cbas.master.metrics import Metrics
    from cbas.master.resource_manager import ResourceManager
    from cbas.master.timers import Deadlines
    from cbas.master.worker_manager import WorkerManager
    from cbas.messages import Envelope
    from cbas.settings import Settings

log = structlog.get_logger(__name__)


def measured_restart(job: Job) -> float | None:
    """Launch to running, averaged over the job's starts (exponentially, the newest weighing most)."""
    if job.provisioned_at is None:
        return job.restart_seconds
    sample = (utcnow() - job.provisioned_at).total_seconds()
    return sample if job.restart_seconds is None else 0.5 * job.restart_seconds + 0.5 * sample


def checkpoint_detail(record: CheckpointRecord) -> str:
    detail = (f"{record.id} ({record.reason}): {record.size_bytes} bytes, {record.new_bytes} new, "
              f"pause {record.pause_seconds:.2f}s, upload {record.upload_seconds:.2f}s")
    if record.snapshot_id:
        detail += f", disk snapshot {record.snapshot_id}"
    if record.deadline_margin_seconds is not None:
        detail += f", {record.deadline_margin_seconds:.1f}s before the machine is reclaimed"
    return detail


def stalled(job: Job) -> int:
    """1 if the attempt now ending began (its worker had the job) and took no checkpoint of its own."""
    return 1 if job.state in (JobState.STARTING, JobState.RUNNING) and job.attempt_checkpoints == 0 else 0


def restart_loop(job: Job, limit: int) -> str | None:
    """Why a job whose attempts keep ending without a new checkpoint must stop, or None. Without a
    checkpoint failure to blame (it was lost before its first one), it goes on, on demand."""
    if job.stalled_attempts < limit or not job.last_checkpoint_error:
        return None
    start = f"restored from {job.restored_from}" if job.restored_from else "from the start"
    return (f"restart loop: {job.stalled_attempts} attempts in a row ended without a new checkpoint (the last "
            f"{start}); checkpoints fail: {job.last_checkpoint_error}")


class WorkerEvents:
    """The Master's side of what its workers say (the Master holds what this uses)."""

    if TYPE_CHECKING:  # provided by cbas.master.service.Master
        settings: Settings
        store: JobStore
        cloud: Cloud
        bus: MessageBus
        resources: ResourceManager
        workers: WorkerManager
        keys: MachineKeys
        metrics: Metrics
        progress: Deadlines
        moving: dict[str, tuple[str, float]]
        job_credentials: JobCredentials

        async def transition(self, job_id: str, target: JobState, **kwargs: Any) -> Job | None: ...
        async def _release(self, job_id: str, instance_id: str, reason: str) -> None: ...
        async def _signed(self, message: Envelope) -> Envelope: ...
        async def send_quietly(self, message: Envelope) -> None: ...
        async def drop_snapshots(self, job_id: str, keep: int) -> None: ...
        def kick(self) -> None: ...

    # --- worker events ----------------------------------------------------------------------
    async def worker_started(self, instance_id: str) -> None:
        entry = await self.resources.entry_for(instance_id)
        if entry is None:
            log.warning("worker.unknown_machine", instance_id=instance_id)
            await self.cloud.terminate(instance_id)
            return
        job = await self.store.get_job(entry.job_id)
        if job.state == JobState.QUEUED:
            # the worker booted before the scheduler recorded the placement: record it now
            placed = await self.transition(job.id, JobState.PROVISIONING, event="provisioning",
                                           detail=where(entry), update=lambda _: {"instance_id": instance_id})
            job = placed or await self.store.get_job(entry.job_id)
        if self.workers.was_noticed(instance_id):
            return  # about to be reclaimed: the job is restarted elsewhere at the notice's end
        if job.state != JobState.PROVISIONING or job.instance_id != instance_id:
            if job.instance_id == instance_id and job.state.has_machine():
                await self.machine_lost(job.id, instance_id, "worker restarted on its machine")
            elif job.state.is_terminal() or job.instance_id != instance_id:
                await self._release(job.id, instance_id, reason="machine not needed")
            return
        checkpoints = await self._restorable(job.id)
        started = await self.transition(
            job.id, JobState.STARTING, instance_id=instance_id, event="starting",
            detail=f"on {instance_id}" + (f", restoring {checkpoints[0]}" if checkpoints else ", fresh start"),
            update=lambda j: {
                "attempt": j.attempt + 1,
                "restarts": j.restarts + (1 if j.attempt > 0 else 0),
                "restored_from": checkpoints[0] if checkpoints else None,
                "attempt_checkpoints": 0,
            },
        )
        if started is None:
            return
        crash_point("start-recorded")
        if started.attempt > 1:
            self.metrics.restarts.inc()
        self.workers.pinged(instance_id)
        await self._send_start(started, instance_id, checkpoints)

    async def _restorable(self, job_id: str) -> list[str]:
        good = [c.id for c in reversed(await self.store.list_checkpoints(job_id)) if not c.bad]
        return good[: self.settings.checkpoints_kept]  # older ones are garbage-collected

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
            running = await self.transition(
                ping.job_id, JobState.RUNNING, attempt=ping.attempt, instance_id=ping.instance_id,
                event="running", detail=detail, update=lambda j: {
                    "restored_from": ping.restored_from, "restart_seconds": measured_restart(j)})
            if running is not None:
                self._watch_progress(running)

    def _watch_progress(self, job: Job) -> None:
        """A restart from a checkpoint must take a checkpoint of its own in time, or it is stalled."""
        if job.state == JobState.RUNNING and job.restored_from and job.attempt_checkpoints == 0:
            self.progress.arm(job.id, time.time() + self.stall_timeout(job))

    def stall_timeout(self, job: Job) -> float:
        if self.settings.restart_stall_timeout is not None:
            return self.settings.restart_stall_timeout
        return 3 * describe(job.jdl).checkpoint_interval + 60.0

    async def checkpoint_done(self, record: CheckpointRecord, final: bool, instance_id: str) -> None:
        job = await self.store.get_job(record.job_id)
        if job.attempt != record.attempt or job.state.is_terminal():
            log.info("checkpoint.stale", job_id=job.id, checkpoint=record.id)
            return
        if await self.store.add_checkpoint(record):
            crash_point("checkpoint-recorded")
            took = record.pause_seconds + record.upload_seconds
            self.metrics.checkpoint_seconds.observe(took)
            self.metrics.checkpoint_bytes.observe(record.new_bytes)
            await self.store.mutate_job(job.id, lambda j: j.model_copy(update={
                "checkpoint_seconds": took if j.checkpoint_seconds is None else 0.5 * (j.checkpoint_seconds + took),
                "last_checkpoint_at": record.created_at,
                "checkpoints": j.checkpoints + 1,
                "attempt_checkpoints": j.attempt_checkpoints + (1 if j.attempt == record.attempt else 0),
                "last_checkpoint": max(record.id, j.last_checkpoint or ""),
                "stalled_attempts": 0, "last_checkpoint_error": None,
            }))
            self.progress.disarm(job.id)
            await self.store.add_event(JobEvent(
                job_id=job.id, kind="checkpoint",
                detail=checkpoint_detail(record),
            ))
            if record.snapshot_id:
                await self.drop_snapshots(job.id, keep=self.settings.checkpoints_kept)
        if final and job.instance_id:
            if job.id in self.moving:
                reason, _ = self.moving.pop(job.id)
                await self._restart_elsewhere(job.id, job.instance_id, f"{reason} (checkpointed)", event="moved",
                                              update=lambda j: {})
            else:
                await self.machine_lost(job.id, job.instance_id, "spot interruption notice (checkpointed)", spot=True)

    async def checkpoint_failed(self, failure: CheckpointFailure) -> None:
        """A checkpoint that does not count (its sender is the job's current machine and attempt):
        shown with its reason, and remembered to judge a restart loop by."""
        detail = f"{failure.checkpoint_id} ({failure.reason}): {failure.error}"
        await self.store.mutate_job(failure.job_id, lambda j: j.model_copy(update={"last_checkpoint_error": detail}))
        await self.store.add_event(JobEvent(job_id=failure.job_id, kind="checkpoint-failed", detail=detail))
        self.metrics.checkpoint_failures.inc()

    async def spot_notice(self, instance_id: str, action_time: float) -> None:
        entry = await self.resources.entry_for(instance_id)
        if entry is None:
            return
        self.workers.noticed(instance_id, action_time)
        await self.store.add_event(JobEvent(job_id=entry.job_id, kind="spot-notice", detail=f"on {instance_id}"))

    async def job_finished(self, job_id: str, attempt: int, ok: bool, update: dict[str, Any], detail: str) -> None:
        target = JobState.COMPLETED if ok else JobState.FAILED
        job = await self.store.get_job(job_id)
        if (not ok and job.attempt == attempt and not job.state.is_terminal()
                and job.restored_from and job.attempt_checkpoints == 0):
            await self.fall_back(job, f"the restart from {job.restored_from} failed: {detail}")
            return
        self.progress.disarm(job_id)
        new = await self.transition(job_id, target, attempt=attempt, event=target.lower(), detail=detail,
                                    update=lambda _: update)
        crash_point("job-finished-recorded")
        if new is not None and job.instance_id:
            await self._release(job_id, job.instance_id, reason=f"job {target.lower()}")

    async def check_workers(self) -> None:
        for job_id, (reason, deadline) in list(self.moving.items()):
            if time.time() > deadline:
                try:
                    job = await self.store.get_job(job_id)
                    if job.instance_id and job.state.has_machine():
                        await self._restart_elsewhere(job_id, job.instance_id, f"{reason}; no checkpoint came in time",
                                                      event="moved", update=lambda j: {})
                    del self.moving[job_id]
                except Exception as exc:  # still moving: the next pass tries again
                    log.warning("move.retrying", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
        for job_id in self.progress.pop_expired(time.time()):
            try:
                job = await self.store.get_job(job_id)
                if job.state == JobState.RUNNING and job.restored_from and job.attempt_checkpoints == 0:
                    await self.fall_back(job, f"no new checkpoint within {self.stall_timeout(job):.0f}s of restoring "
                                              f"{job.restored_from}")
            except Exception as exc:  # watched again shortly, never dropped
                log.warning("fall_back.retrying", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
                self.progress.arm(job_id, time.time() + min(self.settings.ping_interval, 5.0))
        for instance_id in self.workers.dead():
            try:
                entry = await self.resources.entry_for(instance_id)
                if entry is None:
                    continue
                spot = self.workers.was_noticed(instance_id)
                reason = "spot capacity reclaimed" if spot else "worker stopped answering"
                await self.machine_lost(entry.job_id, instance_id, reason, spot=spot)
            except Exception as exc:  # the store or the cloud failed: keep the machine watched, try again
                log.warning("machine_lost.retrying", instance_id=instance_id, error=f"{type(exc).__name__}: {exc}")
                self.workers.again_soon(instance_id)

    async def machine_lost(self, job_id: str, instance_id: str | None, reason: str, spot: bool = False) -> None:
        """The job's machine is gone or going: release it and queue the job again."""
        await self._restart_elsewhere(job_id, instance_id, reason, event="preempted" if spot else "machine-lost",
                                      update=lambda j: {"preemptions": j.preemptions + (1 if spot else 0)})
        if spot:
            self.metrics.preemptions.inc()

    async def fall_back(self, job: Job, reason: str) -> None:
        """A restart from a checkpoint failed or stalled: never use that checkpoint again."""
        self.progress.disarm(job.id)
        if job.fallbacks >= self.settings.max_fallbacks:
            message = f"restart loop: {job.fallbacks + 1} restarts from checkpoints made no progress; last: {reason}"
            failed = await self.transition(job.id, JobState.FAILED, event="failed", detail=message,
                                           update=lambda _: {"error": message})
            if failed is not None and job.instance_id:
                await self._release(job.id, job.instance_id, reason="job failed")
            return
        if job.restored_from:
            await self.store.mark_checkpoint_bad(job.id, job.restored_from)
        await self._restart_elsewhere(job.id, job.instance_id, f"{reason}; falling back to the checkpoint before it",
                                      event="fallback", update=lambda j: {"fallbacks": j.fallbacks + 1})

    async def _restart_elsewhere(self, job_id: str, instance_id: str | None, reason: str, event: str,
                                 update: Callable[[Job], dict[str, Any]]) -> None:
        lost = await self.transition(job_id, JobState.PREEMPTED, instance_id=instance_id, event=event, detail=reason,
                                     update=lambda j: {**update(j), "instance_id": None,
                                                       "stalled_attempts": j.stalled_attempts + stalled(j)})
        if instance_id:
            await self._release(job_id, instance_id, reason=reason)
        if lost is None:
            current = await self.store.get_job(job_id)
            if current.state != JobState.PREEMPTED:
                return
            lost = current  # an earlier pass stopped halfway (its release failed): finish it
        loop = restart_loop(lost, self.settings.max_stalled_attempts)
        if loop is not None:
            await self.transition(job_id, JobState.FAILED, event="failed", detail=loop, update=lambda _: {"error": loop})
            return
        await self.transition(job_id, JobState.QUEUED, event="requeued", detail="restart from the newest good checkpoint")
        self.kick()

