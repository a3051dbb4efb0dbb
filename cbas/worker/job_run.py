"""One attempt of one job on this machine: prepare, restore, run under a checkpointer, report.

    disk/job/work        the executable's working directory (input sandbox unpacked here)
    disk/job/checkpoint  $CBAS_CHECKPOINT_DIR (signal strategy)
    disk/job/prologue    the prologue scripts
    disk/job/stdout, stderr
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import shutil
import time
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from cbas import jdl
from cbas.archive import ArchiveError, Member, pack, unpack
from cbas.backends import BlobNotFound, BlobStore, VolumeSnapshots
from cbas.checkpoint.base import CheckpointFailed, JobContext, JobProcess, checkpointer_for
from cbas.checkpoint.signalled import CHECKPOINT_EXIT_CODE
from cbas.checkpoint.store import ChunkStore, CorruptCheckpoint, Manifest, Snapshot
from cbas.faults import crash_point
from cbas.messages import (
    MASTER, CheckpointDone, Envelope, JobDone, JobFailed, MessageType, StartJob, envelope, worker_address,
)
from cbas.settings import Settings

log = structlog.get_logger(__name__)

STDERR_TAIL_LINES = 20
VOLUME_MARKER = ".cbas-checkpoint"  # volume strategy: names the checkpoint a disk was snapshotted at
Deliver = Callable[[Envelope], Awaitable[bool]]


class PrepareFailed(RuntimeError):
    pass


def job_user(settings: Settings) -> tuple[int, int] | None:
    """Jobs never run as root: a root worker drops to settings.job_user."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(settings.job_user)
    except KeyError:
        raise PrepareFailed(f"job user {settings.job_user!r} does not exist on this machine") from None
    if entry.pw_uid == 0:
        raise PrepareFailed(f"job user {settings.job_user!r} is root; jobs never run as root")
    return entry.pw_uid, entry.pw_gid


def chown_tree(root: Path, user: tuple[int, int]) -> None:
    os.chown(root, *user)
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(base, name), *user, follow_symlinks=False)


def tree_size(root: Path) -> int:
    return sum(entry.stat(follow_symlinks=False).st_size for entry in root.rglob("*") if not entry.is_symlink())


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64 * 1024))
            return b"\n".join(handle.read().splitlines()[-lines:]).decode(errors="replace")
    except FileNotFoundError:
        return ""


