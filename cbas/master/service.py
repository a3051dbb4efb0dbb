"""The master's job lifecycle: every state change of a job goes through here.

Each change is a conditional write through JobStore.mutate_job that first checks the state
machine and the attempt number, so a duplicated, late or reordered message changes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import structlog

from cbas import authority, jdl
from cbas.backends import (
    BlobStore, CapacityError, Cloud, DeliveryError, ImageBuilder,
    JobCredentials, JobStore, MessageBus, MessageRejected, NoJobCredentials, NotFound, StaleWrite,
)
from cbas.master.credentials import MachineKeys, load_master_key
from cbas.master.job_images import JobImages
from cbas.master.metrics import Metrics
from cbas.master.reaper import GcReport, Reaper
from cbas.master.resource_manager import ResourceManager
from cbas.master.scheduler_adapter import SchedulerAdapter
from cbas.master.timers import Deadlines
from cbas.master.views import describe, job_view, where
from cbas.master.worker_events import WorkerEvents
from cbas.master.worker_manager import WorkerManager
from cbas.messages import (
    MASTER, CheckpointNow, Envelope, MessageType, StopJob, envelope,
    worker_address,
)
from cbas.models import DiskSpec, Job, JobEvent, LedgerEntry, Offer, utcnow
from cbas.settings import Settings
from cbas.state import JobState, can_transition

log = structlog.get_logger(__name__)


class BadRequest(ValueError):
    """A request or message that is well-formed but cannot be acted on."""


@dataclass
class Backends:
    store: JobStore
    blobs: BlobStore
    bus: MessageBus
    cloud: Cloud
    images: ImageBuilder | None = None  # None: this backend builds no images (prologues run on the machines)
    job_credentials: JobCredentials | None = None  # None: workers reach the blob store themselves (local)


def allowed_types(requested: list[str], default: str, offered: list[str]) -> list[str]:
    """The job's instance types that exist; without a request, the default type or any type."""
    if requested:
        return [kind for kind in requested if kind in offered]
    return [default] if default in offered else offered


def console_key(job_id: str, instance_id: str) -> str:
    return f"jobs/{job_id}/logs/console/{instance_id}.log"


def new_job_id() -> str:
    return secrets.token_hex(4)


