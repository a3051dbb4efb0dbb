"""A spot notice never waits behind an interval checkpoint: it captures at once, its upload gets
the way, and the older checkpoint's upload gives way to it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cbas import jdl
from cbas.local.blobs import FolderBlobStore
from cbas.messages import MessageType
from tests.harness import Harness, wait_for_line
from tests.homes import reachable_tmp

COUNTER = Path(__file__).resolve().parents[2] / "examples" / "counter"
TEXT = jdl.write(jdl.JobDescription(
    executable="counter.sh", arguments="4000 input.txt", input_sandbox=("input.txt", "big.bin"),
    output_sandbox=("output.txt",), checkpoint_interval=3600, environment={"COUNTER_DELAY": "0.02"},
))


class HeldChunks:
    """The folder store, whose chunk uploads wait while `held` (a link to S3 that has stalled)."""

    def __init__(self, inner: FolderBlobStore) -> None:
        self.inner = inner
        self.open = threading.Event()
        self.open.set()
        self.waiting = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _hold(self, key: str) -> None:
        if "/chunks/" in key and not self.open.is_set():
            self.waiting.set()
            self.open.wait(30)

    def put_file(self, key: str, path: Path, progress: Any = None) -> None:
        self._hold(key)
        self.inner.put_file(key, path, progress)

    def put_bytes(self, key: str, data: bytes) -> None:  # chunks go up from memory, after the capture
        self._hold(key)
        self.inner.put_bytes(key, data)


@pytest.fixture
def harness():
    with reachable_tmp() as root:
        yield Harness(root)


async def test_a_notice_checkpoint_goes_ahead_of_an_interval_checkpoint_under_way(harness: Harness) -> None:
    import os

    harness.upload_inputs("n1", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"2\n",
                                 "big.bin": os.urandom(48 << 20)})  # ~48 chunks to upload the first time
    link = HeldChunks(harness.blobs)
    harness.blobs = link  # type: ignore[assignment]
    run = harness.run("n1", TEXT)
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.stdout, "progress 20/4000")
    link.open.clear()  # the interval checkpoint's upload stalls
    interval = asyncio.create_task(run.checkpoint("interval"))
    while not link.waiting.is_set():  # captured; now uploading, and stuck
        await asyncio.sleep(0.01)
    assert not interval.done()
    notice = asyncio.create_task(run.checkpoint("notice", final=True, deadline=time.time() + 60))
    while not link.waiting.is_set() or len(run.checkpoints._uploading) < 2:  # type: ignore[union-attr]
        await asyncio.sleep(0.01)  # the notice captured while the interval's upload still hangs
    link.open.set()  # the link comes back: the notice's upload goes on, the interval's gives way
    assert await notice
    assert not await interval  # superseded, never reported
    await asyncio.wait_for(task, 20)
    [done] = harness.of_type(MessageType.CHECKPOINT_DONE)
    assert done.body["reason"] == "notice" and done.body["final"]
    assert done.body["deadline_margin_seconds"] > 0


async def test_a_report_that_cannot_be_delivered_never_holds_the_next_checkpoint(harness: Harness) -> None:
    """The interval checkpoint is stored, and its report hangs (the master is away; the worker
    retries for up to an hour): the notice checkpoint is captured and stored meanwhile, and both
    reports go once the master is back."""
    harness.upload_inputs("n2", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"2\n", "big.bin": b"small"})
    master_back = asyncio.Event()
    delivered = harness.deliver

    async def away(message: Any) -> bool:
        if message.type == MessageType.CHECKPOINT_DONE:
            await master_back.wait()
        return await delivered(message)

    harness.deliver = away  # type: ignore[method-assign]
    run = harness.run("n2", TEXT)
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.stdout, "progress 20/4000")
    interval = asyncio.create_task(run.checkpoint("interval"))
    from cbas.messages import checkpoint_record_key
    first = checkpoint_record_key("n2", "a0001-n00001")
    while not harness.blobs.exists(first):  # stored and recorded; its report now hangs
        await asyncio.sleep(0.01)
    notice = asyncio.create_task(run.checkpoint("notice", final=True, deadline=time.time() + 60))
    second = checkpoint_record_key("n2", "a0001-n00002")
    for _ in range(1000):  # captured, stored and recorded while the first report still hangs
        if harness.blobs.exists(second):
            break
        await asyncio.sleep(0.01)
    assert harness.blobs.exists(second) and not interval.done()
    master_back.set()
    assert await interval and await notice
    await asyncio.wait_for(task, 20)
    assert sorted(m.body["checkpoint_id"] for m in harness.of_type(MessageType.CHECKPOINT_DONE)) == [
        "a0001-n00001", "a0001-n00002"]
