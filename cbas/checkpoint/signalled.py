"""`signal`: the worker signals the job (SIGUSR1), the job saves its own state.

The job writes its state into $CBAS_CHECKPOINT_DIR and then creates $CBAS_CHECKPOINT_DIR/.done
(and goes on), or exits with code 85 once the state is written (the worker starts it again).
The worker archives that directory. On restart the directory is restored before the job starts,
and CBAS_RESTORED=1 is set.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from cbas.archive import pack_directory, unpack
from cbas.checkpoint.base import Capture, CheckpointFailed, JobContext, JobProcess, strategy

DONE_MARKER = ".done"
CHECKPOINT_EXIT_CODE = 85


class SignalCheckpointer:
    name = "signal"

    def __init__(self, sig: int = signal.SIGUSR1, timeout: float = 60.0, poll: float = 0.05) -> None:
        self.sig = sig
        self.timeout = timeout
        self.poll = poll

    async def start(self, ctx: JobContext, argv: list[str]) -> JobProcess:
        return await ctx.spawn(argv)

    async def capture(self, ctx: JobContext, job: JobProcess, archive: Path) -> Capture:
        done = ctx.checkpoint_dir / DONE_MARKER
        done.unlink(missing_ok=True)
        started = time.monotonic()
        try:
            job.process.send_signal(self.sig)
        except ProcessLookupError:
            raise CheckpointFailed("the job exited before it could be signalled") from None
        deadline = started + self.timeout
        while not done.exists():
            if job.process.returncode is not None and job.process.returncode != CHECKPOINT_EXIT_CODE:
                raise CheckpointFailed(f"the job exited with {job.process.returncode} instead of checkpointing")
            if job.process.returncode == CHECKPOINT_EXIT_CODE:
                break
            if time.monotonic() > deadline:
                raise CheckpointFailed(f"the job did not write {DONE_MARKER} within {self.timeout:.0f}s of the signal")
            await asyncio.sleep(self.poll)
        pause = time.monotonic() - started
        stdout, stderr = ctx.log_sizes()
        await asyncio.to_thread(pack_directory, ctx.checkpoint_dir, archive, frozenset({DONE_MARKER}))
        done.unlink(missing_ok=True)
        return Capture(pause, stdout, stderr)

    def restore(self, ctx: JobContext, archive: Path) -> None:
        unpack(archive, ctx.checkpoint_dir)


strategy("signal")(SignalCheckpointer)
