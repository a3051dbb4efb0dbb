"""Runs the master: one per CBAS home (a lock file), until SIGTERM or SIGINT.

Stopping the master never stops jobs: machines keep running and the next master adopts them.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
from pathlib import Path
from typing import Callable

import structlog
from aiohttp import web

from cbas.local.bus import load_or_create_secret
from cbas.master.app import create_app
from cbas.master.service import Master
from cbas.messages import MASTER
from cbas.settings import Settings
from cbas.wiring import master_file, open_master_backends, token_path

log = structlog.get_logger(__name__)


class MasterAlreadyRunning(RuntimeError):
    pass


def _lock(home: Path) -> int:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(0o700)  # the store, the keys and every job's files: the master's alone
    fd = os.open(home / "master.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = master_file_info(home / "master.json")
        raise MasterAlreadyRunning(
            f"a master is already running for {home}" + (f" (pid {info['pid']}, {info['url']})" if info else "")
        ) from None
    return fd


def master_file_info(path: Path) -> dict[str, object] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


async def serve(settings: Settings, on_ready: Callable[[str], None] | None = None) -> None:
    lock_fd = _lock(settings.home)
    token = load_or_create_secret(token_path(settings)).decode()
    backends = open_master_backends(settings)
    master = Master(settings, backends)
    runner = web.AppRunner(create_app(master, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.master_host, settings.master_port)
    await site.start()
    host, port = site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
    url = f"http://{host}:{port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    info_path = master_file(settings)
    try:
        # on AWS, SNS must reach the master at its public address
        public = settings.public_url.replace("{port}", str(port)) if settings.public_url else url
        await backends.bus.subscribe(MASTER, f"{public}/messages")
        await master.start()
        tmp = info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        os.replace(tmp, info_path)
        log.info("master.started", url=url, home=str(settings.home), backend=settings.backend)
        if on_ready:
            on_ready(url)
        await stop.wait()
        log.info("master.stopping")
    finally:
        info_path.unlink(missing_ok=True)
        await master.stop()
        await runner.cleanup()
        await backends.bus.close()
        await backends.store.close()
        os.close(lock_fd)
        log.info("master.stopped")
