"""The master's event loop never waits on I/O: a blob store that retries (sleeping between
tries) is called from a thread. Checked with asyncio's debug mode, which logs every callback
that holds the loop longer than `slow_callback_duration`."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path
from typing import Any

import pytest

from cbas.master.app import create_app
from cbas.master.service import Master
from cbas.settings import Settings
from cbas.wiring import open_master_backends

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOW = 0.25  # seconds: far above any step of the master's own, far below the retries' sleeps


@pytest.fixture(autouse=True)
def heap_of_earlier_tests_frozen():  # type: ignore[no-untyped-def]
    """The objects the tests before these left are not the master's: late in the suite a full
    collection of the whole session's heap takes a second or more (seen in CI twice: 1.1 s in
    add_job, 1.4 s in a pass), which a master's own process, holding only its own, never pays."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


class FlakyBlobs:
    """A blob store whose first calls time out, as S3 does under a brown-out."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner, self.failures = inner, failures

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.inner, name)

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if self.failures > 0:
                self.failures -= 1
                raise TimeoutError("the blob store did not answer")
            return call(*args, **kwargs)

        return flaky


async def test_a_blob_store_that_retries_never_holds_the_masters_loop(
    tmp_path: Path, aiohttp_client: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "home").mkdir(mode=0o700)
    settings = Settings(home=tmp_path / "home", batch_window=0.0)
    backends = open_master_backends(settings)
    master = Master(settings, backends)
    client = await aiohttp_client(create_app(master, TOKEN))
    loop = asyncio.get_running_loop()
    try:
        job_id = (await (await client.post("/api/jobs", json={"name": "t"}, headers=AUTH)).json())["job_id"]
        backends.blobs.put_bytes(f"jobs/{job_id}/input.tar.zst", b"not read here")
        backends.blobs.first_wait = 0.3  # type: ignore[attr-defined]
        backends.blobs.inner = FlakyBlobs(backends.blobs.inner, failures=2)  # type: ignore[attr-defined]
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            resp = await client.post(f"/api/jobs/{job_id}/submit", headers=AUTH,
                                     json={"jdl": 'Executable = "x.sh"; InputSandbox = {"x.sh"};'})
            assert resp.status == 200, await resp.text()
        slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
        assert not slow, f"the master's loop was held: {slow}"
        assert (await master.store.get_job(job_id)).state.value == "QUEUED"
    finally:
        loop.set_debug(False)
        await backends.bus.close()
        await backends.store.close()


async def test_a_database_locked_by_another_process_never_holds_the_masters_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """`cbas status` or a backup holding SQLite's write lock makes a write wait (up to its busy
    timeout): the wait is the store's thread's, never the loop's."""
    import sqlite3

    from cbas.local.store import SqliteJobStore
    from cbas.models import Job, JobEvent

    store = SqliteJobStore(tmp_path / "cbas.db")
    await store.create_job(Job(id="j1"))
    other = sqlite3.connect(tmp_path / "cbas.db", isolation_level=None)
    loop = asyncio.get_running_loop()
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            write = asyncio.ensure_future(store.add_event(JobEvent(job_id="j1", kind="note")))
            loop.call_later(2 * SLOW, other.execute, "COMMIT")  # runs only if the loop is free
            await asyncio.wait_for(write, timeout=30)
        slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
        assert not slow, f"the master's loop was held: {slow}"
        assert [e.kind for e in await store.list_events("j1")] == ["note"]
    finally:
        loop.set_debug(False)
        other.close()
        await store.close()


def slow_steps(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]


def test_the_masters_loop_is_never_held_by_hundreds_of_jobs(caplog: pytest.LogCaptureFixture) -> None:
    """600 jobs placed, pinging, checkpointing, and the master killed and started again among
    them (the real Master on the real SQLite store, model workers: tests/faults/model_harness.py).
    No step holds the loop: a scheduling pass over 600 jobs held it 0.54 s at once, every
    message and API call waiting behind it."""
    from tests.faults.model_harness import World

    world = World()
    try:
        world.loop.set_debug(True)
        world.loop.slow_callback_duration = SLOW
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            world.submit(600)
            for _ in range(3):
                world.deliver_everything()
                world.time_passes(30)
            for worker in world.running_workers():
                worker.checkpoint()
            world.deliver_everything()
            world.master_down()
            world.master_up()  # recover() goes over every job and machine
            world.deliver_everything()
            world.time_passes(30)
        assert len(world.running_workers()) == 600
        assert not slow_steps(caplog), f"the master's loop was held: {slow_steps(caplog)}"
    finally:
        world.loop.set_debug(False)
        world.close()


async def test_a_local_cloud_with_a_long_history_never_holds_the_masters_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A launch reads every machine record the cloud ever kept (its idempotency), makes a disk
    and starts a process; listing the machines reads them all too. With a few thousand
    machines behind it (a cluster some weeks old), that is the loop's time unless it is done
    on a thread."""
    from cbas.local.cloud import LocalCloud, MachineRecord
    from cbas.models import LaunchSpec, Machine

    (tmp_path / "home").mkdir(mode=0o700)
    settings = Settings(home=tmp_path / "home", machines_dir=tmp_path / "machines")
    cloud = LocalCloud(settings)
    for number in range(8000):
        old = Machine(instance_id=f"i-{number:016x}", zone="z", instance_type="t", market="spot", price=0.1,
                      state="terminated", tags={"cbas:ledger": f"l-{number}"})
        cloud._save(MachineRecord(machine=old, disk=str(tmp_path / "gone" / str(number))))
    loop = asyncio.get_running_loop()
    offer = (await cloud.offers())[0]
    spec = LaunchSpec(job_id="j1", ledger_id="l-new", zone=offer.zone, instance_type=offer.instance_type,
                      market="on-demand", machine_key="00" * 32)
    try:
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW
        await asyncio.sleep(0)  # a step measured is one begun with debug on
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            machine = await cloud.launch(spec)
            assert [m.instance_id for m in await cloud.list_machines()] == [machine.instance_id]
            await cloud.terminate(machine.instance_id)
        assert not slow_steps(caplog), f"the master's loop was held: {slow_steps(caplog)}"
    finally:
        loop.set_debug(False)
        for left in await cloud.list_machines():  # its process group, if the test failed before
            await cloud.terminate(left.instance_id)
        await cloud.close()
