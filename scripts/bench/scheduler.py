#!/usr/bin/env python3
"""Scheduler benchmark: every policy on a grid of jobs over real spot traces.

Jobs of 4, 12 and 48 hours of work, with deadline slack of 10%, 50% and 100% and restart
overheads of 0.1 h and 0.5 h, start at --starts times spread over each trace; each trace's
markets are grouped by instance type, and a job may use every zone of its type. `greedy` and
`uniform-progress` (single-zone policies, as in Can't Be Late) run once per home zone and count
as one run each; `cbas` and `omniscient` use all zones. Traces shorter than a job's window are
replayed cyclically. Where a trace has no price for a market, spot costs 30% of on-demand there
(cbas.scheduler.traces.UNKNOWN_SPOT_FRACTION). Billing per second unless --billing hour.

    scripts/bench/scheduler.py --traces ../shared/traces [--starts 6] [--json bench-results/scheduler.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cbas.scheduler.model import JobSpec, MarketSteps, Scenario, market_sets, sample  # noqa: E402
from cbas.scheduler.policies import make  # noqa: E402
from cbas.scheduler.simulator import ondemand_cost, simulate, simulate_many  # noqa: E402
from cbas.scheduler.traces import load_traces  # noqa: E402

WORKLOAD_CAPACITY = 2  # spot machines a market holds at once in the many-job workloads
LENGTHS = (4.0, 12.0, 48.0)
SLACKS = (0.1, 0.5, 1.0)
OVERHEADS = (0.1, 0.5)
ONLINE = ("on-demand", "greedy", "uniform-progress", "cbas")
STEP = 0.1


def cyclic(markets: list[MarketSteps], offset: int, steps: int) -> list[MarketSteps]:
    out = []
    for market in markets:
        length = len(market.price)
        index = [(offset + i) % length for i in range(steps)]
        out.append(MarketSteps(market.zone, market.instance_type, market.ondemand,
                               [market.price[i] for i in index], [market.available[i] for i in index]))
    return out


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(0.9 * len(ordered))) - 1)]


def workloads(full: list[MarketSteps], span_steps: int, starts: int, billing: str) -> dict[str, dict[str, list[float]]]:
    """The two many-job models on one market set: cost over on-demand's, and misses, per policy."""
    models = {
        # eight jobs of their own lengths and deadlines, arriving over a day
        "independent": [(JobSpec(work, work * 1.5, 0.1), int(index * 3 / STEP))
                        for index, work in enumerate([4.0, 12.0, 48.0, 4.0, 12.0, 4.0, 48.0, 12.0])],
        # eight 12-hour tasks with one deadline, a day after they all arrive
        "bag-of-tasks": [(JobSpec(12.0, 24.0, 0.1), 0) for _ in range(8)],
    }
    out: dict[str, dict[str, list[float]]] = {}
    for model, jobs in models.items():
        steps = max(arrival + int(math.ceil(job.deadline_hours / STEP)) for job, arrival in jobs)
        for start in range(starts):
            scenario = Scenario(cyclic(full, int(start * span_steps / starts), steps), STEP, billing)  # type: ignore[arg-type]
            baseline = sum(ondemand_cost(job, scenario) for job, _ in jobs)
            for name in ONLINE:
                policies = [make(name, index % len(full)) for index in range(len(jobs))]
                results = simulate_many(jobs, scenario, policies, capacity=WORKLOAD_CAPACITY)
                row = out.setdefault(model, {}).setdefault(name, [])
                row.append(sum(r.cost for r in results) / baseline)
                out[model].setdefault(name + ":misses", []).append(sum(r.missed for r in results))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=Path, required=True)
    parser.add_argument("--starts", type=int, default=6)
    parser.add_argument("--billing", choices=["second", "hour"], default="second")
    parser.add_argument("--json", type=Path, default=Path("bench-results/scheduler.json"))
    args = parser.parse_args()

    names = [*ONLINE, "omniscient"]
    ratios: dict[str, list[float]] = {n: [] for n in names}
    vs_best: dict[str, list[float]] = {n: [] for n in names}
    misses = {n: 0 for n in names}  # only where on-demand meets the deadline
    infeasible = 0
    preemptions = {n: 0 for n in names}
    seconds = {n: 0.0 for n in names}
    sims = {n: 0 for n in names}
    started = time.perf_counter()
    long_replay: dict[str, float] = {}
    workload_rows: dict[str, dict[str, list[float]]] = {}
    for trace in load_traces(args.traces):
        span_steps = max(1, int((trace.end - trace.start) / 3600 / STEP))
        for kind, series in market_sets(trace).items():
            full = [sample(s, trace.start, span_steps, STEP) for s in series]
            for model, rows in workloads(full, span_steps, min(args.starts, 3), args.billing).items():
                for name, values in rows.items():
                    workload_rows.setdefault(model, {}).setdefault(name, []).extend(values)
            for work in LENGTHS:
                for slack in SLACKS:
                    for overhead in OVERHEADS:
                        job = JobSpec(work, work * (1 + slack), overhead)
                        steps = int(math.ceil(job.deadline_hours / STEP))
                        for start in range(args.starts):
                            offset = int(start * span_steps / args.starts)
                            scenario = Scenario(cyclic(full, offset, steps), STEP, args.billing)
                            baseline = ondemand_cost(job, scenario)
                            feasible = not simulate(job, scenario, make("on-demand")).missed
                            infeasible += int(not feasible)
                            results: dict[str, float] = {}
                            for name in names:
                                homes = range(len(full)) if name in ("greedy", "uniform-progress") else [0]
                                costs = []
                                for home in homes:
                                    t0 = time.perf_counter()
                                    result = simulate(job, scenario, make(name, home))
                                    seconds[name] += time.perf_counter() - t0
                                    sims[name] += 1
                                    costs.append(result.cost)
                                    misses[name] += int(result.missed and feasible)
                                    preemptions[name] += result.preemptions
                                results[name] = statistics.fmean(costs)
                                ratios[name].append(results[name] / baseline)
                            for name in names:
                                vs_best[name].append(results[name] / results["omniscient"])
        print(f"  {trace.name}: done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
        # replay speed: one job over 45 days of this trace (cyclic where it is shorter)
        if not long_replay:
            kind, series = next(iter(market_sets(trace).items()))
            full = [sample(s, trace.start, span_steps, STEP) for s in series]
            job = JobSpec(500.0, 45 * 24.0, 0.1)
            scenario = Scenario(cyclic(full, 0, int(45 * 24 / STEP)), STEP, args.billing)
            for name in ONLINE:
                t0 = time.perf_counter()
                simulate(job, scenario, make(name))
                long_replay[name] = (time.perf_counter() - t0) * 1000

    print(f"\n{'policy':18} {'runs':>6} {'cost/od':>8} {'p90':>7} {'cost/omni':>10} {'misses':>7} {'preempt':>8} {'ms/run':>7}")
    table = {}
    for name in names:
        row = {
            "runs": len(ratios[name]),
            "simulations": sims[name],
            "mean_cost_vs_ondemand": statistics.fmean(ratios[name]),
            "p90_cost_vs_ondemand": p90(ratios[name]),
            "mean_cost_vs_omniscient": statistics.fmean(vs_best[name]),
            "deadline_misses": misses[name],
            "preemptions": preemptions[name],
            "ms_per_simulation": 1000 * seconds[name] / max(1, sims[name]),
        }
        table[name] = row
        print(f"{name:18} {row['runs']:6d} {row['mean_cost_vs_ondemand']:8.3f} {row['p90_cost_vs_ondemand']:7.3f} "
              f"{row['mean_cost_vs_omniscient']:10.3f} {row['deadline_misses']:7d} {row['preemptions']:8d} "
              f"{row['ms_per_simulation']:7.2f}")
    print(f"misses count only jobs on-demand finishes in time; {infeasible} of {len(ratios['cbas'])} jobs it cannot "
          "(a restart overhead larger than the slack)")
    print("replay of one 45-day job: " + ", ".join(f"{k} {v:.1f} ms" for k, v in long_replay.items()))
    print(f"\nmany jobs on shared markets (at most {WORKLOAD_CAPACITY} spot machines per market): total cost / on-demand, misses")
    workload_table: dict[str, dict[str, dict[str, float]]] = {}
    for model, rows in workload_rows.items():
        cells = []
        for name in ONLINE:
            ratio, missed = statistics.fmean(rows[name]), int(sum(rows[name + ":misses"]))
            workload_table.setdefault(model, {})[name] = {"mean_cost_vs_ondemand": ratio, "deadline_misses": missed}
            cells.append(f"{name} {ratio:.3f} ({missed} missed)")
        print(f"  {model:13} " + ", ".join(cells))
    result = {"policies": table, "workloads": workload_table, "replay_45_days_ms": long_replay, "infeasible_jobs": infeasible, "billing": args.billing, "starts": args.starts,
              "unknown_spot_price": "30% of on-demand", "seconds": time.perf_counter() - started}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
