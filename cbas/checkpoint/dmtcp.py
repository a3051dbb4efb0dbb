"""`dmtcp`: transparent checkpoints of unmodified programs with DMTCP (4.2 and 5.0 alike).

    dmtcp_launch  --new-coordinator --coord-port 0 --port-file F --ckptdir D --tmpdir T --no-gzip
                  --ckpt-signal S [--with-plugin H] prog
    dmtcp_command --coord-port P --checkpoint   (then the hook's call, or --status, says it is written)
    dmtcp_restart --new-coordinator --coord-port 0 --port-file F --ckptdir D --tmpdir T ckpt_*.dmtcp

The images live in <workdir>/.dmtcp, so a checkpoint saves them with the files the program works
on. With the CBAS hook plugin (cbas_dmtcp_hook.c, compiled here when DMTCP's headers and a C
compiler exist) the program stays suspended after its images are written until the worker has
taken the state, so files and images agree; without it the state is read after the program goes
on, and the worker warns. What the real DMTCP does that this relies on (observed on 4.2.0 and the
5.0 head; tests/contract/test_dmtcp_contract.py holds the fake to it):
- `--bcheckpoint` does not block on 4.2.0 (it returns before the images exist), and blocks on 5.0
  for as long as the images take: the worker asks with `--checkpoint` and waits for the hook's
  call, or for the coordinator to say it runs again with fresh images, never for a command.
- the coordinator writes dmtcp_restart_script.sh as a symbolic link, in --ckptdir and, after a
  restart, in the program's working folder: those scripts are not state (restarts use the images).
- images are gzipped by default, which costs seconds and defeats deduplication: --no-gzip.
- SIGUSR2, the default checkpoint signal, is the JVM's: another one is chosen (--ckpt-signal).
- a program launched as a session leader is told at every restart that it could not become one
  again (on its stderr): the job is started in a new process group, not a new session.
- dmtcp_get_restart_env() finds only the first variable of dmtcp_restart's environment: the hook's
  socket is put first.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Iterable

import structlog

from cbas.checkpoint import coordinator_guard
from cbas.checkpoint.base import CheckpointFailed, JobContext, JobProcess, strategy
from cbas.untrusted import UnsafePath, read_job_file, remove_beneath

log = structlog.get_logger(__name__)

IMAGES = ".dmtcp"  # folder of the images inside the working directory
IMAGE_PATTERN = "ckpt_*.dmtcp"
COORDINATOR_NOT_FOUND = 2
CHECKPOINT_SIGNAL = 62  # SIGRTMAX-2: neither the JVM's SIGUSR2 nor glibc's or timers' SIGRTMIN+n
HOOK_VARIABLE = "CBAS_HOOK_SOCKET"
OLDEST, TESTED = (4, 2), {(4, 2), (5, 0)}  # the lines CBAS is tested with (tests/contract)
WRITE_FLOOR = 120.0  # seconds any checkpoint may take to be written, plus 1 s per WRITE_RATE bytes
WRITE_RATE = 20 << 20
MAX_HOOK_CONNECTIONS = 64  # a program's processes, and then some
HOOK_LINE_TIMEOUT = 5.0
COMMAND_TIMEOUT = 20.0  # dmtcp_command: a missing coordinator takes 1-2 s to say so


class DmtcpUnavailable(CheckpointFailed):
    pass


def tools_dir() -> Path:
    launch = shutil.which("dmtcp_launch")
    if launch is None:
        raise DmtcpUnavailable("CheckpointStrategy dmtcp needs DMTCP (dmtcp_launch is not on the PATH of this machine)")
    return Path(launch).resolve().parent


def java_without_perf_data(argv: list[str]) -> list[str]:
    """The JVM's perf-data file breaks restarts under DMTCP: turn it off unless the user chose."""
    if argv and Path(argv[0]).name == "java" and not any(a.startswith(("-XX:+UsePerfData", "-XX:-UsePerfData")) for a in argv):
        return [argv[0], "-XX:-UsePerfData", *argv[1:]]
    return argv


