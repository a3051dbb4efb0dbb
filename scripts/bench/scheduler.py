#!/usr/bin/env python3
"""Scheduler benchmark: every policy on a grid of jobs over real spot traces.

Every online policy learns capacity by trying (cbas.scheduler.simulator): it sees prices, its
refused launches and its preemptions, never a market's capacity. `greedy` and `uniform-progress`
(single-zone, as in Can't Be Late) run once per home zone and count as one run each;
`greedy-multi`, `up-failover` (multi-zone baselines), `cbas` and `omniscient` use all zones.

--grid ours (default): jobs of 4, 12 and 48 h of work, deadline slack of 10%, 50% and 100%,
restart overheads of 0.1 h and 0.5 h, --starts start times spread over each trace (replayed
cyclically where shorter than the job), every instance type's zones, 0.1 h steps.
--grid peer: the peer simulator's grid: the same lengths, deadlines of 1.1, 1.5 and 2.0 x the
work, the same overheads, 4 start offsets in [0, L - D - one bin], one instance type per trace
(the one with the most zones), 600 s bins where a bin has capacity only if every observation in
it has, priced at their mean.

Where a trace has no price for a market, spot costs 30% of on-demand there
(cbas.scheduler.traces.UNKNOWN_SPOT_FRACTION). Billing per second unless --billing hour; the
omniscient bound is exact for per-second billing on the default grid only, and the output says so.

    scripts/bench/scheduler.py --traces ../shared/traces [--grid peer] [--starts 6] [--json F]
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

from cbas.scheduler.model import JobSpec, MarketSteps, Scenario, binned, market_sets, sample  # noqa: E402
from cbas.scheduler.policies import make  # noqa: E402
from cbas.scheduler.simulator import ondemand_cost, simulate, simulate_many  # noqa: E402
from cbas.scheduler.traces import Trace, load_traces  # noqa: E402

WORKLOAD_CAPACITY = 2  # spot machines a market holds at once in the many-job workloads
LENGTHS = (4.0, 12.0, 48.0)
SLACKS = (0.1, 0.5, 1.0)
OVERHEADS = (0.1, 0.5)
ONLINE = ("on-demand", "greedy", "uniform-progress", "greedy-multi", "up-failover", "cbas")
SINGLE_ZONE = ("greedy", "uniform-progress")
STEP = 0.1
PEER_DEADLINES = (1.1, 1.5, 2.0)
PEER_BIN_HOURS = 600 / 3600
PEER_STARTS = 4


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


def grid_jobs(grid: str) -> list[JobSpec]:
    if grid == "peer":
        jobs = [JobSpec(w, w * d, o) for w in LENGTHS for d in PEER_DEADLINES for o in OVERHEADS]
        return [job for job in jobs if job.restart_hours < job.slack_hours]  # its 17 feasible ones
    return [JobSpec(w, w * (1 + s), o) for w in LENGTHS for s in SLACKS for o in OVERHEADS]


def trace_scenarios(trace: Trace, grid: str, job: JobSpec, starts: int, billing: str) -> list[Scenario]:
    """The job's scenarios on this trace: one per start and market set."""
    if grid == "peer":
        series = max(market_sets(trace).values(), key=len)  # the type with the most zones
        bins = int((trace.end - trace.start) / 3600 / PEER_BIN_HOURS)
        need = int(math.ceil(job.deadline_hours / PEER_BIN_HOURS))
        if bins < need + 1:
            return []
        last = bins - need - 1  # start offsets in [0, L - D - one bin]
        full = [binned(s, trace.start, bins, PEER_BIN_HOURS) for s in series]
        offsets = sorted({round(i * last / max(1, PEER_STARTS - 1)) for i in range(PEER_STARTS)})
        return [Scenario(cyclic(full, o, need), PEER_BIN_HOURS, billing) for o in offsets]  # type: ignore[arg-type]
    span = max(1, int((trace.end - trace.start) / 3600 / STEP))
    steps = int(math.ceil(job.deadline_hours / STEP))
    out = []
    for series in market_sets(trace).values():
        full = [sample(s, trace.start, span, STEP) for s in series]
        out += [Scenario(cyclic(full, int(i * span / starts), steps), STEP, billing) for i in range(starts)]  # type: ignore[arg-type]
    return out


def summary(ratios: list[float], vs_best: list[float], misses: int) -> dict[str, float | int]:
    return {"runs": len(ratios), "mean_cost_vs_ondemand": statistics.fmean(ratios), "p90_cost_vs_ondemand": p90(ratios),
            "mean_cost_vs_omniscient": statistics.fmean(vs_best), "p90_cost_vs_omniscient": p90(vs_best),
            "deadline_misses": misses}


