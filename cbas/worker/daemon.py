"""The worker daemon: announces its machine, runs the job it is given, pings, watches for notices.

It speaks with its machine's own credential (cbas.authority): everything it sends is signed with
the machine key, and it takes only messages signed with that key (the master's, to it alone).
"""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime
from pathlib import Path

import structlog
from aiohttp import web

from cbas import authority
from cbas.authority import Credential, Unauthorized
from cbas.backends import BlobStore, InvalidMessage, JobBlobs, MessageBus, VolumeSnapshots
from cbas.jsonlimits import TooDeep
from cbas.messages import (
    MASTER, Ack, CheckpointNow, DataAccess, Envelope, MessageRegistry, MessageType, Ping, SpotNotice, StartJob, StopJob,
    UnroutableMessage, WorkerStarted, envelope, worker_address,
)
from cbas.settings import Settings
from cbas.wiring import open_job_blobs
from cbas.worker.imds import MetadataClient
from cbas.worker.job_run import JobRun
from cbas.worker.outbox import Outbox

log = structlog.get_logger(__name__)

registry: MessageRegistry["Worker"] = MessageRegistry()


class Worker:
    def __init__(
        self, settings: Settings, instance_id: str, disk: Path, metadata: MetadataClient, blobs: BlobStore,
        bus: MessageBus, volumes: VolumeSnapshots | None = None, *, credential: Credential,
        job_blobs: JobBlobs | None = None,
    ) -> None:
        self.settings = settings
        self.credential = credential
        self.instance_id = instance_id
        self.address = worker_address(instance_id)
        self.disk = disk
        self.metadata = metadata
        self.blobs = blobs
        self.job_blobs = job_blobs or open_job_blobs(settings, blobs)  # on AWS each job's own credentials
        self.bus = bus
        self.volumes = volumes
        self.outbox = Outbox(bus, sign=lambda message: authority.sign(message, credential))
        self.job: JobRun | None = None
        self._job_task: asyncio.Task[None] | None = None
        self.noticed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def _message(self, type_: MessageType, body: object) -> Envelope:
        return envelope(type_, body, self.address, MASTER)  # type: ignore[arg-type]

    def _background(self, coro: object) -> None:
        task = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- HTTP endpoint ------------------------------------------------------------------------
    async def receive(self, request: web.Request) -> web.Response:
        try:
            message = await self.bus.receive(await request.read())
        except TooDeep as exc:
            return web.json_response({"error": f"message refused: {exc}"}, status=400)
        except InvalidMessage as exc:
            log.warning("message.rejected", reason=str(exc))
            return web.json_response({"error": f"message rejected: {exc}"}, status=403)
        if message is None:
            return web.json_response({"ok": True, "control": True})
        try:
            authority.verify(message, self.credential)  # only the master has this machine's key
            if message.recipient != self.address:
                return web.json_response({"error": f"this is {self.address}, not {message.recipient}"}, status=400)
            await registry.dispatch(self, message)
        except Unauthorized as exc:
            log.warning("message.refused", type=message.type, sender=message.sender, reason=str(exc))
            return web.json_response({"error": f"message refused: {exc}"}, status=403)
        except UnroutableMessage as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    # --- jobs ---------------------------------------------------------------------------------
    def start_job(self, start: StartJob) -> None:
        if self.noticed:
            log.info("job.not_started", job_id=start.job_id, reason="this machine has its interruption notice")
            return
        if self.job is not None and (self.job.job_id, self.job.start.attempt) == (start.job_id, start.attempt):
            return  # the same START_JOB again
        if self.job is not None:
            self.job.stop()
        self.job = JobRun(self.settings, self.instance_id, self.disk, self.job_blobs.blobs_for(start.job_id), start,
                          self.outbox.deliver, self.volumes, sign=self.outbox.sign)
        self._job_task = asyncio.create_task(self._run_job(self.job))

    async def _run_job(self, job: JobRun) -> None:
        await self.ping()  # tell the master at once that the job is starting
        runner = asyncio.create_task(job.run())
        while not runner.done():
            await asyncio.sleep(0.05)
            if job.phase == "running":
                await self.ping()
                break
        await runner

    async def ping(self) -> None:
        job = self.job
        body = Ping(
            instance_id=self.instance_id,
            job_id=job.job_id if job else None,
            attempt=job.start.attempt if job else 0,
            phase=job.phase if job else "idle",
            restored_from=job.restored_from if job else None,
            bad_checkpoints=job.bad_checkpoints if job else [],
            data_access_expires=self.job_blobs.expires_at(job.job_id) if job else None,
        )
        await self.outbox.try_once(self._message(MessageType.PING, body))

    async def _pinger(self) -> None:
        while True:
            interval = self.job.start.ping_interval if self.job else self.settings.ping_interval
            await asyncio.sleep(interval)
            await self.ping()
            await self.outbox.send_unacknowledged()  # facts a master that was away has not got

    async def _notice_watcher(self) -> None:
        rebalanced = False
        while not self.noticed:
            try:
                action = await self.metadata.spot_action()
                rebalance = None if rebalanced else await self.metadata.rebalance()
            except Exception as exc:  # the endpoint may hiccup; keep watching
                log.warning("metadata.unreachable", error=str(exc))
                action = rebalance = None
            if rebalance and not action and self.job is not None:
                # often earlier than the notice: save the work now, keep running until told
                rebalanced = True
                log.warning("spot.rebalance_recommendation", notice=rebalance)
                self._background(self.job.checkpoint("rebalance"))
            if action:
                self.noticed = True
                log.warning("spot.notice", action=action)
                when = datetime.fromisoformat(str(action.get("time", "")).replace("Z", "+00:00"))
                job = self.job
                self._background(self.outbox.deliver(self._message(MessageType.SPOT_NOTICE, SpotNotice(
                    instance_id=self.instance_id, job_id=job.job_id if job else None,
                    action=str(action.get("action", "terminate")), action_time=when))))
                if job is not None:
                    await job.on_notice(when.timestamp())
                return
            await asyncio.sleep(self.settings.notice_poll_seconds())

    # --- lifecycle ----------------------------------------------------------------------------
    async def _advertised_host(self) -> str:
        """Where the bus reaches this worker: on EC2 the machine's public address."""
        wanted = self.settings.worker_advertise_host or self.settings.worker_listen_host
        if wanted != "metadata":
            return wanted
        for path in ("public-ipv4", "local-ipv4"):  # a private address serves a VPC endpoint
            address = await self.metadata.get(path)
            if address:
                return address.strip()
        raise RuntimeError("instance metadata has neither public-ipv4 nor local-ipv4 to deliver messages to")

    async def run(self, install_signals: bool = True) -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/messages", self.receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.worker_listen_host, self.settings.worker_port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        stop = asyncio.Event()
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        try:
            await self.bus.subscribe(self.address, f"http://{await self._advertised_host()}:{port}/messages")
            await self.outbox.deliver(self._message(MessageType.WORKER_STARTED, WorkerStarted(instance_id=self.instance_id)))
            log.info("worker.started", instance_id=self.instance_id, port=port)
            self._background(self._pinger())
            self._background(self._notice_watcher())
            await stop.wait()
        finally:
            if self.job is not None:
                self.job.stop()
            for task in list(self._tasks) + ([self._job_task] if self._job_task else []):
                task.cancel()
            await self.bus.unsubscribe(self.address)
            await runner.cleanup()
            await self.metadata.close()
            await self.bus.close()


