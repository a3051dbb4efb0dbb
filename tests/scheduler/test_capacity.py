"""Capacity learned by trying (cbas.scheduler.capacity), and the simulator giving its policies only
what EC2 gives: prices, launch results and preemptions, never the markets' capacity."""

from __future__ import annotations

import pytest

from cbas.scheduler.capacity import LaunchOutcomes
from cbas.scheduler.model import JobSpec, MarketSteps, Scenario
from cbas.scheduler.policies import POLICIES, make
from cbas.scheduler.simulator import (
    LAUNCH_TRIES_PER_STEP, ON_DEMAND, REFUSED_LAUNCH_HOURS, WAIT, Progress, simulate, without_capacity,
)


def test_a_refusing_market_is_left_for_longer_at_each_refusal_in_a_row_up_to_the_longest() -> None:
    outcomes: LaunchOutcomes[str] = LaunchOutcomes((60.0, 300.0))
    assert outcomes.state("a", 0.0) is None  # never tried: presumed, not known
    assert [outcomes.refused("a", 0.0) for _ in range(5)] == [60.0, 120.0, 240.0, 300.0, 300.0]
    assert outcomes.refusing("a", 299.0) and outcomes.state("a", 299.0) is False
    assert not outcomes.refusing("a", 300.0) and outcomes.state("a", 300.0) is None
    assert outcomes.retry_at(["a", "b"], 10.0) == 300.0 and outcomes.retry_at(["b"], 10.0) is None
    outcomes.launched("a")
    assert outcomes.state("a", 10.0) is True and outcomes.refused("a", 10.0) == 70.0  # the count starts again
    outcomes.launched("a")
    assert outcomes.preempted("a", 100.0) == 160.0 and outcomes.state("a", 100.0) is False


def test_an_online_policy_cannot_read_the_markets_capacity() -> None:
    scenario = Scenario([MarketSteps("a", "t", 1.0, [0.3] * 10, [True] * 10)])
    shown = without_capacity(scenario)
    assert shown.markets[0].price == [0.3] * 10
    with pytest.raises(LookupError, match="learned by trying"):
        shown.markets[0].available[3]

    class Peeker:
        name = "peeker"

        def reset(self, job: JobSpec, scenario: Scenario) -> None:
            self.scenario = scenario

        def decide(self, now: Progress) -> int:
            return 0 if self.scenario.markets[0].available[now.step] else WAIT

    with pytest.raises(LookupError):
        simulate(JobSpec(0.5, 1.0, 0.1), scenario, Peeker())
    assert {"greedy", "uniform-progress", "cbas"} <= set(POLICIES)  # each runs in the suites without it


class Trier:
    """Tries markets 0, 1, 2 ... in order within a step, and keeps what it was told."""

    name = "trier"

    def __init__(self, markets: int) -> None:
        self.markets = markets
        self.seen: list[Progress] = []

    def reset(self, job: JobSpec, scenario: Scenario) -> None:
        pass

    def decide(self, now: Progress) -> int:
        self.seen.append(now)
        if now.mode >= 0:
            return now.mode
        untried = [m for m in range(self.markets) if m not in now.refused]
        return untried[0] if untried else WAIT


def test_refused_launches_are_told_cost_time_unbilled_and_are_bounded_per_step() -> None:
    down, up = [False] * 30, [True] * 30
    markets = [MarketSteps(f"z{i}", "t", 1.0, [0.2] * 30, down) for i in range(2)]
    markets.append(MarketSteps("z2", "t", 1.0, [0.5] * 30, up))
    trier = Trier(3)
    result = simulate(JobSpec(1.0, 2.5, 0.1), Scenario(markets), trier)
    assert [p.refused for p in trier.seen[:3]] == [(), (0,), (0, 1)]  # told, then it tries the next
    assert result.starts == 1 and result.finished_hours == pytest.approx(1.1 + 2 * REFUSED_LAUNCH_HOURS)
    assert result.cost == pytest.approx(0.5 * 1.1)  # the refused tries' minutes are not billed

    blocked = [MarketSteps(f"z{i}", "t", 1.0, [0.2] * 30, down) for i in range(LAUNCH_TRIES_PER_STEP + 1)]
    trier = Trier(len(blocked))
    simulate(JobSpec(1.0, 2.5, 0.1), Scenario(blocked), trier)
    assert max(len(p.refused) for p in trier.seen if p.step == 0) == LAUNCH_TRIES_PER_STEP - 1  # then it waits


def test_a_preemption_is_told_at_the_step_it_happens() -> None:
    market = MarketSteps("a", "t", 1.0, [0.2] * 30, [True] * 5 + [False] * 25)
    trier = Trier(1)
    simulate(JobSpec(1.0, 3.0, 0.1), Scenario([market]), trier)
    assert {p.step for p in trier.seen if p.preempted == 0} == {5}  # asked again there, after a refusal


def test_ours_learns_a_flapping_zone_is_unreliable_from_its_own_preemptions() -> None:
    # a cheap zone up 18 minutes, down 6, again and again; a dearer one always up
    steps = 240
    flapping = MarketSteps("flapping", "t", 1.0, [0.2] * steps, ([True] * 3 + [False]) * (steps // 4))
    stable = MarketSteps("stable", "t", 1.0, [0.3] * steps, [True] * steps)
    job = JobSpec(12.0, 18.0, 0.2)
    ours = simulate(job, Scenario([flapping, stable]), make("cbas"), keep_actions=True)
    greedy = simulate(job, Scenario([flapping, stable]), make("greedy", 0))
    assert not ours.missed and ours.preemptions == 1 and greedy.preemptions > 10
    assert ours.actions[-1] == 1 and ours.cost < 0.3 * (12.0 + 2 * 0.2) + 0.2 * 0.3


def test_ours_takes_on_demand_when_spot_costs_more_and_leaves_it_when_spot_is_cheap_again() -> None:
    steps = 240
    # spot spikes above on-demand for 10 hours; the slack does not last through it
    market = MarketSteps("a", "t", 1.0, [0.3] * 20 + [1.5] * 100 + [0.3] * 120, [True] * steps)
    ours = simulate(JobSpec(12.0, 18.0, 0.2), Scenario([market]), make("cbas"), keep_actions=True)
    assert not ours.missed and ours.ondemand_hours > 0
    on_spot_at_a_spike = [i for i, a in enumerate(ours.actions) if a == 0 and 20 <= i < 120]
    assert on_spot_at_a_spike == []  # never paid $1.50 spot while on-demand was $1.00
    assert ours.actions[-1] == 0  # back to spot once it is cheap again
    assert ON_DEMAND in ours.actions


def test_refused_tries_never_cost_more_than_the_step_they_are_in() -> None:
    """Steps of the live master's pass (2 s): two refused tries then a machine that runs one step
    and is reclaimed. Its session is billed what it ran (never below nothing), and the job waits."""
    step = 2.0 / 3600.0
    down = [False] * 40
    markets = [MarketSteps(f"z{i}", "t", 1.0, [0.2] * 40, down) for i in range(2)]
    markets.append(MarketSteps("z2", "t", 1.0, [0.5] * 40, [True] + [False] * 39))
    result = simulate(JobSpec(20 * step, 40 * step, 0.0), Scenario(markets, step), Trier(3))
    late = min(2 * REFUSED_LAUNCH_HOURS, step)
    assert result.cost >= 0.5 * (step - late) - 1e-12 and result.cost >= 0.0, result
