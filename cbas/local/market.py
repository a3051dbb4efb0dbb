"""The local spot market: where and when spot capacity exists, and at what price. Pure.

Time here is simulated seconds since the market opened; the local cloud maps wall time onto it
with its time scale. Two models:
- BuiltinMarket (the default): each zone alternates between periods with and without spot
  capacity, their lengths drawn from lognormal distributions fitted to the median and mean
  measured from real traces (scripts/measure_market.py reproduces the numbers).
- TraceMarket: replays a real trace file (shared/traces format), wrapping around at its end.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

from cbas.scheduler.traces import Trace

# On-demand USD/hour of the instance types the local cloud offers (us-east-1 list prices).
ONDEMAND_PRICES: dict[str, float] = {
    "m5.large": 0.096,
    "c5.large": 0.085,
    "c5.xlarge": 0.17,
    "r5.large": 0.126,
    "p3.2xlarge": 3.06,
}


@dataclass(frozen=True)
class ZoneModel:
    """Hours of spot capacity and of its absence (median, mean), and spot price / on-demand."""

    name: str
    measured_from: str
    up_median_h: float
    up_mean_h: float
    down_median_h: float
    down_mean_h: float
    price_ratio: float


# Measured from aws-p3.2xlarge-9zones-2023-02-15 (Can't Be Late traces, availability every 195 s):
# four zones spanning the range from volatile to stable.
BUILTIN_ZONES: tuple[ZoneModel, ...] = (
    ZoneModel("local-1a", "us-east-1c", 0.38, 0.96, 0.70, 2.10, 0.397),
    ZoneModel("local-1b", "us-east-1f", 0.54, 1.58, 0.54, 2.46, 0.392),
    ZoneModel("local-1c", "us-east-2b", 0.70, 2.90, 1.19, 2.21, 0.304),
    ZoneModel("local-1d", "us-west-2b", 1.49, 7.61, 0.70, 1.45, 0.300),
)


class MarketModel(Protocol):
    def zones(self) -> list[str]: ...
    def instance_types(self) -> list[str]: ...
    def available(self, zone: str, instance_type: str, t: float, max_price: float | None = None) -> bool: ...
    def spot_price(self, zone: str, instance_type: str, t: float) -> float: ...
    def ondemand_price(self, instance_type: str) -> float: ...


def _lognormal_seconds(rng: random.Random, median_h: float, mean_h: float) -> float:
    # lognormal with median m has mean m*exp(sigma^2/2)
    sigma = math.sqrt(2 * math.log(max(mean_h / median_h, 1.0)))
    return 3600.0 * median_h * math.exp(rng.gauss(0.0, sigma))


class _Timeline:
    """Alternating up/down periods of one market, drawn lazily as time advances."""

    def __init__(self, zone: ZoneModel, rng: random.Random) -> None:
        self.zone = zone
        self.rng = rng
        up_share = zone.up_mean_h / (zone.up_mean_h + zone.down_mean_h)
        self.up = rng.random() < up_share
        # start somewhere inside the first period
        self.ends = self._draw() * rng.random()
        self.changes: list[tuple[float, bool]] = [(0.0, self.up)]

    def _draw(self) -> float:
        z = self.zone
        return _lognormal_seconds(self.rng, *((z.up_median_h, z.up_mean_h) if self.up else (z.down_median_h, z.down_mean_h)))

    def state_at(self, t: float) -> bool:
        while t >= self.ends:
            self.up = not self.up
            self.changes.append((self.ends, self.up))
            self.ends += self._draw()
        for start, up in reversed(self.changes):
            if start <= t:
                return up
        return self.changes[0][1]


class BuiltinMarket:
    def __init__(self, seed: int | None = None, zones: tuple[ZoneModel, ...] = BUILTIN_ZONES) -> None:
        self._zones = {zone.name: zone for zone in zones}
        self._seed = seed if seed is not None else random.randrange(1 << 30)
        self._timelines: dict[tuple[str, str], _Timeline] = {}

    def zones(self) -> list[str]:
        return list(self._zones)

    def instance_types(self) -> list[str]:
        return list(ONDEMAND_PRICES)

    def _timeline(self, zone: str, instance_type: str) -> _Timeline:
        key = (zone, instance_type)
        if key not in self._timelines:
            rng = random.Random(f"{self._seed}/{zone}/{instance_type}")
            self._timelines[key] = _Timeline(self._zones[zone], rng)
        return self._timelines[key]

    def available(self, zone: str, instance_type: str, t: float, max_price: float | None = None) -> bool:
        if zone not in self._zones or instance_type not in ONDEMAND_PRICES:
            return False
        if max_price is not None and self.spot_price(zone, instance_type, t) > max_price:
            return False
        return self._timeline(zone, instance_type).state_at(t)

    def spot_price(self, zone: str, instance_type: str, t: float) -> float:
        return round(self._zones[zone].price_ratio * ONDEMAND_PRICES[instance_type], 4)

    def ondemand_price(self, instance_type: str) -> float:
        return ONDEMAND_PRICES[instance_type]


class TraceMarket:
    """Replays a trace from `offset` seconds into it; simulated time past the end wraps around."""

    def __init__(self, trace: Trace, offset: float = 0.0) -> None:
        self.trace = trace
        self._start = trace.start
        self._span = max(trace.end - trace.start, 1.0)
        self._offset = offset

    def trace_time(self, t: float) -> float:
        """The trace's own time (epoch s) at simulated time t."""
        return self._start + ((t + self._offset) % self._span)

    def zones(self) -> list[str]:
        return sorted({zone for zone, _ in self.trace.markets})

    def instance_types(self) -> list[str]:
        return sorted({kind for _, kind in self.trace.markets})

    def available(self, zone: str, instance_type: str, t: float, max_price: float | None = None) -> bool:
        series = self.trace.markets.get((zone, instance_type))
        if series is None:
            return False
        if max_price is not None and series.price_at(self.trace_time(t)) > max_price:
            return False
        return series.available_at(self.trace_time(t), max_price)

    def spot_price(self, zone: str, instance_type: str, t: float) -> float:
        return self.trace.markets[(zone, instance_type)].price_at(self.trace_time(t))

    def ondemand_price(self, instance_type: str) -> float:
        for (_, kind), series in self.trace.markets.items():
            if kind == instance_type:
                return series.ondemand_price
        raise KeyError(instance_type)