class Master(WorkerEvents):
    def __init__(self, settings: Settings, backends: Backends, workers: WorkerManager | None = None) -> None:
        self.settings = settings
        self.store = backends.store
        self.blobs = backends.blobs
        self.bus = backends.bus
        self.cloud = backends.cloud
        self.images = JobImages(backends.images, self.store, self.blobs, self._image_failed, self.kick)
        self.metrics = Metrics()
        self.keys = MachineKeys(load_master_key(settings.home))  # every machine's key derives from it
        self.job_credentials = backends.job_credentials or NoJobCredentials()
        self.resources = ResourceManager(self.store, self.cloud, settings.cluster, self.keys)
        self.reaper = Reaper(self.store, self.cloud, self.blobs, self.bus,
                             retention=timedelta(days=settings.retention_days),
                             grace=timedelta(seconds=settings.reaper_grace))
        self.workers = workers or WorkerManager(settings)
        self.progress = Deadlines()  # job id -> when a restart from a checkpoint counts as stalled
        self.adapter = SchedulerAdapter(settings)
        self.moving: dict[str, tuple[str, float]] = {}  # job id -> why it moves, and by when
        self._waiting: dict[str, str] = {}  # job id -> the last wait reason recorded
        self._checkpoint_requested: dict[str, float] = {}  # job id -> when we last asked
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._snapshots_dropped: set[str] = set()
        self.offers: list[Offer] = []  # the market as the last scheduling pass saw it
        self.ondemand_prices: dict[str, float] = {}

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.cloud.start()
        await self.recover()
        self._tasks = [
            asyncio.create_task(self._loop(self.schedule, self.settings.schedule_interval), name="scheduler"),
            asyncio.create_task(self._loop(self.check_workers, min(self.settings.ping_interval / 2, 5.0)), name="pings"),
            asyncio.create_task(self._loop(self.prune_endpoints, 60.0), name="endpoints"),
            asyncio.create_task(self._loop(self.release_unneeded, 30.0), name="release"),
            asyncio.create_task(self._loop(self.collect_garbage, self.settings.reaper_interval), name="reaper"),
        ]
        self.kick()

    async def stop(self) -> None:
        """Stop the master's own loops; machines and jobs keep running for the next master."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.images.stop()
        self._tasks = []
        await self.cloud.close()

    def kick(self) -> None:
        self._wake.set()

    async def _loop(self, step: Callable[[], Any], period: float) -> None:
        while True:
            try:
                await step()
            except Exception:
                log.exception("master.loop_failed", step=step.__name__)
            if step == self.schedule:
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel that lands as
                    # the wait ends (a kick just before a stop), and the stop then hangs
                    async with asyncio.timeout(period):
                        await self._wake.wait()
                    await asyncio.sleep(self.settings.batch_window)  # gather arrivals into one pass
                except TimeoutError:
                    pass
                self._wake.clear()
            else:
                await asyncio.sleep(period)

    async def recover(self) -> None:
        """Rebuild from the store after a (re)start: reconcile machines, re-arm timers, re-queue."""
        result = await self.resources.reconcile()
        for entry in result.adopted:
            self.workers.launched(entry.instance_id or "")
        await self.release_unneeded()
        live = {entry.instance_id: entry for entry in await self.store.list_ledger(live_only=True)}
        for job in await self.store.list_jobs():
            if job.state.is_terminal():
                continue
            if job.state.has_machine():
                if job.instance_id in live:
                    self.workers.pinged(job.instance_id)  # a full ping window to be heard from
                    self._watch_progress(job)
                else:
                    await self.machine_lost(job.id, job.instance_id, "machine gone while the master was down")
            elif job.state == JobState.PREEMPTED:
                await self.transition(job.id, JobState.QUEUED, event="requeued", detail="after master restart")
        await self.prune_endpoints()
        log.info("master.recovered", adopted=len(result.adopted), vanished=len(result.vanished),
                 strays=len(result.strays_terminated))

    async def release_unneeded(self) -> None:
        """Machines still held for finished jobs, or for jobs now on another machine: let them go.
        A termination that failed (the cloud erred) is retried here until it works."""
        for entry in await self.store.list_ledger(live_only=True):
            if not entry.instance_id:
                continue  # a launch under way
            try:
                job = await self.store.get_job(entry.job_id)
            except NotFound:
                job = None
            moved = job is not None and job.state.has_machine() and job.instance_id not in (None, entry.instance_id)
            if job is None:
                await self.resources.terminate(entry.instance_id, reason="job unknown")
            elif job.state.is_terminal() or moved:
                why = "job moved to another machine" if moved else f"job {job.state.lower()}"
                await self._release(job.id, entry.instance_id, reason=why)

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

    # --- state changes --------------------------------------------------------------------
    async def transition(
        self, job_id: str, target: JobState, *, attempt: int | None = None,
        instance_id: str | None = None, event: str, detail: str = "",
        update: Callable[[Job], dict[str, Any]] | None = None,
    ) -> Job | None:
        """Move a job to target if the state machine allows it and the message is current."""

        def change(job: Job) -> Job | None:
            if not can_transition(job.state, target):
                return None
            if attempt is not None and job.attempt != attempt:
                return None
            if instance_id is not None and job.instance_id != instance_id:
                return None
            fields: dict[str, Any] = {"state": target}
            now = utcnow()
            if job.state == JobState.RUNNING and job.running_since is not None:
                fields["run_seconds"] = job.run_seconds + (now - job.running_since).total_seconds()
                fields["running_since"] = None
            if target == JobState.RUNNING:
                fields["running_since"] = now
                if job.started_at is None:
                    fields["started_at"] = now
            if target.is_terminal():
                fields["finished_at"] = now
            if update is not None:
                fields.update(update(job))
            return job.model_copy(update=fields)

        try:
            new = await self.store.mutate_job(job_id, change)
        except NotFound:
            log.warning("job.unknown", job_id=job_id, target=target)
            return None
        if new is None:
            log.info("job.transition_ignored", job_id=job_id, target=target, cause=event)
            return None
        await self.store.add_event(JobEvent(job_id=job_id, kind=event, detail=detail))
        log.info("job.state", job_id=job_id, state=new.state, cause=event, detail=detail)
        if target.is_terminal():
            await self.drop_snapshots(job_id, keep=0)
        return new

    async def drop_snapshots(self, job_id: str, keep: int) -> None:
        """Volume checkpoints: delete the disk snapshots beyond the newest `keep` good ones."""
        records = [c for c in await self.store.list_checkpoints(job_id) if c.snapshot_id]
        good = [c.id for c in records if not c.bad][-keep:] if keep else []
        for record in records:
            if record.id not in good and record.snapshot_id not in self._snapshots_dropped:
                try:
                    await self.cloud.delete_snapshot(record.snapshot_id)  # type: ignore[arg-type]
                    self._snapshots_dropped.add(record.snapshot_id)  # type: ignore[arg-type]
                except Exception as exc:  # the reaper finds it again later
                    log.warning("snapshot.delete_failed", job_id=job_id, snapshot=record.snapshot_id, error=str(exc))

    async def create_job(self, name: str | None) -> Job:
        for _ in range(5):
            try:
                return await self.store.create_job(Job(id=new_job_id(), name=name))
            except StaleWrite:  # id clash: draw again
                continue
        raise RuntimeError("could not allocate a job id")

    async def add_job(self, job_id: str, text: str) -> None:
        try:
            description = jdl.parse(text, filename=f"job {job_id}")
        except jdl.JDLError as exc:
            raise BadRequest(str(exc)) from None
        for name, files in (("prologue", description.prologue), ("input", description.input_sandbox)):
            # the store retries (sleeping) through a brown-out: never on the loop
            if files and not await asyncio.to_thread(self.blobs.exists, f"jobs/{job_id}/{name}.tar.zst"):
                raise BadRequest(f"job {job_id} has no uploaded {name} archive (jobs/{job_id}/{name}.tar.zst)")
        job = await self.store.get_job(job_id)
        if job.state != JobState.SUBMITTING:
            return  # added already: a repeated submission changes nothing
        await self.transition(
            job_id, JobState.QUEUED, event="queued", detail=description.name or description.executable,
            update=lambda _: {"jdl": text, "name": description.name or _.name},
        )
        self.kick()

    async def cancel_job(self, job_id: str) -> None:
        job = await self.store.get_job(job_id)
        new = await self.transition(job_id, JobState.CANCELLED, event="cancelled", detail="by the user")
        if new is not None and job.instance_id and job.state.has_machine():
            await self.send_quietly(envelope(MessageType.STOP_JOB, StopJob(job_id=job_id, reason="cancelled"),
                                              MASTER, worker_address(job.instance_id)))
            await self._release(job_id, job.instance_id, reason="job cancelled")

    async def send_quietly(self, message: Envelope) -> None:
        try:
            await self.bus.send(await self._signed(message))
        except (DeliveryError, MessageRejected) as exc:
            log.warning("message.undelivered", type=message.type, recipient=message.recipient, error=str(exc))

    async def _signed(self, message: Envelope) -> Envelope:
        """A message to a worker, signed with its machine's key: the worker takes no other."""
        entry = await self.resources.entry_for(message.recipient.removeprefix("worker/"))
        if entry is None:
            raise DeliveryError(f"{message.recipient} is no machine of this master's any more")
        return authority.sign(message, self.keys.credential(entry.id))

    async def forget_key_drop(self, ledger_id: str) -> None:
        """The copy of a machine's key left for its boot (AWS) goes once its worker has it, or
        the machine is let go; the reaper removes any the master missed."""
        try:
            await asyncio.to_thread(self.blobs.delete, authority.key_drop(ledger_id))
        except Exception as exc:
            log.warning("key_drop.not_deleted", ledger_id=ledger_id, error=str(exc))

    async def _release(self, job_id: str, instance_id: str, reason: str) -> None:
        self.workers.forget(instance_id)
        entry = await self.resources.terminate(instance_id, reason)
        if entry is not None:
            await self.forget_key_drop(entry.id)
        if entry is not None and entry.cost:
            await self.store.mutate_job(job_id, lambda job: job.model_copy(update={"cost": job.cost + entry.cost}))
        if entry is not None:
            await self._keep_console(job_id, instance_id)

    async def _keep_console(self, job_id: str, instance_id: str) -> None:
        """The machine's console goes with the job's logs: a failure it shows outlives the machine."""
        try:
            output = await self.cloud.console_output(instance_id)
            if output:
                await asyncio.to_thread(self.blobs.put_bytes, console_key(job_id, instance_id), output)
        except Exception as exc:  # the logs are a help, never a reason to fail
            log.warning("console.not_kept", job_id=job_id, instance_id=instance_id, error=str(exc))

    # --- scheduling -------------------------------------------------------------------------
    async def schedule(self) -> None:
        """One pass over queued and running jobs together, least slack first."""
        offers = await self.cloud.offers()
        self.offers = offers
        self.ondemand_prices.update({o.instance_type: o.ondemand_price for o in offers})
        self.adapter.observe(offers)  # every pass: the market's history informs later choices
        jobs = await self.store.list_jobs({JobState.QUEUED, JobState.RUNNING})
        if not jobs:
            return
        offered = sorted({offer.instance_type for offer in offers})
        live = {entry.job_id: entry for entry in await self.store.list_ledger(live_only=True)}
        described = [(job, describe(job.jdl)) for job in jobs]
        described.sort(key=lambda pair: self.adapter.slack_hours(*pair))
        for job, description in described:
            types = allowed_types(list(description.instance_types), self.settings.default_instance_type, offered)
            if job.state == JobState.QUEUED:
                await self._place(job, description, types, offered, live)
            elif job.id in live and job.id not in self.moving and types:
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
        decision = self.adapter.place(job, description, types)
        if decision.action == "wait" or decision.placement is None:
            if self._waiting.get(job.id) != decision.reason:
                self._waiting[job.id] = decision.reason
                await self.store.add_event(JobEvent(job_id=job.id, kind="waiting", detail=decision.reason))
            return
        self._waiting.pop(job.id, None)
        try:
            entry = await self.resources.launch(job.id, decision.placement, description.max_price,
                                                await self._disk_for(job, description))
        except CapacityError as exc:
            log.info("launch.no_capacity", job_id=job.id, error=str(exc))
            return
        assert entry.instance_id is not None
        self.workers.launched(entry.instance_id)
        placed = await self.transition(
            job.id, JobState.PROVISIONING, event="provisioning", detail=f"{where(entry)}: {decision.reason}",
            update=lambda j: {"instance_id": entry.instance_id, "provisioned_at": utcnow(),
                              "predicted_cost": j.predicted_cost if j.predicted_cost is not None else decision.predicted_cost},
        )
        if placed is None:
            current = await self.store.get_job(job.id)
            if current.instance_id != entry.instance_id:  # cancelled meanwhile
                await self._release(job.id, entry.instance_id, reason="job no longer queued")
            # else: its worker announced itself first and placed the job already

    async def _disk_for(self, job: Job, description: jdl.JobDescription) -> DiskSpec:
        disk = DiskSpec(image_id=job.image_id)
        if description.checkpoints_on_volume():
            snapshots = [c.snapshot_id for c in await self.store.list_checkpoints(job.id) if c.snapshot_id and not c.bad]
            disk.data_volume_gib = description.volume_size
            disk.data_snapshot = snapshots[-1] if snapshots else None
        return disk

    async def _image_failed(self, job_id: str, error: str) -> None:
        await self.transition(job_id, JobState.FAILED, event="failed", detail=f"image build failed: {error}",
                              update=lambda _: {"error": f"BuildImage: {error}"})

    async def request_checkpoint(self, job: Job, reason: str) -> None:
        """Ask for a checkpoint ahead of schedule; at most one request per checkpoint's duration."""
        last = self._checkpoint_requested.get(job.id, 0.0)
        if not job.instance_id or time.time() - last < 2 * (job.checkpoint_seconds or 0.0) + self.settings.schedule_interval:
            return
        self._checkpoint_requested[job.id] = time.time()
        await self.store.add_event(JobEvent(job_id=job.id, kind="checkpoint-requested", detail=reason))
        await self.send_quietly(envelope(MessageType.CHECKPOINT_NOW, CheckpointNow(job_id=job.id, reason=reason),
                                          MASTER, worker_address(job.instance_id)))

    async def move(self, job: Job, reason: str) -> None:
        """Checkpoint the job and stop it, to run it again where the policy now wants it."""
        if not job.instance_id:
            return
        self.moving[job.id] = (reason, time.time() + self.settings.migrate_timeout)
        await self.store.add_event(JobEvent(job_id=job.id, kind="moving", detail=reason))
        await self.send_quietly(envelope(MessageType.STOP_JOB, StopJob(job_id=job.id, reason=reason, checkpoint=True),
                                          MASTER, worker_address(job.instance_id)))

    # --- views ------------------------------------------------------------------------------
    def job_view(self, job: Job, ledger: list[LedgerEntry]) -> dict[str, Any]:
        return job_view(job, ledger, self.ondemand_prices)
