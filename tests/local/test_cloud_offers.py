"""The local cloud tells what EC2 tells: prices, never capacity. Only a launch finds out, refused as
EC2 refuses it: no capacity (InsufficientInstanceCapacity) or a MaxPrice under the spot price
(SpotMaxPriceTooLow), which says nothing of capacity."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from cbas.backends import CapacityError, PriceTooLow
from cbas.local.cloud import LocalCloud
from cbas.models import LaunchSpec
from cbas.settings import Settings
from tests.tracefiles import write_trace


def cloud_on(tmp_path: Path) -> LocalCloud:
    trace = write_trace(tmp_path / "trace.csv", {
        ("z1", "c5.large"): (0.02, 0.085, [(0, False)]),  # the cheapest zone, with no capacity
        ("z2", "c5.large"): (0.03, 0.085, [(0, True)]),
    })
    return LocalCloud(Settings(home=tmp_path / "home", machines_dir=tmp_path / "machines", market_trace=trace))


def spot(zone: str, max_price: float | None = None) -> LaunchSpec:
    return LaunchSpec(ledger_id="l-1", job_id="j1", instance_type="c5.large", zone=zone, market="spot",
                      max_price=max_price, machine_key=SecretStr("ab" * 32))


async def test_offers_never_say_which_markets_have_capacity(tmp_path: Path) -> None:
    cloud = cloud_on(tmp_path)
    offers = {o.zone: o for o in await cloud.offers()}
    assert offers["z1"].available and offers["z2"].available  # as on EC2: every market, whatever its capacity
    assert (offers["z1"].spot_price, offers["z2"].spot_price) == (0.02, 0.03)


async def test_a_launch_tells_no_capacity_and_a_price_above_max_apart(tmp_path: Path) -> None:
    cloud = cloud_on(tmp_path)
    with pytest.raises(CapacityError, match="InsufficientInstanceCapacity") as refused:
        await cloud.launch(spot("z1"))
    assert not isinstance(refused.value, PriceTooLow)
    with pytest.raises(PriceTooLow, match=r"\$0.0300/h, is above MaxPrice \$0.0250/h \(SpotMaxPriceTooLow\)"):
        await cloud.launch(spot("z2", max_price=0.025))
    assert not list((tmp_path / "machines").glob("i-*"))  # a refused launch leaves no machine behind
