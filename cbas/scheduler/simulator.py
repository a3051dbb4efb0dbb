"""Replays a scenario for one job under one policy, step by step, and accounts for it. Pure.

At each step: a spot machine whose market has lost capacity is preempted (the worker's notice
checkpoint keeps its progress; the next start pays the restart overhead again); then the policy
picks WAIT, ON_DEMAND or a spot market; a change of machine ends the old session and starts a
new one, whose first restart_hours make no progress. A job not done by its deadline is a miss;
its remaining work is then costed on on-demand, so misses are never cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from cbas.scheduler.model import JobSpec, Scenario

WAIT = -1
ON_DEMAND = -2
_EPS = 1e-9


@dataclass
class Progress:
    """What a policy sees at a step: the past and present, never the future."""

    step: int
    progress: float  # hours of work done
    mode: int  # WAIT, ON_DEMAND or a spot market index
    warming: float  # restart overhead still to pay on the current machine
    preemptions: int


class Policy(Protocol):
    name: str

    def reset(self, job: JobSpec, scenario: Scenario) -> None: ...
    def decide(self, now: Progress) -> int: ...


@dataclass
class Result:
    policy: str
    cost: float
    finished_hours: float | None  # when the work was done, from the start
    missed: bool
    preemptions: int
    starts: int
    spot_hours: float
    ondemand_hours: float
    actions: list[int] = field(default_factory=list, repr=False)


class _Bill:
    """Charges machine sessions by the second, or per started hour at each hour's first price."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.total = 0.0
        self._prices: list[float] = []  # price of each step of the open session

    def run(self, price: float) -> None:
        self._prices.append(price)

    def close(self, used_fraction_of_last: float = 1.0, reclaimed: bool = False) -> None:
        prices = self._prices
        if not prices:
            return
        step = self.scenario.step_hours
        if self.scenario.billing == "second":
            self.total += step * (sum(prices[:-1]) + prices[-1] * used_fraction_of_last)
        else:
            duration = step * (len(prices) - 1 + used_fraction_of_last)
            hours = math.floor(duration + _EPS) if reclaimed else math.ceil(duration - _EPS)
            per_hour = max(1, int(round(1.0 / step)))
            self.total += sum(prices[h * per_hour] if h * per_hour < len(prices) else prices[-1] for h in range(hours))
        self._prices = []


def simulate(job: JobSpec, scenario: Scenario, policy: Policy, keep_actions: bool = False) -> Result:
    step = scenario.step_hours
    markets = scenario.markets
    ondemand = scenario.ondemand
    deadline_steps = int(math.ceil(job.deadline_hours / step - _EPS))
    horizon = min(deadline_steps, scenario.steps)
    bill = _Bill(scenario)
    policy.reset(job, scenario)
    progress, mode, warming = 0.0, WAIT, 0.0
    preemptions = starts = 0
    spot_hours = ondemand_hours = 0.0
    finished: float | None = None
    actions: list[int] = []
    for index in range(horizon):
        if mode >= 0 and not markets[mode].available[index]:
            bill.close(reclaimed=True)  # the market took the machine back
            mode, warming = WAIT, 0.0
            preemptions += 1
        action = policy.decide(Progress(index, progress, mode, warming, preemptions))
        if action >= 0 and not markets[action].available[index]:
            action = WAIT  # no capacity to launch into
        if keep_actions:
            actions.append(action)
        if action != mode:
            bill.close()
            mode = action
            if mode != WAIT:
                warming = job.restart_hours
                starts += 1
        if mode == WAIT:
            continue
        price = ondemand if mode == ON_DEMAND else markets[mode].price[index]
        bill.run(price)
        useful = step
        if warming > 0:
            paid = min(warming, step)
            warming -= paid
            useful -= paid
        needed = job.work_hours - progress
        if useful >= needed - _EPS and useful > 0:
            fraction = (step - useful + needed) / step
            bill.close(used_fraction_of_last=fraction)
            progress = job.work_hours
            finished = index * step + step * fraction
            used = step * fraction
        else:
            progress += useful
            used = step
        if mode == ON_DEMAND:
            ondemand_hours += used
        else:
            spot_hours += used
        if finished is not None:
            break
    if finished is None:
        bill.close()
    cost = bill.total
    missed = finished is None or finished > job.deadline_hours + _EPS
    if finished is None:  # finish late on on-demand: a miss is never a saving
        cost += ondemand * (job.work_hours - progress + job.restart_hours)
    return Result(policy.name, cost, finished, missed, preemptions, starts, spot_hours, ondemand_hours, actions)


def ondemand_cost(job: JobSpec, scenario: Scenario) -> float:
    """The baseline: one on-demand machine from the start, restart overhead included."""
    return scenario.ondemand * (job.work_hours + job.restart_hours)