@registry.handler(MessageType.START_JOB)
async def on_start_job(worker: Worker, message: Envelope, body: StartJob) -> None:
    # the job's checkpoint key comes sealed for this machine: it opens here, and goes no further
    key = authority.open_checkpoint_key(worker.credential.key, body.job_id, body.checkpoint_key)
    if body.data_access:  # the job's files, for this machine alone (sealed the same way)
        worker.job_blobs.accept(worker.credential.key, body.job_id, body.data_access)
    worker.start_job(body.with_checkpoint_key(key))


@registry.handler(MessageType.DATA_ACCESS)
async def on_data_access(worker: Worker, message: Envelope, body: DataAccess) -> None:
    if worker.job is not None and (worker.job.job_id, worker.job.start.attempt) == (body.job_id, body.attempt):
        worker.job_blobs.accept(worker.credential.key, body.job_id, body.sealed)  # uploads under way go on


@registry.handler(MessageType.STOP_JOB)
async def on_stop_job(worker: Worker, message: Envelope, body: StopJob) -> None:
    if worker.job is not None and worker.job.job_id == body.job_id:
        log.info("job.stopping", job_id=body.job_id, reason=body.reason, checkpoint=body.checkpoint)
        if body.checkpoint:  # the job moves: save it first, as on a spot notice
            worker._background(worker.job.on_notice())
        else:
            worker.job.stop()


@registry.handler(MessageType.ACK)
async def on_ack(worker: Worker, message: Envelope, body: Ack) -> None:
    worker.outbox.acknowledged(body.message_ids)


@registry.handler(MessageType.CHECKPOINT_NOW)
async def on_checkpoint_now(worker: Worker, message: Envelope, body: CheckpointNow) -> None:
    if worker.job is not None and worker.job.job_id == body.job_id:
        log.info("checkpoint.requested", job_id=body.job_id, reason=body.reason)
        worker._background(worker.job.checkpoint("scheduler"))
