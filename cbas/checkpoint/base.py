"""What every checkpoint strategy provides, and the registry that picks one by JDL name."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncContextManager, Callable, Protocol


class CheckpointFailed(RuntimeError):
    pass


@dataclass
class JobProcess:
    """The running executable: its own process group, so it can be paused and killed whole."""

    process: asyncio.subprocess.Process

    @property
    def pgid(self) -> int:
        return self.process.pid

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)


@dataclass
class JobContext:
    """Where a job lives on its machine and how its processes are started."""

    job_id: str
    workdir: Path  # the executable's working directory: sandbox and (directory strategy) state
    checkpoint_dir: Path  # $CBAS_CHECKPOINT_DIR for the signal strategy
    stdout: Path
    stderr: Path
    env: dict[str, str]
    user: tuple[int, int] | None  # (uid, gid) to drop to, or None to stay who we are
    on_spawn: Callable[[int], None] = lambda pgid: None  # records process groups for the cloud
    cache_dir: Path | None = None  # survives the job's attempts on this machine (built helpers)

    def log_sizes(self) -> tuple[int, int]:
        return _size(self.stdout), _size(self.stderr)

    async def spawn(self, argv: list[str]) -> JobProcess:
        with open(self.stdout, "ab") as out, open(self.stderr, "ab") as err:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=self.workdir, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True,
                user=self.user[0] if self.user else None,
                group=self.user[1] if self.user else None,
                extra_groups=[] if self.user else None,
            )
        self.on_spawn(process.pid)
        return JobProcess(process)


class Checkpointer(Protocol):
    name: str
    exclude: frozenset[str]  # names at the top of the state folder that are not state

    def state_dir(self, ctx: JobContext) -> Path:
        """The folder that holds the job's state: what a checkpoint saves and a restore fills."""
        ...

    async def start(self, ctx: JobContext, argv: list[str]) -> JobProcess:
        """Start the executable (fresh, or on state a restore put back in place)."""
        ...

    def quiesced(self, ctx: JobContext, job: JobProcess) -> AsyncContextManager[None]:
        """Inside this context the state folder is consistent and may be read."""
        ...


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


STRATEGIES: dict[str, Callable[[], Checkpointer]] = {}


def strategy(name: str) -> Callable[[Callable[[], Checkpointer]], Callable[[], Checkpointer]]:
    def register(factory: Callable[[], Checkpointer]) -> Callable[[], Checkpointer]:
        STRATEGIES[name] = factory
        return factory

    return register


def checkpointer_for(name: str, signal_timeout: float = 60.0) -> Checkpointer:
    # the strategies register themselves on import
    from cbas.checkpoint import directory, dmtcp  # noqa: F401
    from cbas.checkpoint.signalled import SignalCheckpointer

    if name not in STRATEGIES:
        raise CheckpointFailed(
            f"checkpoint strategy {name!r} is not available on this backend (available: {', '.join(sorted(STRATEGIES))})"
        )
    checkpointer = STRATEGIES[name]()
    if isinstance(checkpointer, SignalCheckpointer):
        checkpointer.timeout = signal_timeout
    return checkpointer
