"""A real CBAS installation in a temporary home: master and machines as processes.

Every process is ended by its own process group at teardown, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from cbas.checkpoint import coordinator_guard
from cbas.client import MasterClient
from cbas.local.cloud import MachineRecord
from cbas.settings import Settings
from cbas.worker.cgroups import kill_cgroup
from tests.processes import kill_groups, wait_until_gone
from tests.tracefiles import write_trace

COUNTER = Path(__file__).resolve().parents[2] / "examples" / "counter"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")

FAST = {
    "CBAS_PING_INTERVAL": "0.5",
    "CBAS_PING_MISSED_MAX": "4",
    "CBAS_BOOT_TIMEOUT": "20",
    "CBAS_SCHEDULE_INTERVAL": "0.3",
    "CBAS_NOTICE_POLL_INTERVAL": "0.2",
    "CBAS_LOG_UPLOAD_INTERVAL": "0.5",
    "CBAS_MARKET_TIME_SCALE": "1",
    "CBAS_MARKET_NOTICE_SECONDS": "1.5",
    "CBAS_BATCH_WINDOW": "0.1",
    "CBAS_RESTART_OVERHEAD": "2",
    "CBAS_CAPACITY_RETRY_SECONDS": "2",  # these markets change within seconds
}
CALM = {("z1", "c5.large"): (0.03, 0.085, [(0.0, True)])}
# simulated seconds since the master opened the market: the cheapest zone loses its capacity at
# 10 s, the next one at 20 s; the dearest one never does (a job long enough is preempted twice)
TWO_PREEMPTIONS = {
    ("z1", "c5.large"): (0.020, 0.085, [(0.0, True), (10.0, False)]),
    ("z2", "c5.large"): (0.025, 0.085, [(0.0, True), (20.0, False)]),
    ("z3", "c5.large"): (0.040, 0.085, [(0.0, True)]),
}


class Cluster:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CBAS_")}
        # the machines' disks beside the home: the jobs' own users cannot enter the private home
        self.env.update(FAST, CBAS_HOME=str(home), CBAS_MACHINES_DIR=str(home.parent / f"{home.name}-machines"))
        self.masters: list[subprocess.Popen[bytes]] = []
        self.settings = Settings(home=home)

    # --- set-up ---------------------------------------------------------------------------
    def market(self, markets: dict[tuple[str, str], Any]) -> None:
        self.env["CBAS_MARKET_TRACE"] = str(write_trace(self.home / "trace.csv", markets, span=36000))

    def start_master(self, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        log = open(self.home / f"master-{len(self.masters)}.log", "wb")
        master = subprocess.Popen([sys.executable, "-m", "cbas", "master"], env=self.env, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.masters.append(master)
        deadline = time.monotonic() + timeout
        while True:
            info = self._master_info()
            if info and info.get("pid") == master.pid:
                return master
            if master.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"master did not start: {(self.home / log.name).read_text()[-2000:]}")
            time.sleep(0.05)

    def _master_info(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.home / "master.json").read_text())
        except (OSError, ValueError):
            return None

    def kill_master(self, sig: int = signal.SIGKILL) -> None:
        master = self.masters[-1]
        os.killpg(master.pid, sig)
        master.wait(timeout=20)

    def job_dir(self, name: str, n: int, delay: float = 0.1, interval: int = 1, extra: str = "") -> Path:
        folder = self.home / "jobs-src" / name
        folder.mkdir(parents=True)
        shutil.copy(COUNTER / "counter.sh", folder)
        (folder / "input.txt").write_text("3\n")
        (folder / "job.jdl").write_text(
            f'Name = "{name}"; Executable = "counter.sh"; Arguments = "{n} input.txt";\n'
            f'InputSandbox = {{"input.txt"}}; OutputSandbox = {{"output.txt"}};\n'
            f'CheckpointInterval = {interval}; Environment = {{COUNTER_DELAY = "{delay}"}};\n{extra}'
        )
        return folder / "job.jdl"

    # --- use --------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cbas", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def submit(self, jdl_path: Path) -> str:
        result = self.cli("submit", "-q", str(jdl_path))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def fetch(self, job_id: str) -> Path:
        """`cbas fetch` a finished job's output into the home; where it went."""
        out = self.home / "fetched" / job_id
        result = self.cli("fetch", job_id, "-o", str(out))
        assert result.returncode == 0, result.stderr
        return out

    def job(self, job_id: str) -> dict[str, Any]:
        return MasterClient(self.settings).job(job_id)

    def wait(self, job_id: str, states: tuple[str, ...] = TERMINAL, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s: {job['events']}")
            time.sleep(0.2)

    def records(self) -> list[MachineRecord]:
        folder = self.home / "cloud" / "machines"
        return [MachineRecord.model_validate_json(p.read_text()) for p in sorted(folder.glob("i-*.json"))]

    def process_groups(self) -> list[int]:
        """Every process group a machine of this home started (machines and their jobs)."""
        groups = []
        for record in self.records():
            if record.pgid:
                groups.append(record.pgid)
            pgids = Path(record.disk) / "job-pgids"
            if pgids.exists():
                groups += [int(line) for line in pgids.read_text().split()]
        return groups

    def running_machines(self) -> list[str]:
        return [r.machine.instance_id for r in self.records() if r.machine.state != "terminated"]

    def assert_nothing_left(self) -> None:
        """No machine running and no process of any machine or job alive (a machine's end may
        still be under way: the master terminates it just after the job's end is recorded)."""
        deadline = time.monotonic() + 30
        while self.running_machines() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.running_machines() == []
        assert wait_until_gone(self.process_groups()) == []

    def close(self) -> None:
        groups = self.process_groups()
        for master in self.masters:
            if master.poll() is None:
                os.killpg(master.pid, signal.SIGTERM)
                try:
                    master.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    kill_groups([master.pid])
                    master.wait()
        kill_groups(groups + self.process_groups())
        wait_until_gone(groups)
        for record in self.records():  # what a machine killed with its master leaves: cgroups, firewall rules
            listed = Path(record.disk) / "job-cgroups"
            for name in listed.read_text().split() if listed.exists() else []:
                kill_cgroup(name)
            coordinator_guard.release(f"{record.machine.instance_id}-", prefix=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    home = Path(tempfile.mkdtemp(prefix="cbas-it-"))
    home.chmod(0o711)
    cluster = Cluster(home)
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(home.parent / f"{home.name}-machines", ignore_errors=True)


def expected_counter(n: int, k: int = 3) -> str:
    return "".join(f"{i} {i * k}\n" for i in range(n))
