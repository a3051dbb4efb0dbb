"""Taking one job's checkpoints: hold the job only to capture, upload after, report, collect.

    capture   the job held (DMTCP's hook, the cgroup freezer or SIGSTOP, the signal strategy's
              .done): changed files are copied (or cloned, or compared with the last capture)
              into the worker's own folder; DMTCP's images, which are never changed in place,
              are only opened (cbas.checkpoint.capture). One capture at a time.
    upload    the job runs again: the opened images are copied, everything captured is cut,
              hashed, compressed and stored, then the manifest (or the data disk's snapshot is
              awaited), the checkpoint may be validated, and it is reported; only then does it
              count. Its event says how long the job was held (pause) and how long until it was
              durable (from the capture's start), a notice checkpoint's as any other's.

A spot notice never queues behind an interval checkpoint: it waits at most for a capture under
way (the job is held then anyway), takes its own, and the upload of any older checkpoint gives
way to it. Every checkpoint that does not count is reported with its reason.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog

from cbas.backends import VolumeSnapshots
from cbas.checkpoint.base import CheckpointFailed, Checkpointer, JobContext, JobProcess
from cbas.checkpoint.store import ChunkStore, CommitCancelled, Manifest, Snapshot
from cbas.faults import crash_point
from cbas.messages import CheckpointDone, CheckpointFailure, MessageType
from cbas.untrusted import tree_size
from cbas.worker.job_files import JobLayout

log = structlog.get_logger(__name__)

JOB_END_GRACE = 1.0  # seconds: a capture that failed as the job ended is the job's end, not a failure
VOLUME_MARKER = ".cbas-checkpoint"  # volume storage: names the checkpoint a disk was snapshotted at
Report = Callable[[MessageType, object], Awaitable[bool]]
Validate = Callable[[str, float | None], Awaitable[str | None]]  # checkpoint, deadline -> None if good, else why not


@dataclass
class Captured:
    checkpoint_id: str
    reason: str
    final: bool
    deadline: float | None
    snapshot: Snapshot | str  # chunk store snapshot, or the id of the data disk's snapshot
    stdout: int
    stderr: int
    pause: float
    cancelled: threading.Event
    began: float  # monotonic: when the capture began (its durable time counts from here)
    manifest: Manifest | None = None  # stored while the job was held (no room on the disk to copy it)


class Checkpoints:
    def __init__(self, job_id: str, attempt: int, layout: JobLayout, checkpointer: Checkpointer, store: ChunkStore,
                 report: Report, volumes: VolumeSnapshots | None = None, keep: int = 3,
                 validate: Validate | None = None, upload_logs: Callable[[], None] = lambda: None,
                 state_limit: int | None = None) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.layout = layout
        self.checkpointer = checkpointer
        self.store = store
        self.report = report
        self.volumes = volumes
        self.keep = keep
        self.validate = validate
        self.upload_logs = upload_logs
        self.state_limit = state_limit  # StateSizeLimit: a bigger state does not count
        self.restored_from: str | None = None
        self.last_failure: str | None = None
        self._counter = 0
        self.capture_lock = asyncio.Lock()
        self._uploading: list[Captured] = []
        self._reports: set[asyncio.Task[bool]] = set()
        self._taking = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.log = log.bind(job_id=job_id, attempt=attempt)

    def next_id(self) -> str:
        self._counter += 1
        return f"a{self.attempt:04d}-n{self._counter:05d}"

    async def take(self, ctx: JobContext, process: JobProcess, reason: str, final: bool = False,
                   deadline: float | None = None, on_captured: Callable[[], None] = lambda: None) -> bool:
        """One checkpoint; True once it counts. `on_captured` runs when the job's state is taken
        (a final checkpoint stops the job there: nothing it does later would be kept)."""
        self._taking += 1
        self._idle.clear()
        try:
            return await self._take(ctx, process, reason, final, deadline, on_captured)
        finally:
            self._taking -= 1
            if not self._taking:
                self._idle.set()

    async def idle(self) -> None:
        """Until no checkpoint is being taken, uploaded or validated (the attempt's user and
        cgroup are let go only then)."""
        await self._idle.wait()

    async def _take(self, ctx: JobContext, process: JobProcess, reason: str, final: bool, deadline: float | None,
                    on_captured: Callable[[], None]) -> bool:
        captured = await self._capture(ctx, process, reason, final, deadline)
        if captured is None:
            return False
        on_captured()
        if final:  # this one supersedes whatever is still uploading
            for older in self._uploading:
                older.cancelled.set()
        self._uploading.append(captured)
        try:
            return await self._upload(captured)
        finally:
            self._uploading.remove(captured)
            if not isinstance(captured.snapshot, str):
                await asyncio.to_thread(self.store.release, captured.snapshot)

    async def _capture(self, ctx: JobContext, process: JobProcess, reason: str, final: bool,
                       deadline: float | None) -> Captured | None:
        async with self.capture_lock:
            if process.process.returncode is not None:
                return None
            checkpoint_id = self.next_id()
            started = time.monotonic()
            manifest: Manifest | None = None
            try:
                async with self.checkpointer.quiesced(ctx, process):
                    stdout, stderr = ctx.log_sizes()
                    if self.volumes is not None:
                        snapshot: Snapshot | str = await asyncio.to_thread(self._snapshot_volume, checkpoint_id)
                    else:
                        snapshot = await asyncio.to_thread(
                            self.store.snapshot, self.checkpointer.state_dir(ctx), self.layout.staging / checkpoint_id,
                            self.checkpointer.exclude, self.checkpointer.immutable, self.state_limit,
                            ctx.user[0] if ctx.user is not None else None)
                        if snapshot.held_for_upload:
                            manifest = await self._store_held(snapshot, checkpoint_id, stdout, stderr)
            except Exception as exc:  # the strategy, the files or the disk: this one does not count
                if await self._ended(process):  # e.g. DMTCP's coordinator, gone with the job: no failure
                    self.log.info("checkpoint.skipped", checkpoint=checkpoint_id, reason=reason,
                                  why=f"the job ended while it was captured ({exc})")
                else:
                    self._failed(checkpoint_id, reason, str(exc) if isinstance(exc, CheckpointFailed)
                                 else f"{type(exc).__name__}: {exc}")
                await asyncio.to_thread(shutil.rmtree, self.layout.staging / checkpoint_id, True)
                return None
            return Captured(checkpoint_id, reason, final, deadline, snapshot, stdout, stderr,
                            time.monotonic() - started, threading.Event(), started, manifest)

    @staticmethod
    async def _ended(process: JobProcess) -> bool:
        """Whether the job has ended, or ends within a moment (its exit is seen a little after
        what it took with it, such as DMTCP's coordinator)."""
        if process.process.returncode is not None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(process.process.wait()), JOB_END_GRACE)
        except TimeoutError:
            return False
        return True

    async def _store_held(self, snapshot: Snapshot, checkpoint_id: str, stdout: int, stderr: int) -> Manifest:
        """A capture some of whose files are read in place, the job held: stored now, before it runs on."""
        self.log.warning("checkpoint.held_for_upload", checkpoint=checkpoint_id, why=snapshot.held_for_upload)
        try:
            return await asyncio.to_thread(self.store.commit, snapshot, checkpoint_id, self.checkpointer.name,
                                           stdout, stderr)
        except BaseException:
            await asyncio.to_thread(self.store.release, snapshot)
            raise

    def _snapshot_volume(self, checkpoint_id: str) -> str:
        assert self.volumes is not None
        marker = self.layout.root / VOLUME_MARKER  # the worker's folder: the job cannot swap it
        marker.write_text(checkpoint_id)
        os.sync()  # what the job wrote is on the disk before the snapshot's point in time
        try:
            return self.volumes.snapshot(self.job_id, checkpoint_id)
        except Exception as exc:
            raise CheckpointFailed(f"snapshot of the data disk failed: {exc}") from exc

    async def _upload(self, captured: Captured) -> bool:
        started = time.monotonic()
        checkpoint_id, snapshot = captured.checkpoint_id, captured.snapshot
        try:
            await asyncio.to_thread(self.upload_logs)
            if isinstance(snapshot, str):
                await asyncio.to_thread(self.volumes.wait, snapshot)  # type: ignore[union-attr]
                size_bytes = new_bytes = await asyncio.to_thread(tree_size, self.layout.root)
            elif captured.manifest is not None:  # stored while the job was held
                size_bytes, new_bytes = captured.manifest.total_bytes, captured.manifest.new_bytes
            else:
                manifest = await asyncio.to_thread(
                    self.store.commit, snapshot, checkpoint_id, self.checkpointer.name, captured.stdout,
                    captured.stderr, captured.cancelled)
                size_bytes, new_bytes = manifest.total_bytes, manifest.new_bytes
            crash_point("worker-checkpoint-uploaded")
            if self.validate is not None and not isinstance(snapshot, str):
                problem = await self.validate(checkpoint_id, captured.deadline)
                if problem is not None:  # gone, so it takes no place among the checkpoints kept
                    await asyncio.to_thread(self.store.forget, checkpoint_id)
                    raise CheckpointFailed(f"validation failed: {problem}")
        except CommitCancelled:
            self.log.info("checkpoint.superseded", checkpoint=checkpoint_id)
            return False
        except Exception as exc:  # the blob store gave up, or validation: this one does not count
            self._failed(checkpoint_id, captured.reason, str(exc) or type(exc).__name__)
            return False
        upload = time.monotonic() - started
        durable = time.monotonic() - captured.began
        margin = None if captured.deadline is None else captured.deadline - time.time()
        self.log.info("checkpoint.uploaded", checkpoint=checkpoint_id, reason=captured.reason, bytes=size_bytes,
                      new_bytes=new_bytes, pause=round(captured.pause, 3), upload=round(upload, 3),
                      durable=round(durable, 3),
                      deadline_margin=None if margin is None else round(margin, 3))
        if margin is not None and margin < 0:
            self.log.error("checkpoint.missed_notice_deadline", checkpoint=checkpoint_id, late_by=round(-margin, 3))
        delivered = await self.report(MessageType.CHECKPOINT_DONE, CheckpointDone(
            job_id=self.job_id, attempt=self.attempt, checkpoint_id=checkpoint_id,
            manifest_key="" if isinstance(snapshot, str) else self.store.manifest_key(checkpoint_id),
            size_bytes=size_bytes, new_bytes=new_bytes, pause_seconds=captured.pause,
            upload_seconds=upload, reason=captured.reason, final=captured.final, deadline_margin_seconds=margin,
            snapshot_id=snapshot if isinstance(snapshot, str) else None))
        if delivered:
            self.last_failure = None
        if delivered and not captured.final and self.volumes is None:
            try:
                await asyncio.to_thread(self._collect_garbage)
            except Exception as exc:  # old checkpoints stay a while longer; the next pass retries
                self.log.warning("checkpoint.collect_failed", error=str(exc))
        return delivered

    def _failed(self, checkpoint_id: str, reason: str, error: str) -> None:
        """Say why, in the background: the report is retried while the master is away, and no
        checkpoint waits for it."""
        self.last_failure = error
        self.log.warning("checkpoint.failed", checkpoint=checkpoint_id, reason=reason, error=error)
        task = asyncio.create_task(self.report(MessageType.CHECKPOINT_FAILED, CheckpointFailure(
            job_id=self.job_id, attempt=self.attempt, checkpoint_id=checkpoint_id, reason=reason, error=error[:2000])))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def reported(self) -> None:
        """Wait for the failure reports still under way (before the attempt's last word)."""
        if self._reports:
            await asyncio.wait(list(self._reports))

    def _collect_garbage(self) -> None:
        dropped, chunks = self.store.collect_garbage(
            keep=self.keep, protect=[self.restored_from] if self.restored_from else [], attempt=self.attempt)
        if dropped:
            self.log.info("checkpoint.collected", dropped=dropped, chunks=chunks)
