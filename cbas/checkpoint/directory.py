"""`directory`: the job keeps its state in its working directory; the worker archives it.

The job's process group is stopped (SIGSTOP) while the archive is written, so the files are
consistent with each other, then continued (SIGCONT).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from cbas.archive import pack_directory, unpack
from cbas.checkpoint.base import Capture, JobContext, JobProcess, strategy


class DirectoryCheckpointer:
    name = "directory"

    async def start(self, ctx: JobContext, argv: list[str]) -> JobProcess:
        return await ctx.spawn(argv)

    async def capture(self, ctx: JobContext, job: JobProcess, archive: Path) -> Capture:
        started = time.monotonic()
        job.signal_group(signal.SIGSTOP)
        try:
            stdout, stderr = ctx.log_sizes()
            await asyncio.to_thread(pack_directory, ctx.workdir, archive)
        finally:
            job.signal_group(signal.SIGCONT)
        return Capture(time.monotonic() - started, stdout, stderr)

    def restore(self, ctx: JobContext, archive: Path) -> None:
        unpack(archive, ctx.workdir)


strategy("directory")(DirectoryCheckpointer)
