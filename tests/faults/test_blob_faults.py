"""Blob store faults at every call a job's life makes: each call of each method in turn fails
(an error, a timeout, or for writes a partial object and then an error), once or for good.
Through the retrying store the job (as the worker opens it): a passing fault is retried and the
job completes; a lasting one ends in a clear report. The job never hangs, and every checkpoint
that was reported restores."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cbas.blob_retry import RetryingBlobStore
from cbas.checkpoint.store import ChunkStore
from cbas.local.blobs import FolderBlobStore
from cbas.messages import MessageType
from tests.harness import Harness, wait_for_line
from tests.homes import reachable_tmp
from tests.worker.test_job_run import COUNTER, COUNTER_JDL

METHODS = ("put_file", "put_bytes", "get_file", "get_bytes", "exists", "list", "delete", "size")
# slow enough that the job is still running for its second checkpoint (at progress 30/40) on a busy
# machine, after a first one that waited out a fault: the clean run and every faulted one then make
# the same calls (at 0.03 s a step the job ended first once in a full run under load)
TEXT = COUNTER_JDL


class FlakyBlobs:
    """The real folder store, whose `nth` call of `method` fails (writes: after writing half)."""

    def __init__(self, inner: FolderBlobStore, method: str = "", nth: int = 0, mode: str = "error",
                 lasting: bool = False) -> None:
        self.inner, self.method, self.nth, self.mode, self.lasting = inner, method, nth, mode, lasting
        self.calls: Counter[str] = Counter()
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.inner, name)
        if name not in METHODS:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name == self.method and (self.calls[name] == self.nth or (self.lasting and self.calls[name] > self.nth)):
                self.failed = True
                if self.mode == "partial" and name in ("put_file", "put_bytes"):
                    data = Path(args[1]).read_bytes() if name == "put_file" else args[1]
                    self.inner.put_bytes(args[0], data[: len(data) // 2])
                raise (TimeoutError("injected timeout") if self.mode == "timeout" else OSError(f"injected {name} failure"))
            return real(*args, **kwargs)

        return call


async def job_life(harness: Harness, blobs: Any, retry_seconds: float = 15.0) -> tuple[list[str], bool]:
    """Run the counter, checkpoint it twice on the way; returns the reported checkpoints and
    whether the run ended (done or failed) rather than hung. A passing fault is retried for
    `retry_seconds` (ample: the failing call itself, an fsync on a loaded disk, counts in it)."""
    harness.blobs = RetryingBlobStore(blobs, budget_seconds=retry_seconds, first_wait=0.01)
    # logs uploaded only at the checkpoints and the end: the same calls in every run, so the nth
    # call of the clean run is there to fail in each faulted one
    harness.settings = harness.settings.model_copy(update={"log_upload_interval": 3600.0})
    run = harness.run("jf", TEXT)
    task = asyncio.create_task(run.run())
    for line in ("progress 10/40", "progress 30/40"):
        try:
            await wait_for_line(run.layout.stdout, line, timeout=10)
        except AssertionError:
            break  # it failed before getting there: that is for the assertions below
        await run.checkpoint("interval")
    try:
        await asyncio.wait_for(task, 30)
    except asyncio.TimeoutError:
        run.stop()
        return [], False
    reported = [m.body["checkpoint_id"] for m in harness.of_type(MessageType.CHECKPOINT_DONE)]
    return reported, True


def clean_call_counts() -> Counter[str]:
    async def count() -> Counter[str]:
        with reachable_tmp() as root:
            harness = Harness(root)
            harness.upload_inputs("jf", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"2\n"})
            blobs = FlakyBlobs(harness.blobs)
            reported, ended = await job_life(harness, blobs)
            assert ended and len(reported) == 2 and harness.of_type(MessageType.JOB_DONE)
            return blobs.calls

    return asyncio.run(count())


CALLS = clean_call_counts()
# a passing fault at every call; a lasting one from the first, a middle and the last call on
ONCE = [(method, nth, mode, False) for method in sorted(CALLS) for nth in range(1, CALLS[method] + 1)
        for mode in (("error", "partial") if method.startswith("put") else ("timeout",))]
LASTING = [(method, nth, "error", True) for method in sorted(CALLS)
           for nth in sorted({1, (CALLS[method] + 1) // 2, CALLS[method]})]
CASES = ONCE + LASTING


@pytest.mark.parametrize(("method", "nth", "mode", "lasting"), CASES,
                         ids=[f"{m}-{n}-{k}-{'lasting' if last else 'once'}" for m, n, k, last in CASES])
async def test_a_blob_store_fault_never_hangs_a_job_or_counts_a_half_checkpoint(
        method: str, nth: int, mode: str, lasting: bool) -> None:
    with reachable_tmp() as root:
        harness = Harness(root)
        harness.upload_inputs("jf", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"2\n"})
        blobs = FlakyBlobs(harness.blobs, method, nth, mode, lasting)
        reported, ended = await job_life(harness, blobs, retry_seconds=0.5 if lasting else 15.0)
        assert blobs.failed  # the fault was really injected
        assert ended, "the job hung after a blob store fault"
        done, failed = harness.of_type(MessageType.JOB_DONE), harness.of_type(MessageType.JOB_FAILED)
        assert len(done) + len(failed) == 1
        if not lasting:  # retried: as if nothing had happened
            assert done and len(reported) == 2, (failed[0].body if failed else reported)
        elif failed:
            assert "injected" in failed[0].body["reason"], failed[0].body["reason"]  # says what went wrong
        for checkpoint_id in reported:  # every checkpoint reported restores, chunk by chunk
            ChunkStore(blobs.inner, "jf", harness.checkpoint_key("jf")).restore(checkpoint_id, root / f"check-{checkpoint_id}")
