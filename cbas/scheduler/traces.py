"""Read spot market traces (the CSV format of shared/traces/README.md). Parsing is pure.

    timestamp,zone,instance_type,available,spot_price,ondemand_price
A row holds until the next row of the same market; `available` is empty in price-only traces
and `spot_price` empty where unknown (then the last known price is carried forward).
"""

from __future__ import annotations

import bisect
import csv
import gzip
import io
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REQUIRED_COLUMNS = ("timestamp", "zone", "instance_type", "available", "spot_price", "ondemand_price")


# Spot price / on-demand for a market whose trace never gives a price: the ratio measured on the
# priced p3.2xlarge markets of the 2023 traces (scripts/measure_market.py).
UNKNOWN_SPOT_FRACTION = 0.3


class TraceError(ValueError):
    pass


@dataclass
class MarketSeries:
    """One market (zone x instance type): values that hold from each time until the next."""

    zone: str
    instance_type: str
    ondemand_price: float
    times: list[float] = field(default_factory=list)  # unix seconds, ascending
    available: list[bool | None] = field(default_factory=list)
    spot_price: list[float | None] = field(default_factory=list)

    def index_at(self, t: float) -> int:
        return max(0, bisect.bisect_right(self.times, t) - 1)

    def available_at(self, t: float, max_price: float | None = None) -> bool:
        """Price-only traces: capacity exists while the price is at or under the max price."""
        i = self.index_at(t)
        known = self.available[i]
        if known is not None:
            return known
        price = self.price_at(t)
        return price <= (max_price if max_price is not None else self.ondemand_price)

    @property
    def priced(self) -> bool:
        return any(price is not None for price in self.spot_price)

    def price_at(self, t: float) -> float:
        """The spot price then; before any known price, a fixed fraction of on-demand."""
        price = self.spot_price[self.index_at(t)]
        return price if price is not None else UNKNOWN_SPOT_FRACTION * self.ondemand_price


@dataclass
class Trace:
    name: str
    markets: dict[tuple[str, str], MarketSeries]

    @property
    def start(self) -> float:
        return min(series.times[0] for series in self.markets.values())

    @property
    def end(self) -> float:
        return max(series.times[-1] for series in self.markets.values())


def parse_trace(text: str, name: str = "<trace>") -> Trace:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise TraceError(f"{name}: missing columns {', '.join(missing)} (need {','.join(REQUIRED_COLUMNS)})")
    markets: dict[tuple[str, str], MarketSeries] = {}
    last_price: dict[tuple[str, str], float | None] = {}
    for number, row in enumerate(reader, start=2):
        try:
            key = (row["zone"], row["instance_type"])
            t = datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00")).timestamp()
            ondemand = float(row["ondemand_price"])
            price = float(row["spot_price"]) if row["spot_price"] else last_price.get(key)
            available = None if row["available"] == "" else row["available"].strip() == "1"
        except (ValueError, KeyError) as exc:
            raise TraceError(f"{name}:{number}: {exc}") from None
        series = markets.get(key)
        if series is None:
            series = markets[key] = MarketSeries(key[0], key[1], ondemand)
        if series.times and t < series.times[-1]:
            raise TraceError(f"{name}:{number}: rows of {key[0]}/{key[1]} are not sorted by time")
        last_price[key] = price
        series.times.append(t)
        series.available.append(available)
        series.spot_price.append(price)
    if not markets:
        raise TraceError(f"{name}: no rows")
    return Trace(name, markets)


def load_trace(path: Path) -> Trace:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as handle:  # type: ignore[operator]
            return parse_trace(handle.read(), path.name)
    except (OSError, EOFError) as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from None


def load_traces(folder: Path) -> list[Trace]:
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".csv", ".csv.gz")))
    if not files:
        raise TraceError(f"no .csv or .csv.gz traces in {folder}")
    return [load_trace(path) for path in files]


@dataclass
class AvailabilityStats:
    """How long spot capacity lasts and stays away in one market, in hours."""

    zone: str
    instance_type: str
    up_hours: list[float]
    down_hours: list[float]
    price_ratio: float | None  # mean spot price / on-demand

    @staticmethod
    def _median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return (ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2) if ordered else 0.0

    def summary(self) -> dict[str, float | int | str | None]:
        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else 0.0

        total = sum(self.up_hours) + sum(self.down_hours)
        return {
            "zone": self.zone, "instance_type": self.instance_type,
            "up_median_h": round(self._median(self.up_hours), 2), "up_mean_h": round(mean(self.up_hours), 2),
            "down_median_h": round(self._median(self.down_hours), 2), "down_mean_h": round(mean(self.down_hours), 2),
            "periods": len(self.up_hours), "up_share": round(sum(self.up_hours) / total, 2) if total else None,
            "price_ratio": None if self.price_ratio is None else round(self.price_ratio, 3),
        }


def availability_stats(series: MarketSeries) -> AvailabilityStats | None:
    """Lengths of the periods with and without capacity; None for a price-only market."""
    if not series.available or series.available[0] is None:
        return None
    up: list[float] = []
    down: list[float] = []
    start, state = series.times[0], series.available[0]
    for t, available in zip(series.times[1:], series.available[1:]):
        if available != state:
            (up if state else down).append((t - start) / 3600.0)
            start, state = t, available
    prices = [p for p in series.spot_price if p is not None]
    ratio = (sum(prices) / len(prices)) / series.ondemand_price if prices else None
    return AvailabilityStats(series.zone, series.instance_type, up, down, ratio)
