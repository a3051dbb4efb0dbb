"""One local 'machine': its metadata endpoint plus the worker daemon, in one process group.

The local cloud starts `python -m cbas.local.machine` in a new session; terminating the machine
kills that process group (and the job process groups the worker recorded in <disk>/job-pgids).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from aiohttp import web

from cbas.local.metadata import metadata_app


async def run_machine(instance_id: str, disk: Path) -> int:
    runner = web.AppRunner(metadata_app(disk / "metadata"), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cbas", "worker",
        "--instance-id", instance_id, "--disk", str(disk), "--metadata-url", url,
    )
    code = await worker.wait()
    print(f"machine {instance_id}: worker exited with {code}; machine stays up until terminated", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description="a local CBAS machine (started by the local cloud)")
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--disk", required=True, type=Path)
    args = parser.parse_args()
    sys.exit(asyncio.run(run_machine(args.instance_id, args.disk)))


if __name__ == "__main__":
    main()