def parse_version(text: str) -> tuple[int, int] | None:
    """`dmtcp_launch (DMTCP) 4.2.0` -> (4, 2); None when the line is not DMTCP's."""
    match = re.search(r"\(DMTCP\)\s+(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def version_problem(version: tuple[int, int] | None, line: str) -> str | None:
    """Why this DMTCP cannot be used (None: it can; an untested one is only warned about)."""
    if version is None:
        return None
    if version < OLDEST:
        return (f"DMTCP {version[0]}.{version[1]} is too old ({line.strip()!r}): CBAS needs 4.2 or newer "
                f"(tested with 4.2.0 and the 5.0 development head)")
    return None


def resident_bytes(pids: Iterable[int]) -> int:
    """Memory the job's processes hold: what DMTCP has to write."""
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def listener_uid(port: int) -> int | None:
    """The uid of the process listening on a TCP port of this machine (/proc/net/tcp{,6})."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[7])
    return None


def dmtcp_environment(env: dict[str, str], hook_socket: Path | None, signal_number: int) -> dict[str, str]:
    """The job's environment for DMTCP's tools: the hook's socket FIRST (dmtcp_get_restart_env
    reads no further), images uncompressed, our checkpoint signal."""
    first = {HOOK_VARIABLE: str(hook_socket)} if hook_socket is not None else {}
    rest = {k: v for k, v in env.items() if k != HOOK_VARIABLE}
    return {**first, **rest, "DMTCP_GZIP": "0", "DMTCP_SIGCKPT": str(signal_number)}


def build_hook(cache: Path, tools: Path) -> Path | None:
    """Compile the hook plugin once per source and DMTCP version; None where it cannot be built.
    Blocking (it may run the compiler): call it in a thread."""
    include = tools.parent / "include"
    header = include / "dmtcp.h"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not header.exists() or compiler is None:
        log.warning("dmtcp.hook_unavailable", reason="no dmtcp.h" if not header.exists() else "no C compiler")
        return None
    source = resources.files("cbas.checkpoint").joinpath("cbas_dmtcp_hook.c").read_bytes()
    version = include / "version.h"
    digest = hashlib.sha256(source + header.read_bytes() + (version.read_bytes() if version.exists() else b"")).hexdigest()
    library = cache / f"cbas_dmtcp_hook-{digest[:16]}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    source_file = cache / f"cbas_dmtcp_hook-{digest[:16]}.c"
    source_file.write_bytes(source)
    forced = ["-include", str(version)] if version.exists() else []  # dmtcp.h wants dmtcp/version.h
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run([compiler, "-shared", "-fPIC", "-O2", f"-I{include}", *forced, "-o", str(partial), str(source_file)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("dmtcp.hook_build_failed", error=result.stderr[-2000:])
        return None
    partial.chmod(0o755)
    os.replace(partial, library)
    return library


class HookServer:
    """The worker's end of the hook: a unix socket the plugin calls at every RESUME (images
    written) and RESTART (memory restored), each time waiting for an answer."""

    def __init__(self, path: Path, owner: tuple[int, int] | None, answer_restarts: bool = True) -> None:
        self.path = path
        self.owner = owner
        self.answer_restarts = answer_restarts  # a validation restart is held, never answered
        self.restarted = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._window: asyncio.Future[None] | None = None
        self._expected = 1
        self._held: list[asyncio.StreamWriter] = []
        self._connections = 0

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # in a folder of the worker's: the job cannot swap it
        self._server = await asyncio.start_unix_server(self._called, path=str(self.path))
        if self.owner is not None:
            os.chown(self.path, *self.owner, follow_symlinks=False)
        os.chmod(self.path, 0o600)

    async def _called(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the socket is the job's to call: a job that opens many connections or says nothing must
        # not use up the worker's descriptors
        if self._connections >= MAX_HOOK_CONNECTIONS:
            writer.close()
            return
        self._connections += 1  # until answered (held ones: until released)
        try:
            line = await asyncio.wait_for(reader.readline(), HOOK_LINE_TIMEOUT)
        except (TimeoutError, ConnectionError, ValueError):
            line = b""
        if line not in (b"restarted\n", b"checkpoint-written\n"):
            self._connections -= 1
            writer.close()
            return
        if line.startswith(b"restarted"):
            self.restarted.set()
            if self.answer_restarts:
                await self._answer(writer)
            else:
                self._held.append(writer)
            return
        if self._window is None:  # nobody is waiting: let the program go at once
            await self._answer(writer)
            return
        self._held.append(writer)
        if len(self._held) >= self._expected and not self._window.done():
            self._window.set_result(None)

    def open_window(self, processes: int = 1) -> asyncio.Future[None]:
        """Hold the next checkpoint's callers; done once `processes` of them have called."""
        self._expected = max(processes, 1)
        self._window = asyncio.get_running_loop().create_future()
        return self._window

    @property
    def held(self) -> int:
        return len(self._held)

    async def release(self) -> None:
        self._window = None
        held, self._held = self._held, []
        for writer in held:
            await self._answer(writer)

    async def _answer(self, writer: asyncio.StreamWriter) -> None:
        self._connections -= 1
        await _answer(writer)

    async def close(self) -> None:
        await self.release()
        if self._server is not None:
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)


