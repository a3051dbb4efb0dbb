"""Runs the master: one per CBAS home (a lock file), until SIGTERM or SIGINT.

Stopping the master never stops jobs: machines keep running and the next master adopts them.

Where its messages come from: on the local backend the bus pushes them to POST /messages, and
the master subscribes that endpoint while it runs. On AWS they wait in the master's SQS queue
(cbas.aws.sqs_inbox), read for the master's lifetime: the master subscribes nothing, and its stop
leaves the queue and its subscription in place, so what workers say meanwhile waits for the next
master (up to 14 days). /messages still answers there, for nothing SNS sends.
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
from cbas.master.app import INBOX_KEY, create_app
from cbas.master.service import Master
from cbas.messages import MASTER
from cbas.settings import Settings
from cbas.wiring import master_file, open_inbox_queue, open_master_backends, token_path

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
    app = create_app(master, token)
    queue = open_inbox_queue(settings, backends.bus, app[INBOX_KEY], master.metrics)  # None: pushed to /messages
    runner = web.AppRunner(app, access_log=None)
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
    reading: asyncio.Task[None] | None = None
    try:
        if queue is None:
            public = settings.public_url.replace("{port}", str(port)) if settings.public_url else url
            await backends.bus.subscribe(MASTER, f"{public}/messages")
        else:
            await queue.open()  # a missing queue stops the start here, saying to run bootstrap
        await master.start()
        if queue is not None:
            reading = asyncio.create_task(queue.run(), name="inbox")
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
        if reading is not None:  # what it has not settled comes back to the next master
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        await master.stop()
        await runner.cleanup()
        await backends.bus.close()  # its own subscriptions only: on AWS there are none
        await backends.store.close()
        os.close(lock_fd)
        log.info("master.stopped")