class JobRun:
    def __init__(
        self, settings: Settings, instance_id: str, disk: Path, blobs: BlobStore, start: StartJob, deliver: Deliver,
        volumes: VolumeSnapshots | None = None,
    ) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.blobs = blobs
        self.start = start
        self.deliver = deliver
        self.description = jdl.parse(start.jdl)
        self.checkpointer = checkpointer_for(self.description.checkpoint_strategy, settings.signal_checkpoint_timeout)
        self.store = ChunkStore(blobs, start.job_id)
        self.volumes = volumes if self.description.checkpoint_strategy == "volume" else None
        self.root = disk / "job"
        self.pgids_file = disk / "job-pgids"
        self.cache_dir = disk / "cache"  # kept across attempts on this machine
        self.phase = "starting"
        self.restored_from: str | None = None
        self.bad_checkpoints: list[str] = []
        self.stopping = False
        self.process: JobProcess | None = None
        self._counter = 0
        self._checkpoint_lock = asyncio.Lock()
        self.log = log.bind(job_id=start.job_id, attempt=start.attempt)
        self.ctx: JobContext | None = None

    @property
    def job_id(self) -> str:
        return self.start.job_id

    def _message(self, type_: MessageType, body: object) -> Envelope:
        return envelope(type_, body, worker_address(self.instance_id), MASTER)  # type: ignore[arg-type]

    # --- the whole attempt ------------------------------------------------------------------
    async def run(self) -> None:
        try:
            ctx = await self._prepare()
            if self.stopping:
                return
            self.process = await self.checkpointer.start(ctx, self._argv(ctx))
            self.phase = "running"
            self.log.info("job.started", pgid=self.process.pgid, restored_from=self.restored_from)
            crash_point("worker-job-started")
            helpers = [asyncio.create_task(self._checkpoint_timer()), asyncio.create_task(self._log_uploader())]
            try:
                code = await self._wait(ctx)
            finally:
                for task in helpers:
                    task.cancel()
            if self.stopping:
                return
            self.phase = "finishing"
            await self._finish(ctx, code)
        except PrepareFailed as exc:
            await self._fail(None, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # report, never die silently: the master would wait for pings
            self.log.exception("job.worker_error")
            await self._fail(None, f"worker error: {type(exc).__name__}: {exc}")
        finally:
            self.phase = "done"

    async def _fail(self, code: int | None, reason: str) -> None:
        if self.stopping:
            return
        self.phase = "finishing"
        tail = _tail(self.root / "stderr", STDERR_TAIL_LINES)
        await self._upload_logs_quietly()
        await self.deliver(self._message(MessageType.JOB_FAILED, JobFailed(
            job_id=self.job_id, attempt=self.start.attempt, exit_code=code, reason=reason, stderr_tail=tail)))
        self.phase = "done"

    # --- preparation ------------------------------------------------------------------------
    async def _prepare(self) -> JobContext:
        if self.description.checkpoint_strategy == "volume" and self.volumes is None:
            raise PrepareFailed("CheckpointStrategy \"volume\" needs a backend with disk snapshots (local or aws)")
        on_volume = self._checkpoint_on_volume()
        if on_volume is None:
            await asyncio.to_thread(self._lay_out_sandbox)
        user = job_user(self.settings)
        ctx = JobContext(
            job_id=self.job_id, workdir=self.root / "work", checkpoint_dir=self.root / "checkpoint",
            stdout=self.root / "stdout", stderr=self.root / "stderr", env={}, user=user, on_spawn=self._record_pgid,
            cache_dir=self.cache_dir,
        )
        self.ctx = ctx
        if on_volume is None:
            await asyncio.to_thread(self._restore, ctx)
        else:  # the disk was made from this checkpoint's snapshot: state and logs are in place
            self.restored_from = on_volume
            self.log.info("checkpoint.restored", checkpoint=on_volume, source="volume snapshot")
        ctx.env = self._environment(ctx)
        if user is not None:
            chown_tree(self.root, user)
        if self.start.prologue_in_image:
            self.log.info("prologue.in_image")  # the machine's image was built with it
        else:
            await self._run_prologue(ctx)
        return ctx

    def _lay_out_sandbox(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        for sub in ("work", "checkpoint", "prologue", "scratch"):
            (self.root / sub).mkdir(parents=True)
        (self.root / "stdout").touch()
        (self.root / "stderr").touch()
        self.root.chmod(0o711)
        self.cache_dir.mkdir(mode=0o711, exist_ok=True)
        for name, target in (("input", self.root / "work"), ("prologue", self.root / "prologue")):
            key = f"jobs/{self.job_id}/{name}.tar.zst"
            try:
                if not self.blobs.exists(key):
                    continue
            except Exception as exc:
                raise PrepareFailed(f"the blob store cannot be reached for the {name} sandbox: {exc}") from None
            archive = self.root / "scratch" / f"{name}.tar.zst"
            try:
                self.blobs.get_file(key, archive)
            except BlobNotFound:
                raise
            except Exception as exc:  # retried within the blob store's budget already
                raise PrepareFailed(f"the {name} sandbox could not be downloaded: {exc}") from None
            try:
                unpack(archive, target)
            except ArchiveError as exc:
                raise PrepareFailed(f"the {name} sandbox cannot be unpacked: {exc}") from None
            archive.unlink()

    def _checkpoint_on_volume(self) -> str | None:
        """Volume strategy: the checkpoint this machine's disk was made from, if it is one to use."""
        if self.volumes is None or not self.start.checkpoints:
            return None
        try:
            found = (self.root / VOLUME_MARKER).read_text().strip()
        except FileNotFoundError:
            found = ""
        if found in self.start.checkpoints:
            return found
        self.log.warning("checkpoint.volume_mismatch", disk_has=found or None, wanted=self.start.checkpoints[0])
        return None

    def _restore(self, ctx: JobContext) -> None:
        if self.volumes is not None:
            return  # volume checkpoints come with the disk, never from the blob store
        for checkpoint_id in self.start.checkpoints:
            try:
                manifest = self.store.restore(checkpoint_id, self.checkpointer.state_dir(ctx))
            except CorruptCheckpoint as exc:
                self.log.warning("checkpoint.unusable", checkpoint=checkpoint_id, error=str(exc))
                self.bad_checkpoints.append(checkpoint_id)
                self._lay_out_sandbox()  # undo a partial restore before trying an older one
                continue
            self._restore_logs(manifest)
            self.restored_from = checkpoint_id
            self.log.info("checkpoint.restored", checkpoint=checkpoint_id, bytes=manifest.total_bytes)
            return
        if self.start.checkpoints:
            self.log.warning("checkpoint.none_usable", tried=self.start.checkpoints)

    def _restore_logs(self, manifest: Manifest) -> None:
        for name, length in (("stdout", manifest.stdout_bytes), ("stderr", manifest.stderr_bytes)):
            try:
                data = self.blobs.get_bytes(f"jobs/{self.job_id}/logs/{name}")
            except BlobNotFound:
                data = b""
            (self.root / name).write_bytes(data[:length])

    def _environment(self, ctx: JobContext) -> dict[str, str]:
        # a clean environment: nothing of the worker's (credentials included) leaks into the job
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(ctx.workdir),
            "LANG": "C.UTF-8",
            "CBAS_JOB_ID": self.job_id,
            "CBAS_ATTEMPT": str(self.start.attempt),
            "CBAS_CHECKPOINT_DIR": str(ctx.checkpoint_dir),
            "CBAS_RESTORED": "1" if self.restored_from else "0",
            **self.description.environment,
        }

    async def _run_prologue(self, ctx: JobContext) -> None:
        for name in self.description.prologue:
            script = self.root / "prologue" / Path(name).name
            if not script.is_file():
                raise PrepareFailed(f"prologue script {name} is missing from the sandbox")
            script.chmod(0o755)
            process = await ctx.spawn([str(script)] if script.read_bytes()[:2] == b"#!" else ["/bin/sh", str(script)])
            code = await process.process.wait()
            if code != 0:
                raise PrepareFailed(f"prologue {name} exited with code {code}")

    def _argv(self, ctx: JobContext) -> list[str]:
        executable = self.description.executable
        try:
            arguments = shlex.split(self.description.arguments)
        except ValueError as exc:
            raise PrepareFailed(f"Arguments cannot be split: {exc}") from None
        local = ctx.workdir / executable
        if not os.path.isabs(executable) and local.is_file():
            local.chmod(local.stat().st_mode | 0o555)
            return [f"./{executable}", *arguments]
        found = shutil.which(executable, path=ctx.env["PATH"])
        if found is None:
            raise PrepareFailed(f"Executable {executable!r} is neither in the input sandbox nor on the PATH")
        return [found, *arguments]

    def _record_pgid(self, pgid: int) -> None:
        with open(self.pgids_file, "a") as out:
            out.write(f"{pgid}\n")

    # --- running ----------------------------------------------------------------------------
    async def _wait(self, ctx: JobContext) -> int:
        assert self.process is not None
        while True:
            code = await self.process.process.wait()
            async with self._checkpoint_lock:  # a checkpoint in progress ends before we judge
                pass
            if self.stopping or code != CHECKPOINT_EXIT_CODE or self.description.checkpoint_strategy != "signal":
                return code
            self.log.info("job.restarting_after_checkpoint_exit")
            ctx.env["CBAS_RESTORED"] = "1"
            self.process = await self.checkpointer.start(ctx, self._argv(ctx))

    async def _checkpoint_timer(self) -> None:
        while True:
            await asyncio.sleep(self.description.checkpoint_interval)
            await self.checkpoint("interval")

    async def _log_uploader(self) -> None:
        while True:
            await asyncio.sleep(self.settings.log_upload_interval)
            await self._upload_logs_quietly()

    async def _upload_logs_quietly(self) -> None:
        """Logs are uploaded again and again: one failed upload is only worth a warning."""
        try:
            await asyncio.to_thread(self._upload_logs)
        except Exception as exc:
            self.log.warning("logs.upload_failed", error=str(exc))

    def _upload_logs(self) -> None:
        for name in ("stdout", "stderr"):
            path = self.root / name
            if path.exists():
                self.blobs.put_file(f"jobs/{self.job_id}/logs/{name}", path)

    async def checkpoint(self, reason: str, final: bool = False, deadline: float | None = None) -> bool:
        """Quiesce and read the state, let the job go, upload (chunks then manifest), report.
        True once the checkpoint counts."""
        async with self._checkpoint_lock:
            process, ctx = self.process, self.ctx
            if process is None or ctx is None or self.phase != "running":
                return False
            if process.process.returncode is not None:
                return False
            self._counter += 1
            checkpoint_id = f"a{self.start.attempt:04d}-n{self._counter:05d}"
            started = time.monotonic()
            try:
                async with self.checkpointer.quiesced(ctx, process):
                    stdout, stderr = ctx.log_sizes()
                    if self.volumes is not None:
                        snapshot = await asyncio.to_thread(self._snapshot_volume, checkpoint_id)
                    else:
                        snapshot = await asyncio.to_thread(
                            self.store.snapshot, self.checkpointer.state_dir(ctx), self.root / "staging",
                            self.checkpointer.exclude)
            except Exception as exc:  # the strategy, the files or the blob store: this one does not count
                self.log.warning("checkpoint.failed", reason=reason, error=str(exc))
                return False
            pause = time.monotonic() - started
            if final:  # nothing the job does from now on would be kept
                self.stopping = True
                process.kill()
            started = time.monotonic()
            try:
                return await self._store_checkpoint(
                    checkpoint_id, snapshot, reason, final, deadline, stdout, stderr, pause, started)
            except Exception as exc:  # the blob store gave up: this checkpoint does not count
                self.log.warning("checkpoint.failed", checkpoint=checkpoint_id, reason=reason, error=str(exc))
                return False

    async def _store_checkpoint(self, checkpoint_id: str, snapshot: Snapshot | str, reason: str, final: bool,
                                deadline: float | None, stdout: int, stderr: int, pause: float, started: float) -> bool:
        """Upload (chunks, then the manifest that makes it a checkpoint) and report it."""
        await asyncio.to_thread(self._upload_logs)
        if isinstance(snapshot, str):
            await asyncio.to_thread(self.volumes.wait, snapshot)  # type: ignore[union-attr]
            size_bytes = new_bytes = await asyncio.to_thread(tree_size, self.root)
        else:
            manifest = await asyncio.to_thread(
                self.store.commit, snapshot, checkpoint_id, self.checkpointer.name, stdout, stderr)
            size_bytes, new_bytes = manifest.total_bytes, manifest.new_bytes
        upload = time.monotonic() - started
        crash_point("worker-checkpoint-uploaded")
        if self.description.validate_checkpoint and self.volumes is None \
                and not await asyncio.to_thread(self._validate, checkpoint_id):
            return False
        margin = None if deadline is None else deadline - time.time()
        self.log.info("checkpoint.uploaded", checkpoint=checkpoint_id, reason=reason, bytes=size_bytes,
                      new_bytes=new_bytes, pause=round(pause, 3), upload=round(upload, 3),
                      deadline_margin=None if margin is None else round(margin, 3))
        if margin is not None and margin < 0:
            self.log.error("checkpoint.missed_notice_deadline", checkpoint=checkpoint_id, late_by=round(-margin, 3))
        delivered = await self.deliver(self._message(MessageType.CHECKPOINT_DONE, CheckpointDone(
            job_id=self.job_id, attempt=self.start.attempt, checkpoint_id=checkpoint_id,
            manifest_key="" if isinstance(snapshot, str) else self.store.manifest_key(checkpoint_id),
            size_bytes=size_bytes, new_bytes=new_bytes, pause_seconds=pause,
            upload_seconds=upload, reason=reason, final=final, deadline_margin_seconds=margin,
            snapshot_id=snapshot if isinstance(snapshot, str) else None)))
        if delivered and not final and self.volumes is None:
            try:
                await asyncio.to_thread(self._collect_garbage)
            except Exception as exc:  # old checkpoints stay a while longer; the next pass retries
                self.log.warning("checkpoint.collect_failed", error=str(exc))
        return delivered

    def _snapshot_volume(self, checkpoint_id: str) -> str:
        assert self.volumes is not None
        (self.root / VOLUME_MARKER).write_text(checkpoint_id)
        os.sync()  # what the job wrote is on the disk before the snapshot's point in time
        try:
            return self.volumes.snapshot(self.job_id, checkpoint_id)
        except Exception as exc:
            raise CheckpointFailed(f"snapshot of the data disk failed: {exc}") from exc

    def _validate(self, checkpoint_id: str) -> bool:
        """Restore the checkpoint into a scratch folder, as a new machine would; False if it fails."""
        scratch = self.root / "validate"
        try:
            ChunkStore(self.blobs, self.job_id).restore(checkpoint_id, scratch)  # remembers nothing: reads every chunk
            return True
        except CorruptCheckpoint as exc:
            self.log.error("checkpoint.invalid", checkpoint=checkpoint_id, error=str(exc))
            return False
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _collect_garbage(self) -> None:
        dropped, chunks = self.store.collect_garbage(
            keep=self.settings.checkpoints_kept, protect=[self.restored_from] if self.restored_from else [])
        if dropped:
            self.log.info("checkpoint.collected", dropped=dropped, chunks=chunks)

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

    # --- the end ------------------------------------------------------------------------------
    async def _finish(self, ctx: JobContext, code: int) -> None:
        crash_point("worker-job-exited")
        try:
            missing = await asyncio.to_thread(self._upload_outputs, ctx)
        except Exception as exc:  # retried within the blob store's budget already
            await self._fail(code, f"the job ended (exit code {code}) but its output could not be uploaded: {exc}")
            return
        await self._upload_logs_quietly()
        if code == 0:
            self.log.info("job.done", missing_outputs=missing)
            await self.deliver(self._message(MessageType.JOB_DONE, JobDone(
                job_id=self.job_id, attempt=self.start.attempt, exit_code=0, missing_outputs=missing)))
            self.phase = "done"
        else:
            reason = f"exited with code {code}" if code > 0 else f"killed by signal {-code}"
            await self._fail(code, reason)

    def _upload_outputs(self, ctx: JobContext) -> list[str]:
        members, missing = [], []
        for name in self.description.output_sandbox:
            path = (ctx.workdir / name).resolve()
            inside = path == ctx.workdir.resolve() or ctx.workdir.resolve() in path.parents
            if not inside or not path.exists() or path.is_symlink():
                missing.append(name)
            else:
                members.append(Member(path, name))
        if members:
            archive = self.root / "scratch" / "output.tar.zst"
            pack(members, archive)
            self.blobs.put_file(f"jobs/{self.job_id}/output.tar.zst", archive)
        return missing
