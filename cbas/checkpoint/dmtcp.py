"""`dmtcp`: transparent checkpoints of unmodified programs with DMTCP.

    dmtcp_launch  --new-coordinator --coord-port 0 --port-file F --ckptdir D --tmpdir T [--with-plugin H] prog
    dmtcp_command --coord-port P --bcheckpoint        (images are on disk when it returns)
    dmtcp_restart --new-coordinator --coord-port 0 --port-file F --ckptdir D --tmpdir T ckpt_*.dmtcp

The images live in <workdir>/.dmtcp, so a checkpoint saves them together with the files the
program works on. With the CBAS hook plugin (cbas/checkpoint/cbas_dmtcp_hook.c, compiled here when
DMTCP's headers and a C compiler exist) the program stays suspended after its images are written
until the worker has read the state, so files and images agree. Without it the worker reads the
state after the program resumed, and warns that files written since may differ from the images.
Restarts use the images, never dmtcp_restart_script.sh (a snapshot may be taken before it exists).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import AsyncIterator

import structlog

from cbas.checkpoint.base import CheckpointFailed, JobContext, JobProcess, strategy

log = structlog.get_logger(__name__)

IMAGES = ".dmtcp"  # folder of the images inside the working directory
COORDINATOR_NOT_FOUND = 2


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


def build_hook(cache: Path, tools: Path) -> Path | None:
    """Compile the hook plugin once per source and DMTCP version; None where it cannot be built."""
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
    partial = library.with_suffix(".tmp")
    result = subprocess.run([compiler, "-shared", "-fPIC", "-O2", f"-I{include}", *forced, "-o", str(partial), str(source_file)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("dmtcp.hook_build_failed", error=result.stderr[-2000:])
        return None
    partial.chmod(0o755)
    os.replace(partial, library)
    return library


class HookServer:
    """The worker's end of the hook: a unix socket the plugin calls at every RESUME."""

    def __init__(self, path: Path, owner: tuple[int, int] | None) -> None:
        self.path = path
        self.owner = owner
        self._server: asyncio.AbstractServer | None = None
        self._window: asyncio.Future[None] | None = None
        self._held: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._called, path=str(self.path))
        if self.owner is not None:
            os.chown(self.path, *self.owner)
        self.path.chmod(0o600)

    async def _called(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        if self._window is None:  # nobody is waiting: let the program go at once
            writer.write(b"ok\n")
            await writer.drain()
            writer.close()
            return
        self._held.append(writer)
        if not self._window.done():
            self._window.set_result(None)

    def open_window(self) -> asyncio.Future[None]:
        self._window = asyncio.get_running_loop().create_future()
        return self._window

    async def release(self) -> None:
        self._window = None
        held, self._held = self._held, []
        for writer in held:
            try:
                writer.write(b"ok\n")
                await writer.drain()
                writer.close()
            except (ConnectionError, OSError):
                pass

    async def close(self) -> None:
        await self.release()
        if self._server is not None:
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)


