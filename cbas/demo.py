"""`cbas demo`: the whole system on this machine, in under two minutes.

A master with a fast simulated spot market runs the counter example; the market reclaims its
machines; the job resumes from its checkpoints each time; its output must equal an uninterrupted
run's. Everything it starts is stopped by process group before it returns.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cbas.client import MasterClient, MasterUnavailable
from cbas.frontend import fetch, prepare, submit
from cbas.local.cloud import group_alive, kill_group
from cbas.settings import Settings

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "counter"
TIME_LIMIT = 110.0
MIN_PREEMPTIONS = 2

# A fast market: one wall second is 5 simulated minutes; the notice lasts 2 wall seconds.
# Seed 2 reclaims the job's machines several times within its ~30 s of work.
DEMO_ENV = {
    "CBAS_PING_INTERVAL": "1",
    "CBAS_PING_MISSED_MAX": "4",
    "CBAS_BOOT_TIMEOUT": "30",
    "CBAS_SCHEDULE_INTERVAL": "0.5",
    "CBAS_BATCH_WINDOW": "0.2",
    "CBAS_NOTICE_POLL_INTERVAL": "0.25",
    "CBAS_LOG_UPLOAD_INTERVAL": "1",
    "CBAS_MARKET_TIME_SCALE": "300",
    "CBAS_MARKET_NOTICE_SECONDS": "2",
    "CBAS_MARKET_SEED": "2",
}


def demo_root() -> Path:
    """The demo's folder: its private CBAS home, and beside it the machines' disks, which the
    jobs' own users (when run as root) must reach."""
    root = Path(tempfile.mkdtemp(prefix="cbas-demo-"))
    root.chmod(0o711)
    (root / "home").mkdir(mode=0o700)
    return root


def local_env(root: Path, **settings: str) -> dict[str, str]:
    """The environment of a master on the local backend in `root` (demo_root()), with the demo's
    fast timings and these CBAS_ settings over them."""
    env = {**os.environ, **DEMO_ENV, "CBAS_HOME": str(root / "home"), "CBAS_MACHINES_DIR": str(root / "machines"),
           **settings}
    if os.geteuid() != 0:  # no users of their own for the jobs: run them as ourselves
        env["CBAS_JOB_USER"] = "worker"
    return env


def start_master(env: dict[str, str], home: Path, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    with open(home / "master.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cbas", "master"], env=env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while not (home / "master.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_master(process)
            raise RuntimeError(f"the master did not start; see {home / 'master.log'}")
        time.sleep(0.1)
    return process


def stop_master(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill_group(process.pid)
            process.wait()


def leftover_machines(home: Path) -> list[int]:
    """Process groups of local machines that are still alive."""
    from cbas.local.cloud import MachineRecord

    alive = []
    for path in (home / "cloud" / "machines").glob("i-*.json"):
        record = MachineRecord.model_validate_json(path.read_text())
        if record.pgid and group_alive(record.pgid):
            alive.append(record.pgid)
    return alive


def reference_output(example: Path, arguments: list[str], scratch: Path) -> bytes:
    """What the counter writes when nothing interrupts it (run here with no delay)."""
    shutil.copy(example / "input.txt", scratch / "input.txt")
    subprocess.run(["/bin/sh", str(example / "counter.sh"), *arguments], cwd=scratch, check=True,
                   env={"PATH": "/usr/bin:/bin", "COUNTER_DELAY": "0"}, stdout=subprocess.DEVNULL)
    return (scratch / "output.txt").read_bytes()


def _view(job: dict[str, object], progress: str, elapsed: float) -> Table:
    table = Table("job", "state", "restarts", "preempted", "checkpoints", "progress", "elapsed", box=None)
    table.add_row(str(job["id"]), str(job["state"]), str(job["restarts"]), str(job["preemptions"]),
                  str(job["checkpoints"]), progress, f"{elapsed:.0f}s")
    return table


def run_demo(
    keep: bool = False, trace: Path | None = None, console: Console | None = None,
    seed: int | None = None, time_scale: float | None = None,
) -> int:
    console = console or Console()
    root = demo_root()
    home = root / "home"
    env = local_env(root)
    if seed is not None:
        env["CBAS_MARKET_SEED"] = str(seed)
    if time_scale is not None:
        env["CBAS_MARKET_TIME_SCALE"] = str(time_scale)
    if trace is not None:
        env["CBAS_MARKET_TRACE"] = str(trace.resolve())
    settings = Settings(home=home)
    jdl_path = EXAMPLE / "counter.jdl"
    console.print(f"[bold]CBAS demo[/bold]: state in {home}")
    master = start_master(env, home)
    ok = False
    try:
        job_id = submit(settings, jdl_path, show_progress=False)
        console.print(f"submitted {jdl_path.name} as job [bold]{job_id}[/bold]; the spot market will reclaim its machines")
        client = MasterClient(settings)
        started = time.monotonic()
        job = client.job(job_id)
        with Live(_view(job, "", 0), console=console, refresh_per_second=4) as live:
            while job["state"] not in ("COMPLETED", "FAILED", "CANCELLED"):
                if time.monotonic() - started > TIME_LIMIT:
                    break
                time.sleep(0.5)
                job = client.job(job_id)
                live.update(_view(job, _progress(home, job_id), time.monotonic() - started))
        console.print()
        for event in job.get("events", []):
            if event["kind"] in ("preempted", "machine-lost", "starting", "completed", "failed"):
                console.print(f"  {event['kind']:<12} {event['detail']}", highlight=False)
        if job["state"] != "COMPLETED":
            console.print(f"[red]the job ended {job['state']}[/red] {job.get('error') or ''}")
            return 1
        out = home / "fetched"
        fetch(settings, job_id, out, show_progress=False)
        arguments = prepare(jdl_path).description.arguments.split()
        expected = reference_output(EXAMPLE, arguments, Path(tempfile.mkdtemp(dir=home)))
        same = (out / "output.txt").read_bytes() == expected
        enough = job["preemptions"] >= MIN_PREEMPTIONS
        console.print(
            f"output.txt: {len(expected.splitlines())} lines, "
            + ("[green]identical to an uninterrupted run[/green]" if same else "[red]differs from an uninterrupted run[/red]")
        )
        console.print(f"preempted {job['preemptions']} time(s), restarted {job['restarts']} time(s), "
                      f"{job['checkpoints']} checkpoints, cost ${job['cost_so_far']:.5f}")
        if not enough:
            console.print(f"[red]the market preempted the job fewer than {MIN_PREEMPTIONS} times[/red]")
        ok = same and enough
    except MasterUnavailable as exc:
        console.print(f"[red]{exc}[/red]")
    finally:
        stop_master(master)
        for pgid in leftover_machines(home):  # the master terminates machines; make sure
            kill_group(pgid)
        if not keep and ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            console.print(f"state kept in {home} (master.log, cloud/, blobs/)")
    console.print("[bold green]demo passed[/bold green]" if ok else "[bold red]demo failed[/bold red]")
    return 0 if ok else 1


def _progress(home: Path, job_id: str) -> str:
    try:
        text = (home / "blobs" / "jobs" / job_id / "logs" / "stdout").read_text()
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.startswith("progress")]
    return lines[-1].split()[1] if lines else ""
