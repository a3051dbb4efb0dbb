"""The offline optimum: the cheapest schedule that meets the deadline, knowing the whole future.

Dynamic programming over (step, progress in steps, machine), on the simulator's grid and with its
rules: a start pays `k = restart/step` steps without progress (spot capacity must last through
them), a running step costs its price and adds one step of progress, stopping is free. Backwards:

    Run_m[i][p]   = price_m[i] * step + R_m[i+1][p+1]        (spot: only with capacity at i)
    Start_m[i][p] = cost of k warm-up steps + R_m[i+k][p]
    Off[i][p]     = min(Off[i+1][p], min_m Start_m[i][p])
    R_m[i][p]     = min(Run_m[i][p], Off[i][p])              (keep running, or stop)

with on-demand as one more market that never loses capacity. The answer is Off[0][0]; the plan
is read forwards from the same tables. It is the lower bound the other policies are scored by
(exact where the job's work, restart and deadline are whole steps, as on the default grid).
"""

from __future__ import annotations

import math

import numpy as np

from cbas.scheduler.model import JobSpec, Scenario
from cbas.scheduler.simulator import ON_DEMAND, WAIT, Progress

INF = float("inf")


class Omniscient:
    name = "omniscient"
    omniscient = True  # the bound: it is given the future, capacity included

    def reset(self, job: JobSpec, scenario: Scenario) -> None:
        self.plan, self.best_cost = plan(job, scenario)

    def decide(self, now: Progress) -> int:
        return self.plan[now.step] if now.step < len(self.plan) else WAIT


def plan(job: JobSpec, scenario: Scenario) -> tuple[list[int], float]:
    step = scenario.step_hours
    # whole steps before the deadline; work and restart rounded up to whole steps: exact when all
    # three are multiples of the step, an upper estimate of the optimum otherwise
    horizon = min(int(math.floor(job.deadline_hours / step + 1e-9)), scenario.steps)
    work = int(math.ceil(job.work_hours / step - 1e-9))
    warm = max(1, int(math.ceil(job.restart_hours / step - 1e-9)))
    markets = scenario.markets
    count = len(markets) + 1  # the last one is on-demand
    price = np.empty((count, horizon))
    up = np.ones((count, horizon), dtype=bool)
    for m, market in enumerate(markets):
        price[m] = market.price[:horizon]
        up[m] = market.available[:horizon]
    price[-1] = scenario.ondemand
    step_cost = np.where(up, price * step, INF)
    # warm-up of k steps starting at i: its cost, and whether capacity lasts through it
    # (prefix sums of prices and of missing capacity; past the horizon counts as missing)
    pad_price = np.concatenate([price * step, np.zeros((count, warm))], axis=1)
    pad_gone = np.concatenate([~up, np.ones((count, warm), dtype=bool)], axis=1).astype(np.int64)
    zero = np.zeros((count, 1))
    price_sum = np.concatenate([zero, np.cumsum(pad_price, axis=1)], axis=1)
    gone_sum = np.concatenate([zero.astype(np.int64), np.cumsum(pad_gone, axis=1)], axis=1)
    lasts = (gone_sum[:, warm:warm + horizon] - gone_sum[:, :horizon]) == 0
    warm_cost = np.where(lasts, price_sum[:, warm:warm + horizon] - price_sum[:, :horizon], INF)

    width = work + 1
    done = np.zeros(width)
    done[:work] = INF  # at the deadline, only finished work is free
    R = np.full((horizon + warm + 1, count, width), INF)
    off = np.full((horizon + 1, width), INF)
    R[horizon:] = done
    off[horizon] = done
    run_choice = np.zeros((horizon, count, width), dtype=bool)
    for i in range(horizon - 1, -1, -1):
        run = np.full((count, width), INF)
        run[:, :work] = step_cost[:, i:i + 1] + R[i + 1, :, 1:]
        run[:, work] = 0.0  # already done
        start = warm_cost[:, i:i + 1] + R[i + warm]
        off[i] = np.minimum(off[i + 1], start.min(axis=0))
        off[i, work] = 0.0
        run_choice[i] = run <= off[i]
        R[i] = np.minimum(run, off[i])
    best = float(off[0, 0])
    return _read_plan(off, R, run_choice, warm_cost, horizon, work, warm, count), best


def _read_plan(off: np.ndarray, R: np.ndarray, run_choice: np.ndarray, warm_cost: np.ndarray,
               horizon: int, work: int, warm: int, count: int) -> list[int]:
    actions: list[int] = []
    i, p, machine, warming = 0, 0, -1, 0  # machine: -1 none, else a market index (count-1: on-demand)
    while i < horizon and p < work:
        if warming > 0:
            warming -= 1
        elif machine >= 0 and run_choice[i, machine, p]:
            p += 1
        else:
            machine = -1
            start = warm_cost[:, i] + R[i + warm, :, p]
            if not (off[i + 1, p] <= start.min()):
                machine = int(start.argmin())
                warming = warm - 1
        actions.append(WAIT if machine < 0 else (ON_DEMAND if machine == count - 1 else machine))
        i += 1
    return actions + [WAIT] * (horizon - len(actions))
