"""ValidateCheckpoint: a checkpoint counts only once it has been restored as a new machine would.

Every strategy: the checkpoint is read back from the blob store into the worker's scratch space
(out of the job's reach), every chunk verified, as a restart would. `dmtcp` further restarts the
images there, as the job's user, and stops them right after they resume: in a mount namespace
of its own, the scratch job folder is bound over the live one, so the restarted program (which
reopens its files and working folder by their old paths) sees only scratch copies; the hook
holds it at DMTCP's RESTART event, before its threads run again, and the worker then kills it
(its own cgroup, all of it).
Without root and cgroups (no namespace, nothing to end it by), or when the images would not fit in
the memory left beside the live program, only the restore is checked, and the worker says so once.
The restart runs with nothing of the job's environment (the restored program has its own).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable

import structlog

from cbas.checkpoint.base import Cgroup, Checkpointer, JobContext
from cbas.checkpoint.dmtcp import IMAGE_PATTERN, IMAGES, Coordinator, DmtcpCheckpointer, HookServer, dmtcp_environment
from cbas.checkpoint.store import ChunkStore, CorruptCheckpoint
from cbas.logs import say_once
from cbas.untrusted import remove_tree, read_job_file, tail
from cbas.worker.job_files import JobLayout, lay_out, secure

log = structlog.get_logger(__name__)

def _available_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


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

    async def __call__(self, checkpoint_id: str, deadline: float | None = None) -> str | None:
        """None if the checkpoint restores (and, for dmtcp, restarts); else what went wrong. A
        notice checkpoint's validation ends before its machine does (`deadline`, unix time)."""
        budget = self.timeout if deadline is None else max(1.0, min(self.timeout, deadline - time.time() - 5.0))
        scratch = self.layout.validate / checkpoint_id
        scratch_layout = JobLayout(scratch)
        try:
            state = self.checkpointer.state_dir(self.ctx).relative_to(self.layout.root)
            await asyncio.to_thread(lay_out, scratch_layout, None)  # as a new machine's, in the worker's space
            try:
                await asyncio.to_thread(self.open_store().restore, checkpoint_id, scratch_layout.root / state)
            except CorruptCheckpoint as exc:
                return str(exc)
            if isinstance(self.checkpointer, DmtcpCheckpointer):
                return await self._restart(scratch_layout, checkpoint_id, budget)
            return None
        finally:
            await asyncio.to_thread(remove_tree, scratch)

    async def _restart(self, scratch: JobLayout, checkpoint_id: str, budget: float) -> str | None:
        images = sorted((scratch.work / IMAGES).glob(IMAGE_PATTERN))
        if not images:
            return "the checkpoint holds no DMTCP images"
        user = self.ctx.user
        checkpointer = self.checkpointer
        assert isinstance(checkpointer, DmtcpCheckpointer)
        size = sum(image.stat().st_size for image in images)
        cgroup = await asyncio.to_thread(self.make_cgroup, "validate") if os.geteuid() == 0 and user else None
        if cgroup is None:  # no namespace, or nothing to end it by: never run it beside the live job
            say_once(log, "validation.restore_only", reason="restarting DMTCP images away from the live files needs a "
                      "root worker that can make cgroups: only the restore is checked")
            return None
        if size > 0.8 * _available_memory():  # a second copy of the program must not starve the first
            await asyncio.to_thread(_end_cgroup, cgroup)
            say_once(log, "validation.too_big", images=size,
                      reason="the images do not fit in the memory left: only the restore is checked")
            return None
        await asyncio.to_thread(_give, scratch, user)  # the state is the job's, as on a new machine
        live = self.layout
        hook = HookServer(scratch.hook / "hook.sock", user, answer_restarts=False) if checkpointer.hook else None
        if hook is not None:
            await hook.start()
        tmp = live.checkpoint / "dmtcp-tmp"
        restart = [checkpointer._tool("dmtcp_restart"), "--new-coordinator", "--coord-port", "0",
                   "--port-file", str(tmp / "coordinator.port"), "--ckptdir", str(live.work / IMAGES),
                   "--tmpdir", str(tmp), *(str(live.work / IMAGES / image.name) for image in images)]
        # nothing of the job's environment: the restored program has its own, from the image
        env = dmtcp_environment({"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                                live.hook / "hook.sock" if hook else None, checkpointer.signal_number)
        sandbox = JobContext(job_id=self.ctx.job_id, workdir=scratch.work, checkpoint_dir=scratch.checkpoint,
                             stdout=scratch.stdout, stderr=scratch.stderr, env=env, user=user, cgroup=cgroup)
        process = await sandbox.spawn(restart, bind=(scratch.root, live.root))
        try:
            return await self._resumed(process.process, hook, scratch, checkpoint_id, budget)
        finally:
            process.kill()
            await asyncio.to_thread(_end_cgroup, cgroup)
            if hook is not None:
                await hook.close()
            try:
                await asyncio.wait_for(process.process.wait(), 10)
            except TimeoutError:
                log.warning("validation.restart_lingers", checkpoint=checkpoint_id, pid=process.pgid)

    async def _resumed(self, process: asyncio.subprocess.Process, hook: HookServer | None, scratch: JobLayout,
                       checkpoint_id: str, budget: float) -> str | None:
        """Until the images are restored (the hook's RESTART call, or the coordinator running)."""
        deadline = time.monotonic() + budget
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
        return f"the images did not restart within {budget:.0f}s"


def _give(scratch: JobLayout, user: tuple[int, int]) -> None:
    secure(scratch, user)
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
