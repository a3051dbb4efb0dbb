"""The `cbas` command line.

Exit codes: 0 success; 1 the job failed or is not finished; 2 bad input (JDL, missing file,
unknown job id); 3 no master is running or it cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from cbas import __version__, jdl, logs
from cbas.backends import BlobNotFound
from cbas.client import ApiError, MasterClient, MasterUnavailable
from cbas.settings import Settings

# piped output is not squeezed to 80 columns (rich's default without a terminal)
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

STATE_STYLE = {
    "SUBMITTING": "dim", "QUEUED": "yellow", "PROVISIONING": "yellow", "STARTING": "cyan", "RUNNING": "green",
    "PREEMPTED": "magenta", "COMPLETED": "bold green", "FAILED": "bold red", "CANCELLED": "dim",
}


def fail(message: str, code: int) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    sys.exit(code)


def settings_of(ctx: click.Context) -> Settings:
    return ctx.ensure_object(dict)["settings"]


def api_call(func: Any, *args: Any) -> Any:
    try:
        return func(*args)
    except MasterUnavailable as exc:
        fail(str(exc), 3)
    except ApiError as exc:
        fail(str(exc), 2 if exc.status in (400, 404) else 3)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), envvar="CBAS_HOME", help="State folder (default ~/.cbas).")
@click.option("--backend", type=click.Choice(["local", "aws"]), envvar="CBAS_BACKEND", help="Backend (default local).")
@click.version_option(__version__, prog_name="cbas")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, backend: str | None) -> None:
    """CBAS runs long jobs on cheap preemptible machines and makes them finish.

    \b
    Quick start on the local backend (no cloud account needed):
      cbas master &                 # the daemon that schedules and restarts jobs
      cbas submit examples/counter/counter.jdl
      cbas status                   # watch it survive preemptions
      cbas fetch <job id>           # download its output
    Or run everything at once: cbas demo

    Exit codes: 0 ok, 1 job failed or not finished, 2 bad input or unknown job, 3 no master.
    """
    overrides: dict[str, Any] = {}
    if home is not None:
        overrides["home"] = home
    if backend is not None:
        overrides["backend"] = backend
    ctx.ensure_object(dict)["settings"] = Settings(**overrides)


@cli.command()
@click.argument("jdl_file", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["local", "aws"]), help="Backend for this submission.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the job id.")
@click.option("--wait", "-w", is_flag=True,
              help="Follow the job to its end, then fetch its output (exit 0 only if it completed).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="With --wait: folder for the output (default ./<job id>).")
@click.pass_context
def submit(ctx: click.Context, jdl_file: Path, backend: str | None, quiet: bool, wait: bool,
           output: Path | None) -> None:
    """Submit the job described by JDL_FILE and print its id.

    Every file the JDL names (Executable, Prologue, InputSandbox) is checked before anything is
    uploaded. With --wait, follow the job (each change of state is printed) and fetch its output
    when it ends; Ctrl-C stops following, not the job.

    Example: cbas submit examples/counter/counter.jdl --wait -o results/
    """
    from cbas.frontend import SubmitError, submit as do_submit

    settings = settings_of(ctx)
    if backend:
        settings = settings.model_copy(update={"backend": backend})
    try:
        job_id = do_submit(settings, jdl_file, show_progress=not quiet and sys.stderr.isatty())
    except (jdl.JDLError, SubmitError) as exc:
        fail(str(exc), 2)
    except MasterUnavailable as exc:
        fail(str(exc), 3)
    except ApiError as exc:
        fail(str(exc), 3)
    except Exception as exc:  # DeliveryError and friends: say what failed, not a traceback
        fail(f"submission failed: {exc}", 3)
    if quiet or not sys.stdout.isatty():
        click.echo(job_id)  # scripts get the bare id
    else:
        console.print(f"submitted job [bold]{job_id}[/bold]  (follow it with: cbas status {job_id})")
    if wait:
        ctx.invoke(fetch, job_id=job_id, output=output, wait=True)


def _follow(client: MasterClient, job_id: str, interval: float = 1.0) -> dict[str, Any]:
    """Poll a job until it ends, printing each new event to stderr; returns the finished job."""
    shown = 0
    try:
        while True:
            job = api_call(client.job, job_id)
            for event in job["events"][shown:]:
                err_console.print(f"{event['at'][11:19]}  {event['kind']:<14} {event['detail']}", highlight=False)
            shown = len(job["events"])
            if job["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
                return job
            time.sleep(interval)
    except KeyboardInterrupt:
        err_console.print(f"stopped following; job {job_id} goes on (cbas status {job_id})")
        sys.exit(130)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


@cli.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, job_id: str | None, as_json: bool) -> None:
    """Show all jobs, or one job in detail with its timeline.

    Example: cbas status; cbas status 3f9a1c2e --json
    """
    client = api_call(MasterClient, settings_of(ctx))
    if job_id:
        job = api_call(client.job, job_id)
        if as_json:
            click.echo(json.dumps(job, indent=2))
            return
        _print_job(job)
        return
    jobs = api_call(client.jobs)
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    table = Table(title=None)
    for column in ("id", "name", "state", "restarts", "preempted", "checkpoints", "runtime", "cost $"):
        numeric = column in ("restarts", "preempted", "checkpoints", "cost $")
        # ids and states are what scripts and eyes look for: never cut them short
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column != "name",
                         min_width=12 if column == "state" else None)
    for job in jobs:
        state = job["state"]
        table.add_row(
            job["id"], job.get("name") or "", f"[{STATE_STYLE.get(state, '')}]{state}[/]", str(job["restarts"]),
            str(job["preemptions"]), str(job["checkpoints"]), _duration(job["runtime_seconds"]), f"{job['cost_so_far']:.4f}",
        )
    console.print(table if jobs else "no jobs yet: submit one with `cbas submit JOB.jdl`")


def _print_job(job: dict[str, Any]) -> None:
    state = job["state"]
    console.print(f"[bold]{job['id']}[/bold] {job.get('name') or ''}  [{STATE_STYLE.get(state, '')}]{state}[/]")
    console.print(
        f"restarts {job['restarts']}  preemptions {job['preemptions']}  checkpoints {job['checkpoints']}  "
        f"runtime {_duration(job['runtime_seconds'])}  cost ${job['cost_so_far']:.4f}"
        + (f" (predicted ${job['predicted_cost']:.4f})" if job.get("predicted_cost") is not None else "")
    )
    if job.get("exit_code") is not None:
        console.print(f"exit code {job['exit_code']}")
    if job.get("error"):
        console.print(f"[red]{job['error']}[/red]")
    if job.get("stderr_tail"):
        console.print("last lines of stderr:\n" + job["stderr_tail"], highlight=False)
    table = Table("time", "event", "detail", box=None)
    for event in job.get("events", []):
        at = datetime.fromisoformat(event["at"]).strftime("%H:%M:%S")
        table.add_row(at, event["kind"], event["detail"])
    console.print(table)


@cli.command(name="logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the job ends.")
@click.option("--stderr", "stream", flag_value="stderr", help="Show stderr instead of stdout.")
@click.option("--stdout", "stream", flag_value="stdout", default=True, hidden=True)
@click.pass_context
def logs_command(ctx: click.Context, job_id: str, follow: bool, stream: str) -> None:
    """Print a job's stdout (or stderr), as far as it has been uploaded.

    Example: cbas logs 3f9a1c2e -f
    """
    from cbas.wiring import open_blobs

    settings = settings_of(ctx)
    client = api_call(MasterClient, settings)
    job = api_call(client.job, job_id)
    blobs = open_blobs(settings)
    key = f"jobs/{job_id}/logs/{stream}"
    shown = 0
    while True:
        try:
            data = blobs.get_bytes(key)
        except BlobNotFound:
            data = b""
        if len(data) < shown:  # the job was restored from a checkpoint: its log was rewound
            shown = len(data)
        sys.stdout.buffer.write(data[shown:])
        sys.stdout.flush()
        shown = len(data)
        if not follow or job["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return
        time.sleep(1.0)
        job = api_call(client.job, job_id)


@cli.command()
@click.argument("job_id")
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a job: its machine is terminated and it will not run again.

    Example: cbas cancel 3f9a1c2e
    """
    from cbas.frontend import cancel as do_cancel

    settings = settings_of(ctx)
    api_call(do_cancel, settings, job_id)
    console.print(f"cancelling {job_id}")


