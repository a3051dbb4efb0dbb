"""Replays a scenario for one job under one policy, step by step, and accounts for it. Pure.

At each step: a spot machine whose market has lost capacity is preempted (the worker's notice
checkpoint keeps its progress; the next start pays the restart overhead again); then the policy
picks WAIT, ON_DEMAND or a spot market; a change of machine ends the old session and starts a
new one, whose first restart_hours make no progress.

What a policy knows is what EC2 tells: prices, and capacity only by trying. Online policies get
the scenario without its availability (reading it raises); a launch into a market with no
capacity is refused, which delays the start by REFUSED_LAUNCH_HOURS (not billed) and is told to the policy,
which may try up to LAUNCH_TRIES_PER_STEP markets in a step; a preemption is told too. A job not done by its deadline is a miss;
its remaining work is then costed on on-demand, so misses are never cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from cbas.scheduler.model import JobSpec, MarketSteps, Scenario

WAIT = -1
ON_DEMAND = -2
_EPS = 1e-9
LAUNCH_TRIES_PER_STEP = 3  # as the master's placement pass (cbas.master.placement)
# a refused launch: EC2's answer and the next try, in the same pass (seen live: well under a second
# on the local backend; RunInstances answers in about a second). Never more than the step it is in.
REFUSED_LAUNCH_HOURS = 5.0 / 3600.0


@dataclass
class Progress:
    """What a policy sees at a step: the past and present, never the future."""

    step: int
    progress: float  # hours of work done
    mode: int  # WAIT, ON_DEMAND or a spot market index
    warming: float  # restart overhead still to pay on the current machine
    preemptions: int
    unsaved: float = 0.0  # work done since the last checkpoint
    refused: tuple[int, ...] = ()  # spot markets that refused a launch in this step, so far
    preempted: int = WAIT  # the spot market that took the job's machine back at this step


class CapacityUnknown(Sequence[bool]):
    """A market's availability as an online policy sees it: not at all (EC2 never says)."""

    def __len__(self) -> int:
        raise LookupError("spot capacity is learned by trying (Progress.refused), never read")

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        raise LookupError("spot capacity is learned by trying (Progress.refused), never read")


def without_capacity(scenario: Scenario) -> Scenario:
    """The scenario as EC2 shows it: prices, and no capacity."""
    return Scenario([MarketSteps(m.zone, m.instance_type, m.ondemand, m.price, CapacityUnknown())  # type: ignore[arg-type]
                     for m in scenario.markets], scenario.step_hours, scenario.billing)


class Policy(Protocol):
    name: str  # a policy with `omniscient = True` is given the scenario's capacity too

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
    checkpoints: int = 0


