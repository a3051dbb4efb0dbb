"""What the scheduler reasons about, on a grid of fixed time steps. Pure.

A job has remaining work (hours of compute on its instance type), a deadline, a restart overhead
(boot + restore, paid at every start of a machine, the first included), and a checkpoint interval
and cost (a checkpoint that fits in the interruption notice makes a preemption lose nothing). A market
(zone x instance type) has, per step, a spot price and whether spot capacity exists, and an
on-demand price that always has capacity. Billing is per second, or per started hour as in 2013
(when AWS reclaimed a spot machine, its last partial hour was free).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

from cbas.scheduler.traces import MarketSeries, Trace

Billing = Literal["second", "hour"]
STEP_HOURS = 0.1  # six minutes: the grid of the simulator and the policies


@dataclass(frozen=True)
class JobSpec:
    work_hours: float
    deadline_hours: float  # from the job's start
    restart_hours: float = 0.1
    checkpoint_interval_hours: float = 1.0  # of work between periodic checkpoints
    checkpoint_hours: float = 0.0  # how long a checkpoint holds the job still
    notice_hours: float = 2.0 / 60.0  # spot interruption notice: a checkpoint that fits loses nothing

    @property
    def slack_hours(self) -> float:
        return self.deadline_hours - self.work_hours


@dataclass
class MarketSteps:
    zone: str
    instance_type: str
    ondemand: float
    price: list[float]  # USD/hour, per step
    available: list[bool]  # spot capacity, per step


@dataclass
class Scenario:
    """The markets a job may use, from its start, step by step."""

    markets: list[MarketSteps]
    step_hours: float = STEP_HOURS
    billing: Billing = "second"

    @property
    def steps(self) -> int:
        return min(len(m.price) for m in self.markets)

    @property
    def ondemand(self) -> float:
        return min(m.ondemand for m in self.markets)


def sample(series: MarketSeries, start: float, steps: int, step_hours: float,
           max_price: float | None = None) -> MarketSteps:
    """Read a market at the start of each step (bisect into its rows)."""
    price, available = [], []
    times = series.times
    step_seconds = step_hours * 3600.0
    for index in range(steps):
        t = start + index * step_seconds
        row = max(0, bisect.bisect_right(times, t) - 1)
        known = series.available[row]
        value = series.spot_price[row]
        value = value if value is not None else series.price_at(t)
        bid = max_price if max_price is not None else series.ondemand_price
        price.append(value)
        available.append(known if known is not None else value <= bid)
    return MarketSteps(series.zone, series.instance_type, series.ondemand_price, price, available)


def market_sets(trace: Trace) -> dict[str, list[MarketSeries]]:
    """A trace's markets grouped by instance type: a job of that type may use any of them."""
    groups: dict[str, list[MarketSeries]] = {}
    for (_, kind), series in sorted(trace.markets.items()):
        groups.setdefault(kind, []).append(series)
    return groups


def scenario_from(markets: list[MarketSeries], start: float, hours: float, step_hours: float = STEP_HOURS,
                  billing: Billing = "second") -> Scenario:
    steps = int(round(hours / step_hours))
    return Scenario([sample(m, start, steps, step_hours) for m in markets], step_hours, billing)


def binned(series: MarketSeries, start: float, bins: int, bin_hours: float) -> MarketSteps:
    """A market in bins, as the peer simulator reads it: a bin has capacity only if every
    observation in it (the row in effect at its start included) has; its price is their mean."""
    price, available = [], []
    times, width = series.times, bin_hours * 3600.0
    for index in range(bins):
        t0 = start + index * width
        first = max(0, bisect.bisect_right(times, t0) - 1)
        last = max(first + 1, bisect.bisect_left(times, t0 + width))
        rows = range(first, last)
        values = [p if (p := series.spot_price[r]) is not None else series.price_at(t0) for r in rows]
        ups = [known if (known := series.available[r]) is not None else value <= series.ondemand_price
               for r, value in zip(rows, values)]
        price.append(sum(values) / len(values))
        available.append(all(ups))
    return MarketSteps(series.zone, series.instance_type, series.ondemand_price, price, available)