def _detach_master(settings: Settings, args: list[str], timeout: float = 30.0) -> int:
    """Start `cbas <args>` (the master) in its own session and wait until it has written master.json."""
    from cbas.master.daemon import master_file_info
    from cbas.wiring import master_file

    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / "master.log", "ab") as log:
        child = subprocess.Popen([sys.executable, "-m", "cbas", *args], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "CBAS_HOME": str(settings.home)})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = master_file_info(master_file(settings))
        if info and info.get("pid") == child.pid:
            console.print(f"master running (pid {child.pid}) at {info['url']}; dashboard at {info['url']}/; "
                          f"log in {settings.home / 'master.log'}")
            return 0
        if child.poll() is not None:
            err_console.print(f"[red]the master did not start[/] (exit code {child.returncode}); "
                              f"see {settings.home / 'master.log'}")
            return child.returncode or 3
        time.sleep(0.1)
    err_console.print(f"[red]the master did not answer within {timeout:.0f}s[/]; see {settings.home / 'master.log'}")
    return 3


def _stop_master(settings: Settings, timeout: float = 30.0) -> int:
    from cbas.master.daemon import master_file_info
    from cbas.wiring import master_file

    info = master_file_info(master_file(settings))
    if info is None:
        err_console.print(f"no master is running for {settings.home}")
        return 3
    pid = int(info["pid"])  # type: ignore[call-overload]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and master_file(settings).exists():
        time.sleep(0.1)
    if master_file(settings).exists():
        err_console.print(f"[red]master {pid} did not stop within {timeout:.0f}s[/]")
        return 1
    console.print(f"master {pid} stopped; its jobs go on")
    return 0


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool) -> None:
    """Remove what no job needs: machines, volumes, snapshots and images left behind, image
    builder queues, and the files of jobs finished more than CBAS_RETENTION_DAYS ago.

    The master also does this every CBAS_REAPER_INTERVAL seconds. Nothing an unfinished job
    uses is ever removed.

    Example: cbas gc --dry-run
    """
    settings = settings_of(ctx)
    report = api_call(api_call(MasterClient, settings).collect_garbage, dry_run)
    verb = "would remove" if dry_run else "removed"
    for line in report["removed"]:
        console.print(f"{verb} {line}")
    for line in report["failed"]:
        err_console.print(f"[red]could not remove[/] {line}")
    if not report["removed"] and not report["failed"]:
        console.print("nothing to remove")
    sys.exit(1 if report["failed"] else 0)


