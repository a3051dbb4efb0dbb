#!/usr/bin/env python3
"""Load on the master's message endpoint: a real `cbas master` (local backend) in its own
process, and this process sending it signed PING messages over loopback, as a fleet of workers
would. Every message is verified (the bus's signature, then its machine's own key against the
ledger and the job it names), checked for duplicates and dispatched, as in production: the
fleet's jobs, ledger entries and machines are in the home before the master starts.

Two phases within --duration: as fast as the master answers (throughput), then a steady
1,000 messages per second (latency), while the master's resident memory is sampled.

    scripts/bench/master_load.py --duration 60 --json bench-results/master_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cbas import authority  # noqa: E402
from cbas.authority import Credential  # noqa: E402
from cbas.local.bus import LocalMessageBus  # noqa: E402
from cbas.local.cloud import MachineRecord  # noqa: E402
from cbas.local.store import SqliteJobStore  # noqa: E402
from cbas.master.credentials import MachineKeys, load_master_key  # noqa: E402
from cbas.messages import MASTER, MessageType, Ping, envelope, worker_address  # noqa: E402
from cbas.models import Job, LedgerEntry, LedgerState, Machine  # noqa: E402
from cbas.state import JobState  # noqa: E402

# distinct workers the pings come from, each a machine of the local cloud (whose market loop reads
# every machine's record each tick: a larger fleet measures the simulator, not the message path)
FLEET = 100


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def instance_of(n: int) -> str:
    return f"i-{n % FLEET:017x}"


def seed_fleet(home: Path) -> list[Credential]:
    """FLEET jobs, each placed on a machine of the local cloud: what a master restarted under a
    running fleet finds. Returns each machine's credential, as its worker would read it."""
    keys = MachineKeys(load_master_key(home))
    records = home / "cloud" / "machines"
    records.mkdir(parents=True)
    store = SqliteJobStore(home / "cbas.db")
    credentials = []

    async def write() -> None:
        for n in range(FLEET):
            instance, ledger_id = instance_of(n), f"l-{n:016x}"
            await store.create_job(Job(id=f"{n:08x}", state=JobState.PROVISIONING, instance_id=instance))
            await store.put_ledger(LedgerEntry(id=ledger_id, job_id=f"{n:08x}", state=LedgerState.RUNNING, market="on-demand",
                                               instance_id=instance, zone="z1", instance_type="c5.large"))
            machine = Machine(instance_id=instance, zone="z1", instance_type="c5.large", market="on-demand", price=0.085,
                              tags={"cbas:cluster": "default", "cbas:ledger": ledger_id, "cbas:job": f"{n:08x}"})
            (records / f"{instance}.json").write_text(MachineRecord(machine=machine, disk=str(home / instance)).model_dump_json())
            credentials.append(keys.credential(ledger_id))
        await store.close()

    asyncio.run(write())
    return credentials


def signed_pings(bus: LocalMessageBus, credentials: list[Credential], count: int) -> list[bytes]:
    bodies = []
    for n in range(count):
        instance = instance_of(n)
        ping = envelope(MessageType.PING, Ping(instance_id=instance), worker_address(instance), MASTER)
        bodies.append(bus.sign(authority.sign(ping, credentials[n % FLEET])))
    return bodies


