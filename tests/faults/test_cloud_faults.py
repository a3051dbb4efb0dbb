"""Cloud faults at every call of a job's life: launch, terminate, listing and offers each fail in
turn (an error or a timeout). The master's loops go on, the job completes, and no machine is
left running or held in the ledger once the master's periodic passes have run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cbas.local.bus import LocalMessageBus
from cbas.state import JobState
from tests.faults.test_message_chaos import JDL, MemoryCloud, job_log, machine_credential, master_with_worker

METHODS = ("launch", "terminate", "list_machines", "offers")


class FlakyCloud(MemoryCloud):
    def __init__(self, method: str, nth: int, error: type[Exception]) -> None:
        super().__init__()
        self.method, self.nth, self.error = method, nth, error
        self.calls = {name: 0 for name in METHODS}
        self.failed = False

    def _maybe_fail(self, name: str) -> None:
        self.calls[name] += 1
        if name == self.method and self.calls[name] == self.nth:
            self.failed = True
            raise self.error(f"injected {name} failure")

    async def launch(self, spec: Any) -> Any:
        self._maybe_fail("launch")
        return await super().launch(spec)

    async def terminate(self, instance_id: str) -> None:
        self._maybe_fail("terminate")
        await super().terminate(instance_id)

    async def list_machines(self) -> Any:
        self._maybe_fail("list_machines")
        return await super().list_machines()

    async def offers(self) -> Any:
        self._maybe_fail("offers")
        return await super().offers()


async def pass_(step: Any) -> None:
    """One run of a master loop's step: an error is logged and the loop goes on."""
    try:
        await step()
    except Exception:
        pass


@pytest.mark.parametrize("error", [RuntimeError, TimeoutError], ids=["error", "timeout"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nth", [1, 2])
async def test_a_cloud_fault_leaves_no_machine_and_no_job_behind(
        tmp_path: Path, aiohttp_client: Any, method: str, nth: int, error: type[Exception]) -> None:
    cloud = FlakyCloud(method, nth, error)
    master, client, _ = await master_with_worker(tmp_path, aiohttp_client, cloud)
    bus = master.bus
    assert isinstance(bus, LocalMessageBus)
    try:
        job = await master.create_job("cloudy")
        await master.add_job(job.id, JDL)
        for _ in range(4):
            await pass_(master.schedule)
            if (await master.store.get_job(job.id)).state == JobState.PROVISIONING:
                break
        assert (await master.store.get_job(job.id)).state == JobState.PROVISIONING
        for message in job_log(job.id, await machine_credential(master, job.id)):
            body = bus.sign(message)
            for _ in range(3):  # a worker re-sends until it gets an answer
                if (await client.post("/messages", data=body)).status == 200:
                    break
        for _ in range(3):
            await pass_(master.release_unneeded)
        final = await master.store.get_job(job.id)
        assert final.state == JobState.COMPLETED, await master.store.list_events(job.id)
        assert await master.store.list_ledger(live_only=True) == []
        assert [m.state for m in cloud.machines.values()] == ["terminated"]
        assert cloud.failed or cloud.calls[method] < nth  # injected, unless the life never called it that often
    finally:
        await master.bus.close()
        await master.store.close()