class DmtcpCheckpointer:
    name = "dmtcp"
    exclude: frozenset[str] = frozenset()

    def __init__(self, hook_timeout: float = 10.0, port_timeout: float = 30.0) -> None:
        self.hook_timeout = hook_timeout
        self.port_timeout = port_timeout
        self.tools: Path | None = None
        self.port: int | None = None
        self.hook: HookServer | None = None
        self._warned = False

    def state_dir(self, ctx: JobContext) -> Path:
        return ctx.workdir

    def _tool(self, name: str) -> str:
        if self.tools is None:
            self.tools = tools_dir()
        return str(self.tools / name)

    async def start(self, ctx: JobContext, argv: list[str]) -> JobProcess:
        if os.geteuid() == 0 and ctx.user is None:
            raise CheckpointFailed("DMTCP never runs a job as root; set CBAS_JOB_USER to an unprivileged user")
        images_dir, tmpdir = ctx.workdir / IMAGES, ctx.checkpoint_dir / "dmtcp-tmp"
        images_dir.mkdir(exist_ok=True)
        tmpdir.mkdir(exist_ok=True)  # DMTCP_TMPDIR on the machine's disk, never a /tmp that vanishes
        port_file = tmpdir / "coordinator.port"
        port_file.unlink(missing_ok=True)
        if ctx.user is not None:
            for path in (images_dir, tmpdir):
                os.chown(path, *ctx.user)
        common = ["--new-coordinator", "--coord-port", "0", "--port-file", str(port_file),
                  "--ckptdir", str(images_dir), "--tmpdir", str(tmpdir)]
        images = sorted(images_dir.glob("ckpt_*.dmtcp"))
        library = build_hook(ctx.cache_dir or ctx.checkpoint_dir.parent / "cache", Path(self._tool("dmtcp_launch")).parent)
        env = dict(ctx.env)
        if library is not None:
            self.hook = HookServer(ctx.checkpoint_dir / "hook.sock", ctx.user)
            await self.hook.start()
            env["CBAS_HOOK_SOCKET"] = str(self.hook.path)
        if images:
            command = [self._tool("dmtcp_restart"), *common, *map(str, images)]
        else:
            plugin = ["--with-plugin", str(library)] if library is not None else []
            command = [self._tool("dmtcp_launch"), *common, *plugin, *java_without_perf_data(argv)]
        saved_env, ctx.env = ctx.env, env
        try:
            job = await ctx.spawn(command)
        finally:
            ctx.env = saved_env
        self.port = await self._read_port(port_file, job)
        log.info("dmtcp.started", restart=bool(images), port=self.port, hook=library is not None)
        return job

    async def _read_port(self, port_file: Path, job: JobProcess) -> int:
        deadline = time.monotonic() + self.port_timeout
        while time.monotonic() < deadline:
            text = port_file.read_text().strip() if port_file.exists() else ""
            if text.isdigit():
                return int(text)
            if job.process.returncode is not None:
                raise CheckpointFailed(f"DMTCP exited with {job.process.returncode} before its coordinator was up")
            await asyncio.sleep(0.05)
        raise CheckpointFailed(f"DMTCP's coordinator did not write its port within {self.port_timeout:.0f}s")

    async def _blocking_checkpoint(self) -> None:
        command = await asyncio.create_subprocess_exec(
            self._tool("dmtcp_command"), "--coord-port", str(self.port), "--bcheckpoint",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await command.communicate()
        if command.returncode == COORDINATOR_NOT_FOUND:
            raise CheckpointFailed(f"DMTCP's coordinator (port {self.port}) is gone")
        if command.returncode != 0:
            raise CheckpointFailed(f"dmtcp_command --bcheckpoint exited with {command.returncode}: {output.decode()[-500:]}")

    def _check_images(self, ctx: JobContext, since: float) -> None:
        """Keep this checkpoint's images; a checkpoint with missing or empty ones is rejected."""
        images = sorted((ctx.workdir / IMAGES).glob("ckpt_*.dmtcp"))
        fresh = [image for image in images if image.stat().st_mtime >= since - 1.0]
        if not fresh or any(image.stat().st_size == 0 for image in fresh):
            raise CheckpointFailed("DMTCP reported a checkpoint but its images are missing or empty")
        for stale in set(images) - set(fresh):  # processes that have ended since the last one
            stale.unlink()

    @asynccontextmanager
    async def quiesced(self, ctx: JobContext, job: JobProcess) -> AsyncIterator[None]:
        since = time.time()
        window = self.hook.open_window() if self.hook is not None else None
        try:
            await self._blocking_checkpoint()
            if window is not None:
                try:  # the program stays suspended until we release it
                    await asyncio.wait_for(asyncio.shield(window), self.hook_timeout)
                except TimeoutError:
                    log.warning("dmtcp.hook_silent", waited=self.hook_timeout)
            elif not self._warned:
                self._warned = True
                log.warning("dmtcp.no_hook", consequence="files written after the resume can differ from the images")
            self._check_images(ctx, since)
            yield
        finally:
            if self.hook is not None:
                await self.hook.release()


strategy("dmtcp")(DmtcpCheckpointer)
