#!/usr/bin/env python3
"""Live replay: the real master on the local backend beside the simulator, on one spot trace.

The master runs as a user runs it (`cbas master`, local backend) with the trace replayed on a
compressed clock (--scale trace seconds per wall second, from --offset-hours into it). --jobs jobs
with Runtime and Deadline are submitted --spread wall seconds apart, each a real program that does
its work and keeps how much it did in its working directory (directory checkpoints), on the
trace's instance type with the most zones. The simulator then runs the same policy code (`cbas`)
on the same trace, start times and jobs, in the master's own units: wall seconds, the trace read
at the compressed times, steps of the master's scheduling interval, each job's restart overhead
as the master measured it. Prints both, job by job, and writes JSON:

    {"live": {"mean_cost_vs_ondemand", "deadline_misses", "jobs"}, "simulated": {...},
     "simulated_alone": {...}, "per_job": [...]}

"simulated" runs the jobs as one master runs them: together, sharing what every launch and
preemption taught (the master keeps one record for all its jobs); "simulated_alone" each job by
itself.

Costs are against running the same work on on-demand. The live cost is the master's account (each
machine at its launch price for its lifetime); the simulator bills each step at its price.

    scripts/bench/live_replay.py --trace ../shared/traces/aws-p3.2xlarge-9zones-2023-02-15.csv.gz \\
        --jobs 4 [--scale 120] [--work-hours 4] [--deadline 1.5] [--offset-hours 0] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cbas import jdl  # noqa: E402
from cbas.client import MasterClient  # noqa: E402
from cbas.demo import demo_root, leftover_machines, local_env, start_master, stop_master  # noqa: E402
from cbas.frontend import submit  # noqa: E402
from cbas.local.cloud import kill_group  # noqa: E402
from cbas.local.market import TraceMarket  # noqa: E402
from cbas.scheduler.model import JobSpec, MarketSteps, Scenario, binned, market_sets  # noqa: E402
from cbas.scheduler.policies import Knowledge, make  # noqa: E402
from cbas.scheduler.simulator import Result, ondemand_cost, simulate, simulate_many  # noqa: E402
from cbas.scheduler.traces import MarketSeries, load_trace  # noqa: E402
from cbas.settings import Settings  # noqa: E402

WORK_PY = """#!/usr/bin/env python3
# argv[1] seconds of work: the time it has run, kept in its working directory (its checkpoints hold
# it), so that it needs exactly its Runtime of running, as the simulator's job does
import os, sys, time
need = float(sys.argv[1])
done = float(open("progress").read()) if os.path.exists("progress") else 0.0
last = time.monotonic()
while done < need:
    time.sleep(min(0.2, need - done))
    now = time.monotonic()
    done, last = done + now - last, now
    with open("progress.part", "w") as out:
        out.write(repr(done))
    os.replace("progress.part", "progress")
