"""`directory`: the job keeps its state in its working directory; the worker saves that folder.
`volume` holds the job still the same way while its disk is snapshotted.

The job is held still while the folder is read, so the files are consistent with each other:
frozen through its cgroup, which holds every process it started (a daemon that left its process
group included); where the machine gives no cgroups, its process group is stopped (SIGSTOP).
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from cbas.checkpoint.base import JobContext, JobProcess, strategy


class DirectoryCheckpointer:
    name = "directory"
    exclude: frozenset[str] = frozenset()
    immutable: frozenset[str] = frozenset()

    def state_dir(self, ctx: JobContext) -> Path:
        return ctx.workdir

    async def start(self, ctx: JobContext, argv: list[str]) -> JobProcess:
        return await ctx.spawn(argv)

    @asynccontextmanager
    async def quiesced(self, ctx: JobContext, job: JobProcess) -> AsyncIterator[None]:
        if job.cgroup is not None:
            await asyncio.to_thread(job.cgroup.freeze)
            try:
                yield
            finally:
                await asyncio.to_thread(job.cgroup.thaw)
            return
        job.signal_group(signal.SIGSTOP)
        try:
            yield
        finally:
            job.signal_group(signal.SIGCONT)


strategy("directory")(DirectoryCheckpointer)


class VolumeCheckpointer(DirectoryCheckpointer):
    """`volume`: the job's whole data disk is snapshotted while the job is held still (the
    worker takes the snapshot); a restart gets a disk made from it, state and logs in place."""

    name = "volume"


strategy("volume")(VolumeCheckpointer)
