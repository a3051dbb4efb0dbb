"""The simulator's accounting, against hand-computed cases, for both billing granularities."""

from __future__ import annotations

import pytest

from cbas.scheduler.model import JobSpec, MarketSteps, Scenario
from cbas.scheduler.simulator import ON_DEMAND, WAIT, Progress, simulate


def market(available: list[bool], price: float | list[float] = 0.3, zone: str = "a") -> MarketSteps:
    prices = price if isinstance(price, list) else [price] * len(available)
    return MarketSteps(zone, "t", 1.0, prices, available)


class Script:
    """A policy that plays a fixed list of actions (then its last one)."""

    name = "script"

    def __init__(self, actions: list[int]) -> None:
        self.actions = actions

    def reset(self, job: JobSpec, scenario: Scenario) -> None:
        pass

    def decide(self, now: Progress) -> int:
        return self.actions[min(now.step, len(self.actions) - 1)]


def test_per_second_spot_run_pays_restart_and_work() -> None:
    scenario = Scenario([market([True] * 30)])
    result = simulate(JobSpec(1.0, 3.0, 0.1), scenario, Script([0]))
    assert result.cost == pytest.approx(0.3 * 1.1)
    assert result.finished_hours == pytest.approx(1.1)
    assert (result.starts, result.preemptions, result.missed) == (1, 0, False)


def test_a_preemption_costs_a_second_restart() -> None:
    available = [True] * 5 + [False] + [True] * 24
    result = simulate(JobSpec(1.0, 3.0, 0.1), Scenario([market(available)]), Script([0]))
    # 5 steps on the first machine (0.1 warm-up + 0.4 work), 1 step down, then 0.1 + 0.6
    assert result.preemptions == 1 and result.starts == 2
    assert result.finished_hours == pytest.approx(0.5 + 0.1 + 0.7)
    assert result.cost == pytest.approx(0.3 * (0.5 + 0.7))


def test_on_demand_and_the_last_partial_step() -> None:
    result = simulate(JobSpec(0.25, 1.0, 0.1), Scenario([market([False] * 10)]), Script([ON_DEMAND]))
    assert result.finished_hours == pytest.approx(0.35)
    assert result.cost == pytest.approx(1.0 * 0.35)
    assert result.ondemand_hours == pytest.approx(0.35)


def test_hourly_billing_charges_started_hours_at_each_hours_first_price() -> None:
    prices = [0.2] * 10 + [0.5] * 20
    scenario = Scenario([market([True] * 30, prices)], billing="hour")
    result = simulate(JobSpec(1.0, 3.0, 0.1), scenario, Script([0]))
    assert result.finished_hours == pytest.approx(1.1)
    assert result.cost == pytest.approx(0.2 + 0.5)  # two started hours, priced at their starts


def test_hourly_billing_a_reclaimed_spot_machines_last_partial_hour_is_free() -> None:
    available = [True] * 15 + [False] * 5 + [True] * 20
    scenario = Scenario([market(available)], billing="hour")
    result = simulate(JobSpec(1.5, 4.0, 0.1), scenario, Script([0]))
    # first machine: 1.5 h, reclaimed: 1 hour charged; second: 0.1 + 0.2 h: one started hour
    assert result.preemptions == 1
    assert result.cost == pytest.approx(0.3 * 1 + 0.3 * 1)


def test_hourly_billing_a_machine_we_stop_pays_its_partial_hour() -> None:
    scenario = Scenario([market([True] * 40)], billing="hour")
    result = simulate(JobSpec(1.0, 4.0, 0.1), scenario, Script([0] * 5 + [WAIT] * 5 + [0]))
    # 0.5 h, stopped by us: one hour; then 0.1 + 0.6 h: one hour
    assert result.cost == pytest.approx(0.3 * 2)


def test_a_miss_is_costed_as_finishing_on_demand() -> None:
    result = simulate(JobSpec(1.0, 2.0, 0.1), Scenario([market([False] * 20)]), Script([WAIT]))
    assert result.missed and result.finished_hours is None
    assert result.cost == pytest.approx(1.0 * 1.1)