async def _answer(writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(b"ok\n")
        await writer.drain()
        writer.close()
    except (ConnectionError, OSError):
        pass


class Coordinator:
    """dmtcp_command against one coordinator."""

    def __init__(self, tool: str, port: int) -> None:
        self.tool = tool
        self.port = port

    async def _run(self, *args: str) -> tuple[int, str]:
        command = await asyncio.create_subprocess_exec(
            self.tool, "--coord-port", str(self.port), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:  # the coordinator runs as the job's user, which can stop it: never wait on it for good
            output, _ = await asyncio.wait_for(command.communicate(), COMMAND_TIMEOUT)
        except TimeoutError:
            command.kill()
            await command.wait()
            raise CheckpointFailed(f"DMTCP's coordinator (port {self.port}) did not answer dmtcp_command "
                                   f"{' '.join(args)} within {COMMAND_TIMEOUT:.0f}s") from None
        return command.returncode or 0, output.decode(errors="replace")

    async def status(self) -> dict[str, str]:
        code, output = await self._run("--status")
        if code == COORDINATOR_NOT_FOUND:
            raise CheckpointFailed(f"DMTCP's coordinator (port {self.port}) is gone")
        return dict(line.strip().split("=", 1) for line in output.splitlines() if "=" in line)

    async def checkpoint(self) -> None:
        """Ask for a checkpoint; it does not wait for it (--bcheckpoint would on 5.0 only, for as
        long as the images take): the hook's call, or the coordinator's status, says when."""
        code, output = await self._run("--checkpoint")
        if code == COORDINATOR_NOT_FOUND:
            raise CheckpointFailed(f"DMTCP's coordinator (port {self.port}) is gone")
        if code != 0:
            raise CheckpointFailed(f"dmtcp_command --checkpoint exited with {code}: {output[-500:]}")


class DmtcpCheckpointer:
    name = "dmtcp"
    # not state: DMTCP's restart scripts (links among them), in the images' folder and, after a
    # restart, in the working folder; restarts use the images
    exclude: frozenset[str] = frozenset({"dmtcp_restart_script*.sh", f"{IMAGES}/dmtcp_restart_script*.sh",
                                         f"{IMAGES}/*.temp"})
    immutable: frozenset[str] = frozenset({f"{IMAGES}/{IMAGE_PATTERN}"})

    def __init__(self, write_timeout: float | None = None, port_timeout: float = 30.0,
                 signal_number: int = CHECKPOINT_SIGNAL, hook_grace: float = 3.0) -> None:
        # the longest DMTCP may take to write its images; None: WRITE_FLOOR plus the job's memory
        # at WRITE_RATE (a program DMTCP cannot checkpoint must fail, not hold the job for good)
        self.write_timeout = write_timeout
        self.port_timeout = port_timeout
        self.signal_number = signal_number
        self.hook_grace = hook_grace  # images written and no call from the hook: it is silent
        self.tools: Path | None = None
        self.version: tuple[int, int] | None = None
        self.coordinator: Coordinator | None = None
        self.hook: HookServer | None = None
        self._guard: str | None = None  # the iptables rules keeping others off the coordinator
        self.last_write_seconds = 0.0  # DMTCP's own share of the last pause: writing its images
        self._warned = False

    @property
    def port(self) -> int | None:
        return self.coordinator.port if self.coordinator else None

    def state_dir(self, ctx: JobContext) -> Path:
        return ctx.workdir

    def _tool(self, name: str) -> str:
        if self.tools is None:
            self.tools = tools_dir()
        return str(self.tools / name)

    async def _check_version(self) -> None:
        if self.version is not None:
            return
        command = await asyncio.create_subprocess_exec(
            self._tool("dmtcp_launch"), "--version", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await command.communicate()
        line = output.decode(errors="replace").splitlines()[0] if output else ""
        version = parse_version(line)
        problem = version_problem(version, line)
        if problem is not None:
            raise DmtcpUnavailable(problem)
        if version not in TESTED:
            log.warning("dmtcp.untested_version", version=line.strip(), tested="4.2.0, 5.0")
        self.version = version or (0, 0)

    async def start(self, ctx: JobContext, argv: list[str]) -> JobProcess:
        if os.geteuid() == 0 and ctx.user is None:
            raise CheckpointFailed("DMTCP never runs a job as root; set CBAS_JOB_USER to an unprivileged user")
        await self._check_version()
        images_dir, tmpdir = ctx.workdir / IMAGES, ctx.checkpoint_dir / "dmtcp-tmp"
        await asyncio.to_thread(_job_folders, (images_dir, tmpdir), ctx.user)
        port_file = tmpdir / "coordinator.port"
        # a disk made from a snapshot holds the old coordinator's port: never read that one
        await asyncio.to_thread(remove_beneath, ctx.checkpoint_dir, "dmtcp-tmp/coordinator.port")
        common = ["--new-coordinator", "--coord-port", "0", "--port-file", str(port_file),
                  "--ckptdir", str(images_dir), "--tmpdir", str(tmpdir)]
        images = sorted(images_dir.glob(IMAGE_PATTERN))
        library = await asyncio.to_thread(build_hook, ctx.cache_dir or ctx.checkpoint_dir.parent / "cache",
                                          Path(self._tool("dmtcp_launch")).parent)
        if library is not None and self.hook is None:
            self.hook = HookServer((ctx.hook_dir or ctx.checkpoint_dir) / "hook.sock", ctx.user)
            await self.hook.start()
        env = dmtcp_environment(ctx.env, self.hook.path if self.hook else None, self.signal_number)
        if images:
            command = [self._tool("dmtcp_restart"), *common, *map(str, images)]
        else:
            plugin = ["--with-plugin", str(library)] if library is not None else []
            command = [self._tool("dmtcp_launch"), *common, "--no-gzip", "--ckpt-signal", str(self.signal_number),
                       *plugin, *java_without_perf_data(argv)]
        job = await ctx.spawn(command, env=env)
        port = await self._read_port(tmpdir, job)
        if ctx.user is not None and (owner := listener_uid(port)) != ctx.user[0]:
            # the port file is the job's to write: never command another's coordinator for it
            raise CheckpointFailed(f"port {port} in DMTCP's port file is not the job's coordinator's "
                                   f"(it is {'not listened on' if owner is None else f'uid {owner}'}'s)")
        self.coordinator = Coordinator(self._tool("dmtcp_command"), port)
        if ctx.user is not None:  # only the job and the worker may command its coordinator
            self._guard = f"{ctx.tag or ctx.job_id}-{port}"
            await asyncio.to_thread(coordinator_guard.guard, self._guard, port, ctx.user[0])
        log.info("dmtcp.started", restart=bool(images), port=port, hook=library is not None)
        return job

    async def _read_port(self, tmpdir: Path, job: JobProcess) -> int:
        deadline = time.monotonic() + self.port_timeout
        while time.monotonic() < deadline:
            try:
                text = read_job_file(tmpdir, "coordinator.port", limit=32).decode(errors="replace").strip()
            except (FileNotFoundError, UnsafePath):
                text = ""
            if text.isdigit():
                return int(text)
            if job.process.returncode is not None:
                raise CheckpointFailed(f"DMTCP exited with {job.process.returncode} before its coordinator was up")
            await asyncio.sleep(0.05)
        raise CheckpointFailed(f"DMTCP's coordinator did not write its port within {self.port_timeout:.0f}s")

    async def _wait_written(self, ctx: JobContext, job: JobProcess, since: float,
                            window: asyncio.Future[None] | None) -> None:
        """Until the hook calls (the program held, images written), or without a hook until the
        coordinator runs the program again with fresh images."""
        assert self.coordinator is not None
        timeout = self.write_timeout
        if timeout is None:
            cgroup = job.cgroup
            held = await asyncio.to_thread(lambda: resident_bytes(cgroup.pids() if cgroup else {job.pgid}))
            timeout = WRITE_FLOOR + held / WRITE_RATE
        deadline = time.monotonic() + timeout
        written_at: float | None = None
        while window is None or not window.done():
            if job.process.returncode is not None:
                raise CheckpointFailed(f"the program exited (code {job.process.returncode}) during its checkpoint")
            if time.monotonic() > deadline:
                raise CheckpointFailed(f"DMTCP did not write its images within {timeout:.0f}s: DMTCP cannot "
                                       f"checkpoint this program (a device, an unsupported socket?), see its stderr")
            status = await self.coordinator.status()
            if status.get("RUNNING") == "yes" and _fresh_images(ctx.workdir / IMAGES, since):
                if window is None:
                    return
                written_at = written_at or time.monotonic()
                if time.monotonic() - written_at > self.hook_grace:
                    assert self.hook is not None
                    log.warning("dmtcp.hook_silent", called=self.hook.held,
                                consequence="files written after the resume can differ from the images")
                    return
            if window is None:
                await asyncio.sleep(0.05)
            else:
                await asyncio.wait([window], timeout=0.2)

    def _check_images(self, ctx: JobContext, since: float) -> None:
        """Keep this checkpoint's images; a checkpoint with missing or empty ones is rejected."""
        images = _images(ctx.workdir / IMAGES)
        fresh = {name for name, info in images.items() if info.st_mtime >= since - 1.0}
        if not fresh or any(images[name].st_size == 0 for name in fresh):
            raise CheckpointFailed("DMTCP reported a checkpoint but its images are missing or empty")
        for stale in set(images) - fresh:  # processes that have ended since the last one
            remove_beneath(ctx.workdir, f"{IMAGES}/{stale}")

    @asynccontextmanager
    async def quiesced(self, ctx: JobContext, job: JobProcess) -> AsyncIterator[None]:
        if self.coordinator is None:
            raise CheckpointFailed("DMTCP's coordinator is not known (the program did not start under DMTCP)")
        since = time.time()
        processes = int((await self.coordinator.status()).get("NUM_PEERS", "1") or 1)
        window = self.hook.open_window(processes) if self.hook is not None else None
        try:
            began = time.monotonic()
            await self.coordinator.checkpoint()
            await self._wait_written(ctx, job, since, window)
            self.last_write_seconds = time.monotonic() - began
            if window is None and not self._warned:
                self._warned = True
                log.warning("dmtcp.no_hook", consequence="files written after the resume can differ from the images")
            await asyncio.to_thread(self._check_images, ctx, since)
            yield
        finally:
            if self.hook is not None:
                await self.hook.release()

    async def close(self) -> None:
        if self.hook is not None:
            await self.hook.close()
        if self._guard is not None:
            await asyncio.to_thread(coordinator_guard.release, self._guard)
            self._guard = None


def _job_folders(paths: tuple[Path, ...], user: tuple[int, int] | None) -> None:
    """DMTCP's folders inside the job's own ones: real folders (a link in their place is
    refused), the job's."""
    for path in paths:
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir() or path.is_symlink():
                raise UnsafePath(f"{path} is not a folder") from None
        if user is not None:
            os.chown(path, *user, follow_symlinks=False)


def _images(folder: Path) -> dict[str, os.stat_result]:
    found = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("ckpt_") and entry.name.endswith(".dmtcp") and entry.is_file(follow_symlinks=False):
                    found[entry.name] = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        pass
    return found


def _fresh_images(folder: Path, since: float) -> bool:
    images = _images(folder)
    return any(info.st_mtime >= since - 1.0 and info.st_size > 0 for info in images.values())


strategy("dmtcp")(DmtcpCheckpointer)
