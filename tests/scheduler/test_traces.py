from pathlib import Path

import pytest

from cbas.scheduler.traces import TraceError, load_traces, parse_trace

HEADER = "timestamp,zone,instance_type,available,spot_price,ondemand_price\n"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def test_price_only_rows_decide_availability_by_price() -> None:
    trace = parse_trace(HEADER + "2015-03-01T00:00:00Z,a,m3.medium,,0.01,0.067\n"
                                 "2015-03-01T01:00:00Z,a,m3.medium,,0.5,0.067\n"
                                 "2015-03-01T02:00:00Z,a,m3.medium,,,0.067\n")
    series = trace.markets[("a", "m3.medium")]
    t0 = series.times[0]
    assert series.available_at(t0)
    assert not series.available_at(t0 + 3600)  # above on-demand
    assert series.available_at(t0 + 3600, max_price=1.0)
    assert series.price_at(t0 + 7200) == 0.5  # an unknown price carries the last known one


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,2\n", "missing columns"),
        (HEADER, "no rows"),
        (HEADER + "yesterday,a,t,1,0.1,1\n", ":2:"),
        (HEADER + "2023-01-01T01:00:00Z,a,t,1,0.1,1\n2023-01-01T00:00:00Z,a,t,1,0.1,1\n", "not sorted"),
    ],
)
def test_bad_traces_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_trace(text, "bad.csv")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/traces is not beside this checkout")
def test_reads_every_shared_trace() -> None:
    traces = load_traces(SHARED)
    assert len(traces) >= 4
    for trace in traces:
        assert trace.markets and trace.end > trace.start


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no .csv"):
        load_traces(tmp_path)


def test_a_bin_has_capacity_only_if_every_observation_in_it_has_and_costs_their_mean() -> None:
    from cbas.scheduler.model import binned
    from cbas.scheduler.traces import MarketSeries

    series = MarketSeries("a", "t", 1.0, times=[0.0, 100.0, 700.0, 1300.0],
                          available=[True, False, True, True], spot_price=[0.2, 0.4, 0.3, None])
    steps = binned(series, 0.0, 3, 600 / 3600)
    # the down row of 100 s holds until 700 s: it spoils the first two bins
    assert steps.available == [False, False, True]
    assert steps.price == pytest.approx([0.3, 0.35, 0.3])
