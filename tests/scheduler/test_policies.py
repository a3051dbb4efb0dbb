"""Policies on small hand-made markets where the right answer is known, and their properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbas.scheduler.model import JobSpec, MarketSteps, Scenario
from cbas.scheduler.omniscient import plan
from cbas.scheduler.policies import make
from cbas.scheduler.simulator import ON_DEMAND, REFUSED_LAUNCH_HOURS, simulate

NAMES = ["on-demand", "greedy", "uniform-progress", "greedy-multi", "up-failover", "cbas", "omniscient"]


def market(available: list[bool], price: float = 0.3, zone: str = "a") -> MarketSteps:
    return MarketSteps(zone, "t", 1.0, [price] * len(available), available)


def run(name: str, job: JobSpec, scenario: Scenario, home: int = 0):  # type: ignore[no-untyped-def]
    return simulate(job, scenario, make(name, home), keep_actions=True)


JOB = JobSpec(4.0, 8.0, 0.2)
STEPS = 80


@pytest.mark.parametrize("name", ["greedy", "uniform-progress", "greedy-multi", "up-failover", "cbas", "omniscient"])
def test_always_available_runs_on_spot_once(name: str) -> None:
    result = run(name, JOB, Scenario([market([True] * STEPS)]))
    assert not result.missed and result.ondemand_hours == 0
    assert result.cost == pytest.approx(0.3 * (4.0 + 0.2))


@pytest.mark.parametrize("name", NAMES)
def test_never_available_means_on_demand_and_no_miss(name: str) -> None:
    result = run(name, JOB, Scenario([market([False] * STEPS)]))
    assert not result.missed
    assert result.spot_hours == 0
    if name in ("uniform-progress", "up-failover"):  # it follows its line, stopping when ahead: a few restarts,
        # each after trying spot in vain (a refused launch delays the start, unbilled)
        assert result.starts <= 4 and result.cost == pytest.approx(1.0 * (4.0 + 0.2 * result.starts))
    else:
        assert result.cost == pytest.approx(1.0 * 4.2)


def test_available_only_late() -> None:
    late = Scenario([market([False] * 30 + [True] * 50)])
    greedy, uniform, ours, best = (run(n, JOB, late) for n in ("greedy", "uniform-progress", "cbas", "omniscient"))
    assert not any(r.missed for r in (greedy, uniform, ours, best))
    assert greedy.cost == pytest.approx(0.3 * 4.2)  # waits 3 h, then spot to the end
    assert uniform.ondemand_hours > 0  # it falls behind its line and buys on-demand meanwhile
    assert ours.cost == pytest.approx(best.cost)


def test_ours_uses_the_other_zone_when_home_has_no_capacity() -> None:
    scenario = Scenario([market([False] * STEPS, 0.3, "home"), market([True] * STEPS, 0.35, "other")])
    assert run("greedy", JOB, scenario).ondemand_hours > 0  # greedy only knows its home zone
    ours = run("cbas", JOB, scenario)
    # it tries the cheaper home first: refused, which delays the start on the other (unbilled)
    assert ours.ondemand_hours == 0 and ours.cost == pytest.approx(0.35 * 4.2)
    assert ours.finished_hours == pytest.approx(4.2 + REFUSED_LAUNCH_HOURS)


def test_ours_waits_out_a_price_spike_when_slack_allows() -> None:
    spiky = MarketSteps("a", "t", 1.0, [0.2] * 2 + [0.9] * 20 + [0.2] * 58, [True] * STEPS)
    scenario = Scenario([spiky])
    job = JobSpec(3.0, 8.0, 0.1)
    ours = run("cbas", job, scenario)
    assert not ours.missed
    assert ours.cost < run("greedy", job, scenario).cost


def test_omniscient_plans_what_it_predicts() -> None:
    scenario = Scenario([market([True] * 10 + [False] * 10 + [True] * 60), market([False] * 15 + [True] * 65, 0.5, "b")])
    actions, predicted = plan(JOB, scenario)
    assert run("omniscient", JOB, scenario).cost == pytest.approx(predicted)
    assert ON_DEMAND not in actions


# --- properties over random markets -------------------------------------------------------------

@st.composite
def cases(draw):  # type: ignore[no-untyped-def]
    steps = draw(st.integers(min_value=20, max_value=60))
    markets = []
    for index in range(draw(st.integers(min_value=1, max_value=3))):
        runs = draw(st.lists(st.tuples(st.booleans(), st.integers(min_value=1, max_value=15)), min_size=1, max_size=8))
        available = [up for up, length in runs for _ in range(length)]
        available = (available * (steps // len(available) + 1))[:steps]
        prices = draw(st.lists(st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.9]), min_size=steps, max_size=steps))
        markets.append(MarketSteps(f"z{index}", "t", 1.0, prices, available))
    work = draw(st.integers(min_value=1, max_value=steps // 2)) / 10
    deadline = draw(st.integers(min_value=int(work * 10), max_value=steps)) / 10
    restart = draw(st.sampled_from([0.1, 0.2, 0.3]))
    return JobSpec(work, deadline, restart), Scenario(markets)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_no_policy_misses_what_on_demand_meets_or_bills_more_than_on_demand_for_its_work(case) -> None:  # type: ignore[no-untyped-def]
    job, scenario = case
    feasible = not run("on-demand", job, scenario).missed
    for name in NAMES:
        for home in range(len(scenario.markets)):
            result = run(name, job, scenario, home)
            if feasible:
                assert not result.missed, (name, home)
                assert result.cost <= scenario.ondemand * (job.work_hours + result.starts * job.restart_hours) + 1e-9


@settings(max_examples=150, deadline=None)
@given(cases())
def test_omniscient_is_never_beaten(case) -> None:  # type: ignore[no-untyped-def]
    job, scenario = case
    if run("on-demand", job, scenario).missed:
        return
    best = run("omniscient", job, scenario).cost
    for name in ("on-demand", "greedy", "uniform-progress", "cbas"):
        for home in range(len(scenario.markets)):
            assert best <= run(name, job, scenario, home).cost + 1e-9, name


@pytest.mark.parametrize("name", ["greedy-multi", "up-failover"])
def test_the_multi_zone_baselines_fail_over_to_another_zone(name: str) -> None:
    # the cheap zone is reclaimed after an hour and never comes back; the other is always up
    cheap = MarketSteps("cheap", "t", 1.0, [0.2] * STEPS, [True] * 10 + [False] * (STEPS - 10))
    other = MarketSteps("other", "t", 1.0, [0.3] * STEPS, [True] * STEPS)
    result = run(name, JOB, Scenario([cheap, other]))
    assert not result.missed and result.preemptions == 1 and result.ondemand_hours == 0
    assert result.actions[0] == 0 and result.actions[-1] == 1


def test_jobs_of_one_master_share_what_a_preemption_taught() -> None:
    """The master keeps one record of launches and preemptions for all its jobs: a job that
    arrives just after another's machine was reclaimed in the cheap zone does not launch there,
    as a job simulated alone (knowing nothing of it) does. Steps of 2 s, the master's pass."""
    from cbas.scheduler.policies import Knowledge
    from cbas.scheduler.simulator import simulate_many

    step = 2.0 / 3600.0
    flap = [True] * 5 + [False] + [True] * 200  # the cheap zone reclaims for one step, then is back
    scenario = Scenario([MarketSteps("cheap", "t", 1.0, [0.2] * 206, flap),
                         MarketSteps("dear", "t", 1.0, [0.3] * 206, [True] * 206)], step)
    job = JobSpec(40 * step, 120 * step, step)

    def second_jobs_first_market(shared: bool) -> int:
        knowledge = Knowledge()
        policies = [make("cbas"), make("cbas")]
        if shared:
            for policy, arrival in zip(policies, (0, 6)):
                policy.shared, policy.arrival = knowledge, arrival  # type: ignore[attr-defined]
        chosen: list[int] = []
        decide = policies[1].decide

        def noting(now):  # type: ignore[no-untyped-def]
            action = decide(now)
            chosen.append(action)
            return action

        policies[1].decide = noting  # type: ignore[method-assign]
        simulate_many([(job, 0), (job, 6)], scenario, policies)
        return next(a for a in chosen if a >= 0)

    assert second_jobs_first_market(shared=False) == 0  # alone, it knows nothing of the reclaim
    assert second_jobs_first_market(shared=True) == 1  # one master: that zone is left for a while
