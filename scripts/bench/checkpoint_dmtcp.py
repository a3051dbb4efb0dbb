"""`scripts/bench/checkpoint.py --dmtcp`: a process holding N MiB of memory under the real DMTCP.

The program (Python) fills a bytearray of --memory-mib MiB with random bytes and waits; when
told (a flag file appears) it rewrites 1% of it in 8 regions. Through the worker's own code
(JobRun, the dmtcp strategy with its hook, the chunked store on the local folder blob store) it
is checkpointed, changed, checkpointed again; then a new attempt restores the second checkpoint
and restarts the images. Reported: the pause (the job held: DMTCP writing its images and the
worker taking the state), the bytes and seconds of both checkpoints, the restore (blob store to
running again), and notice checkpoints (captured and durable, as on a spot notice) at two sizes,
from which the largest state whose notice checkpoint is durable within EC2's 120 s notice follows.
Needs root (jobs run as users of their own) and dmtcp_launch on the PATH.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cbas import jdl
from cbas.archive import Member, pack
from cbas.local.blobs import FolderBlobStore
from cbas.messages import Envelope, MessageType, StartJob
from cbas.settings import Settings
from cbas.worker.job_run import JobRun

MIB = 1 << 20
NOTICE_SECONDS = 120.0
BENCH_CHECKPOINT_KEY = b"bench checkpoint key"  # what the master would seal into START_JOB
PROGRAM = """\
import os, random, sys, time
size = int(sys.argv[1]) << 20
memory = bytearray(os.urandom(size))
rng = random.Random(1)
open("ready", "w").close()
while True:
    if os.path.exists("change"):
        region = size // 100 // 8
        for _ in range(8):
            at = rng.randrange(0, size - region)
            memory[at:at + region] = os.urandom(region)
        os.unlink("change")
        open("changed", "w").close()
    time.sleep(0.02)
