"""Capacity learned by trying, as on EC2: its offers always say "available", and only a launch
tells that a market has no capacity. The master must move on to another market in the same pass,
try the failed one again only after a growing pause (not every scheduling pass, each adding a
ledger row: about 17,000 a day), and say in the job's events what it waits for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbas.backends import CapacityError
from cbas.models import LaunchSpec, Machine, Offer
from cbas.state import JobState
from tests.faults.test_message_chaos import JDL, MemoryCloud, master_with_worker


class Ec2LikeCloud(MemoryCloud):
    """Two zones that both look available; `full` zones refuse every launch, as EC2 does with
    InsufficientInstanceCapacity."""

    def __init__(self, full: set[str]) -> None:
        super().__init__()
        self.full = full
        self.launches: list[tuple[str, str]] = []

    async def offers(self) -> list[Offer]:
        return [Offer(zone=zone, instance_type="c5.large", spot_price=price, ondemand_price=0.085, available=True)
                for zone, price in (("z1", 0.02), ("z2", 0.03))]

    async def launch(self, spec: LaunchSpec) -> Machine:
        self.launches.append((spec.zone, spec.market))
        if spec.zone in self.full:
            raise CapacityError(f"{spec.market} {spec.instance_type} in {spec.zone}: InsufficientInstanceCapacity")
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
