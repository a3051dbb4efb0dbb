"""The Master: what its parts (below) share, its loops, and what the API asks of it.

Its parts are mixins, one concern each, every one built on the parts it calls:
transitions.py (every state change: guards, fencing, run-time accounting) under all;
placement.py (the scheduling pass, moves) on it; restarts.py (attempts that end early, and the
watchdogs) on it; worker_events.py (what workers say) and recovery.py (reconciling with the
store after a restart, and every so often) on restarts; recorded_ends.py (the end a lost
machine's worker left in the blob store, read before its job restarts) on worker events. What they share of the Master is
declared in parts.py. docs/architecture.md draws the map.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import structlog

from cbas import authority, jdl
from cbas.backends import (
    BlobStore, Cloud, DeliveryError, ImageBuilder,
    JobCredentials, JobStore, MessageBus, MessageRejected, NoJobCredentials, StaleWrite,
)
from cbas.master.credentials import MachineKeys, load_master_key
from cbas.master.job_images import JobImages
from cbas.master.metrics import Metrics
from cbas.master.placement import Placement
from cbas.master.reaper import Reaper
from cbas.master.recorded_ends import RecordedEnds
from cbas.master.recovery import Recovery
from cbas.master.resource_manager import ResourceManager
from cbas.master.scheduler_adapter import SchedulerAdapter
from cbas.master.views import job_view
from cbas.master.worker_manager import WorkerManager
from cbas.messages import MASTER, Envelope, MessageType, StopJob, envelope, worker_address
from cbas.models import Job, LedgerEntry
from cbas.settings import Settings
from cbas.state import JobState

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


def console_key(job_id: str, instance_id: str) -> str:
    return f"jobs/{job_id}/logs/console/{instance_id}.log"


def new_job_id() -> str:
    return secrets.token_hex(4)


class Master(Placement, RecordedEnds, Recovery):
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
        self.adapter = SchedulerAdapter(settings)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # each part's timers and views, beside the code that uses them; what they track is in
        # the store, and recover() arms them again from it
        self._init_placement()
        self._init_restarts()

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

    # --- what the API asks --------------------------------------------------------------
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

    # --- messages to workers, machines let go ---------------------------------------------
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

    # --- views ------------------------------------------------------------------------------
    def job_view(self, job: Job, ledger: list[LedgerEntry]) -> dict[str, Any]:
        return job_view(job, ledger, self.ondemand_prices)
