"""Bringing what runs in line with what the store says: after a (re)start (recover), and every so
often (machines no job needs, endpoints of machines that are gone, the reaper's garbage).

A part of the Master (cbas.master.service), built on its restarts (and so its transitions).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from cbas.backends import NotFound
from cbas.master.restarts import Restarts
from cbas.messages import worker_address
from cbas.state import JobState

if TYPE_CHECKING:
    from cbas.master.reaper import GcReport

log = structlog.get_logger(__name__)


class Recovery(Restarts):
    """The Master's reconciliation."""

    async def recover(self) -> None:
        """Rebuild from the store after a (re)start: reconcile machines, re-arm timers, re-queue."""
        result = await self.resources.reconcile()
        for entry in result.adopted:
            self.workers.launched(entry.instance_id or "")
        await self.release_unneeded()
        live = {entry.instance_id: entry for entry in await self.store.list_ledger(live_only=True)}
        for instance_id, entry in live.items():
            if instance_id and entry.notice_ends_at:  # a notice heard before: it still decides
                self.workers.noticed(instance_id, entry.notice_ends_at.timestamp())
        for job in await self.store.list_jobs():
            if job.state.is_terminal():
                continue
            if job.state.has_machine():
                if job.instance_id in live:
                    self.workers.pinged(job.instance_id)  # a full ping window to be heard from
                    self._watch_progress(job)
                    if job.move_reason and job.move_deadline:  # a move under way goes on
                        self.moves.arm(job.id, job.move_deadline.timestamp())
                        await self.ask_to_stop_for_move(job.id, job.instance_id, job.move_reason)
                else:
                    await self.machine_lost(job.id, job.instance_id, "machine gone while the master was down")
        await self.prune_endpoints()
        log.info("master.recovered", adopted=len(result.adopted), vanished=len(result.vanished),
                 strays=len(result.strays_terminated))

    async def release_unneeded(self) -> None:
        """Machines still held for finished jobs, or for jobs now on another machine or none: let
        them go. A termination that failed (the cloud erred) is retried here until it works, and
        an attempt's ending it interrupted (the job left PREEMPTED) is finished."""
        for entry in await self.store.list_ledger(live_only=True):
            await asyncio.sleep(0)  # messages get in between machines: hundreds never hold the loop
            if not entry.instance_id:
                continue  # a launch under way
            try:
                job = await self.store.get_job(entry.job_id)
            except NotFound:
                job = None
            # (a QUEUED job's entry may be a launch not yet recorded as its placement: never that)
            moved = job is not None and job.instance_id != entry.instance_id and (
                job.state.has_machine() or job.state == JobState.PREEMPTED)
            if job is None:
                await self.resources.terminate(entry.instance_id, reason="job unknown")
            elif job.state.is_terminal() or moved:
                why = "job moved to another machine" if moved else f"job {job.state.lower()}"
                await self._release(job.id, entry.instance_id, reason=why)
        for job in await self.store.list_jobs({JobState.PREEMPTED}):
            await self.requeue(job, detail="restart from the newest good checkpoint (its ending was interrupted)")

    async def prune_endpoints(self) -> None:
        """Stale endpoints: subscriptions of workers whose machines no longer exist."""
        live = {worker_address(e.instance_id) for e in await self.store.list_ledger(live_only=True) if e.instance_id}
        removed = await self.bus.unsubscribe_stale(live)
        if removed:
            log.info("endpoints.pruned", recipients=removed)

    async def collect_garbage(self, dry_run: bool = False) -> GcReport:
        """What no job needs goes: leftover machines, volumes, snapshots, images, builder queues,
        old jobs' files; and endpoints of machines that are gone."""
        report = await self.reaper.run(dry_run=dry_run)
        if not dry_run:
            await self.prune_endpoints()
        return report
