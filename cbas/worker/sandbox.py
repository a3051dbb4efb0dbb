"""What a job starts from on this machine: its sandboxes unpacked, its state restored from the
newest usable checkpoint, its environment, its prologue and its command line.

Everything here is done by the root worker in folders the job cannot change yet (cbas.worker.
job_files); the job's user gets its folders only through `secure`, once they are laid out.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from cbas import jdl
from cbas.archive import ArchiveError, unpack
from cbas.backends import BlobNotFound, BlobStore, VolumeSnapshots
from cbas.checkpoint.base import Checkpointer, JobContext
from cbas.checkpoint.store import ChunkStore, CorruptCheckpoint, Manifest
from cbas.messages import StartJob
from cbas.untrusted import UnsafePath, make_executable
from cbas.worker.checkpoints import VOLUME_MARKER
from cbas.worker.job_files import JobLayout, lay_out, secure


class PrepareFailed(RuntimeError):
    pass


@dataclass
class Sandbox:
    layout: JobLayout
    start: StartJob
    description: jdl.JobDescription
    blobs: BlobStore
    store: ChunkStore
    volumes: VolumeSnapshots | None
    cache_dir: Path
    log: structlog.stdlib.BoundLogger
    bad_checkpoints: list[str] = field(default_factory=list)  # failed verification on restore

    @property
    def job_id(self) -> str:
        return self.start.job_id

    def lay_out(self, user: tuple[int, int] | None) -> None:
        """Fresh folders with the input and prologue archives unpacked (at most DiskLimit)."""
        lay_out(self.layout, None)
        self.cache_dir.mkdir(mode=0o711, exist_ok=True)
        limit = self.description.disk_limit_bytes()
        for name, target in (("input", self.layout.work), ("prologue", self.layout.prologue)):
            key = f"jobs/{self.job_id}/{name}.tar.zst"
            try:
                if not self.blobs.exists(key):
                    continue
            except Exception as exc:
                raise PrepareFailed(f"the blob store cannot be reached for the {name} sandbox: {exc}") from None
            archive = self.layout.scratch / f"{name}.tar.zst"
            try:
                self.blobs.get_file(key, archive)
            except BlobNotFound:
                raise
            except Exception as exc:  # retried within the blob store's budget already
                raise PrepareFailed(f"the {name} sandbox could not be downloaded: {exc}") from None
            try:
                unpack(archive, target, **({"max_bytes": limit} if limit else {}))
            except ArchiveError as exc:
                raise PrepareFailed(f"the {name} sandbox cannot be unpacked: {exc}") from None
            archive.unlink()
        secure(self.layout, user)

    def checkpoint_on_volume(self) -> str | None:
        """Volume storage: the checkpoint this machine's disk was made from, if it is one to use."""
        if self.volumes is None or not self.start.checkpoints:
            return None
        try:
            marker = self.layout.root / VOLUME_MARKER
            found = marker.read_text().strip() if marker.is_file() and not marker.is_symlink() else ""
        except OSError:
            found = ""
        if found in self.start.checkpoints:
            return found
        self.log.warning("checkpoint.volume_mismatch", disk_has=found or None, wanted=self.start.checkpoints[0])
        return None

    def restore(self, checkpointer: Checkpointer, ctx: JobContext, user: tuple[int, int] | None) -> str | None:
        """The newest of the master's checkpoints that verifies, put in place; its id, or None."""
        if self.volumes is not None:
            return None  # volume checkpoints come with the disk, never from the blob store
        for checkpoint_id in self.start.checkpoints:
            try:
                manifest = self.store.restore(checkpoint_id, checkpointer.state_dir(ctx))
            except CorruptCheckpoint as exc:
                self.log.warning("checkpoint.unusable", checkpoint=checkpoint_id, error=str(exc))
                self.bad_checkpoints.append(checkpoint_id)
                self.lay_out(user)  # undo a partial restore before trying an older one
                continue
            self._restore_logs(manifest)
            secure(self.layout, user)
            self.log.info("checkpoint.restored", checkpoint=checkpoint_id, bytes=manifest.total_bytes)
            return checkpoint_id
        if self.start.checkpoints:
            self.log.warning("checkpoint.none_usable", tried=self.start.checkpoints)
        return None

    def _restore_logs(self, manifest: Manifest) -> None:
        for path, length in ((self.layout.stdout, manifest.stdout_bytes), (self.layout.stderr, manifest.stderr_bytes)):
            try:
                data = self.blobs.get_bytes(f"jobs/{self.job_id}/logs/{path.name}")
            except BlobNotFound:
                data = b""
            path.write_bytes(data[:length])

    def environment(self, ctx: JobContext, user_name: str, restored: bool) -> dict[str, str]:
        # a clean environment: nothing of the worker's (credentials included) leaks into the job
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(ctx.workdir),
            "USER": user_name,
            "LOGNAME": user_name,
            "LANG": "C.UTF-8",
            "CBAS_JOB_ID": self.job_id,
            "CBAS_ATTEMPT": str(self.start.attempt),
            "CBAS_CHECKPOINT_DIR": str(ctx.checkpoint_dir),
            "CBAS_RESTORED": "1" if restored else "0",
            **self.description.environment,
        }

    async def run_prologue(self, ctx: JobContext) -> None:
        for name in self.description.prologue:
            script = self.layout.prologue / Path(name).name  # the worker's folder: unpacked by it
            if not script.is_file():
                raise PrepareFailed(f"prologue script {name} is missing from the sandbox")
            script.chmod(0o755)
            process = await ctx.spawn([str(script)] if script.read_bytes()[:2] == b"#!" else ["/bin/sh", str(script)])
            code = await process.process.wait()
            if code != 0:
                raise PrepareFailed(f"prologue {name} exited with code {code}")

    def argv(self, ctx: JobContext) -> list[str]:
        executable = self.description.executable
        try:
            arguments = shlex.split(self.description.arguments)
        except ValueError as exc:
            raise PrepareFailed(f"Arguments cannot be split: {exc}") from None
        if not os.path.isabs(executable):
            try:
                if make_executable(ctx.workdir, executable):  # never a link the prologue made
                    return [f"./{executable}", *arguments]
            except UnsafePath:
                pass
        found = shutil.which(executable, path=ctx.env["PATH"])
        if found is None:
            raise PrepareFailed(f"Executable {executable!r} is neither in the input sandbox nor on the PATH")
        return [found, *arguments]