@cli.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Folder to write to (default ./<job id>).")
@click.option("--wait", "-w", is_flag=True, help="Wait for the job to end first, printing its events.")
@click.pass_context
def fetch(ctx: click.Context, job_id: str, output: Path | None, wait: bool) -> None:
    """Download a finished job's output sandbox and its stdout and stderr.

    Example: cbas fetch 3f9a1c2e -o results/
    """
    from cbas.frontend import fetch as do_fetch

    settings = settings_of(ctx)
    client = api_call(MasterClient, settings)
    job = _follow(client, job_id) if wait else api_call(client.job, job_id)
    if job["state"] not in ("COMPLETED", "FAILED", "CANCELLED"):
        fail(f"job {job_id} is {job['state']}; its output can be fetched once it has finished", 1)
    target = output or Path(job_id)
    written = do_fetch(settings, job_id, target, show_progress=sys.stderr.isatty())
    console.print(f"wrote {len(written)} item(s) to {target}/: {', '.join(written) or 'nothing'}")
    if job["state"] != "COMPLETED":
        sys.exit(1)


@cli.command()
@click.option("--port", type=int, help="Port to listen on (default: any free port).")
@click.option("--trace", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Replay this spot market trace (CSV or CSV.GZ) instead of the built-in market model.")
@click.option("--detach", "-d", is_flag=True,
              help="Start in the background (its log in <CBAS_HOME>/master.log) and return once it answers.")
@click.option("--stop", is_flag=True, help="Stop the running master (its jobs go on) and return once it has.")
@click.pass_context
def master(ctx: click.Context, port: int | None, trace: Path | None, detach: bool, stop: bool) -> None:
    """Run the master daemon (until SIGTERM or Ctrl-C). Jobs keep running while it is stopped.

    Example: cbas master --detach   (later: cbas master --stop)
    """
    from cbas.master.daemon import MasterAlreadyRunning, serve
    from cbas.wiring import BackendUnavailable

    settings = settings_of(ctx)
    if stop:
        sys.exit(_stop_master(settings))
    if detach:
        sys.exit(_detach_master(settings, [a for a in sys.argv[1:] if a not in ("--detach", "-d")]))
    updates: dict[str, Any] = {}
    if port is not None:
        updates["master_port"] = port
    if trace is not None:
        updates["market_trace"] = trace.resolve()
    settings = settings.model_copy(update=updates)
    logs.configure(json=True, level=settings.log_level)
    try:
        asyncio.run(serve(settings, on_ready=lambda url: err_console.print(
            f"master listening on {url}; dashboard at {url}/ (sign in with {settings.home}/api-token)")))
    except MasterAlreadyRunning as exc:
        fail(str(exc), 3)
    except BackendUnavailable as exc:
        fail(str(exc), 2)


@cli.command(hidden=True)
@click.option("--instance-id", required=True)
@click.option("--disk", type=click.Path(path_type=Path), required=True)
@click.option("--metadata-url", required=True)
@click.option("--key-file", type=click.Path(path_type=Path),
              help="The machine's key (default <disk>/worker/machine.key; its ledger-id beside it).")
@click.pass_context
def worker(ctx: click.Context, instance_id: str, disk: Path, metadata_url: str, key_file: Path | None) -> None:
    """Run the worker daemon of one machine (started by the machine's boot script)."""
    from cbas.wiring import open_blobs, open_bus, open_volumes
    from cbas.worker import credential
    from cbas.worker.daemon import Worker
    from cbas.worker.imds import MetadataClient

    settings = settings_of(ctx)
    logs.configure(json=True, level=settings.log_level)
    _raise_open_file_limit()  # a job's sockets to it (the DMTCP hook) must not run it out
    path = key_file or credential.key_file(disk)
    try:
        machine = credential.read_credential(path)
    except (OSError, ValueError) as exc:  # PermissionError included
        fail(f"cannot use the machine's key {path}: {exc}", 2)

    async def run() -> None:
        daemon = Worker(settings, instance_id, disk, MetadataClient(metadata_url), open_blobs(settings),
                        open_bus(settings), open_volumes(settings, instance_id, disk), credential=machine)
        await daemon.run()

    asyncio.run(run())


def _raise_open_file_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the demo's state folder for a look afterwards.")
@click.option("--trace", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Replay a spot market trace instead of the built-in model.")
@click.option("--seed", type=int, help="Seed of the simulated market (another seed, another history).")
@click.option("--time-scale", type=float, help="Simulated seconds per wall second of the market.")
def demo(keep: bool, trace: Path | None, seed: int | None, time_scale: float | None) -> None:
    """Run a checkpointed counter job that survives spot preemptions, end to end, on this machine.

    Starts a master with a fast simulated spot market, submits examples/counter, shows progress,
    fetches the output and checks it equals an uninterrupted run. Exit 0 only if it does.

    Example: cbas demo --keep   (keeps its state folder to look at afterwards)
    """
    from cbas.demo import run_demo

    sys.exit(run_demo(keep=keep, trace=trace, console=console, seed=seed, time_scale=time_scale))


@cli.group()
def aws() -> None:
    """Create or remove the AWS resources of a CBAS cluster."""


@aws.command()
@click.option("--cluster", default="default", show_default=True, help="Name of the cluster (part of every name).")
@click.option("--region", default="us-east-1", show_default=True)
def bootstrap(cluster: str, region: str) -> None:
    """Create the bucket, table, topic, worker role and security group (again: only what is missing).

    Example: cbas aws bootstrap --cluster lab --region eu-west-1 >> ~/.cbas/aws.env
    """
    from cbas.aws.bootstrap import Bootstrap

    report = Bootstrap(cluster, region).up()
    for line in report.created:
        err_console.print(f"created {line}")
    for line in report.found:
        err_console.print(f"found   {line}")
    err_console.print("set these (an AMI with Python 3.11 as CBAS_AWS_IMAGE_ID, the master's https address as CBAS_PUBLIC_URL):")
    for name, value in report.settings.items():
        click.echo(f"{name}={value}")


@aws.command()
@click.option("--cluster", default="default", show_default=True)
@click.option("--region", default="us-east-1", show_default=True)
@click.option("--yes", is_flag=True, help="Really delete (the bucket with all job data in it).")
def teardown(cluster: str, region: str, yes: bool) -> None:
    """Delete what bootstrap created, the bucket's job data included.

    Example: cbas aws teardown --cluster lab --yes
    """
    from cbas.aws.bootstrap import Bootstrap

    if not yes:
        fail("teardown deletes every job's data in the bucket; run it again with --yes to go ahead", 2)
    for line in Bootstrap(cluster, region).down().created:
        err_console.print(line)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name", type=click.Choice(["checkpoint", "scheduler"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name: str, args: tuple[str, ...]) -> None:
    """Run a benchmark from scripts/bench (it prints a table and writes JSON).

    Example: cbas bench scheduler --traces ../shared/traces --starts 6
    """

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench" / f"{name}.py"
    if not script.exists():
        fail(f"{script} is not here: benchmarks run from a checkout of CBAS", 2)
    sys.exit(subprocess.call([sys.executable, str(script), *args]))


@cli.command()
@click.argument("target", type=click.Path(path_type=Path, dir_okay=False))
@click.pass_context
def backup(ctx: click.Context, target: Path) -> None:
    """Copy the job store (jobs, ledger, checkpoints' records, events) to TARGET, consistently,
    while the master runs. Local backend only: on AWS, use DynamoDB's point-in-time recovery.

    Example: cbas backup ~/cbas-$(date +%F).db
    """
    import sqlite3

    from cbas.wiring import db_path

    settings = settings_of(ctx)
    if settings.backend != "local":
        fail("cbas backup copies the local SQLite store; on AWS enable point-in-time recovery on the table", 2)
    if not db_path(settings).exists():
        fail(f"no job store at {db_path(settings)}", 2)
    if target.exists():
        fail(f"{target} exists; choose a new file", 2)
    source = sqlite3.connect(db_path(settings))
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)  # SQLite's online backup: a consistent copy while others write
    finally:
        copy.close()
        source.close()
    target.chmod(0o600)
    console.print(f"backed up {db_path(settings)} to {target}")


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (commands, options and their values).

    Example: cbas completion bash >> ~/.bashrc   (or: eval "$(cbas completion bash)")
    """
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)
    assert completer is not None
    click.echo(completer(cli, {}, "cbas", "_CBAS_COMPLETE").source())


def main() -> None:
    cli(obj={})