async def post_all(url: str, bodies: list[bytes], concurrency: int, rate: float | None,
                   latencies: list[float], deadline: float) -> int:
    """Send the bodies with at most `concurrency` in flight, paced to `rate` per second if given."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    start = time.perf_counter()
    sent = 0
    failures = 0

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal sent, failures
        while not queue.empty() and time.perf_counter() < deadline:
            body = queue.get_nowait()
            if rate is not None:  # open loop: each message leaves at its scheduled time
                due = start + sent / rate
                sent += 1
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                sent += 1
            began = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "text/plain"}) as response:
                await response.read()
                if response.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - began)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(sender(session) for _ in range(concurrency)))
    if failures:
        raise SystemExit(f"{failures} messages were refused: the benchmark is not measuring what it should")
    return sent


async def sample_memory(pid: int, samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append((time.monotonic(), rss_mib(pid)))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def measure(url: str, bus: LocalMessageBus, credentials: list[Credential], pid: int,
                  duration: float) -> dict[str, float]:
    memory: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(pid, memory, stop))
    began = time.monotonic()

    # phase 1: as fast as it goes, a third of the time
    burst_seconds = duration / 3
    bodies = signed_pings(bus, credentials, 10_000)
    latencies: list[float] = []
    t0 = time.perf_counter()
    done = 0
    while time.perf_counter() - t0 < burst_seconds:
        done += await post_all(url, bodies, 32, None, latencies, t0 + burst_seconds)
        bodies = signed_pings(bus, credentials, 10_000)  # new ids: duplicates would be answered early
    burst_rate = done / (time.perf_counter() - t0)

    # phase 2: a steady 1,000 per second for the rest
    steady_seconds = duration - (time.monotonic() - began)
    steady: list[float] = []
    t1 = time.perf_counter()
    await post_all(url, signed_pings(bus, credentials, int(1000 * steady_seconds)), 64, 1000.0, steady,
                   t1 + steady_seconds + 5)
    steady_rate = len(steady) / (time.perf_counter() - t1)
    stop.set()
    await sampler
    steady.sort()
    rss = [value for _, value in memory]
    quarter = max(1, len(rss) // 4)
    return {
        "max_msgs_per_s": burst_rate,
        "burst_messages": float(done),
        "steady_msgs_per_s": steady_rate,
        "p50_ms_at_1000_per_s": 1000 * statistics.median(steady),
        "p99_ms_at_1000_per_s": 1000 * steady[int(0.99 * (len(steady) - 1))],
        "peak_rss_mib": max(rss),
        "rss_first_quarter_mib": statistics.mean(rss[:quarter]),
        "rss_last_quarter_mib": statistics.mean(rss[-quarter:]),
        "duration_s": time.monotonic() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load in all (default 60)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cbas-load-") as home_text:
        home = Path(home_text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CBAS_")}
        env.update(CBAS_HOME=str(home), CBAS_LOG_LEVEL="warning", CBAS_MASTER_HOST="127.0.0.1", CBAS_MASTER_PORT="0")
        credentials = seed_fleet(home)
        with open(home / "master.log", "wb") as log:
            master = subprocess.Popen([sys.executable, "-m", "cbas", "master"], cwd=ROOT, env=env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            for _ in range(400):
                if (home / "master.json").exists() or master.poll() is not None:
                    break
                time.sleep(0.05)
            if not (home / "master.json").exists():
                raise SystemExit(f"the master did not start:\n{(home / 'master.log').read_text()[-2000:]}")
            url = json.loads((home / "master.json").read_text())["url"] + "/messages"
            bus = LocalMessageBus(home, home / "cbas.db")  # only to sign, with the home's key
            results = asyncio.run(measure(url, bus, credentials, master.pid, args.duration))
        finally:
            os.killpg(master.pid, signal.SIGTERM)
            try:
                master.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, signal.SIGKILL)
                master.wait()

    print(f"{'measure':<28}{'value':>12}  target")
    rows = [("max msgs/s", results["max_msgs_per_s"], ">= 5000"),
            ("steady msgs/s", results["steady_msgs_per_s"], "1000"),
            ("p50 ms at 1000/s", results["p50_ms_at_1000_per_s"], ""),
            ("p99 ms at 1000/s", results["p99_ms_at_1000_per_s"], "< 20"),
            ("peak RSS MiB", results["peak_rss_mib"], ""),
            ("RSS first quarter MiB", results["rss_first_quarter_mib"], ""),
            ("RSS last quarter MiB", results["rss_last_quarter_mib"], "flat")]
    for name, value, target in rows:
        print(f"{name:<28}{value:>12.1f}  {target}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
