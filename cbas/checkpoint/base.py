"""What every checkpoint strategy provides, and the registry that picks one by JDL name."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
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
    tag: str = ""  # the attempt's name on its machine (its cgroups and firewall rules carry it)

    def log_sizes(self) -> tuple[int, int]:
        return _size(self.stdout), _size(self.stderr)

    async def spawn(self, argv: list[str], env: dict[str, str] | None = None,
                    bind: tuple[Path, Path] | None = None) -> JobProcess:
        """Start argv as the job: its user, a new process group (not a new session: DMTCP cannot
        make a restarted session leader one again), its cgroup, the logs as stdout and stderr.
        A root worker starts it through cbas.worker.launch (root, an empty environment, in the
        cgroup before it runs anything, then the job's user and environment); `bind` gives it
        a mount namespace where bind[0] stands at bind[1]."""
        out, err = _open_log(self.stdout), _open_log(self.stderr)
        env = self.env if env is None else env
        launched = self.user is not None or self.cgroup is not None or bind is not None
        gate_read, gate_write = os.pipe() if launched else (subprocess.DEVNULL, -1)
        env_fd = _memfd_of(env) if launched else -1
        try:
            command = argv
            if launched:
                uid, gid = self.user or (os.geteuid(), os.getegid())
                command = [sys.executable, "-I", "-m", "cbas.worker.launch", "--uid", str(uid), "--gid", str(gid),
                           "--cwd", str(bind[1] / self.workdir.relative_to(bind[0]) if bind else self.workdir),
                           "--env-fd", str(env_fd), *(["--bind", f"{bind[0]}:{bind[1]}"] if bind else []), "--", *argv]
            process = await asyncio.create_subprocess_exec(
                *command, cwd="/" if launched else self.workdir, env=_ROOT_ENV if launched else env,
                stdin=gate_read, stdout=out, stderr=err, process_group=0,
                pass_fds=(env_fd,) if launched else (),
            )
        finally:
            for fd in (out, err, env_fd, gate_read):
                if fd >= 0 and fd != subprocess.DEVNULL:
                    os.close(fd)
        if launched:
            try:
                if self.cgroup is not None:
                    await asyncio.to_thread(self.cgroup.add, process.pid)
                os.write(gate_write, b"go\n")
            except OSError as exc:
                process.kill()
                raise CheckpointFailed(f"the job's process could not join its cgroup: {exc}") from exc
            finally:
                os.close(gate_write)
        self.on_spawn(process.pid)
        return JobProcess(process, self.cgroup)


# what a root launcher runs with: nothing of the job's, nothing of the worker's
_ROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _memfd_of(env: dict[str, str]) -> int:
    """The job's environment in an anonymous file the launcher reads (no command line shows it)."""
    fd = os.memfd_create("cbas-job-env")  # close-on-exec: only the launcher gets it (pass_fds)
    os.write(fd, json.dumps(list(env.items())).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class Checkpointer(Protocol):
    name: str
    # fnmatch patterns of paths, relative to the state folder, that are not state
    exclude: frozenset[str]
    # patterns of files never changed in place once written (DMTCP's images): only opened while
    # the job is held, and read through that descriptor after it goes on, so the job pauses only
    # for the open
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