"""


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = FolderBlobStore(root / "blobs")
        self.settings = Settings(home=root, log_upload_interval=3600)
        self.sent: list[Envelope] = []
        self.attempt = 0

    async def deliver(self, message: Envelope) -> bool:
        self.sent.append(message)
        return True

    def run(self, job_id: str, memory_mib: int, checkpoints: list[str] | None = None) -> JobRun:
        self.attempt += 1
        disk = self.root / f"disk{self.attempt}"
        disk.mkdir(mode=0o711)
        text = jdl.write(jdl.JobDescription(executable="/usr/bin/python3", arguments=f"hold.py {memory_mib}",
                                            input_sandbox=("hold.py",), checkpoint_strategy="dmtcp",
                                            checkpoint_interval=86400, memory_limit=max(256, 4 * memory_mib)))
        start = StartJob(job_id=job_id, attempt=self.attempt, jdl=text, checkpoints=checkpoints or [], ping_interval=30)
        start = start.with_checkpoint_key(BENCH_CHECKPOINT_KEY)  # as the worker opens it from START_JOB
        return JobRun(self.settings, f"i-{self.attempt}", disk, self.blobs, start, self.deliver)

    def upload(self, job_id: str) -> None:
        source = self.root / "hold.py"
        source.write_text(PROGRAM)
        pack([Member(source, "hold.py")], self.root / "input.tar.zst")
        self.blobs.put_file(f"jobs/{job_id}/input.tar.zst", self.root / "input.tar.zst")

    def done(self, checkpoint_id: str) -> dict[str, Any]:
        return next(m.body for m in self.sent if m.type == MessageType.CHECKPOINT_DONE
                    and m.body["checkpoint_id"] == checkpoint_id)

    def last_done(self) -> dict[str, Any]:
        return [m.body for m in self.sent if m.type == MessageType.CHECKPOINT_DONE][-1]


async def wait_for(path: Path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        await asyncio.sleep(0.05)


async def started(run: JobRun) -> asyncio.Task[None]:
    task = asyncio.create_task(run.run())
    while run.phase != "running":
        if task.done():
            task.result()
            raise RuntimeError("the job ended before it ran")
        await asyncio.sleep(0.02)
    return task


async def stop(run: JobRun, task: asyncio.Task[None]) -> None:
    run.stop()
    await asyncio.wait_for(task, 60)


async def measure(memory_mib: int, small_mib: int, workdir: Path | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="cbas-bench-dmtcp-", dir=workdir))
    root.chmod(0o711)
    try:
        bench = Bench(root)
        bench.upload("b1")
        first_run = bench.run("b1", memory_mib)
        task = await started(first_run)
        await wait_for(first_run.layout.work / "ready")
        first, first_total, first_write = await checkpoint(bench, first_run, "first")
        (first_run.layout.work / "change").touch()
        await wait_for(first_run.layout.work / "changed")
        second, second_total, second_write = await checkpoint(bench, first_run, "second")
        await stop(first_run, task)

        began = time.monotonic()
        again = bench.run("b1", memory_mib, checkpoints=[second["checkpoint_id"]])
        task = await started(again)
        restore_s = time.monotonic() - began
        assert again.restored_from == second["checkpoint_id"]
        await stop(again, task)

        # notice checkpoints at their worst: a job's first, every byte new
        notices = {}
        for job_id, size in (("b2", small_mib), ("b3", memory_mib)):
            bench.upload(job_id)
            run = bench.run(job_id, size)
            task = await started(run)
            await wait_for(run.layout.work / "ready")
            notices[size] = await notice(run)
            await asyncio.wait_for(task, 60)
        notice_small, notice_big = notices[small_mib], notices[memory_mib]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_mib = (notice_big - notice_small) / max(memory_mib - small_mib, 1)
    fixed = notice_small - per_mib * small_mib
    notice_max = (NOTICE_SECONDS - fixed) / per_mib if per_mib > 0 else NOTICE_SECONDS / max(notice_big, 1e-3) * memory_mib
    result = {
        "memory_mib": memory_mib, "pause_s": second["pause_seconds"], "first_pause_s": first["pause_seconds"],
        "dmtcp_write_s": second_write, "first_dmtcp_write_s": first_write,
        "first_bytes": first["new_bytes"], "first_seconds": first_total,
        "second_new_bytes": second["new_bytes"], "second_seconds": second_total,
        "second_new_bytes_ratio": second["new_bytes"] / max(first["new_bytes"], 1),
        "state_bytes": second["size_bytes"], "restore_s": restore_s,
        "notice_seconds": {str(small_mib): notice_small, str(memory_mib): notice_big},
        "notice_max_state_mib": round(notice_max),
    }
    print(f"\nDMTCP, a process holding {memory_mib} MiB, 1% changed between the checkpoints")
    print(f"{'':20} {'pause s':>8} {'of it DMTCP':>12} {'total s':>8} {'new MiB':>9} {'state MiB':>10}")
    print(f"{'first checkpoint':20} {first['pause_seconds']:8.2f} {first_write:12.2f} {first_total:8.2f} "
          f"{first['new_bytes'] / MIB:9.1f} {first['size_bytes'] / MIB:10.1f}")
    print(f"{'second checkpoint':20} {second['pause_seconds']:8.2f} {second_write:12.2f} {second_total:8.2f} "
          f"{second['new_bytes'] / MIB:9.1f} {second['size_bytes'] / MIB:10.1f}")
    print("(the pause is DMTCP writing its images, and CBAS opening them: they are read after the job goes on)")
    print(f"second checkpoint's new bytes: {100 * result['second_new_bytes_ratio']:.2f}% of the first's")
    print(f"restore of the second checkpoint, blob store to running again: {restore_s:.2f} s")
    print(f"a first (all new) notice checkpoint durable in {notice_small:.2f} s ({small_mib} MiB), {notice_big:.2f} s "
          f"({memory_mib} MiB): about {result['notice_max_state_mib']} MiB fit in a {NOTICE_SECONDS:.0f} s notice "
          f"(a line through the two)")
    return result


async def checkpoint(bench: Bench, run: JobRun, which: str) -> tuple[dict[str, Any], float, float]:
    """An interval checkpoint: what was reported, its seconds in all, and DMTCP's share of the pause."""
    began = time.monotonic()
    if not await run.checkpoint("interval"):
        raise RuntimeError(f"the {which} checkpoint failed: {bench.sent}")
    return bench.last_done(), time.monotonic() - began, run.checkpointer.last_write_seconds  # type: ignore[attr-defined]


async def notice(run: JobRun) -> float:
    """A notice checkpoint as a spot notice takes it: seconds until it is durable and reported."""
    began = time.monotonic()
    await run.on_notice(time.time() + NOTICE_SECONDS)
    return time.monotonic() - began


def run_benchmark(memory_mib: int, small_mib: int, workdir: Path | None) -> dict[str, Any]:
    if shutil.which("dmtcp_launch") is None:
        raise SystemExit("--dmtcp needs DMTCP: dmtcp_launch is not on the PATH")
    return asyncio.run(measure(memory_mib, small_mib, workdir))
