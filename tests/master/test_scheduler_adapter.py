"""The scheduler adapter's decisions, with an injected clock (no sleeping)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cbas import jdl
from cbas.master.scheduler_adapter import SchedulerAdapter
from cbas.models import Job, LedgerEntry, LedgerState, Offer
from cbas.scheduler.placement import Placement
from cbas.settings import Settings
from cbas.state import JobState

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = T0.timestamp()

    def __call__(self) -> float:
        return self.now


def offer(zone: str, spot: float, available: bool = True, kind: str = "c5.large", ondemand: float = 0.085) -> Offer:
    return Offer(zone=zone, instance_type=kind, spot_price=spot, ondemand_price=ondemand, available=available)


def setup(deadline: str | None = "10h", runtime: str | None = "4h") -> tuple[SchedulerAdapter, Clock, Job, jdl.JobDescription]:
    clock = Clock()
    adapter = SchedulerAdapter(Settings(restart_overhead=360, schedule_interval=5), clock=clock)
    text = 'Executable = "x";' + (f' Deadline = "{deadline}";' if deadline else "") + (f' Runtime = "{runtime}";' if runtime else "")
    job = Job(id="j", state=JobState.QUEUED, jdl=text, submitted_at=T0)
    return adapter, clock, job, jdl.parse(text)


def test_a_job_without_deadline_gets_the_cheapest_spot_market() -> None:
    adapter, _, job, description = setup(deadline=None, runtime=None)
    adapter.observe([offer("a", 0.03), offer("b", 0.02), offer("c", 0.01, available=False)])
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.action == "launch" and decision.placement is not None
    assert (decision.placement.zone, decision.placement.market) == ("b", "spot")
    assert decision.predicted_cost is None


def test_with_slack_to_spare_it_launches_spot_and_predicts_the_cost() -> None:
    adapter, _, job, description = setup()
    adapter.observe([offer("a", 0.03), offer("b", 0.025)])
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.placement is not None and decision.placement.zone == "b" and decision.placement.market == "spot"
    assert decision.predicted_cost is not None
    assert 0.025 * 4.1 <= decision.predicted_cost < 0.085 * 4.1


def test_no_capacity_means_wait_while_the_slack_allows_then_on_demand() -> None:
    adapter, clock, job, description = setup()
    adapter.observe([offer("a", 0.03, available=False)])
    assert adapter.place(job, description, ["c5.large"]).action == "wait"
    clock.now += timedelta(hours=5.9).total_seconds()  # 4.1 h left for 4 h of work: less than two restarts
    adapter.observe([offer("a", 0.03, available=False)])
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.action == "launch" and decision.placement is not None
    assert decision.placement.market == "on-demand"
    assert decision.predicted_cost == 0.085 * (4.0 + 0.1)


def running_on(zone: str, market: str = "spot") -> LedgerEntry:
    return LedgerEntry(id="l", job_id="j", state=LedgerState.RUNNING, instance_id="i-1", market=market,
                       zone=zone, instance_type="c5.large", price=0.03)


def test_a_running_job_switches_to_on_demand_when_the_deadline_nears() -> None:
    adapter, clock, job, description = setup()
    job = job.model_copy(update={"state": JobState.RUNNING, "run_seconds": 3600.0, "running_since": None})
    adapter.observe([offer("a", 0.03)])
    assert adapter.review(job, description, ["c5.large"], running_on("a")).action == "keep"
    clock.now += timedelta(hours=6.95).total_seconds()  # 3 h of work left, 3.05 h to the deadline
    adapter.observe([offer("a", 0.03)])
    decision = adapter.review(job, description, ["c5.large"], running_on("a"))
    assert decision.action == "move" and "on-demand" in decision.reason
    assert adapter.review(job, description, ["c5.large"], running_on("a", "on-demand")).action == "keep"


def test_a_running_job_moves_only_once_a_launch_shows_the_cheaper_market_has_capacity() -> None:
    """A move stops the job first: into a market that then refuses, it costs a restart for nothing.
    EC2 tells capacity only by launches, so a running job moves to a market only once a launch
    there worked (another job's), never on a market merely presumed up."""
    adapter, clock, job, description = setup(deadline="40h", runtime="30h")
    job = job.model_copy(update={"state": JobState.RUNNING})
    adapter.observe([offer("a", 0.06), offer("b", 0.01)])
    adapter.preempted("b", "c5.large")  # b took a machine back ...
    clock.now += 5 * 3600  # ... long ago: presumed up again, but nothing has shown it
    adapter.observe([offer("a", 0.06), offer("b", 0.01)])
    assert adapter.review(job, description, ["c5.large"], running_on("a")).action == "keep"
    adapter.launched(Placement("b", "c5.large", "spot", 0.01))  # another job's launch there worked
    adapter.observe([offer("a", 0.06), offer("b", 0.01)])
    decision = adapter.review(job, description, ["c5.large"], running_on("a"))
    assert decision.action == "move" and "in b" in decision.reason


def test_least_slack_first() -> None:
    adapter, _, job, description = setup()
    assert adapter.slack_hours(job, description) == 6.0
    _, _, other, plain = setup(deadline=None, runtime=None)
    assert adapter.slack_hours(other, plain) == float("inf")


def test_a_job_whose_checkpoint_outlasts_the_notice_checkpoints_before_a_likely_loss() -> None:
    adapter, clock, job, description = setup(deadline=None, runtime=None)
    description = description.model_copy(update={"checkpoint_interval": 3600})
    # market a loses its capacity every 20 minutes or so
    for _ in range(4):
        adapter.observe([offer("a", 0.03)])
        clock.now += 20 * 60
        adapter.observe([offer("a", 0.03, available=False)])
        clock.now += 60
    adapter.observe([offer("a", 0.03)])
    started = datetime.fromtimestamp(clock.now, timezone.utc)
    clock.now += 15 * 60
    adapter.observe([offer("a", 0.03)])
    slow = job.model_copy(update={"state": JobState.RUNNING, "running_since": started, "checkpoint_seconds": 300.0})
    decision = adapter.review(slow, description, ["c5.large"], running_on("a"))
    assert decision.action == "checkpoint" and "likely to lose its capacity" in decision.reason
    quick = slow.model_copy(update={"checkpoint_seconds": 1.0})  # fits in the notice: nothing to gain
    assert adapter.review(quick, description, ["c5.large"], running_on("a")).action == "keep"
    assert adapter.review(slow, description, ["c5.large"], running_on("a", "on-demand")).action == "keep"


def test_a_running_job_whose_market_shows_no_capacity_is_reviewed_without_error() -> None:
    """The market a machine runs on may show no spot capacity before its notice comes: the
    scheduling pass must still decide (it raised KeyError in cbas_choice and aborted the pass)."""
    adapter, _, job, description = setup(deadline="40h", runtime="30h")
    job = job.model_copy(update={"state": JobState.RUNNING})
    adapter.observe([offer("a", 0.03, available=False), offer("b", 0.04)])
    decision = adapter.review(job, description, ["c5.large"], running_on("a"))
    assert decision.action in ("keep", "move", "checkpoint")


def test_a_price_spike_is_judged_against_the_jobs_own_instance_types() -> None:
    """A cheap small type elsewhere in the market must not make a big type's price look like a
    spike (the job waited half its slack and was moved off its machine for it)."""
    adapter, _, job, description = setup(deadline="12h", runtime="4h")
    adapter.observe([offer("a", 0.90, kind="p3.2xlarge", ondemand=3.06), offer("a", 0.01, kind="m3.medium")])
    decision = adapter.place(job, description, ["p3.2xlarge"])
    assert decision.action == "launch" and decision.placement is not None
    running = job.model_copy(update={"state": JobState.RUNNING})
    machine = running_on("a").model_copy(update={"instance_type": "p3.2xlarge", "price": 0.90})
    assert adapter.review(running, description, ["p3.2xlarge"], machine).action == "keep"


def test_a_deadline_job_never_launches_spot_above_its_max_price() -> None:
    adapter, _, job, _ = setup()
    description = jdl.parse(job.jdl + " MaxPrice = 0.03;")
    adapter.observe([offer("a", 0.05), offer("b", 0.04)])
    assert adapter.place(job, description, ["c5.large"]).action == "wait"
    adapter.observe([offer("a", 0.05), offer("b", 0.025)])
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.placement is not None and decision.placement.zone == "b"


def test_a_spot_only_job_never_gets_on_demand() -> None:
    adapter, clock, job, _ = setup()
    description = jdl.parse(job.jdl + ' Market = "spot";')
    adapter.observe([offer("a", 0.03, available=False)])
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.action == "wait"
    clock.now += timedelta(hours=5.9).total_seconds()  # the slack is gone: an "any" job goes on-demand
    adapter.observe([offer("a", 0.03, available=False)])
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.action == "wait" and "deadline will be missed" in decision.reason
    adapter.observe([offer("a", 0.03)])
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.placement is not None and decision.placement.market == "spot", decision
    assert "deadline is missed if" in decision.reason
    running = job.model_copy(update={"state": JobState.RUNNING})
    assert adapter.review(running, description, ["c5.large"], running_on("a")).action == "keep"
    # without a deadline, no spot capacity means waiting, never on-demand
    plain = jdl.parse('Executable = "x"; Market = "spot";')
    adapter.observe([offer("a", 0.03, available=False)])
    assert adapter.place(job, plain, ["c5.large"]).action == "wait"
    stalled = job.model_copy(update={"stalled_attempts": 5})
    assert adapter.place(stalled, plain, ["c5.large"]).action == "wait"


def test_an_on_demand_only_job_never_gets_spot() -> None:
    adapter, _, job, _ = setup(deadline=None, runtime=None)
    description = jdl.parse('Executable = "x"; Market = "on-demand";')
    adapter.observe([offer("a", 0.01), offer("b", 0.02)])
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.placement is not None and decision.placement.market == "on-demand", decision
    capped = jdl.parse('Executable = "x"; Market = "on-demand"; MaxPrice = 0.05;')
    assert adapter.place(job, capped, ["c5.large"]).action == "wait"  # on-demand is 0.085


def test_market_accepts_only_what_it_knows() -> None:
    with pytest.raises(jdl.JDLError, match="Market"):
        jdl.parse('Executable = "x"; Market = "cheap";')


def test_a_wait_says_what_it_waits_for_and_until_when() -> None:
    adapter, clock, job, description = setup()  # 4 h of work, 10 h to the deadline, restarts 0.1 h
    adapter.observe([offer("a", 0.03, available=False)])
    first = adapter.place(job, description, ["c5.large"])
    assert first.action == "wait" and first.reason == "waiting for spot capacity; on-demand from 05:48 UTC if none comes"
    clock.now += 600
    adapter.observe([offer("a", 0.03, available=False)])
    assert adapter.place(job, description, ["c5.large"]).reason == first.reason  # no new event at every pass
    adapter.observe([offer("a", 0.01)])  # seen cheap once ...
    adapter.observe([offer("a", 0.05)])  # ... then a spike
    spike = adapter.place(job, description, ["c5.large"])
    assert spike.action == "wait" and spike.reason.startswith("waiting for spot at or under $0.0150/h"), spike


def test_another_jobs_refused_launch_never_moves_a_running_job_off_its_market() -> None:
    adapter, _, job, description = setup(deadline="40h", runtime="30h")
    adapter.observe([offer("a", 0.03)])
    adapter.launch_refused(Placement("a", "c5.large", "spot", 0.03))  # a new machine there was refused
    running = job.model_copy(update={"state": JobState.RUNNING})
    assert adapter.review(running, description, ["c5.large"], running_on("a")).action == "keep"


def test_a_deadline_job_whose_on_demand_is_refused_takes_spot_when_the_slack_is_gone() -> None:
    adapter, clock, job, description = setup()
    clock.now += timedelta(hours=5.9).total_seconds()  # less than two restarts of slack left
    adapter.observe([offer("a", 0.03)])
    adapter.launch_refused(Placement("a", "c5.large", "on-demand", 0.085))
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.placement is not None and decision.placement.market == "spot", decision
    assert "on-demand launches were refused" in decision.reason


def test_spot_dearer_than_on_demand_means_on_demand_at_launch_and_for_a_running_job() -> None:
    adapter, _, job, description = setup(deadline="12h", runtime="4h")
    adapter.observe([offer("a", 0.12), offer("b", 0.10)])  # both above on-demand's $0.085
    decision = adapter.place(job, description, ["c5.large"])
    assert decision.placement is not None and decision.placement.market == "on-demand"
    assert "less than spot's $0.1000/h" in decision.reason
    running = job.model_copy(update={"state": JobState.RUNNING})
    machine = running_on("b").model_copy(update={"price": 0.10})
    decision = adapter.review(running, description, ["c5.large"], machine)
    assert decision.action == "move" and "switching to on-demand: $0.0850/h" in decision.reason


@pytest.mark.parametrize("case", ["cheapest", "refused", "dearer-than-on-demand"])
def test_the_master_and_the_simulator_decide_the_same_from_the_same_facts(case: str) -> None:
    """One policy, two callers: the master's adapter and the simulator's `cbas`, given the same
    markets, job and launch results, choose the same."""
    from cbas.scheduler.model import JobSpec, MarketSteps, Scenario
    from cbas.scheduler.policies import make
    from cbas.scheduler.simulator import ON_DEMAND, Progress

    prices = {"cheapest": (0.03, 0.02), "refused": (0.03, 0.02), "dearer-than-on-demand": (0.12, 0.10)}[case]
    clock = Clock()
    adapter = SchedulerAdapter(Settings(restart_overhead=360, schedule_interval=360), clock=clock)  # one 0.1 h step
    text = 'Executable = "x"; Deadline = "10h"; Runtime = "4h";'
    job, description = Job(id="j", state=JobState.QUEUED, jdl=text, submitted_at=T0), jdl.parse(text)
    adapter.observe([offer("a", prices[0]), offer("b", prices[1])])
    refused: tuple[int, ...] = ()
    if case == "refused":
        adapter.launch_refused(Placement("b", "c5.large", "spot", prices[1]))
        refused = (1,)
    decision = adapter.place(job, description, ["c5.large"])
    master = decision.placement

    ours = make("cbas")
    ours.reset(JobSpec(4.0, 10.0, 0.1), Scenario([MarketSteps(z, "c5.large", 0.085, [p] * 100, [True] * 100)
                                                 for z, p in zip("ab", prices)]))
    if refused:
        ours.decide(Progress(0, 0.0, -1, 0.0, 0))  # its first try, then told it was refused
    simulated = ours.decide(Progress(0, 0.0, -1, 0.0, 0, refused=refused))
    assert master is not None
    if simulated == ON_DEMAND:
        assert master.market == "on-demand"
    else:
        assert (master.market, master.zone) == ("spot", "ab"[simulated])
    assert {"cheapest": 1, "refused": 0, "dearer-than-on-demand": ON_DEMAND}[case] == simulated


def test_a_job_not_started_yet_is_judged_by_the_restarts_its_cluster_measured() -> None:
    """With 10 minutes of slack, EC2's default restart (5 minutes, paid twice in the reckoning)
    leaves none: on-demand. The cluster's running jobs measured 5 s restarts (as on the local
    backend, or a small image): the same job takes spot, as the simulator with that overhead does."""
    clock = Clock()
    adapter = SchedulerAdapter(Settings(backend="aws", schedule_interval=5), clock=clock)
    text = 'Executable = "x"; Deadline = "70m"; Runtime = "1h";'
    job, description = Job(id="j", state=JobState.QUEUED, jdl=text, submitted_at=T0), jdl.parse(text)
    adapter.observe([offer("a", 0.03)])
    first = adapter.place(job, description, ["c5.large"])
    assert first.placement is not None and first.placement.market == "on-demand", first
    running = [Job(id=f"r{i}", state=JobState.RUNNING, jdl=text, submitted_at=T0, restart_seconds=s)
               for i, s in enumerate((4.0, 5.0, 400.0))]
    adapter.learn_restarts([job, *running])
    again = adapter.place(job, description, ["c5.large"])
    assert again.placement is not None and again.placement.market == "spot", again
    adapter.learn_restarts([job])  # they ended: what they measured stays
    assert adapter.restart_hours(job) == 5.0 / 3600.0


def test_the_default_restart_is_the_backends() -> None:
    assert Settings(backend="aws").default_restart_seconds() == 300.0
    assert Settings(backend="local").default_restart_seconds() == 10.0
    assert Settings(backend="aws", restart_overhead=42).default_restart_seconds() == 42.0
