"""Capacity learned by trying, as on EC2: its offers always say "available", and only a launch
tells that a market has no capacity. The master must move on to another market in the same pass,
try the failed one again only after a growing pause (not every scheduling pass, each adding a
ledger row: about 17,000 a day), and say in the job's events what it waits for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbas import jdl
from cbas.backends import CapacityError, PriceTooLow
from cbas.models import LaunchSpec, Machine, Offer
from cbas.state import JobState
from tests.faults.test_message_chaos import JDL, MemoryCloud, master_with_worker


class Ec2LikeCloud(MemoryCloud):
    """Two zones that both look available; `full` zones refuse every launch, as EC2 does with
    InsufficientInstanceCapacity."""

    def __init__(self, full: set[str], dearer: dict[str, float] | None = None) -> None:
        super().__init__()
        self.full = full
        self.dearer = dearer or {}  # zone -> its spot price now, above what the offers said
        self.launches: list[tuple[str, str]] = []

    async def offers(self) -> list[Offer]:
        return [Offer(zone=zone, instance_type="c5.large", spot_price=price, ondemand_price=0.085, available=True)
                for zone, price in (("z1", 0.02), ("z2", 0.03))]

    async def launch(self, spec: LaunchSpec) -> Machine:
        self.launches.append((spec.zone, spec.market))
        if spec.zone in self.full:
            raise CapacityError(f"{spec.market} {spec.instance_type} in {spec.zone}: InsufficientInstanceCapacity")
        if spec.market == "spot" and spec.max_price is not None and self.dearer.get(spec.zone, 0.0) > spec.max_price:
            raise PriceTooLow(f"spot {spec.instance_type} in {spec.zone}: SpotMaxPriceTooLow")
        return await super().launch(spec)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_full_zone_is_left_for_the_next_in_the_same_pass(tmp_path: Path, aiohttp_client: Any) -> None:
    cloud = Ec2LikeCloud(full={"z1"})  # the cheaper zone has no capacity
    master, _, _ = await master_with_worker(tmp_path, aiohttp_client, cloud)
    job = await master.create_job("full zone")
    await master.add_job(job.id, JDL)
    await master.schedule()
    placed = await master.store.get_job(job.id)
    assert placed.state == JobState.PROVISIONING, placed
    assert cloud.launches == [("z1", "spot"), ("z2", "spot")]
    events = [e.detail for e in await master.store.list_events(job.id)]
    assert any("no spot capacity" in d and "z1" in d for d in events), events


async def test_a_market_without_capacity_is_tried_again_ever_less_often(tmp_path: Path, aiohttp_client: Any) -> None:
    cloud = Ec2LikeCloud(full={"z1", "z2"})  # no spot capacity anywhere, and on-demand neither
    master, _, _ = await master_with_worker(tmp_path, aiohttp_client, cloud)
    clock = Clock(master.adapter.clock())
    master.adapter.clock = clock
    job = await master.create_job("no capacity")
    await master.add_job(job.id, JDL)
    hourly = []
    for _ in range(12):  # twelve hours of scheduling passes (every 30 s here; every 5 s by default)
        before = len(cloud.launches)
        for _ in range(120):
            await master.schedule()
            clock.now += 30
        hourly.append(len(cloud.launches) - before)
    assert (await master.store.get_job(job.id)).state == JobState.QUEUED
    assert len(await master.store.list_ledger(live_only=False)) == len(cloud.launches)
    # each market (two zones, spot and on-demand) at most every 30 minutes once it keeps failing;
    # it was every market at every pass: 480 an hour here, 2,880 at the default 5 s
    assert hourly[0] <= 40 and all(n <= 8 for n in hourly[3:]), hourly
    waiting = (await master.store.get_job(job.id)).waiting_reason or ""
    assert "capacity" in waiting and "again at" in waiting, waiting


async def test_a_max_price_refusal_leaves_the_market_to_jobs_without_that_max_price(
        tmp_path: Path, aiohttp_client: Any) -> None:
    """EC2's SpotMaxPriceTooLow (the price rose above the job's MaxPrice since the history said
    otherwise) is no lack of capacity: the job tries the next market and says why; a job without
    a MaxPrice still launches in the first."""
    cloud = Ec2LikeCloud(full=set(), dearer={"z1": 0.05})
    master, _, _ = await master_with_worker(tmp_path, aiohttp_client, cloud)
    capped = await master.create_job("capped")
    await master.add_job(capped.id, jdl.write(jdl.JobDescription(executable="/bin/true", name="capped",
                                                                   max_price=0.04)))
    await master.schedule()
    assert cloud.launches == [("z1", "spot"), ("z2", "spot")]
    events = [e.detail for e in await master.store.list_events(capped.id)]
    assert any("above MaxPrice $0.0400/h" in d and "z1" in d for d in events), events
    free = await master.create_job("uncapped")
    await master.add_job(free.id, JDL)
    await master.schedule()
    assert cloud.launches[2:] == [("z1", "spot")]  # not taken for a market without capacity
    assert (await master.store.get_job(free.id)).state == JobState.PROVISIONING
