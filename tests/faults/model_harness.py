"""A World: the real Master (on the real SQLite store) among model workers, cloud and bus
(tests/faults/model_world.py), on the model's clock; its crash points raise MasterKilled. The
steps are plain methods, so the hypothesis machine (test_protocol_model.py) and scenario tests
drive the same world, and check the same invariants."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable

import cbas.faults
from cbas import jdl
from cbas.local.blobs import FolderBlobStore
from cbas.local.store import SqliteJobStore
from cbas.master.gate import NotYet, Refused
from cbas.master.inbox import Inbox
from cbas.master.service import Backends, Master
from cbas.master.worker_manager import WorkerManager
from cbas.messages import Envelope, MessageType, StartJob
from cbas.models import Job
from cbas.settings import Settings
from cbas.state import JobState
from cbas.wiring import db_path
from tests.faults.model_world import Clock, ModelBus, ModelCloud, ModelWorker, Network

JDL = jdl.write(jdl.JobDescription(executable="/bin/true", name="model"))
# the job store's writes: the master may die after any of them, before the next
STORE_WRITES = ("create_job", "update_job", "put_ledger", "add_checkpoint", "mark_checkpoint_bad",
                "mark_snapshot_deleted", "add_event", "first_sighting")


class MasterKilled(BaseException):
    """kill -9 at a crash point: nothing after it runs (a BaseException, so no handler catches it)."""


class RecordingBus(ModelBus):
    """The model bus, remembering the newest attempt the master started for each job."""

    def __init__(self, network: Network) -> None:
        super().__init__(network)
        self.started: dict[str, int] = {}

    async def send(self, message: Envelope) -> None:
        if message.type == MessageType.START_JOB:
            start = StartJob.model_validate(message.body)
            self.started[start.job_id] = max(self.started.get(start.job_id, 0), start.attempt)
        await super().send(message)


class World:
    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="cbas-model-"))
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.network = Network()
        self.blobs = FolderBlobStore(self.home / "blobs")  # the workers' and the master's
        self.cloud = ModelCloud(self.network, self.clock, self.blobs)
        self.bus = RecordingBus(self.network)
        self.settings = Settings(home=self.home, batch_window=0.0, restart_stall_timeout=1e9)
        self.master: Master | None = None
        self.inbox: Inbox | None = None
        self.jobs: list[str] = []
        self.notices: Counter[str] = Counter()  # job id -> spot notices its machines were given
        self.crash_at: str | None = None
        self.writes_left: int | None = None  # the master dies once this many more store writes landed
        self._patch()
        self.master_up()

    # --- the harness --------------------------------------------------------------------------
    def _patch(self) -> None:
        """The master's clock is the model's; its crash points raise MasterKilled."""
        self._real_time = time.time
        time.time = self.clock  # type: ignore[assignment]
        self._patched = [m for m in list(sys.modules.values())
                         if getattr(m, "__name__", "").startswith("cbas.")
                         and getattr(m, "crash_point", None) is cbas.faults.crash_point]
        for module in self._patched:
            module.crash_point = self._crash_point  # type: ignore[attr-defined]

    def _crash_point(self, name: str) -> None:
        if self.crash_at == name:
            self.crash_at = None
            raise MasterKilled(name)

    def _dying_after_writes(self, store: SqliteJobStore) -> SqliteJobStore:
        """The store, each write of which may be the master's last (it lands; nothing after it runs)."""
        for name in STORE_WRITES:
            def counted(write: Callable[..., Awaitable[Any]], name: str = name) -> Callable[..., Awaitable[Any]]:
                async def write_then_maybe_die(*args: Any, **kwargs: Any) -> Any:
                    result = await write(*args, **kwargs)
                    if self.writes_left is not None:
                        self.writes_left -= 1
                        if self.writes_left <= 0:
                            self.writes_left = None
                            raise MasterKilled(f"after {name}")
                    return result
                return write_then_maybe_die
            setattr(store, name, counted(getattr(store, name)))
        return store

    def run(self, coroutine: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        if self.master is not None:
            self.master_down()
        time.time = self._real_time  # type: ignore[assignment]
        for module in self._patched:
            module.crash_point = cbas.faults.crash_point  # type: ignore[attr-defined]
        self.loop.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def on_master(self, step: Callable[[Master], Awaitable[Any]]) -> None:
        if self.master is None:
            return
        try:
            self.run(step(self.master))
        except MasterKilled:
            self.master_down()

    def jobs_now(self) -> list[Job]:
        assert self.master is not None
        return self.run(self.master.store.list_jobs())  # type: ignore[no-any-return]

    # --- the master -------------------------------------------------------------------------------
    def master_up(self) -> None:
        backends = Backends(store=self._dying_after_writes(SqliteJobStore(db_path(self.settings))), blobs=self.blobs,
                            bus=self.bus, cloud=self.cloud)
        self.master = Master(self.settings, backends, workers=WorkerManager(self.settings, clock=self.clock))
        self.inbox = Inbox(self.master)
        self.on_master(lambda master: master.recover())

    def master_down(self) -> None:
        """kill -9: nothing the master held in memory survives; the store's file does."""
        assert self.master is not None and self.inbox is not None
        for task in list(self.inbox._acks):
            task.cancel()
        self.run(asyncio.sleep(0))
        self.run(self.master.store.close())
        self.master = self.inbox = None

    def submit(self, jobs: int) -> None:
        assert self.master is not None
        for _ in range(jobs):
            job = self.run(self.master.create_job("model"))
            self.run(self.master.add_job(job.id, JDL))
            self.jobs.append(job.id)
        self.on_master(lambda master: master.schedule())

    def scheduler_decides(self, job: Job, move: bool) -> None:
        """What a scheduling pass may decide for a running job: move it, or ask for a checkpoint."""
        if move:
            self.on_master(lambda master: master.move(job, "model: a cheaper market"))
        else:
            self.on_master(lambda master: master.request_checkpoint(job, "model: the market may turn"))

    # --- the network --------------------------------------------------------------------------------
    def deliver_to_master(self, index: int, again: bool = False) -> None:
        flight = self.network.to_master[index]
        if self.master is None:  # the bus retries an unreachable master a few times, then drops it
            flight.tries_left -= 1
            if flight.tries_left == 0:
                del self.network.to_master[index]
            return
        assert self.inbox is not None
        self.cloud.handling = flight.message
        try:
            self.run(self.inbox.take(flight.message))
        except Refused as exc:
            raise AssertionError(f"an honest worker's {flight.message.type} was refused: {exc}") from None
        except NotYet:
            return  # sent again
        except MasterKilled:
            self.master_down()
            return  # no answer: the bus delivers it again
        finally:
            self.cloud.handling = None
        if not again:
            del self.network.to_master[index]

    def deliver_to_worker(self, index: int, again: bool = False) -> None:
        message = self.network.to_workers[index]
        worker = self.cloud.workers.get(message.recipient.removeprefix("worker/"))
        if worker is not None:
            worker.receive(message)
        if not again:
            del self.network.to_workers[index]

    def deliver_everything(self) -> None:
        """In the order sent; what cannot be taken yet (the master is down, a launch not
        recorded) stays."""
        for _ in range(3):  # answers go out as messages come in
            for message in list(self.network.to_workers):
                self.deliver_to_worker(self.network.to_workers.index(message))
            for flight in list(self.network.to_master):
                self.deliver_to_master(self.network.to_master.index(flight))

    # --- time and machines ---------------------------------------------------------------------------
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds
        for worker in self.cloud.live_workers():
            if worker.reclaim_at is not None and worker.reclaim_at <= self.clock.now:
                self.cloud.gone(worker.instance_id)  # EC2 takes it back
        for worker in self.cloud.live_workers():
            worker.ping()
        for step in ("check_workers", "release_unneeded", "schedule"):
            self.on_master(lambda master: getattr(master, step)())

    def running_workers(self) -> list[ModelWorker]:
        return [w for w in self.cloud.live_workers() if w.phase == "running"]

    def spot_notice(self, worker: ModelWorker) -> None:
        worker.notice()
        self.notices[worker.job_id] += 1

    # --- what must always hold -----------------------------------------------------------------------
    def check(self) -> None:
        assert not self.cloud.wrongly_stopped, self.cloud.wrongly_stopped
        if self.master is None:
            return
        for job in self.jobs_now():
            assert job.preemptions <= self.notices[job.id], (
                f"job {job.id}: {job.preemptions} preemptions counted, {self.notices[job.id]} spot notices given")
            if job.state == JobState.COMPLETED:
                assert job.missing_outputs == [f"{job.instance_id}/{job.attempt}"], (
                    f"job {job.id} completed with the result of {job.missing_outputs}, not of its attempt "
                    f"{job.attempt} on {job.instance_id}")
                assert job.attempt == self.bus.started.get(job.id), (
                    f"job {job.id} completed with attempt {job.attempt}; the newest started was "
                    f"{self.bus.started.get(job.id)}")
            records = self.run(self.master.store.list_checkpoints(job.id))
            events = self.run(self.master.store.list_events(job.id))
            assert job.checkpoints <= len(records), (
                f"job {job.id}: {job.checkpoints} checkpoints counted, {len(records)} recorded (one counted twice)")
            counted = [e for e in events if e.kind == "checkpoint"]
            assert len(counted) == job.checkpoints, (
                f"job {job.id}: {job.checkpoints} checkpoints counted, {len(counted)} checkpoint events")
            states = [e.state for e in events if e.state is not None]
            assert (states[-1] if states else JobState.SUBMITTING) == job.state, (
                f"job {job.id} is {job.state}; the newest state its events show is {states[-1:]}")
            if job.state.is_terminal():
                held = [m.instance_id for m in self.cloud.machines.values()
                        if m.tags["cbas:job"] == job.id and self.cloud.live(m.instance_id)]
                assert not held, f"job {job.id} is {job.state} and still holds {held}"

    def calm_down(self) -> list[Job]:
        """The trouble ends: the master is up, messages arrive, workers finish. Every job must."""
        self.crash_at = self.writes_left = None
        if self.master is None:
            self.master_up()
        for _ in range(40):
            for worker in self.cloud.live_workers():
                worker.finish()
            self.deliver_everything()
            self.time_passes(30)
            self.check()
            jobs = self.jobs_now()
            if all(job.state.is_terminal() for job in jobs) and not self.cloud.live_workers():
                assert all(job.state == JobState.COMPLETED for job in jobs), [(j.id, j.state, j.error) for j in jobs]
                for job in jobs:  # every checkpoint it recorded was counted, once
                    records = self.run(self.master.store.list_checkpoints(job.id))  # type: ignore[union-attr]
                    assert job.checkpoints == len(records), (job.id, job.checkpoints, [r.id for r in records])
                return jobs
        states = {job.id: job.state.value for job in self.jobs_now()}
        raise AssertionError(f"jobs stuck after the world calmed down: {states}; "
                             f"machines {[w.instance_id for w in self.cloud.live_workers()]}")
