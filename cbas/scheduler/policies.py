"""Scheduling policies: at every step, run on spot in market Z, run on on-demand, or wait. Pure.

`on-demand`, `greedy` and `uniform-progress` use one home market (as in Can't Be Late, NSDI 2024);
`cbas` uses every market of the job's instance type; `omniscient` (omniscient.py) knows the future.
All but `on-demand` keep the same safety net: once the time left only covers the remaining work
plus a restart, run on on-demand to the end, so none misses a deadline on-demand could meet.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from cbas.scheduler.capacity import LaunchOutcomes
from cbas.scheduler.model import JobSpec, Scenario
from cbas.scheduler.simulator import ON_DEMAND, WAIT, Policy, Progress

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


@dataclass
class Knowledge:
    """What one master learns from all its jobs' launches and preemptions: it keeps one record for
    every job. Jobs simulated as one master runs them share one (each with its `arrival`)."""

    outcomes: LaunchOutcomes[int] = field(default_factory=LaunchOutcomes)
    history: "AvailabilityHistory | None" = None


class LearnsCapacity(_Base):
    """Keeps the record of launches and preemptions the master keeps (cbas.scheduler.capacity):
    its own, or `shared` with other jobs, on a clock where this job arrived at step `arrival`."""

    shared: Knowledge | None = None
    arrival = 0

    def reset(self, job: JobSpec, scenario: Scenario) -> None:
        super().reset(job, scenario)
        self.outcomes: LaunchOutcomes[int] = self.shared.outcomes if self.shared is not None else LaunchOutcomes()

    def hours(self, now: Progress) -> float:
        """The time now on the learning clock (shared by the jobs that share what they learn)."""
        return (self.arrival + now.step) * self.step

    def learn(self, now: Progress) -> float:
        """Note what this call of decide() tells; the time now, in seconds."""
        seconds = self.hours(now) * 3600.0
        if now.refused:  # asked again in the same step: the last try was refused
            self.outcomes.refused(now.refused[-1], seconds)
        elif now.preempted >= 0:
            self.outcomes.preempted(now.preempted, seconds)
        if now.mode >= 0:
            self.outcomes.launched(now.mode)
        return seconds

    def untried(self, now: Progress, seconds: float) -> list[int]:
        """Spot markets worth a try now, cheapest first."""
        index = now.step
        markets = self.scenario.markets
        return sorted((m for m in range(len(markets)) if not self.outcomes.refusing(m, seconds)),
                      key=lambda m: markets[m].price[index])


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
        return WAIT if self.home in now.refused else self.home  # it tries; a refusal is a step waited


@policy("uniform-progress")
class UniformProgress(_Base):
    """Can't Be Late's rule: keep progress at or above work * t / deadline; on-demand only while
    behind that line; spot whenever it has capacity (leaving on-demand for it only when far enough
    ahead to pay the restart); with the same safety net."""

    def spot_market(self, now: Progress) -> int | None:
        """Where it runs spot: its home, tried until it refuses in this step."""
        return None if self.home in now.refused else self.home

    def decide(self, now: Progress) -> int:
        spot = self.spot_market(now)
        if self.must_run_on_demand(now):
            return ON_DEMAND
        line = self.job.work_hours * (now.step * self.step) / self.job.deadline_hours
        if now.mode == ON_DEMAND:
            slack = self.time_left(now) - (self.job.work_hours - now.progress)
            # leaving on-demand (for spot, or to wait) must leave slack to come back to it
            if slack < 2 * self.job.restart_hours + 2 * self.step:
                return ON_DEMAND
        if spot is not None:
            if now.mode == ON_DEMAND and now.progress < line + self.job.restart_hours:
                return ON_DEMAND  # only far enough ahead to pay the restart
            return spot
        if now.mode == ON_DEMAND:  # hysteresis: stop only when far enough ahead to pay a restart
            return ON_DEMAND if now.progress < line + 2 * self.job.restart_hours else WAIT
        return ON_DEMAND if now.progress < line else WAIT


class MarketNow(NamedTuple):
    price: float
    available: bool
    residual_up_hours: float  # expected hours of capacity left, from what has been seen


class Situation(NamedTuple):
    """What ours decides from, in the simulator and in the master alike."""

    remaining_hours: float
    time_left_hours: float
    slack_hours: float  # the job's whole slack (deadline - work), to tell how much is left
    restart_hours: float
    mode: int  # WAIT, ON_DEMAND or the index of the spot market it runs on
    warming_hours: float
    markets: list[MarketNow]
    cheapest_seen: float  # the lowest spot price seen with capacity
    ondemand_price: float = float("inf")  # USD/h of the cheapest on-demand it may have (inf: none)


class AvailabilityHistory:
    """Spot capacity of each market as observed over time (hours); no look into the future.
    Capacity comes in heavy-tailed periods, so how long a market has been up predicts how long
    it stays up: its mean residual up-time at that age, from the completed periods seen."""

    def __init__(self, markets: int, unknown_residual_hours: float) -> None:
        self.unknown = unknown_residual_hours  # for a market up since before we looked
        self.up_since = [0.0] * markets
        self.completed: list[list[float]] = [[] for _ in range(markets)]  # sorted
        self.suffix: list[list[float]] = [[0.0] for _ in range(markets)]  # sums of completed[m][i:]
        self.last_seen = [False] * markets
        self.seen_rise = [False] * markets
        self.last_known: list[bool | None] = [None] * markets  # the last thing seen of it
        self.cheapest = [float("inf")] * markets  # each market's lowest spot price seen with capacity

    def observe(self, hours: float, available: Sequence[bool | None], prices: list[float]) -> None:
        """`available[m]`: True seen up, False seen down, None not known (presumed up, and no
        period is begun or ended by it)."""
        for m, up in enumerate(available):
            if up is not False:
                self.cheapest[m] = min(self.cheapest[m], prices[m])
            if up is None:
                self.last_seen[m] = False  # a period whose end is not known is not counted
                continue
            if up and not self.last_seen[m]:
                self.up_since[m] = hours
                self.seen_rise[m] = self.last_known[m] is False  # seen down before: it rose now
            elif not up and self.last_seen[m]:
                periods = self.completed[m]
                bisect.insort(periods, hours - self.up_since[m])
                suffix = [0.0] * (len(periods) + 1)
                for i in range(len(periods) - 1, -1, -1):
                    suffix[i] = suffix[i + 1] + periods[i]
                self.suffix[m] = suffix
            self.last_seen[m] = self.last_known[m] = up

    def cheapest_seen(self, markets: list[int] | None = None) -> float:
        """The lowest spot price seen with capacity in these markets (all by default): a spike is
        judged against the job's own markets, never a cheaper type's."""
        return min((self.cheapest[m] for m in (range(len(self.cheapest)) if markets is None else markets)),
                   default=float("inf"))

    def residual_up(self, m: int, hours: float, floor: float) -> float:
        periods = self.completed[m]
        if not self.last_seen[m]:  # presumed up, not seen: a whole period, as periods went
            return self.suffix[m][0] / len(periods) if periods else self.unknown
        age = hours - self.up_since[m]
        first_longer = bisect.bisect_right(periods, age)
        if first_longer < len(periods):
            return self.suffix[m][first_longer] / (len(periods) - first_longer) - age
        if not self.seen_rise[m]:
            return self.unknown
        return max(age, floor)  # no period this long seen yet: Lindy's guess


def cbas_choice(now: Situation, step_hours: float) -> int:
    """Ours: the market with the lowest price per useful hour (restarts counted at its expected
    rate), on-demand included whenever it is cheaper; move only when the saving over the expected
    stay pays the restart twice; sit out price spikes while the slack allows; keep the slack needed
    to never miss a deadline on-demand could meet, with one decision step of margin: a spot start
    needs two restarts of slack (its own and an on-demand fall-back), a running spot machine one."""
    restart = now.restart_hours
    slack = now.time_left_hours - now.remaining_hours
    running = now.mode >= 0
    if running and slack - now.warming_hours < restart + step_hours - 1e-9:
        return ON_DEMAND
    can_start = slack >= 2 * restart + step_hours - 1e-9
    if not running and not can_start:
        return ON_DEMAND
    choices = [m for m, market in enumerate(now.markets) if market.available]
    if not choices:  # nowhere better: a live machine is not given up for nothing
        return now.mode if now.mode != WAIT else WAIT

    def per_useful_hour(m: int) -> float:
        stay = max(now.markets[m].residual_up_hours, step_hours)
        return now.markets[m].price / (1.0 - min(0.9, restart / stay))

    # the machine's own market is weighed even when it shows no capacity (live, before its notice)
    cost = {m: per_useful_hour(m) for m in choices + ([now.mode] if running else [])}
    best = min(choices, key=cost.__getitem__)
    stay = min(now.remaining_hours, now.markets[best].residual_up_hours)
    # on-demand is weighed against spot's price: expected restarts rank spot markets among
    # themselves, but a guess from a few periods seen is too rough to buy on-demand on
    ondemand = now.ondemand_price
    if now.mode == ON_DEMAND:  # leaving it for spot must pay the restart twice over the stay
        price = now.markets[best].price
        return best if (ondemand - price) * stay > 2 * price * restart else ON_DEMAND
    slack_share = slack / max(now.slack_hours, step_hours)
    spike = slack_share > 0.5 and now.markets[best].price > 1.5 * now.cheapest_seen
    if running:
        if spike and can_start:
            return WAIT
        own = now.markets[now.mode].price
        if (own - ondemand) * now.remaining_hours > 2 * ondemand * restart and ondemand < now.markets[best].price:
            return ON_DEMAND  # spot dearer than on-demand for the rest of the job
        moving_pays = (cost[now.mode] - cost[best]) * stay > 2 * cost[best] * restart
        return best if moving_pays and can_start else now.mode
    if spike:
        return WAIT
    return ON_DEMAND if ondemand < now.markets[best].price else best


def checkpoint_before_loss(unsaved: float, to_next: float, residual_up: float, checkpoint_hours: float) -> bool:
    """Take an extra checkpoint when the work likely lost before the next periodic one (unsaved
    work times the chance the market goes first) is worth more than the checkpoint costs."""
    chance = min(1.0, max(to_next, 0.0) / max(residual_up, 1e-6))
    return unsaved * chance > checkpoint_hours


@policy("cbas")
class Cbas(LearnsCapacity):
    """Ours (cbas_choice), over every market of the job's instance type; it also times extra
    checkpoints before likely preemptions when a checkpoint does not fit in the notice."""

    def checkpoint_now(self, now: Progress) -> bool:
        job = self.job
        if now.mode < 0 or job.checkpoint_hours <= job.notice_hours:
            return False  # on-demand is never reclaimed; a fitting checkpoint is taken at the notice
        residual = self.history.residual_up(now.mode, self.hours(now), job.restart_hours)
        return checkpoint_before_loss(now.unsaved, job.checkpoint_interval_hours - now.unsaved, residual,
                                      job.checkpoint_hours)

    def reset(self, job: JobSpec, scenario: Scenario) -> None:
        super().reset(job, scenario)
        if self.shared is None:
            self.history = AvailabilityHistory(len(scenario.markets), job.deadline_hours)
            return
        if self.shared.history is None:
            self.shared.history = AvailabilityHistory(len(scenario.markets), job.deadline_hours)
        self.history = self.shared.history

    def decide(self, now: Progress) -> int:
        index = now.step
        hours = self.hours(now)
        markets = self.scenario.markets
        seconds = self.learn(now)
        # capacity as the master knows it: presumed until a launch or a preemption says otherwise
        seen = [self.outcomes.state(m, seconds) for m in range(len(markets))]
        self.history.observe(hours, seen, [m.price[index] for m in markets])
        # running: another market counts once a launch there has shown capacity (the master's rule:
        # its moves stop the job first); waiting: presumed until a launch says otherwise
        available = [up is True or (up is None and now.mode in (WAIT, m)) for m, up in enumerate(seen)]
        return cbas_choice(Situation(
            remaining_hours=self.job.work_hours - now.progress,
            time_left_hours=self.time_left(now),
            slack_hours=self.job.slack_hours,
            restart_hours=self.job.restart_hours,
            mode=now.mode,
            warming_hours=now.warming,
            markets=[MarketNow(m.price[index], up, self.history.residual_up(i, hours, self.job.restart_hours) if up else 0.0)
                     for i, (m, up) in enumerate(zip(markets, available))],
            cheapest_seen=self.history.cheapest_seen(),
            ondemand_price=self.scenario.ondemand,
        ), self.step)


from cbas.scheduler import baselines  # noqa: E402,F401  (registers the multi-zone baselines)


def make(name: str, home: int = 0) -> Policy:
    """A fresh policy by name; `home` is the single-zone policies' market."""
    if name == "omniscient":
        from cbas.scheduler.omniscient import Omniscient

        return Omniscient()
    policy: Policy = POLICIES[name](home)
    return policy

