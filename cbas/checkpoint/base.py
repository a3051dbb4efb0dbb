"""What every checkpoint strategy provides, and the registry that picks one by JDL name."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncContextManager, Callable, Protocol


class CheckpointFailed(RuntimeError):
    pass


class Cgroup(Protocol):
    """What the strategies need of the job's cgroup (cbas.worker.cgroups.JobCgroup)."""

    def add(self, pid: int) -> None: ...
    def pids(self) -> set[int]: ...
    def freeze(self, timeout: float = 10.0) -> None: ...
    def thaw(self) -> None: ...
    def kill(self, timeout: float = 10.0) -> None: ...


# The job's first process waits on its stdin until the worker has put it in the job's cgroup,
# so nothing it starts can run outside it; then it becomes the program (the same pid).
_GATE = ["/bin/sh", "-c", 'read -r _ || exit 111; exec "$@" </dev/null', "cbas-gate"]


@dataclass
class JobProcess:
    """A process the job started: in its own process group, and in the job's cgroup where the
    machine allows one (then nothing it starts escapes a freeze or a kill)."""

    process: asyncio.subprocess.Process
    cgroup: Cgroup | None = None

    @property
    def pgid(self) -> int:
        return self.process.pid

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the process group now; the cgroup's kill (which waits) is JobRun's to await."""
        self.signal_group(signal.SIGKILL)


def _open_log(path: Path) -> int:
    # the logs folder is the worker's; O_NOFOLLOW all the same, the job must never choose the file
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


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
    hook_dir: Path | None = None  # a folder the job can reach but not change (the DMTCP hook's socket)
    scratch_dir: Path | None = None  # the worker's own scratch space, out of the job's reach
    cgroup: Cgroup | None = None

    def log_sizes(self) -> tuple[int, int]:
        return _size(self.stdout), _size(self.stderr)

    async def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> JobProcess:
        """Start argv as the job: its user, a new process group (not a new session: DMTCP cannot
        make a restarted session leader one again), its cgroup, the logs as stdout and stderr."""
        out, err = _open_log(self.stdout), _open_log(self.stderr)
        gate_read, gate_write = os.pipe() if self.cgroup is not None else (subprocess.DEVNULL, -1)
        try:
            process = await asyncio.create_subprocess_exec(
                *(_GATE + argv if self.cgroup is not None else argv), cwd=self.workdir,
                env=self.env if env is None else env, stdin=gate_read, stdout=out, stderr=err, process_group=0,
                user=self.user[0] if self.user else None,
                group=self.user[1] if self.user else None,
                extra_groups=[] if self.user else None,
            )
        finally:
            os.close(out)
            os.close(err)
            if gate_read != subprocess.DEVNULL:
                os.close(gate_read)
        if self.cgroup is not None:
            try:
                await asyncio.to_thread(self.cgroup.add, process.pid)
                os.write(gate_write, b"go\n")
            except OSError as exc:
                process.kill()
                raise CheckpointFailed(f"the job's process could not join its cgroup: {exc}") from exc
            finally:
                os.close(gate_write)
        self.on_spawn(process.pid)
        return JobProcess(process, self.cgroup)


class Checkpointer(Protocol):
    name: str
    # fnmatch patterns of paths, relative to the state folder, that are not state
    exclude: frozenset[str]
    # patterns of files never changed in place once written (DMTCP's images): taken by a hard link
    # while the job is held, and read after it goes on, so the job pauses only for the link
    immutable: frozenset[str]

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


def checkpointer_for(name: str, signal_timeout: float = 60.0, dmtcp_signal: int | None = None) -> Checkpointer:
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
    if isinstance(checkpointer, dmtcp.DmtcpCheckpointer) and dmtcp_signal is not None:
        checkpointer.signal_number = dmtcp_signal
    return checkpointer
