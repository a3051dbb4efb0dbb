"""Where jobs run: the scheduling pass places queued jobs on machines and reviews running ones,
which it may ask for a checkpoint ahead of time or move (checkpoint, stop, place again).
The policy itself is the SchedulerAdapter's (docs/scheduling.md); this is what carries it out.

A part of the Master (cbas.master.service), built on its transitions.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from cbas import jdl
from cbas.backends import CapacityError, PriceTooLow
from cbas.faults import crash_point
from cbas.master.transitions import Transitions
from cbas.master.views import describe, where
from cbas.messages import MASTER, CheckpointNow, MessageType, StopJob, envelope, worker_address
from cbas.models import DiskSpec, Job, JobEvent, LedgerEntry, Offer, from_epoch, utcnow
from cbas.state import JobState

log = structlog.get_logger(__name__)
LAUNCH_TRIES_PER_PASS = 3  # markets tried for one job in one pass when launches find no capacity


def on_machine(job: Job, instance_id: str) -> bool:
    """Still on that machine, and not ending: what a decision about the running job needs."""
    return job.state.has_machine() and job.instance_id == instance_id and job.move_reason is None


def allowed_types(requested: list[str], default: str, offered: list[str]) -> list[str]:
    """The job's instance types that exist; without a request, the default type or any type."""
    if requested:
        return [kind for kind in requested if kind in offered]
    return [default] if default in offered else offered


