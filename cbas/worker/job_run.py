"""One attempt of one job on this machine: prepare, restore, run under a checkpointer, report.

The job runs as a user of its own (cbas.worker.job_users), in a cgroup of its own where the
machine has them (every process it starts is frozen with it and killed with it), in the folders
of cbas.worker.job_files: it can write its working and checkpoint folders and nothing of the
worker's. Checkpoints are taken by cbas.worker.checkpoints.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from cbas import jdl
from cbas.archive import pack_beneath
from cbas.backends import BlobStore, VolumeSnapshots
from cbas.checkpoint.base import Cgroup, JobContext, JobProcess, checkpointer_for
from cbas.checkpoint.signalled import CHECKPOINT_EXIT_CODE
from cbas.checkpoint.store import ChunkStore
from cbas.faults import crash_point
from cbas.logs import say_once
from cbas.messages import (
    MASTER, CheckpointDone, Envelope, JobDone, JobFailed, MessageType, StartJob, checkpoint_record_key, end_record_key,
    envelope, worker_address,
)
from cbas.settings import Settings
from cbas.untrusted import UnsafePath, tail, tree_size
from cbas.worker import cgroups
from cbas.worker.checkpoints import Checkpoints
from cbas.worker.job_files import JobLayout, secure
from cbas.worker.job_users import JobIdentity, JobUserUnavailable, acquire
from cbas.worker.sandbox import PrepareFailed, Sandbox
from cbas.worker.validation import Validator

log = structlog.get_logger(__name__)

STDERR_TAIL_LINES = 20
Deliver = Callable[[Envelope], Awaitable[bool]]
Sign = Callable[[Envelope], Envelope]


class JobRun:
    def __init__(
        self, settings: Settings, instance_id: str, disk: Path, blobs: BlobStore, start: StartJob, deliver: Deliver,
        volumes: VolumeSnapshots | None = None, sign: Sign = lambda message: message,
    ) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.blobs = blobs
        self.start = start
        self.deliver = deliver
        self.sign = sign  # the machine's key: a recorded end is as trustworthy as a delivered one
        self.description = jdl.parse(start.jdl)
        self.checkpointer = checkpointer_for(self.description.checkpoint_strategy, settings.signal_checkpoint_timeout,
                                             settings.dmtcp_checkpoint_signal)
        self.store = ChunkStore(blobs, start.job_id, start.opened_checkpoint_key())
        self.layout = JobLayout(disk)
        self.root = self.layout.root
        self.pgids_file = disk / "job-pgids"
        self.cgroups_file = disk / "job-cgroups"
        self.cache_dir = disk / "cache"  # kept across attempts on this machine
        self.log = log.bind(job_id=start.job_id, attempt=start.attempt)
        self.sandbox = Sandbox(self.layout, start, self.description, blobs, self.store,
                               volumes if self.description.checkpoints_on_volume() else None, self.cache_dir, self.log)
        self.phase = "starting"
        self.restored_from: str | None = None
        self.stopping = False
        self.process: JobProcess | None = None
        self.identity: JobIdentity | None = None
        self.cgroup: cgroups.JobCgroup | None = None
        self.checkpoints: Checkpoints | None = None
        self._limit_hit: str | None = None  # a limit the worker enforces itself was passed
        self._leftovers = False  # some of the job's processes could not be ended
        self.ctx: JobContext | None = None

    @property
    def job_id(self) -> str:
        return self.start.job_id

    @property
    def bad_checkpoints(self) -> list[str]:
        return self.sandbox.bad_checkpoints

    @property
    def volumes(self) -> VolumeSnapshots | None:
        return self.sandbox.volumes

    @volumes.setter
    def volumes(self, volumes: VolumeSnapshots | None) -> None:
        self.sandbox.volumes = volumes

    def _message(self, type_: MessageType, body: object) -> Envelope:
        return envelope(type_, body, worker_address(self.instance_id), MASTER)  # type: ignore[arg-type]

    async def _report(self, type_: MessageType, body: object) -> bool:
        return await self.deliver(self._message(type_, body))

    async def _report_end(self, type_: MessageType, body: JobDone | JobFailed) -> None:
        """The job's end, recorded in the blob store before it is sent: if this machine is lost
        before the master hears it, the master reads it there (cbas.master.recorded_ends)."""
        await self._report_recorded(type_, body, end_record_key(self.job_id, self.start.attempt), "worker-end-recorded")

    async def _report_recorded(self, type_: MessageType, body: object, key: str, point: str) -> bool:
        """A fact recorded, signed, at `key` in the blob store, then sent."""
        message = self._message(type_, body)
        try:
            signed = self.sign(message).model_dump_json().encode()
            await asyncio.to_thread(self.blobs.put_bytes, key, signed)
        except Exception as exc:  # the report still goes; only a machine lost before it is at risk
            self.log.warning("report.not_recorded", type=type_, error=f"{type(exc).__name__}: {exc}")
        crash_point(point)
        return await self.deliver(message)

    async def _report_checkpoint(self, type_: MessageType, body: object) -> bool:
        if isinstance(body, CheckpointDone):  # recorded first, as an end is (cbas.master.recorded_ends)
            return await self._report_recorded(type_, body, checkpoint_record_key(self.job_id, body.checkpoint_id),
                                               "worker-checkpoint-recorded")
        return await self._report(type_, body)

    def _open_store(self) -> ChunkStore:
        return ChunkStore(self.blobs, self.job_id, self.start.opened_checkpoint_key())

    # --- the whole attempt ------------------------------------------------------------------
    async def run(self) -> None:
        try:
            ctx = await self._prepare()
            if self.stopping:
                return
            self.process = await self.checkpointer.start(ctx, self.sandbox.argv(ctx))
            if self.stopping:  # stopped (a notice, a cancel) while it was being started
                self.process.kill()
                await self._end_processes()
                return
            self.phase = "running"
            self.log.info("job.started", pgid=self.process.pgid, restored_from=self.restored_from)
            crash_point("worker-job-started")
            helpers = [asyncio.create_task(self._checkpoint_timer()), asyncio.create_task(self._log_uploader())]
            try:
                code = await self._wait(ctx)
            finally:
                for task in helpers:
                    task.cancel()
            await self._end_processes()  # nothing the job started outlives it
            if self.stopping:
                return
            self.phase = "finishing"
            await self._finish(ctx, code)
        except (PrepareFailed, JobUserUnavailable) as exc:
            await self._fail(None, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # report, never die silently: the master would wait for pings
            self.log.exception("job.worker_error")
            await self._fail(None, f"worker error: {type(exc).__name__}: {exc}")
        finally:
            await self._clean_up()
            self.phase = "done"

    async def _fail(self, code: int | None, reason: str) -> None:
        if self.stopping:
            return
        self.phase = "finishing"
        if self.checkpoints is not None:
            await self.checkpoints.reported()
        stderr_tail = tail(self.layout.stderr, STDERR_TAIL_LINES)
        await self._upload_logs_quietly()
        await self._report_end(MessageType.JOB_FAILED, JobFailed(
            job_id=self.job_id, attempt=self.start.attempt, exit_code=code, reason=reason, stderr_tail=stderr_tail))
        self.phase = "done"

    # --- preparation ------------------------------------------------------------------------
    async def _prepare(self) -> JobContext:
        if self.description.checkpoints_on_volume() and self.volumes is None:
            raise PrepareFailed("checkpoints on a volume need a backend with disk snapshots (local or aws)")
        self.identity = await asyncio.to_thread(
            acquire, self.settings.job_user, self.settings.job_slot_dir, self.settings.job_slots)
        user = self.identity.user
        on_volume = self.sandbox.checkpoint_on_volume()
        if on_volume is None:
            await asyncio.to_thread(self.sandbox.lay_out, user)
        else:  # the disk was made from this checkpoint's snapshot: state and logs are in place
            await asyncio.to_thread(secure, self.layout, user)
        self.cgroup = await asyncio.to_thread(self._make_cgroup, "")
        ctx = JobContext(
            job_id=self.job_id, workdir=self.layout.work, checkpoint_dir=self.layout.checkpoint,
            stdout=self.layout.stdout, stderr=self.layout.stderr, env={}, user=user, on_spawn=self._record_pgid,
            cache_dir=self.cache_dir, hook_dir=self.layout.hook, scratch_dir=self.layout.scratch, cgroup=self.cgroup,
            tag=self.tag,
        )
        self.ctx = ctx
        if on_volume is None:
            # before the restore: an older attempt's worker, if it still runs, collects nothing more
            # (it would delete what this one restores and reuses)
            try:
                await asyncio.to_thread(self.store.claim_attempt, self.start.attempt,
                                        self.start.checkpoints[0] if self.start.checkpoints else None)
            except Exception as exc:  # the blob store gave up: the restore and checkpoints say so too
                self.log.warning("attempt.claim_failed", error=str(exc))
            self.restored_from = await asyncio.to_thread(self.sandbox.restore, self.checkpointer, ctx, user)
        else:
            self.restored_from = on_volume
            self.log.info("checkpoint.restored", checkpoint=on_volume, source="volume snapshot")
        ctx.env = self.sandbox.environment(ctx, self.identity.name, restored=self.restored_from is not None)
        validate = Validator(self.layout, ctx, self.checkpointer, self._open_store, self._make_cgroup) \
            if self.description.validate_checkpoint else None
        self.checkpoints = Checkpoints(
            self.job_id, self.start.attempt, self.layout, self.checkpointer, self.store, self._report_checkpoint,
            self.volumes,
            keep=self.settings.checkpoints_kept, validate=validate, upload_logs=self._upload_logs,
            state_limit=self.description.state_size_limit_bytes())
        self.checkpoints.restored_from = self.restored_from
        if self.identity.shared:
            self.log.warning("job.not_isolated", reason=self.identity.shared)
        if self.start.prologue_in_image:
            self.log.info("prologue.in_image")  # the machine's image was built with it
        else:
            await self.sandbox.run_prologue(ctx)
        return ctx

    @property
    def tag(self) -> str:
        """The attempt's name on this machine: its cgroups and firewall rules carry it."""
        return f"{self.instance_id}-{self.job_id}-a{self.start.attempt}"

    def _make_cgroup(self, suffix: str) -> cgroups.JobCgroup | None:
        """The attempt's cgroup (or its validation's); None where the machine allows none (said once)."""
        name = self.tag + (f"-{suffix}" if suffix else "")
        limits = cgroups.Limits(max_processes=self.description.max_processes,
                                memory_bytes=self.description.memory_limit_bytes() or _default_memory_limit())
        try:
            group = cgroups.create_job_cgroup(name, limits)
        except cgroups.CgroupUnavailable as exc:
            say_once(log, "cgroup.unavailable", reason=str(exc), consequence="jobs are tracked by process group only")
            return None
        with open(self.cgroups_file, "a") as out:  # the machine's terminate kills what is listed
            out.write(f"{name}\n")
        if group.unenforced:
            self.log.warning("cgroup.limits_unenforced", limits=group.unenforced)
        return group

    def _record_pgid(self, pgid: int) -> None:
        with open(self.pgids_file, "a") as out:
            out.write(f"{pgid}\n")

    # --- running ----------------------------------------------------------------------------
    async def _wait(self, ctx: JobContext) -> int:
        assert self.process is not None
        while True:
            code = await self.process.process.wait()
            if self.checkpoints is not None:
                async with self.checkpoints.capture_lock:  # a capture in progress ends before we judge
                    pass
            if self.stopping or code != CHECKPOINT_EXIT_CODE or self.description.checkpoint_strategy != "signal":
                return code
            self.log.info("job.restarting_after_checkpoint_exit")
            ctx.env["CBAS_RESTORED"] = "1"
            self.process = await self.checkpointer.start(ctx, self.sandbox.argv(ctx))

    async def _checkpoint_timer(self) -> None:
        while True:
            await asyncio.sleep(self.description.checkpoint_interval)
            await self.checkpoint("interval")

    async def _log_uploader(self) -> None:
        while True:
            await asyncio.sleep(self.settings.log_upload_interval)
            await self._upload_logs_quietly()
            await self._check_limits()

    async def _check_limits(self) -> None:
        """DiskLimit (no quota on these disks: measured, logs included; a tree too deep to measure
        is over it) and the cgroup's limits (said once hit)."""
        limit = self.description.disk_limit_bytes()
        if limit is None or self.ctx is None or self.stopping:
            return
        try:
            used = await asyncio.to_thread(self._disk_used, self.ctx)
            over = f"its folders and logs hold {used} bytes, over DiskLimit ({limit} bytes)" if used > limit else None
        except UnsafePath as exc:
            over = f"its folders cannot be measured against DiskLimit: {exc}"
        if over is not None:
            self.log.error("job.disk_limit", reason=over)
            self._limit_hit = over
            if self.process is not None:
                self.process.kill()

    def _disk_used(self, ctx: JobContext) -> int:
        return sum(ctx.log_sizes()) + tree_size(self.layout.work) + tree_size(self.layout.checkpoint)

    async def _upload_logs_quietly(self) -> None:
        """Logs are uploaded again and again: one failed upload is only worth a warning."""
        try:
            await asyncio.to_thread(self._upload_logs)
        except Exception as exc:
            self.log.warning("logs.upload_failed", error=str(exc))

    def _upload_logs(self) -> None:
        for path in (self.layout.stdout, self.layout.stderr):
            if path.exists():
                self.blobs.put_file(f"jobs/{self.job_id}/logs/{path.name}", path)

    async def checkpoint(self, reason: str, final: bool = False, deadline: float | None = None) -> bool:
        """Hold the job only to capture its state, upload it after, report it. True once it counts."""
        process, ctx = self.process, self.ctx
        if process is None or ctx is None or self.checkpoints is None or self.phase != "running":
            return False

        def captured() -> None:
            if final:  # nothing the job does from now on would be kept
                self.stopping = True
                process.kill()
                self._kill_cgroup_later()

        return await self.checkpoints.take(ctx, process, reason, final, deadline, on_captured=captured)

    async def on_notice(self, deadline: float | None = None) -> None:
        """The machine will be reclaimed at `deadline` (unix time): checkpoint now, upload before
        then, and stop; the master restarts the job elsewhere."""
        if self.stopping or self.phase in ("finishing", "done"):
            return
        if not await self.checkpoint("notice", final=True, deadline=deadline):
            self.stop()

    def stop(self) -> None:
        self.stopping = True
        if self.process is not None:
            self.process.kill()
        self._kill_cgroup_later()

    def _kill_cgroup_later(self) -> None:
        if self.cgroup is not None:
            try:
                asyncio.get_running_loop().run_in_executor(None, _kill_quietly, self.cgroup)
            except RuntimeError:  # no loop: the worker is going down; the machine's end kills it
                pass

    async def _end_processes(self) -> None:
        """Every process of the job, gone: else its user is not given to another job, and the
        attempt fails saying so."""
        if self.cgroup is not None and not await asyncio.to_thread(_kill_quietly, self.cgroup):
            self._leftovers = True
            raise RuntimeError("the job's processes could not all be ended (its cgroup could not be killed)")

    async def _clean_up(self) -> None:
        if self.checkpoints is not None:
            await self.checkpoints.idle()  # a notice checkpoint's upload and validation end first
        hook_close = getattr(self.checkpointer, "close", None)
        if hook_close is not None:
            await hook_close()
        if self.cgroup is not None:
            cgroup, self.cgroup = self.cgroup, None
            await asyncio.to_thread(_remove_quietly, cgroup)
        if self.identity is not None and not self._leftovers:
            await asyncio.to_thread(self.identity.release)
        elif self.identity is not None:
            self.log.error("job_user.kept", user=self.identity.name, reason="processes of the job may live on")

    # --- the end ------------------------------------------------------------------------------
    async def _finish(self, ctx: JobContext, code: int) -> None:
        crash_point("worker-job-exited")
        if self.checkpoints is not None:
            await self.checkpoints.reported()
        limit_hit = self._limit_hit or self._cgroup_limit_hit()
        try:
            missing = await asyncio.to_thread(self._upload_outputs, ctx)
        except Exception as exc:  # retried within the blob store's budget already
            await self._fail(code, f"the job ended (exit code {code}) but its output could not be uploaded: {exc}")
            return
        await self._upload_logs_quietly()
        if code == 0 and limit_hit is None:
            self.log.info("job.done", missing_outputs=missing)
            await self._report_end(MessageType.JOB_DONE, JobDone(
                job_id=self.job_id, attempt=self.start.attempt, exit_code=0, missing_outputs=missing))
            self.phase = "done"
        else:
            reason = f"exited with code {code}" if code > 0 else f"killed by signal {-code}"
            await self._fail(code, f"{reason}: {limit_hit}" if limit_hit else reason)

    def _cgroup_limit_hit(self) -> str | None:
        hits = self.cgroup.limit_hit() if self.cgroup is not None else []
        described = {"memory": f"MemoryLimit ({self.description.memory_limit} MiB) reached",
                     "processes": f"MaxProcesses ({self.description.max_processes}) reached"}
        return "; ".join(described.get(hit, hit) for hit in hits) or None

    def _upload_outputs(self, ctx: JobContext) -> list[str]:
        """The OutputSandbox, read through descriptors from the job's folder (never by a path a
        job process that somehow lives on could turn into a link)."""
        archive = self.layout.scratch / "output.tar.zst"
        missing = pack_beneath(ctx.workdir, self.description.output_sandbox, archive)
        if archive.exists():
            self.blobs.put_file(f"jobs/{self.job_id}/output.tar.zst", archive)
        return missing


def _default_memory_limit() -> int:
    """Without MemoryLimit a job may use 90% of the machine's memory: the worker survives an OOM."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.9)


def _kill_quietly(cgroup: Cgroup) -> bool:
    try:
        cgroup.kill()
        return True
    except Exception as exc:  # the machine's terminate tries again with the names on its disk
        log.warning("cgroup.kill_failed", error=str(exc))
        return False


def _remove_quietly(cgroup: cgroups.JobCgroup) -> None:
    _kill_quietly(cgroup)
    try:
        cgroup.remove()
    except OSError as exc:
        log.warning("cgroup.remove_failed", error=str(exc))

