"""`signal`: the worker signals the job (SIGUSR1), the job saves its own state.

The job writes its state into $CBAS_CHECKPOINT_DIR and then creates $CBAS_CHECKPOINT_DIR/.done
(and goes on), or exits with code 85 once the state is written (the worker starts it again).
The worker saves that folder. On restart the folder is restored before the job starts, and
CBAS_RESTORED=1 is set.
"""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from cbas.checkpoint.base import CheckpointFailed, JobContext, JobProcess, strategy

DONE_MARKER = ".done"
CHECKPOINT_EXIT_CODE = 85


class SignalCheckpointer:
    name = "signal"
    exclude = frozenset({DONE_MARKER})
    immutable: frozenset[str] = frozenset()

    def __init__(self, sig: int = signal.SIGUSR1, timeout: float = 60.0, poll: float = 0.05) -> None:
        self.sig = sig
        self.timeout = timeout
        self.poll = poll

    def state_dir(self, ctx: JobContext) -> Path:
        return ctx.checkpoint_dir

    async def start(self, ctx: JobContext, argv: list[str]) -> JobProcess:
        return await ctx.spawn(argv)

    @asynccontextmanager
    async def quiesced(self, ctx: JobContext, job: JobProcess) -> AsyncIterator[None]:
        done = ctx.checkpoint_dir / DONE_MARKER
        done.unlink(missing_ok=True)
        try:
            job.process.send_signal(self.sig)
        except ProcessLookupError:
            raise CheckpointFailed("the job exited before it could be signalled") from None
        deadline = time.monotonic() + self.timeout
        while not done.exists():
            code = job.process.returncode
            if code == CHECKPOINT_EXIT_CODE:
                break
            if code is not None:
                raise CheckpointFailed(f"the job exited with {code} instead of checkpointing")
            if time.monotonic() > deadline:
                raise CheckpointFailed(f"the job did not write {DONE_MARKER} within {self.timeout:.0f}s of the signal")
            await asyncio.sleep(self.poll)
        try:
            yield
        finally:
            done.unlink(missing_ok=True)


strategy("signal")(SignalCheckpointer)