class _Bill:
    """Charges machine sessions by the second, or per started hour at each hour's first price."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.total = 0.0
        self._prices: list[float] = []  # price of each step of the open session
        self.late = 0.0  # hours of the session's first step before its machine started

    def start(self, late: float) -> None:
        self.late = late

    def run(self, price: float) -> None:
        self._prices.append(price)

    def close(self, used_fraction_of_last: float = 1.0, reclaimed: bool = False) -> None:
        prices = self._prices
        if not prices:
            return
        step = self.scenario.step_hours
        if self.scenario.billing == "second":
            self.total += step * (sum(prices[:-1]) + prices[-1] * used_fraction_of_last) - self.late * prices[0]
        else:
            duration = step * (len(prices) - 1 + used_fraction_of_last) - self.late
            hours = math.floor(duration + _EPS) if reclaimed else math.ceil(duration - _EPS)
            per_hour = max(1, int(round(1.0 / step)))
            self.total += sum(prices[h * per_hour] if h * per_hour < len(prices) else prices[-1] for h in range(hours))
        self._prices, self.late = [], 0.0


class JobRun:
    """One job stepping through its scenario; simulate() runs one, simulate_many() several."""

    def __init__(self, job: JobSpec, scenario: Scenario, policy: Policy, keep_actions: bool = False) -> None:
        self.job, self.scenario, self.policy = job, scenario, policy
        self.horizon = min(int(math.ceil(job.deadline_hours / scenario.step_hours - _EPS)), scenario.steps)
        self.bill = _Bill(scenario)
        self.keep_actions = keep_actions
        self.progress, self.mode, self.warming = 0.0, WAIT, 0.0
        self.saved = 0.0  # progress in the last finished checkpoint
        self.checkpointing = 0.0  # hours left of a checkpoint under way
        self.pending = 0.0  # progress the checkpoint under way will save
        self.checkpoints = 0
        self.wants_checkpoint = getattr(policy, "checkpoint_now", None)
        self.preemptions = self.starts = 0
        self.spot_hours = self.ondemand_hours = 0.0
        self.finished: float | None = None
        self.actions: list[int] = []
        self.index = 0
        policy.reset(job, scenario if getattr(policy, "omniscient", False) else without_capacity(scenario))

    @property
    def active(self) -> bool:
        return self.finished is None and self.index < self.horizon

    def slack(self) -> float:
        step = self.scenario.step_hours
        return self.job.deadline_hours - self.index * step - (self.job.work_hours - self.progress)

    def step(self) -> None:
        index, step, markets, job = self.index, self.scenario.step_hours, self.scenario.markets, self.job
        self.index += 1
        preempted = WAIT
        if self.mode >= 0 and not markets[self.mode].available[index]:
            self.bill.close(reclaimed=True)  # the market took the machine back
            preempted = self.mode
            self._preempted()
        refused: list[int] = []
        while True:
            now = Progress(index, self.progress, self.mode, self.warming, self.preemptions,
                           self.progress - self.saved, tuple(refused), preempted)
            action = self.policy.decide(now)
            if action < 0 or action == self.mode or markets[action].available[index]:
                break
            refused.append(action)  # no capacity to launch into
            if len(refused) >= LAUNCH_TRIES_PER_STEP:
                action = WAIT
                break
        if self.keep_actions:
            self.actions.append(action)
        if action != self.mode:
            self.bill.close()
            if self.mode != WAIT:  # we stop it ourselves: a checkpoint first, nothing is lost
                self.saved, self.checkpointing = self.progress, 0.0
            self.mode = action
            if action != WAIT:  # the machine starts once the refused tries are over: not billed before
                late = min(len(refused) * REFUSED_LAUNCH_HOURS, step)
                self.warming = job.restart_hours + late
                self.bill.start(late)
                self.starts += 1
        if self.mode == WAIT:
            return
        price = self.scenario.ondemand if self.mode == ON_DEMAND else markets[self.mode].price[index]
        self.bill.run(price)
        useful = step
        if self.warming > 0:
            paid = min(self.warming, step)
            self.warming -= paid
            useful -= paid
        if self.checkpointing > 0:  # the job is held still while its checkpoint is taken
            paid = min(self.checkpointing, useful)
            self.checkpointing -= paid
            useful -= paid
            if self.checkpointing <= _EPS:
                self.saved, self.checkpointing = self.pending, 0.0
        needed = job.work_hours - self.progress
        if useful >= needed - _EPS and useful > 0:
            fraction = (step - useful + needed) / step
            self.bill.close(used_fraction_of_last=fraction)
            self.progress = job.work_hours
            self.finished = index * step + step * fraction
            used = step * fraction
        else:
            self.progress += useful
            used = step
            self._maybe_checkpoint(now)
        if self.mode == ON_DEMAND:
            self.ondemand_hours += used
        else:
            self.spot_hours += used

    def _maybe_checkpoint(self, now: Progress) -> None:
        if self.checkpointing > 0 or self.warming > 0:
            return
        due = self.progress - self.saved >= self.job.checkpoint_interval_hours - _EPS
        asked = self.wants_checkpoint is not None and self.progress > self.saved and self.wants_checkpoint(now)
        if not (due or asked):
            return
        self.checkpoints += 1
        if self.job.checkpoint_hours <= 0:
            self.saved = self.progress
        else:
            self.pending, self.checkpointing = self.progress, self.job.checkpoint_hours

    def _preempted(self) -> None:
        if self.job.checkpoint_hours > self.job.notice_hours:
            self.progress = self.saved  # no checkpoint fits in the notice: unsaved work is lost
        else:
            self.saved = self.progress  # the notice checkpoint keeps everything
        self.mode, self.warming, self.checkpointing = WAIT, 0.0, 0.0
        self.preemptions += 1

    def result(self) -> Result:
        if self.finished is None:
            self.bill.close()
        cost = self.bill.total
        missed = self.finished is None or self.finished > self.job.deadline_hours + _EPS
        if self.finished is None:  # finish late on on-demand: a miss is never a saving
            cost += self.scenario.ondemand * (self.job.work_hours - self.progress + self.job.restart_hours)
        return Result(self.policy.name, cost, self.finished, missed, self.preemptions, self.starts,
                      self.spot_hours, self.ondemand_hours, self.actions, self.checkpoints)


def simulate(job: JobSpec, scenario: Scenario, policy: Policy, keep_actions: bool = False) -> Result:
    run = JobRun(job, scenario, policy, keep_actions)
    while run.active:
        run.step()
    return run.result()


def simulate_many(
    jobs: list[tuple[JobSpec, int]], scenario: Scenario, policies: list[Policy], capacity: int | None = None,
) -> list[Result]:
    """Several jobs, each (spec, arrival step), on shared markets where each spot market holds at
    most `capacity` machines. At every step the jobs decide together, least slack first; a full
    market looks to a job like one without capacity."""
    runs: list[tuple[JobRun, int]] = []
    for (job, arrival), policy in zip(jobs, policies):
        view = Scenario([MarketSteps(m.zone, m.instance_type, m.ondemand, m.price[arrival:], list(m.available[arrival:]))
                         for m in scenario.markets], scenario.step_hours, scenario.billing)
        runs.append((JobRun(job, view, policy), arrival))
    last = max((arrival + run.horizon for run, arrival in runs), default=0)
    for now in range(last):
        present = [run for run, arrival in runs if arrival <= now and run.active]
        used = [0] * len(scenario.markets)
        for run in present:
            if run.mode >= 0:
                used[run.mode] += 1
        for run in sorted(present, key=lambda r: r.slack()):
            if capacity is not None:
                for m, market in enumerate(run.scenario.markets):
                    full = used[m] >= capacity and run.mode != m
                    market.available[run.index] = scenario.markets[m].available[now] and not full
            before = run.mode
            run.step()
            if before >= 0:
                used[before] -= 1
            if run.mode >= 0 and run.active:
                used[run.mode] += 1
    return [run.result() for run, _ in runs]


def ondemand_cost(job: JobSpec, scenario: Scenario) -> float:
    """The baseline: one on-demand machine from the start, restart overhead included."""
    return scenario.ondemand * (job.work_hours + job.restart_hours)