"""
ENDED = ("COMPLETED", "FAILED", "CANCELLED")
CHECKPOINT_INTERVAL = 10  # wall seconds


def epoch(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def write_jobs(folder: Path, count: int, kind: str, work_s: int, deadline_s: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "work.py").write_text(WORK_PY)
    paths = []
    for index in range(count):
        description = jdl.JobDescription(
            executable="work.py", arguments=str(work_s), environment={"PATH": "/usr/local/bin:/usr/bin:/bin"},
            name=f"replay-{index}", checkpoint_strategy="directory", checkpoint_interval=CHECKPOINT_INTERVAL,
            instance_types=(kind,), runtime=f"{work_s}s", deadline=f"{deadline_s}s")
        path = folder / f"job-{index}.jdl"
        path.write_text(jdl.write(description))
        paths.append(path)
    return paths


def run_live(args: argparse.Namespace, kind: str, work_s: int, deadline_s: int) -> tuple[list[dict[str, Any]], float]:
    """Submit the jobs to a real master; their views once all ended, and when the market opened."""
    root = demo_root()
    home = root / "home"
    env = local_env(root, CBAS_MARKET_TRACE=str(args.trace.resolve()), CBAS_MARKET_TIME_SCALE=str(args.scale),
                    CBAS_MARKET_TRACE_OFFSET_HOURS=str(args.offset_hours), CBAS_SCHEDULE_INTERVAL=str(args.step),
                    CBAS_MARKET_NOTICE_SECONDS=str(args.notice))
    settings = Settings(home=home)
    jobs = write_jobs(root / "jobs", args.jobs, kind, work_s, deadline_s)
    master = start_master(env, home)
    ids: list[str] = []
    try:
        client = MasterClient(settings)
        started = time.monotonic()
        limit = args.spread * args.jobs + deadline_s * 2 + 60
        views: dict[str, dict[str, Any]] = {}
        while True:
            due = min(args.jobs, int((time.monotonic() - started) // args.spread) + 1)
            while len(ids) < due:
                ids.append(submit(settings, jobs[len(ids)], show_progress=False))
            views = {job_id: client.job(job_id) for job_id in ids}
            ended = sum(view["state"] in ENDED for view in views.values())
            print(f"\r{time.monotonic() - started:6.0f} s: {len(ids)} submitted, {ended} ended  ", end="", flush=True)
            if len(ids) == args.jobs and ended == args.jobs:
                break
            if time.monotonic() - started > limit:
                print(f"\nstopped after {limit:.0f} s with jobs still running")
                break
            time.sleep(1.0)
        print()
        opened_at = json.loads((home / "cloud" / "market.json").read_text())["opened_at"]
        return [views[job_id] for job_id in ids], opened_at
    finally:
        for job_id in ids:
            try:
                if client.job(job_id)["state"] not in ENDED:
                    client.cancel_job(job_id)
            except Exception:  # noqa: BLE001  (cleaning up: the master stops next anyway)
                pass
        stop_master(master)
        for pgid in leftover_machines(home):
            kill_group(pgid)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def market_steps(series: MarketSeries, market: TraceMarket, wall_start: float, opened_at: float, scale: float,
                 step_s: float, steps: int) -> MarketSteps:
    """The market as the live master met it, a step (its scheduling interval) at a time: the trace
    from the job's start at the compressed times, each step available only if every observation
    in it is (the live market reclaims at any of them) and priced at their mean."""
    start = market.trace_time((wall_start - opened_at) * scale)
    return binned(series, start, steps, step_s * scale / 3600.0)


def job_spec(work_s: int, deadline_s: int, restart_s: float, notice_s: float) -> JobSpec:
    return JobSpec(work_s / 3600.0, deadline_s / 3600.0, restart_s / 3600.0, CHECKPOINT_INTERVAL / 3600.0, 0.0,
                   notice_s / 3600.0)


def summary_of(result: Result, job: JobSpec, scenario: Scenario) -> dict[str, Any]:
    reference = ondemand_cost(job, scenario)
    return {"cost_vs_ondemand": result.cost / reference, "missed": result.missed, "preemptions": result.preemptions,
            "starts": result.starts, "reference": reference}


def simulated(views: list[dict[str, Any]], markets: list[MarketSeries], market: TraceMarket, opened_at: float,
              args: argparse.Namespace, jobs: list[JobSpec]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The jobs simulated as one master runs them (in step, sharing what their launches and
    preemptions teach, as the master's one record does), and each alone."""
    starts = [epoch(view["submitted_at"]) or opened_at for view in views]
    first = min(starts)
    arrivals = [int(round((start - first) / args.step)) for start in starts]
    steps = max(arrivals) + int(math.ceil(max(job.deadline_hours for job in jobs) * 3600 / args.step)) + 1
    scenario = Scenario([market_steps(s, market, first, opened_at, args.scale, args.step, steps) for s in markets],
                        args.step / 3600.0)
    knowledge, policies = Knowledge(), []
    for arrival in arrivals:
        policy = make("cbas")
        policy.shared, policy.arrival = knowledge, arrival  # type: ignore[attr-defined]
        policies.append(policy)
    together = simulate_many(list(zip(jobs, arrivals)), scenario, policies)
    shared, alone = [], []
    for job, arrival, result in zip(jobs, arrivals, together):
        own = Scenario([MarketSteps(m.zone, m.instance_type, m.ondemand, m.price[arrival:], m.available[arrival:])
                        for m in scenario.markets], scenario.step_hours)
        shared.append(summary_of(result, job, own))
        alone.append(summary_of(simulate(job, own, make("cbas")), job, own))
    return shared, alone


