"""Scheduling policies: at every step, run on spot in market Z, run on on-demand, or wait. Pure.

`on-demand`, `greedy` and `uniform-progress` use one home market (as in Can't Be Late, NSDI 2024);
`cbas` uses every market of the job's instance type; `omniscient` (omniscient.py) knows the future.
All but `on-demand` keep the same safety net: once the time left only covers the remaining work
plus a restart, run on on-demand to the end, so none misses a deadline on-demand could meet.
"""

from __future__ import annotations

import math

from cbas.scheduler.model import JobSpec, Scenario
from cbas.scheduler.simulator import ON_DEMAND, WAIT, Progress

POLICIES: dict[str, type] = {}


def policy(name: str):  # type: ignore[no-untyped-def]
    def register(cls):  # type: ignore[no-untyped-def]
        cls.name = name
        POLICIES[name] = cls
        return cls

    return register


class _Base:
    name = "base"

    def __init__(self, home: int = 0) -> None:
        self.home = home

    def reset(self, job: JobSpec, scenario: Scenario) -> None:
        self.job = job
        self.scenario = scenario
        self.step = scenario.step_hours
        self.committed = False  # switched to on-demand for good

    def time_left(self, now: Progress) -> float:
        return self.job.deadline_hours - now.step * self.step

    def must_run_on_demand(self, now: Progress, restarts: int = 1) -> bool:
        """The safety net: the slack is down to `restarts` restarts and one step of margin."""
        if self.committed:
            return True
        remaining = self.job.work_hours - now.progress
        starting = 0.0 if now.mode == ON_DEMAND else self.job.restart_hours * restarts
        if self.time_left(now) - remaining - starting - 2 * self.step <= 0:
            self.committed = True
        return self.committed


@policy("on-demand")
class OnDemand(_Base):
    def decide(self, now: Progress) -> int:
        return ON_DEMAND


@policy("greedy")
class Greedy(_Base):
    """Spot in the home market whenever it has capacity, otherwise wait; on-demand once forced."""

    def decide(self, now: Progress) -> int:
        if self.must_run_on_demand(now):
            return ON_DEMAND
        return self.home if self.scenario.markets[self.home].available[now.step] else WAIT


@policy("uniform-progress")
class UniformProgress(_Base):
    """Can't Be Late's rule: keep progress at or above work * t / deadline; on-demand only while
    behind that line; spot whenever it has capacity (leaving on-demand for it only when far enough
    ahead to pay the restart); with the same safety net."""

    def decide(self, now: Progress) -> int:
        if self.must_run_on_demand(now):
            return ON_DEMAND
        line = self.job.work_hours * (now.step * self.step) / self.job.deadline_hours
        if now.mode == ON_DEMAND:
            slack = self.time_left(now) - (self.job.work_hours - now.progress)
            # leaving on-demand (for spot, or to wait) must leave slack to come back to it
            if slack < 2 * self.job.restart_hours + 2 * self.step:
                return ON_DEMAND
        if self.scenario.markets[self.home].available[now.step]:
            if now.mode == ON_DEMAND and now.progress < line + self.job.restart_hours:
                return ON_DEMAND  # only far enough ahead to pay the restart
            return self.home
        if now.mode == ON_DEMAND:  # hysteresis: stop only when far enough ahead to pay a restart
            return ON_DEMAND if now.progress < line + 2 * self.job.restart_hours else WAIT
        return ON_DEMAND if now.progress < line else WAIT


@policy("cbas")
class Cbas(_Base):
    """Ours. Uses every market of the job's type, and what it has seen of them so far (never the
    future): spot capacity comes in heavy-tailed periods, so a market that has been up for long is
    likely to stay up (its mean residual up-time at that age, from the periods seen). It runs on
    the market with the lowest price per useful hour (restarts counted at that market's expected
    rate), moves only when the saving over the expected stay pays the restart twice, waits while
    the slack is ample and nothing near the best seen is available, and keeps exactly the slack
    it needs to never miss a deadline on-demand could meet: starting a spot machine needs two
    restarts of slack (its own and an on-demand fall-back), a running one needs one."""

    def reset(self, job: JobSpec, scenario: Scenario) -> None:
        super().reset(job, scenario)
        count = len(scenario.markets)
        self.up_since = [0] * count  # step when the current period with capacity began
        self.completed: list[list[float]] = [[] for _ in range(count)]  # finished up-periods, hours
        self.last_seen = [False] * count
        self.seen_rise = [False] * count  # saw the current period begin (else its age is unknown)
        self.cheapest_seen = float("inf")

    def _observe(self, index: int) -> None:
        for m, market in enumerate(self.scenario.markets):
            up = market.available[index]
            if up:
                self.cheapest_seen = min(self.cheapest_seen, market.price[index])
            if up and not self.last_seen[m]:
                self.up_since[m] = index
                self.seen_rise[m] = index > 0
            elif not up and self.last_seen[m] and index > 0:
                self.completed[m].append((index - self.up_since[m]) * self.step)
            self.last_seen[m] = up

    def _residual_up(self, m: int, index: int) -> float:
        """Expected hours of capacity left in market m, given how long it has been up."""
        age = (index - self.up_since[m]) * self.step
        longer = [d for d in self.completed[m] if d > age]
        if longer:
            return sum(longer) / len(longer) - age
        if not self.seen_rise[m]:  # up since before we looked: it has lasted at least this long
            return self.job.deadline_hours
        return max(age, self.job.restart_hours)  # no period this long seen yet: Lindy's guess

    def _cost_per_useful_hour(self, m: int, index: int) -> float:
        stay = max(self._residual_up(m, index), self.step)
        overhead = min(0.9, self.job.restart_hours / stay)
        return self.scenario.markets[m].price[index] / (1.0 - overhead)

    def decide(self, now: Progress) -> int:
        index = now.step
        self._observe(index)
        restart = self.job.restart_hours
        remaining = self.job.work_hours - now.progress
        slack = self.time_left(now) - remaining  # hours that may still go to restarts and waiting
        if now.mode == ON_DEMAND:
            return ON_DEMAND
        running = now.mode >= 0
        if running and slack - now.warming < restart - 1e-9:
            return ON_DEMAND  # only the on-demand fall-back's restart is left
        can_start = slack >= 2 * restart - 1e-9
        if not running and not can_start:
            return ON_DEMAND
        choices = [m for m, market in enumerate(self.scenario.markets) if market.available[index]]
        if not choices:
            return WAIT
        cost = {m: self._cost_per_useful_hour(m, index) for m in choices}
        best = min(choices, key=cost.__getitem__)
        # with slack to spare, sit out a price spike: the cheapest price seen comes back
        slack_share = slack / max(self.job.slack_hours, self.step)
        spike = slack_share > 0.5 and self.scenario.markets[best].price[index] > 1.5 * self.cheapest_seen
        if running:
            if spike and can_start:
                return WAIT
            stay = min(remaining, self._residual_up(best, index))
            moving_pays = (cost[now.mode] - cost[best]) * stay > 2 * cost[best] * restart
            return best if moving_pays and can_start else now.mode
        return WAIT if spike else best


def make(name: str, home: int = 0):  # type: ignore[no-untyped-def]
    if name == "omniscient":
        from cbas.scheduler.omniscient import Omniscient

        return Omniscient()
    return POLICIES[name](home)


def steps_for(hours: float, step: float) -> int:
    return int(math.ceil(hours / step - 1e-9))
