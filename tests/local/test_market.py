from pathlib import Path

import pytest

from cbas.local.market import BUILTIN_ZONES, BuiltinMarket, TraceMarket
from cbas.scheduler.traces import load_trace
from tests.tracefiles import write_trace


def test_builtin_market_is_deterministic_for_a_seed() -> None:
    a, b = BuiltinMarket(seed=5), BuiltinMarket(seed=5)
    times = [t * 600.0 for t in range(500)]
    assert [a.available("local-1a", "c5.large", t) for t in times] == [b.available("local-1a", "c5.large", t) for t in times]
    c = BuiltinMarket(seed=6)
    assert [a.available("local-1a", "c5.large", t) for t in times] != [c.available("local-1a", "c5.large", t) for t in times]


@pytest.mark.parametrize("zone", BUILTIN_ZONES, ids=lambda z: z.name)
def test_builtin_market_reproduces_the_measured_share_of_uptime(zone) -> None:
    # over a long simulated stretch, the share of time with capacity approaches mean_up / (mean_up + mean_down)
    market = BuiltinMarket(seed=1)
    step = 300.0
    samples = [market.available(zone.name, "c5.large", t * step) for t in range(int(400 * 24 * 3600 / step))]
    expected = zone.up_mean_h / (zone.up_mean_h + zone.down_mean_h)
    assert abs(sum(samples) / len(samples) - expected) < 0.12


def test_builtin_prices_and_unknown_markets() -> None:
    market = BuiltinMarket(seed=1)
    assert market.spot_price("local-1d", "m5.large", 0) == pytest.approx(0.3 * 0.096, abs=1e-4)
    assert market.ondemand_price("m5.large") == 0.096
    assert not market.available("nowhere", "m5.large", 0)
    assert not market.available("local-1a", "x9.huge", 0)
    assert not market.available("local-1d", "m5.large", 0, max_price=0.001)  # above the max price


def test_trace_market_replays_availability_and_wraps(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.csv", {
        ("z1", "c5.large"): (0.03, 0.085, [(0, True), (100, False), (200, True)]),
    }, span=300))
    market = TraceMarket(trace)
    assert market.zones() == ["z1"] and market.instance_types() == ["c5.large"]
    assert [market.available("z1", "c5.large", t) for t in (0, 99, 100, 199, 200, 300 + 150)] == [
        True, True, False, False, True, False]
    assert market.spot_price("z1", "c5.large", 50) == 0.03
    assert market.ondemand_price("c5.large") == 0.085


SHARED_9ZONES = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "aws-p3.2xlarge-9zones-2023-02-15.csv.gz"


@pytest.mark.skipif(not SHARED_9ZONES.exists(), reason="shared/traces is not beside this checkout")
def test_builtin_zones_are_the_numbers_measured_from_the_real_trace() -> None:
    from cbas.scheduler.traces import availability_stats

    measured = {}
    for series in load_trace(SHARED_9ZONES).markets.values():
        stats = availability_stats(series)
        assert stats is not None
        measured[series.zone] = stats.summary()
    for zone in BUILTIN_ZONES:
        row = measured[zone.measured_from]
        assert (row["up_median_h"], row["up_mean_h"], row["down_median_h"], row["down_mean_h"], row["price_ratio"]) == (
            zone.up_median_h, zone.up_mean_h, zone.down_median_h, zone.down_mean_h, zone.price_ratio)