def live_result(view: dict[str, Any], reference: float) -> dict[str, Any]:
    finished, deadline = epoch(view.get("finished_at")), epoch(view.get("deadline_at"))
    missed = view["state"] != "COMPLETED" or finished is None or deadline is None or finished > deadline
    predicted = view.get("predicted_cost")
    return {"cost_vs_ondemand": view["cost_so_far"] / reference, "missed": missed, "state": view["state"],
            "cost": view["cost_so_far"], "predicted_cost": predicted,  # as `cbas status ID` shows them
            "submitted_at": view["submitted_at"],
            "preemptions": view.get("preemptions", 0), "restarts": view.get("restarts", 0),
            "late_s": (finished - deadline) if finished and deadline else None}


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"mean_cost_vs_ondemand": statistics.fmean(r["cost_vs_ondemand"] for r in rows),
            "deadline_misses": sum(r["missed"] for r in rows), "jobs": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--scale", type=float, default=120.0, help="trace seconds per wall second")
    parser.add_argument("--work-hours", type=float, default=4.0, help="each job's work, in trace hours")
    parser.add_argument("--deadline", type=float, default=1.5, help="deadline, times the work")
    parser.add_argument("--offset-hours", type=float, default=0.0, help="start this far into the trace")
    parser.add_argument("--spread", type=float, default=20.0, help="wall seconds between submissions")
    parser.add_argument("--step", type=float, default=2.0, help="the master's scheduling interval (wall s)")
    parser.add_argument("--notice", type=float, default=2.0, help="the spot notice (wall s)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/live-replay.json"))
    parser.add_argument("--keep", action="store_true", help="keep the master's folder")
    args = parser.parse_args()

    trace = load_trace(args.trace)
    markets = max(market_sets(trace).values(), key=len)  # the type with the most zones
    kind = markets[0].instance_type
    work_s = int(round(args.work_hours * 3600 / args.scale))
    deadline_s = int(round(work_s * args.deadline))
    print(f"{trace.name}: {kind} in {len(markets)} zones; {args.jobs} jobs of {work_s} s (Deadline {deadline_s} s), "
          f"1 wall s = {args.scale:g} trace s")
    began = time.monotonic()
    views, opened_at = run_live(args, kind, work_s, deadline_s)
    market = TraceMarket(trace, args.offset_hours * 3600.0)
    measured = [v["restart_seconds"] for v in views if v.get("restart_seconds")]
    default_restart = statistics.median(measured) if measured else Settings().default_restart_seconds()
    jobs = [job_spec(work_s, deadline_s, view.get("restart_seconds") or default_restart, args.notice) for view in views]
    shared, alone = simulated(views, markets, market, opened_at, args, jobs)
    per_job = [{"job": view["id"], "live": live_result(view, sim["reference"]), "simulated": sim,
                "simulated_alone": own} for view, sim, own in zip(views, shared, alone)]
    print(f"{'job':10} {'live cost':>10} {'sim cost':>9} {'live miss':>10} {'sim miss':>9} {'live preempt':>13} "
          f"{'sim preempt':>12} {'predicted $':>12} {'actual $':>9}")
    for row in per_job:
        live, sim = row["live"], row["simulated"]
        predicted = f"{live['predicted_cost']:.4f}" if live["predicted_cost"] is not None else "-"
        print(f"{row['job']:10} {live['cost_vs_ondemand']:10.3f} {sim['cost_vs_ondemand']:9.3f} {live['missed']!s:>10} "
              f"{sim['missed']!s:>9} {live['preemptions']:13} {sim['preemptions']:12} {predicted:>12} {live['cost']:9.4f}")
    result = {"live": totals([r["live"] for r in per_job]), "simulated": totals([r["simulated"] for r in per_job]),
              "simulated_alone": totals([r["simulated_alone"] for r in per_job]),
              "per_job": per_job, "trace": trace.name, "instance_type": kind, "scale": args.scale,
              "work_s": work_s, "deadline_s": deadline_s, "offset_hours": args.offset_hours, "opened_at": opened_at,
              "wall_seconds": time.monotonic() - began}
    live, sim = result["live"], result["simulated"]
    print(f"live: {live['mean_cost_vs_ondemand']:.3f} of on-demand, {live['deadline_misses']} missed; simulated: "
          f"{sim['mean_cost_vs_ondemand']:.3f}, {sim['deadline_misses']} missed (each job alone: "
          f"{result['simulated_alone']['mean_cost_vs_ondemand']:.3f}); live/simulated "
          f"{live['mean_cost_vs_ondemand'] / sim['mean_cost_vs_ondemand']:.3f}; {result['wall_seconds']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