def test_launching_where_there_is_no_capacity_is_waiting() -> None:
    result = simulate(JobSpec(0.5, 1.0, 0.1), Scenario([market([False] * 10)]), Script([0]), keep_actions=True)
    assert set(result.actions) == {WAIT} and result.starts == 0


def test_many_jobs_share_a_markets_capacity() -> None:
    from cbas.scheduler.policies import make
    from cbas.scheduler.simulator import simulate_many

    scenario = Scenario([market([True] * 40)])
    jobs = [(JobSpec(1.0, 3.0, 0.1), 0), (JobSpec(1.0, 3.0, 0.1), 0)]
    first, second = simulate_many(jobs, scenario, [make("cbas"), make("cbas")], capacity=1)
    assert not first.missed and not second.missed
    assert first.ondemand_hours == second.ondemand_hours == 0  # the second waited for the machine
    # the second learns of the machine freed at 1.1 h by trying: its refused tries back off
    # (1, 2, 4, 8, 16, 30 min), so its try at 1.3 h is the first to launch
    assert sorted([first.finished_hours, second.finished_hours]) == pytest.approx([1.1, 2.4])


def test_a_tight_common_deadline_sends_the_task_without_capacity_to_on_demand() -> None:
    from cbas.scheduler.policies import make
    from cbas.scheduler.simulator import simulate_many

    scenario = Scenario([market([True] * 40)])
    jobs = [(JobSpec(1.0, 1.4, 0.1), 0), (JobSpec(1.0, 1.4, 0.1), 0)]
    results = simulate_many(jobs, scenario, [make("cbas"), make("cbas")], capacity=1)
    assert not any(r.missed for r in results)
    assert sorted(r.ondemand_hours > 0 for r in results) == [False, True]


def test_later_arrivals_start_at_their_arrival() -> None:
    from cbas.scheduler.policies import make
    from cbas.scheduler.simulator import simulate_many

    scenario = Scenario([market([True] * 10 + [False] * 5 + [True] * 25)])
    early, late = simulate_many([(JobSpec(0.5, 2.0, 0.1), 0), (JobSpec(0.5, 2.0, 0.1), 10)], scenario,
                                [make("greedy"), make("greedy")])
    assert early.finished_hours == pytest.approx(0.6) and early.preemptions == 0
    assert late.finished_hours == pytest.approx(0.5 + 0.6)  # waited out steps 10-14 of the market


def test_periodic_checkpoints_cost_time_and_bound_the_loss_when_they_do_not_fit_the_notice() -> None:
    # free capacity for 15 steps, then 1 step without; checkpoints every 0.6 h of work take 0.1 h
    available = ([True] * 15 + [False]) * 10
    job = JobSpec(1.5, 10.0, 0.1, checkpoint_interval_hours=0.6, checkpoint_hours=0.1)
    result = simulate(job, Scenario([market(available)]), Script([0]))
    # each 1.5 h up-period: 0.1 restart, 0.6 work, 0.1 checkpoint, 0.6 work, 0.1 checkpoint = 1.5 h;
    # the preemption then loses nothing beyond the last checkpoint
    assert not result.missed and result.checkpoints >= 2
    fits = simulate(JobSpec(1.5, 10.0, 0.1, checkpoint_interval_hours=0.6, checkpoint_hours=0.02),
                    Scenario([market(available)]), Script([0]))
    assert fits.finished_hours < result.finished_hours  # a checkpoint inside the notice loses nothing


def test_ours_checkpoints_before_likely_preemptions() -> None:
    from cbas.scheduler.policies import make

    available = ([True] * 5 + [False] * 2) * 60  # capacity comes in half-hour periods
    job = JobSpec(3.0, 40.0, 0.1, checkpoint_interval_hours=1.0, checkpoint_hours=0.1)
    scenario = Scenario([market(available)])
    greedy = simulate(job, scenario, make("greedy"))
    ours = simulate(job, scenario, make("cbas"))
    assert not ours.missed
    assert ours.spot_hours < greedy.spot_hours  # greedy loses every period's work until forced to on-demand
    assert ours.cost < greedy.cost