def print_table(title: str, rows: dict[str, dict[str, float | int]]) -> None:
    print(f"\n{title}")
    print(f"{'policy':18} {'runs':>5} {'cost/od':>8} {'p90':>7} {'cost/omni':>10} {'p90':>7} {'misses':>7}")
    for name, row in rows.items():
        print(f"{name:18} {row['runs']:5d} {row['mean_cost_vs_ondemand']:8.3f} {row['p90_cost_vs_ondemand']:7.3f} "
              f"{row['mean_cost_vs_omniscient']:10.3f} {row['p90_cost_vs_omniscient']:7.3f} {row['deadline_misses']:7d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=Path, required=True)
    parser.add_argument("--grid", choices=["ours", "peer"], default="ours")
    parser.add_argument("--starts", type=int, default=6, help="start times per trace (--grid ours)")
    parser.add_argument("--billing", choices=["second", "hour"], default="second")
    parser.add_argument("--json", type=Path, default=Path("bench-results/scheduler.json"))
    args = parser.parse_args()

    names = [*ONLINE, "omniscient"]
    per_set: dict[str, dict[str, tuple[list[float], list[float], list[int]]]] = {}
    infeasible = 0
    preemptions = {n: 0 for n in names}
    seconds = {n: 0.0 for n in names}
    sims = {n: 0 for n in names}
    started = time.perf_counter()
    long_replay: dict[str, float] = {}
    workload_rows: dict[str, dict[str, list[float]]] = {}
    traces = load_traces(args.traces)
    for trace in traces:
        cells = per_set.setdefault(trace.name, {n: ([], [], []) for n in names})
        if args.grid == "ours":
            span_steps = max(1, int((trace.end - trace.start) / 3600 / STEP))
            for kind, series in market_sets(trace).items():
                full = [sample(s, trace.start, span_steps, STEP) for s in series]
                for model, rows in workloads(full, span_steps, min(args.starts, 3), args.billing).items():
                    for name, values in rows.items():
                        workload_rows.setdefault(model, {}).setdefault(name, []).extend(values)
        for job in grid_jobs(args.grid):
            for scenario in trace_scenarios(trace, args.grid, job, args.starts, args.billing):
                baseline = ondemand_cost(job, scenario)
                feasible = not simulate(job, scenario, make("on-demand")).missed
                infeasible += int(not feasible)
                results: dict[str, float] = {}
                for name in names:
                    homes = range(len(scenario.markets)) if name in SINGLE_ZONE else [0]
                    costs, missed = [], 0
                    for home in homes:
                        t0 = time.perf_counter()
                        result = simulate(job, scenario, make(name, home))
                        seconds[name] += time.perf_counter() - t0
                        sims[name] += 1
                        costs.append(result.cost)
                        missed += int(result.missed and feasible)
                        preemptions[name] += result.preemptions
                    results[name] = statistics.fmean(costs)
                    cells[name][0].append(results[name] / baseline)
                    cells[name][2].append(missed)
                for name in names:
                    cells[name][1].append(results[name] / results["omniscient"])
        print(f"  {trace.name}: done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
        if args.grid == "ours" and not long_replay:  # replay speed: one job over 45 days of this trace
            kind, series = next(iter(market_sets(trace).items()))
            full = [sample(s, trace.start, max(1, int((trace.end - trace.start) / 3600 / STEP)), STEP) for s in series]
            scenario = Scenario(cyclic(full, 0, int(45 * 24 / STEP)), STEP, args.billing)  # type: ignore[arg-type]
            for name in ONLINE:
                t0 = time.perf_counter()
                simulate(JobSpec(500.0, 45 * 24.0, 0.1), scenario, make(name))
                long_replay[name] = (time.perf_counter() - t0) * 1000

    table: dict[str, dict[str, float | int]] = {}
    for name in names:
        ratios = [r for cells in per_set.values() for r in cells[name][0]]
        vs_best = [r for cells in per_set.values() for r in cells[name][1]]
        table[name] = summary(ratios, vs_best, sum(m for cells in per_set.values() for m in cells[name][2]))
        table[name].update(simulations=sims[name], preemptions=preemptions[name],
                           ms_per_simulation=1000 * seconds[name] / max(1, sims[name]))
    sets = {trace: {name: summary(*cells[name][:2], sum(cells[name][2])) for name in names}
            for trace, cells in per_set.items() if cells["cbas"][0]}
    # the optimum is exact where work, restart and deadline are whole steps (0.1 h: ours; not the
    # peer grid's 600 s bins, where it rounds a 0.1 h restart up to a bin) and billing is per second
    exact = args.billing == "second" and args.grid == "ours"
    print_table(f"all traces, --grid {args.grid}, billing per {args.billing}", table)
    for trace, rows in sets.items():
        print_table(trace, rows)
    print(f"\nmisses count only jobs on-demand finishes in time; {infeasible} of {table['cbas']['runs']} jobs it cannot "
          "(a restart overhead larger than the slack)")
    print("omniscient: the exact optimum on the simulator's grid" if exact else
          "omniscient is NOT an exact bound here: " + ("it plans for per-second billing, not per started hour"
                                                       if args.billing == "hour" else
                                                       "it rounds work and restarts up to whole 600 s bins"))
    if long_replay:
        print("replay of one 45-day job: " + ", ".join(f"{k} {v:.1f} ms" for k, v in long_replay.items()))
    workload_table: dict[str, dict[str, dict[str, float]]] = {}
    if workload_rows:
        print(f"\nmany jobs on shared markets (at most {WORKLOAD_CAPACITY} spot machines per market): total cost / on-demand, misses")
    for model, rows in workload_rows.items():
        line = []
        for name in ONLINE:
            ratio, missed = statistics.fmean(rows[name]), int(sum(rows[name + ":misses"]))
            workload_table.setdefault(model, {})[name] = {"mean_cost_vs_ondemand": ratio, "deadline_misses": missed}
            line.append(f"{name} {ratio:.3f} ({missed} missed)")
        print(f"  {model:13} " + ", ".join(line))
    result = {"policies": table, "sets": sets, "grid": args.grid, "omniscient_exact": exact,
              "workloads": workload_table, "replay_45_days_ms": long_replay, "infeasible_jobs": infeasible,
              "billing": args.billing, "starts": PEER_STARTS if args.grid == "peer" else args.starts,
              "unknown_spot_price": "30% of on-demand", "seconds": time.perf_counter() - started}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
