"""ValidateCheckpoint: a checkpoint counts only once it has been restored as a new machine would.

Every strategy: the checkpoint is read back from the blob store into the worker's scratch space
(out of the job's reach), every chunk verified, as a restart would. `dmtcp` further restarts the
images there, as the job's user, and stops them right after they resume: in a mount namespace
of its own, the scratch job folder is bound over the live one, so the restarted program (which
reopens its files and working folder by their old paths) sees only scratch copies; the hook
holds it at DMTCP's RESTART event, before its threads run again, and the worker then kills it.
Without root (no namespace) a dmtcp restart cannot be kept off the live files: only the restore
is checked, and the worker says so once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from typing import Callable

import structlog

from cbas.checkpoint.base import Cgroup, Checkpointer, JobContext
from cbas.checkpoint.dmtcp import IMAGE_PATTERN, IMAGES, Coordinator, DmtcpCheckpointer, HookServer, dmtcp_environment
from cbas.checkpoint.store import ChunkStore, CorruptCheckpoint
from cbas.untrusted import chown_tree, read_job_file, tail
from cbas.worker.job_files import JobLayout

log = structlog.get_logger(__name__)

# after the bind mount, as the job: the live paths now lead into the scratch copy
_ISOLATED = ('mount --bind "$1" "$2" || exit 112; cd "$2/work" || exit 113; uid=$3; gid=$4; shift 4; '
             'exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"')
_warned_unisolated = False


class Validator:
    def __init__(self, layout: JobLayout, ctx: JobContext, checkpointer: Checkpointer,
                 open_store: Callable[[], ChunkStore], make_cgroup: Callable[[str], Cgroup | None],
                 timeout: float = 300.0) -> None:
        self.layout = layout
        self.ctx = ctx
        self.checkpointer = checkpointer
        self.open_store = open_store  # a store that remembers nothing: every chunk is read again
        self.make_cgroup = make_cgroup
        self.timeout = timeout

    async def __call__(self, checkpoint_id: str) -> str | None:
        """None if the checkpoint restores (and, for dmtcp, restarts); else what went wrong."""
        scratch = self.layout.validate / checkpoint_id
        scratch_layout = JobLayout(scratch)
        try:
            state = self.checkpointer.state_dir(self.ctx).relative_to(self.layout.root)
            await asyncio.to_thread(_lay_out, scratch_layout)
            try:
                await asyncio.to_thread(self.open_store().restore, checkpoint_id, scratch_layout.root / state)
            except CorruptCheckpoint as exc:
                return str(exc)
            if isinstance(self.checkpointer, DmtcpCheckpointer):
                return await self._restart(scratch_layout, checkpoint_id)
            return None
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)

    async def _restart(self, scratch: JobLayout, checkpoint_id: str) -> str | None:
        global _warned_unisolated
        images = sorted((scratch.work / IMAGES).glob(IMAGE_PATTERN))
        if not images:
            return "the checkpoint holds no DMTCP images"
        user = self.ctx.user
        if os.geteuid() != 0 or user is None or not (shutil.which("unshare") and shutil.which("setpriv")):
            if not _warned_unisolated:
                _warned_unisolated = True
                log.warning("validation.restore_only",
                            reason="restarting DMTCP images away from the live files needs a root worker with "
                                   "unshare and setpriv (util-linux)")
            return None
        checkpointer = self.checkpointer
        assert isinstance(checkpointer, DmtcpCheckpointer)
        await asyncio.to_thread(_give, scratch, user)
        live = self.layout
        hook = HookServer(scratch.hook / "hook.sock", user, answer_restarts=False) if checkpointer.hook else None
        if hook is not None:
            await hook.start()
        tmp = live.checkpoint / "dmtcp-tmp"
        restart = [checkpointer._tool("dmtcp_restart"), "--new-coordinator", "--coord-port", "0",
                   "--port-file", str(tmp / "coordinator.port"), "--ckptdir", str(live.work / IMAGES),
                   "--tmpdir", str(tmp), *(str(live.work / IMAGES / image.name) for image in images)]
        command = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _ISOLATED, "cbas-validate",
                   str(scratch.root), str(live.root), str(user[0]), str(user[1]), *restart]
        env = dmtcp_environment(self.ctx.env, live.hook / "hook.sock" if hook else None, checkpointer.signal_number)
        cgroup = self.make_cgroup("validate")
        sandbox = JobContext(job_id=self.ctx.job_id, workdir=scratch.root, checkpoint_dir=scratch.checkpoint,
                             stdout=scratch.stdout, stderr=scratch.stderr, env=env, user=None, cgroup=cgroup)
        process = await sandbox.spawn(command)
        try:
            return await self._resumed(process.process, hook, scratch, checkpoint_id)
        finally:
            process.kill()
            if cgroup is not None:
                await asyncio.to_thread(_end_cgroup, cgroup)
            if hook is not None:
                await hook.close()
            try:
                await asyncio.wait_for(process.process.wait(), 10)
            except TimeoutError:
                log.warning("validation.restart_lingers", checkpoint=checkpoint_id, pid=process.pgid)

    async def _resumed(self, process: asyncio.subprocess.Process, hook: HookServer | None, scratch: JobLayout,
                       checkpoint_id: str) -> str | None:
        """Until the images are restored (the hook's RESTART call, or the coordinator running)."""
        deadline = time.monotonic() + self.timeout
        coordinator: Coordinator | None = None
        while time.monotonic() < deadline:
            if hook is not None and hook.restarted.is_set():
                log.info("validation.restarted", checkpoint=checkpoint_id)
                return None
            if process.returncode is not None:
                return (f"dmtcp_restart of the images exited with code {process.returncode}: "
                        f"{tail(scratch.stderr, 5) or 'no output'}")
            if hook is None:
                coordinator = coordinator or _coordinator(self.checkpointer, scratch)
                if coordinator is not None and (await coordinator.status()).get("RUNNING") == "yes":
                    return None
            await asyncio.sleep(0.05)
        return f"the images did not restart within {self.timeout:.0f}s"


def _lay_out(scratch: JobLayout) -> None:
    shutil.rmtree(scratch.disk, ignore_errors=True)
    scratch.disk.mkdir(mode=0o700, parents=True)
    scratch.root.mkdir(mode=0o711)
    for path in (scratch.work, scratch.checkpoint, scratch.logs, scratch.hook):
        path.mkdir(mode=0o711)
    scratch.stdout.touch(0o600)
    scratch.stderr.touch(0o600)


def _give(scratch: JobLayout, user: tuple[int, int]) -> None:
    """The restored state is the job's, as it will be on a new machine."""
    for path in (scratch.work, scratch.checkpoint):
        os.chown(path, *user)
        path.chmod(0o700)
        chown_tree(path, user)
    (scratch.checkpoint / "dmtcp-tmp").mkdir(mode=0o700)
    os.chown(scratch.checkpoint / "dmtcp-tmp", *user)


def _coordinator(checkpointer: Checkpointer, scratch: JobLayout) -> Coordinator | None:
    try:
        text = read_job_file(scratch.checkpoint, "dmtcp-tmp/coordinator.port", limit=32).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    assert isinstance(checkpointer, DmtcpCheckpointer)
    return Coordinator(checkpointer._tool("dmtcp_command"), int(text))


def _end_cgroup(cgroup: Cgroup) -> None:
    cgroup.kill()
    remove = getattr(cgroup, "remove", None)
    if remove is not None:
        remove()