class Placement(Transitions):
    """The Master's scheduling pass."""

    def _init_placement(self) -> None:
        # moves, checkpoint requests and wait reasons are kept in the jobs' records (a restarted
        # master goes on with them); only the market's last view is in memory:
        # the market as the last scheduling pass saw it (the API and the job views show it)
        self.offers: list[Offer] = []
        self.ondemand_prices: dict[str, float] = {}

    async def schedule(self) -> None:
        """One pass over queued and running jobs together, least slack first."""
        offers = await self.cloud.offers()
        self.offers = offers
        self.ondemand_prices.update({o.instance_type: o.ondemand_price for o in offers})
        self.adapter.observe(offers)  # every pass: the market's history informs later choices
        jobs = await self.store.list_jobs({JobState.QUEUED, JobState.RUNNING})
        if not jobs:
            return
        self.adapter.learn_restarts(jobs)
        offered = sorted({offer.instance_type for offer in offers})
        live = {entry.job_id: entry for entry in await self.store.list_ledger(live_only=True)}
        described = [(job, describe(job.jdl)) for job in jobs]
        described.sort(key=lambda pair: self.adapter.slack_hours(*pair))
        for job, description in described:
            await asyncio.sleep(0)  # messages get in between jobs: a pass over hundreds never holds the loop
            types = allowed_types(list(description.instance_types), self.settings.default_instance_type, offered)
            if job.state == JobState.QUEUED:
                await self._place(job, description, types, offered, live)
            elif job.id in live and job.move_reason is None and types:
                decision = self.adapter.review(job, description, types, live[job.id])
                if decision.action == "move":
                    await self.move(job, decision.reason)
                elif decision.action == "checkpoint":
                    await self.request_checkpoint(job, decision.reason)

    async def _place(self, job: Job, description: jdl.JobDescription, types: list[str], offered: list[str],
                     live: dict[str, LedgerEntry]) -> None:
        if job.id in live:
            return  # a launch for it is already under way
        if not types:
            await self.transition(
                job.id, JobState.FAILED, event="failed",
                detail=f"no market offers {', '.join(description.instance_types)} (offered: {', '.join(offered)})",
                update=lambda _: {"error": f"InstanceTypes {list(description.instance_types)} are not offered; "
                                           f"offered types: {', '.join(offered)}"},
            )
            return
        if not await self.images.ready(job, description):
            return
        for _ in range(LAUNCH_TRIES_PER_PASS):
            decision = self.adapter.place(job, description, types)
            if decision.action == "wait" or decision.placement is None:
                await self._note_waiting(job, decision.reason)
                return
            try:
                entry = await self.resources.launch(job.id, decision.placement, description.max_price,
                                                    await self._disk_for(job, description))
            except CapacityError as exc:  # EC2 tells capacity only this way: the next market is tried
                where_to = f"{decision.placement.instance_type} in {decision.placement.zone}"
                if isinstance(exc, PriceTooLow) and description.max_price is not None:
                    until = self.adapter.price_refused(decision.placement, description.max_price)
                    why = f"the spot price of {where_to} is above MaxPrice ${description.max_price:.4f}/h"
                else:
                    until = self.adapter.launch_refused(decision.placement)
                    why = f"no {decision.placement.market} capacity for {where_to}"
                log.info("launch.refused", job_id=job.id, error=str(exc), retry_at=until)
                waiting = await self._note_waiting(job, why)
                if waiting is None:
                    return  # no longer queued (cancelled meanwhile): nothing more to launch
                job = waiting
                continue
            self.adapter.launched(decision.placement)
            break
        else:
            return
        assert entry.instance_id is not None
        self.workers.launched(entry.instance_id)
        placed = await self.transition(
            job.id, JobState.PROVISIONING, event="provisioning", detail=f"{where(entry)}: {decision.reason}",
            update=lambda j: {"instance_id": entry.instance_id, "provisioned_at": utcnow(), "waiting_reason": None,
                              "predicted_cost": j.predicted_cost if j.predicted_cost is not None else decision.predicted_cost},
        )
        if placed is None:
            current = await self.store.get_job(job.id)
            if current.instance_id != entry.instance_id:  # cancelled meanwhile
                await self._release(job.id, entry.instance_id, reason="job no longer queued")
            # else: its worker announced itself first and placed the job already

    async def _note_waiting(self, job: Job, reason: str) -> Job | None:
        """The job's waiting reason, with an event when it changes (not at every pass); None if
        the job is no longer queued."""
        if job.waiting_reason == reason:
            return job
        return await self.store.mutate_job(job.id, lambda j: j.model_copy(
            update={"waiting_reason": reason}) if j.state == JobState.QUEUED else None,
            JobEvent(job_id=job.id, kind="waiting", detail=reason))

    async def _disk_for(self, job: Job, description: jdl.JobDescription) -> DiskSpec:
        disk = DiskSpec(image_id=job.image_id)
        if description.checkpoints_on_volume():
            snapshots = [c.snapshot_id for c in await self.store.list_checkpoints(job.id) if c.snapshot_id and not c.bad]
            disk.data_volume_gib = description.volume_size
            disk.data_snapshot = snapshots[-1] if snapshots else None
        return disk

    async def _image_failed(self, job_id: str, error: str) -> None:
        """JobImages' callback: a job whose prologue image cannot be built cannot be placed."""
        await self.transition(job_id, JobState.FAILED, event="failed", detail=f"image build failed: {error}",
                              update=lambda _: {"error": f"BuildImage: {error}"})

    async def request_checkpoint(self, job: Job, reason: str) -> None:
        """Ask for a checkpoint ahead of schedule; at most one request per checkpoint's duration."""
        last = job.checkpoint_requested_at.timestamp() if job.checkpoint_requested_at else 0.0
        now = time.time()
        if not job.instance_id or now - last < 2 * (job.checkpoint_seconds or 0.0) + self.settings.schedule_interval:
            return
        asked = await self.store.mutate_job(job.id, lambda j: j.model_copy(
            update={"checkpoint_requested_at": from_epoch(now)}) if on_machine(j, job.instance_id) else None,
            JobEvent(job_id=job.id, kind="checkpoint-requested", detail=reason))
        if asked is None:
            return
        await self.send_quietly(envelope(MessageType.CHECKPOINT_NOW, CheckpointNow(job_id=job.id, reason=reason),
                                          MASTER, worker_address(job.instance_id)))

    async def move(self, job: Job, reason: str) -> None:
        """Checkpoint the job and stop it, to run it again where the policy now wants it. The final
        checkpoint ends the attempt (checkpoint_done); without one by the deadline, check_workers does."""
        if not job.instance_id:
            return
        deadline = time.time() + self.settings.migrate_timeout
        moving = await self.store.mutate_job(job.id, lambda j: j.model_copy(
            update={"move_reason": reason, "move_deadline": from_epoch(deadline)}) if on_machine(j, job.instance_id) else None,
            JobEvent(job_id=job.id, kind="moving", detail=reason))
        if moving is None:
            return  # it left the machine meanwhile
        self.moves.arm(job.id, deadline)
        crash_point("move-requested")
        await self.ask_to_stop_for_move(job.id, job.instance_id, reason)

    async def ask_to_stop_for_move(self, job_id: str, instance_id: str, reason: str) -> None:
        """STOP_JOB, checkpoint first; the worker takes a second one as the first (recover() sends
        it again: the master may have died before it went)."""
        await self.send_quietly(envelope(MessageType.STOP_JOB, StopJob(job_id=job_id, reason=reason, checkpoint=True),
                                          MASTER, worker_address(instance_id)))
