"""Turns the scheduling policy's choices into placements, waits and moves for the master.

Jobs with a Deadline and a Runtime are scheduled by ours (cbas.scheduler.policies.cbas_choice,
the policy the benchmark scores) over every market of their instance types, from what the master
has observed of the cloud's offers; other jobs get the cheapest spot market with capacity.
Pure apart from the clock it is given: the master does the I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

from cbas.jdl import JobDescription, parse_deadline
from cbas.master.work import work_done
from cbas.models import Job, LedgerEntry, Offer, from_epoch
from cbas.scheduler.capacity import RETRY_FULL_MARKET_SECONDS, LaunchOutcomes
from cbas.scheduler.placement import Placement, cheapest_spot
from cbas.scheduler.policies import AvailabilityHistory, MarketNow, Situation, cbas_choice, checkpoint_before_loss
from cbas.scheduler.simulator import ON_DEMAND, WAIT
from cbas.settings import Settings
from cbas.state import JobState

Clock = Callable[[], float]
UNKNOWN_UP_HOURS = 24.0  # a market with capacity since before the master looked
MarketKey = tuple[str, str, str]  # zone, instance type, spot or on-demand


@dataclass(frozen=True)
class Decision:
    action: Literal["wait", "launch", "keep", "move", "checkpoint"]
    placement: Placement | None = None  # for launch
    reason: str = ""
    predicted_cost: float | None = None  # USD to finish the job, as the policy expects


class SchedulerAdapter:
    def __init__(self, settings: Settings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.keys: list[tuple[str, str]] = []
        self.history = AvailabilityHistory(0, UNKNOWN_UP_HOURS)
        self.offers: dict[tuple[str, str], Offer] = {}  # as the cloud says (_tried: as launches found them)
        retry = (settings.capacity_retry_seconds, max(settings.capacity_retry_seconds, RETRY_FULL_MARKET_SECONDS[1]))
        self.outcomes: LaunchOutcomes[MarketKey] = LaunchOutcomes(retry)
        self.typical_restart: float | None = None  # seconds: the median the cluster's jobs measured
        # spot launches refused for their MaxPrice: (zone, type, MaxPrice); capacity unknown
        self.price_refusals: LaunchOutcomes[tuple[str, str, float]] = LaunchOutcomes(retry)

    def observe(self, offers: list[Offer]) -> None:
        keys = sorted((o.zone, o.instance_type) for o in offers)
        if keys != self.keys:  # markets came or went: start the history again
            self.keys = keys
            self.history = AvailabilityHistory(len(keys), UNKNOWN_UP_HOURS)
        self.offers = {(o.zone, o.instance_type): o for o in offers}
        current = [self._tried(k) for k in keys]
        self.history.observe(self.clock() / 3600.0, [o.available for o in current], [o.spot_price for o in current])

    # --- capacity, as launches tell it (cbas.scheduler.capacity) -------------------------------
    def launch_refused(self, placement: Placement) -> float:
        """A launch found no capacity: that market is left until the time returned (epoch s)."""
        return self.outcomes.refused((placement.zone, placement.instance_type, placement.market), self.clock())

    def price_refused(self, placement: Placement, max_price: float) -> float:
        """A spot launch was refused for its MaxPrice (the price rose since the history said):
        jobs with that MaxPrice leave the market for a while; others may still launch there."""
        return self.price_refusals.refused((placement.zone, placement.instance_type, max_price), self.clock())

    def launched(self, placement: Placement) -> None:
        self.outcomes.launched((placement.zone, placement.instance_type, placement.market))

    def preempted(self, zone: str, kind: str) -> None:
        """A spot machine there got its interruption notice: that market has no capacity now."""
        self.outcomes.preempted((zone, kind, "spot"), self.clock())

    def _shown(self, key: tuple[str, str]) -> bool:
        """A spot launch there worked since it last refused or reclaimed."""
        return self.outcomes.state((*key, "spot"), self.clock()) is True

    def _refusing(self, zone: str, kind: str, market: str) -> bool:
        return self.outcomes.refusing((zone, kind, market), self.clock())

    def _tried(self, key: tuple[str, str], max_price: float | None = None) -> Offer:
        """The market's offer with spot capacity as the last launches found it (for a job with
        `max_price`: also as launches with that MaxPrice found its price)."""
        offer = self.offers[key]
        priced_out = max_price is not None and self.price_refusals.refusing((*key, max_price), self.clock())
        if offer.available and (priced_out or self._refusing(offer.zone, offer.instance_type, "spot")):
            return offer.model_copy(update={"available": False})
        return offer

    def _ondemand(self, offers: list[Offer]) -> list[Offer]:
        return [o for o in offers if not self._refusing(o.zone, o.instance_type, "on-demand")]

    def retry_at(self, types: list[str]) -> float | None:
        """When the first of these types' refusing markets may be tried again, if any refuses."""
        keys = [(zone, kind, market) for zone, kind in self._markets(types) for market in ("spot", "on-demand")]
        return self.outcomes.retry_at(keys, self.clock())

    # --- the job's numbers ----------------------------------------------------------------------
    @staticmethod
    def deadline_aware(description: JobDescription) -> bool:
        return description.deadline is not None and description.runtime is not None

    def learn_restarts(self, jobs: list[Job]) -> None:
        """What restarts cost here, from the jobs that measured theirs: a job not started yet is
        judged by them rather than by a default (kept once they end, until others measure)."""
        measured = sorted(j.restart_seconds for j in jobs if j.restart_seconds is not None)
        if measured:
            self.typical_restart = measured[len(measured) // 2]

    def restart_hours(self, job: Job) -> float:
        seconds = job.restart_seconds if job.restart_seconds is not None else (
            self.typical_restart if self.typical_restart is not None else self.settings.default_restart_seconds())
        return seconds / 3600.0

    def progress_hours(self, job: Job) -> float:
        """The work done as a restart would find it (cbas.master.work), not time spent running."""
        return work_done(job, from_epoch(self.clock())) / 3600.0

    def slack_hours(self, job: Job, description: JobDescription) -> float:
        """Hours to spare before the deadline; infinite for a job without one."""
        if not self.deadline_aware(description):
            return float("inf")
        deadline = parse_deadline(description.deadline or "", job.submitted_at).timestamp()
        remaining = max(0.0, (description.runtime_hours() or 0.0) - self.progress_hours(job))
        return (deadline - self.clock()) / 3600.0 - remaining

    def _situation(self, job: Job, description: JobDescription, markets: list[tuple[str, str]], mode: int) -> Situation:
        """`mode` >= 0: the job runs in markets[mode], whose offer is the cloud's (another job's
        refused launch says nothing of a machine already running there), and another spot market
        counts only once a launch there has shown capacity: a move stops the job first, so a move
        into a market that then refuses costs a restart for nothing (EC2 tells nothing else)."""
        runtime = description.runtime_hours() or 0.0
        deadline = parse_deadline(description.deadline or "", job.submitted_at)
        now_hours = self.clock() / 3600.0
        restart = self.restart_hours(job)
        index = {key: i for i, key in enumerate(self.keys)}
        own = markets[mode] if mode >= 0 else None
        ups = [self._within(self.offers[key] if key == own else self._tried(key, description.max_price),
                            description.max_price) and (own is None or key == own or self._shown(key))
               for key in markets]
        return Situation(
            remaining_hours=max(0.0, runtime - self.progress_hours(job)),
            time_left_hours=deadline.timestamp() / 3600.0 - now_hours,
            slack_hours=(deadline - job.submitted_at).total_seconds() / 3600.0 - runtime,
            restart_hours=restart,
            mode=mode,
            warming_hours=0.0,
            markets=[MarketNow(self.offers[key].spot_price, up,
                               self.history.residual_up(index[key], now_hours, restart) if up else 0.0)
                     for key, up in zip(markets, ups)],
            cheapest_seen=self.history.cheapest_seen([index[key] for key in markets]),
            ondemand_price=float("inf") if description.market == "spot" else min(
                (o.ondemand_price for o in self._ondemand([self.offers[key] for key in markets])), default=float("inf")),
        )

    def _on_demand_why(self, situation: Situation) -> str:
        """Why ours chose on-demand: the deadline, or spot dearer than it."""
        slack = situation.time_left_hours - situation.remaining_hours
        if slack < 2 * situation.restart_hours + self.settings.schedule_interval / 3600.0 + 1e-9:
            return "the slack left only covers the work and a restart"
        spot = min((m.price for m in situation.markets if m.available), default=float("inf"))
        return f"${situation.ondemand_price:.4f}/h, less than spot's ${spot:.4f}/h"

    @staticmethod
    def _within(offer: Offer, max_price: float | None) -> bool:
        """Spot capacity at or under the job's MaxPrice (EC2 would refuse a launch above it)."""
        return offer.available and (max_price is None or offer.spot_price <= max_price)

    def _markets(self, types: list[str]) -> list[tuple[str, str]]:
        return [key for key in self.keys if key[1] in types]

    # --- decisions -----------------------------------------------------------------------------------
    def place(self, job: Job, description: JobDescription, types: list[str]) -> Decision:
        """Where a queued job should run now, if anywhere."""
        offers = [self._tried(key, description.max_price) for key in self._markets(types)]
        ondemand = [] if description.market == "spot" else self._ondemand(offers)
        if description.market == "on-demand":
            return self._on_demand_only(ondemand, types, description.max_price)
        if job.stalled_attempts >= self.settings.max_stalled_attempts and ondemand:
            best = min(ondemand, key=lambda o: o.ondemand_price)  # a machine that stays until a checkpoint
            return Decision("launch", Placement(best.zone, best.instance_type, "on-demand", best.ondemand_price),
                            f"on-demand: {job.stalled_attempts} attempts in a row were lost before a checkpoint")
        if not self.deadline_aware(description):
            placement = cheapest_spot(types, description.max_price, offers, ondemand=ondemand)
            if placement is None:
                return Decision("wait", reason=self._no_market_reason(types, description.max_price))
            if placement.market == "on-demand":
                return Decision("launch", placement, "on-demand: no spot market within the max price has capacity")
            return Decision("launch", placement, "cheapest spot market with capacity")
        markets = self._markets(types)
        situation = self._situation(job, description, markets, WAIT)
        choice = cbas_choice(situation, self.settings.schedule_interval / 3600.0)
        if choice == WAIT:
            return Decision("wait", reason=self._wait_reason(situation, description.market == "spot"))
        if choice == ON_DEMAND and not ondemand:  # spot only, or every on-demand market refused
            return self._spot_anyway(situation, markets, spot_only=description.market == "spot")
        if choice == ON_DEMAND:
            best = min(ondemand, key=lambda o: o.ondemand_price)
            cost = best.ondemand_price * (situation.remaining_hours + situation.restart_hours)
            return Decision("launch", Placement(best.zone, best.instance_type, "on-demand", best.ondemand_price),
                            f"on-demand: {self._on_demand_why(situation)}", cost)
        zone, kind = markets[choice]
        offer = self.offers[(zone, kind)]
        stay = max(situation.markets[choice].residual_up_hours, 1e-6)
        per_hour = offer.spot_price / (1.0 - min(0.9, situation.restart_hours / stay))
        return Decision("launch", Placement(zone, kind, "spot", offer.spot_price),
                        f"spot: lowest price per useful hour (expected {stay:.1f} h of capacity)",
                        per_hour * (situation.remaining_hours + situation.restart_hours))

    def _wait_reason(self, situation: Situation, spot_only: bool) -> str:
        """What a deadline job waits for, and until when: stable while it waits (absolute times), so
        the event that shows it is not repeated at every pass."""
        spare = situation.time_left_hours - situation.remaining_hours - 2 * situation.restart_hours
        until = time.strftime("%H:%M", time.gmtime(self.clock() + max(0.0, spare) * 3600.0))
        spiking = any(m.available for m in situation.markets) and situation.cheapest_seen < float("inf")
        target = f"spot at or under ${1.5 * situation.cheapest_seen:.4f}/h" if spiking else "spot capacity"
        then = f"from {until} UTC it takes any spot capacity (Market = spot)" if spot_only else \
            f"on-demand from {until} UTC if none comes"
        return f"waiting for {target}; {then}"

    def _on_demand_only(self, ondemand: list[Offer], types: list[str], max_price: float | None) -> Decision:
        within = [o for o in ondemand if max_price is None or o.ondemand_price <= max_price]
        if not within:
            return Decision("wait", reason="Market = on-demand: " + self._no_market_reason(types, max_price))
        best = min(within, key=lambda o: (o.ondemand_price, types.index(o.instance_type), o.zone))
        return Decision("launch", Placement(best.zone, best.instance_type, "on-demand", best.ondemand_price),
                        "on-demand (Market = on-demand)")

    def _spot_anyway(self, situation: Situation, markets: list[tuple[str, str]], spot_only: bool) -> Decision:
        """A job whose slack is gone and that cannot have on-demand (Market = spot, or every
        on-demand market refused its launches): the best spot market now, since waiting longer
        certainly misses the deadline; it may still be missed if the machine is reclaimed."""
        why = "Market = spot" if spot_only else "on-demand launches were refused"
        up = [i for i, market in enumerate(situation.markets) if market.available]
        if not up:
            return Decision("wait", reason=f"{why}: no spot capacity, and the slack is gone: the deadline "
                                           "will be missed unless capacity comes back soon")
        best = min(up, key=lambda i: situation.markets[i].price)
        zone, kind = markets[best]
        return Decision("launch", Placement(zone, kind, "spot", situation.markets[best].price),
                        f"spot ({why}): the slack is gone; the deadline is missed if this machine is reclaimed")

    def _no_market_reason(self, types: list[str], max_price: float | None) -> str:
        retry = self.retry_at(types)
        if retry is None:
            return "no market within the max price" if max_price is not None else "no market offers capacity"
        when = time.strftime("%H:%M:%S", time.gmtime(retry))
        return f"no market has capacity for {', '.join(types)}: launches were refused; tried again at {when} UTC"

    def review(self, job: Job, description: JobDescription, types: list[str], machine: LedgerEntry) -> Decision:
        """Whether a running job should stay on its machine, move, or checkpoint before a likely loss."""
        if (machine.zone, machine.instance_type) not in self.offers:
            return Decision("keep")
        early = self._early_checkpoint(job, description, machine)
        if not self.deadline_aware(description):
            return early
        markets = self._markets(types)
        if machine.market == "on-demand":
            return Decision("keep")
        try:
            mode = markets.index((machine.zone, machine.instance_type))
        except ValueError:
            return Decision("keep")
        situation = self._situation(job, description, markets, mode)
        choice = cbas_choice(situation, self.settings.schedule_interval / 3600.0)
        if choice == mode:
            return early
        if choice == ON_DEMAND and (description.market == "spot" or not self._ondemand(
                [self.offers[key] for key in markets])):
            return early  # no on-demand to go to: staying is the best it can do
        if choice == ON_DEMAND:
            why = self._on_demand_why(situation)
            return Decision("move", reason="switching to on-demand: " + (
                "the deadline is near" if why.startswith("the slack") else why))
        if choice == WAIT:
            return Decision("move", reason="pausing through a price spike")
        zone, kind = markets[choice]
        return Decision("move", reason=f"moving to {kind} in {zone}: cheaper for the rest of the job")


    def _early_checkpoint(self, job: Job, description: JobDescription, machine: LedgerEntry) -> Decision:
        """Ours' checkpoint timing: a spot job whose checkpoint does not fit in the interruption
        notice checkpoints early when its market is likely to go before the next periodic one."""
        if machine.market != "spot" or job.checkpoint_seconds is None or job.state != JobState.RUNNING:
            return Decision("keep")
        if job.checkpoint_seconds <= self.settings.interruption_notice_seconds():
            return Decision("keep")  # the notice checkpoint saves everything
        since = job.last_checkpoint_at or job.running_since
        if since is None:
            return Decision("keep")
        unsaved = (self.clock() - since.timestamp()) / 3600.0
        index = self.keys.index((machine.zone, machine.instance_type))
        now_hours = self.clock() / 3600.0
        residual = self.history.residual_up(index, now_hours, self.restart_hours(job))
        interval = description.checkpoint_interval / 3600.0
        if checkpoint_before_loss(unsaved, interval - unsaved, residual, job.checkpoint_seconds / 3600.0):
            return Decision("checkpoint", reason=f"{machine.zone} is likely to lose its capacity within "
                                                 f"{residual * 60:.0f} min; {unsaved * 60:.0f} min of work is unsaved")
        return Decision("keep")

