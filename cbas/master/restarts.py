"""When an attempt ends before its job does, and the watchdogs that notice it: a machine lost
(silent, reclaimed, unreachable, or its worker restarted), a move whose checkpoint never came, a
restart from a checkpoint that makes no progress. The job goes back to the queue: from its
newest good checkpoint, from an older one when a restart fails or stalls (fall back), or not at
all when its attempts are a restart loop.

A part of the Master (cbas.master.service), built on its transitions.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from cbas.master.timers import Deadlines
from cbas.master.transitions import Transitions
from cbas.master.views import describe
from cbas.master.work import resumed_from
from cbas.models import Job
from cbas.state import JobState

if TYPE_CHECKING:
    from cbas.master.transitions import Update

log = structlog.get_logger(__name__)


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


class Restarts(Transitions):
    """The Master's side of attempts that end early."""

    def _init_restarts(self) -> None:
        self.progress = Deadlines()  # job id -> when a restart from a checkpoint counts as stalled
        # job id -> when a move (placement.py) ends without its checkpoint; the job's record has the
        # move itself (move_reason, move_deadline), from which recover() arms these again
        self.moves = Deadlines()

    def _watch_progress(self, job: Job) -> None:
        """A restart from a checkpoint must take a checkpoint of its own in time, or it is stalled."""
        if job.state == JobState.RUNNING and job.restored_from and job.attempt_checkpoints == 0:
            self.progress.arm(job.id, time.time() + self.stall_timeout(job))

    def stall_timeout(self, job: Job) -> float:
        if self.settings.restart_stall_timeout is not None:
            return self.settings.restart_stall_timeout
        return 3 * describe(job.jdl).checkpoint_interval + 60.0

    async def check_workers(self) -> None:
        """The watchdogs (moves, restarts' progress, silent workers): a deadline is dropped only once
        what it triggers is done, so a failing store or cloud leaves it due again."""
        for job_id in self.moves.pop_expired(time.time()):
            try:
                job = await self.store.get_job(job_id)
                if job.move_reason and job.instance_id and job.state.has_machine():
                    await self._restart_elsewhere(job_id, job.instance_id,
                                                  f"{job.move_reason}; no checkpoint came in time",
                                                  event="moved", update=lambda j: {})
            except Exception as exc:  # still moving: tried again shortly
                log.warning("move.retrying", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
                self.moves.arm(job_id, time.time() + min(self.settings.ping_interval, 5.0))
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
        good = [c for c in await self.store.list_checkpoints(job.id) if not c.bad]
        saved = resumed_from(list(reversed(good)))  # the work the checkpoint before it holds
        await self._restart_elsewhere(job.id, job.instance_id, f"{reason}; falling back to the checkpoint before it",
                                      event="fallback", update=lambda j: {"fallbacks": j.fallbacks + 1,
                                                                          "saved_work_seconds": saved})

    async def _restart_elsewhere(self, job_id: str, instance_id: str | None, reason: str, event: str,
                                 update: Update) -> None:
        """End the attempt on instance_id (PREEMPTED, machine released), then queue the job again,
        or fail it if its attempts are a restart loop."""
        lost = await self.transition(job_id, JobState.PREEMPTED, instance_id=instance_id, event=event, detail=reason,
                                     update=lambda j: {**update(j), "instance_id": None,
                                                       "move_reason": None, "move_deadline": None,
                                                       "stalled_attempts": j.stalled_attempts + stalled(j)})
        if instance_id:
            await self._release(job_id, instance_id, reason=reason)
        if lost is None:
            current = await self.store.get_job(job_id)
            if current.state != JobState.PREEMPTED:
                return
            lost = current  # an earlier pass stopped halfway (its release failed): finish it
        await self.requeue(lost)

    async def requeue(self, job: Job, detail: str = "restart from the newest good checkpoint") -> None:
        """A PREEMPTED job (its attempt over, its machine let go) back to the queue, or failed if
        its attempts are a restart loop."""
        loop = restart_loop(job, self.settings.max_stalled_attempts)
        if loop is not None:
            await self.transition(job.id, JobState.FAILED, event="failed", detail=loop, update=lambda _: {"error": loop})
            return
        await self.transition(job.id, JobState.QUEUED, event="requeued", detail=detail)
        self.kick()
