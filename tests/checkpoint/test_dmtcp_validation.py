"""ValidateCheckpoint with dmtcp: a checkpoint counts only once its images really restart, away from
the live job, as the job's user, stopped right after they resume."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import textwrap
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest

from cbas.messages import MessageType
from tests.harness import Harness, wait_for_line
from tests.homes import reachable_tmp

REAL = shutil.which("dmtcp_launch")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a restart away from the live files needs a root worker")

PROGRAM = textwrap.dedent("""\
    #include <stdio.h>
    #include <unistd.h>
    int main(void) {
        FILE *log = fopen("results.txt", "a");
        for (int i = 0; i < 150; i++) {
            printf("%d\\n", i); fflush(stdout);
            fprintf(log, "%d\\n", i); fflush(log);
            usleep(40000);
        }
        return 0;
    }
    """)
JDL = ('Executable = "prog"; OutputSandbox = {"results.txt"}; CheckpointStrategy = "dmtcp"; '
       'CheckpointInterval = 3600; ValidateCheckpoint = true;')


@pytest.fixture
def harness():
    with reachable_tmp("cbas-val-") as root:
        yield Harness(root)


def compiled(harness: Harness) -> Path:
    (harness.root / "prog.c").write_text(PROGRAM)
    subprocess.run(["cc", "-O2", "-o", str(harness.root / "prog"), str(harness.root / "prog.c")], check=True)
    return harness.root / "prog"


@pytest.mark.dmtcp
@needs_root
@pytest.mark.skipif(REAL is None, reason="the real DMTCP is not on the PATH")
async def test_a_validated_checkpoint_restarts_in_a_sandbox_and_leaves_the_live_job_alone(harness: Harness) -> None:
    harness.upload_inputs("v1", {"prog": compiled(harness)})
    run = harness.run("v1", JDL)
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.stdout, "\n30\n")
    assert await run.checkpoint("interval"), [m.body for m in harness.of_type(MessageType.CHECKPOINT_FAILED)]
    assert await run.checkpoint("interval")
    await asyncio.wait_for(task, 60)
    assert harness.of_type(MessageType.JOB_DONE)
    expected = "".join(f"{i}\n" for i in range(150))
    # the restarted images never wrote to the live job's stdout or files: every line once
    assert re.sub(r"(?m)^(?!\d+$).*\n", "", run.layout.stdout.read_text()) == expected
    assert (run.layout.work / "results.txt").read_text() == expected
    assert not any(run.layout.validate.iterdir())  # the sandbox is gone


@asynccontextmanager
async def breaking_images(run) -> AsyncIterator[None]:  # type: ignore[no-untyped-def]
    """Make DMTCP's next images unusable (their header overwritten) after it writes them, before
    they are taken. (A real image cut in half still restarted here: DMTCP read what it found.)"""
    quiesced = run.checkpointer.quiesced

    @asynccontextmanager
    async def broken(ctx, job):  # type: ignore[no-untyped-def]
        async with quiesced(ctx, job):
            for image in (ctx.workdir / ".dmtcp").glob("ckpt_*.dmtcp"):
                with open(image, "r+b") as handle:
                    handle.write(b"\0" * 4096)
            yield

    run.checkpointer.quiesced = broken
    try:
        yield
    finally:
        run.checkpointer.quiesced = quiesced


@pytest.fixture
def dmtcp_tools(request: pytest.FixtureRequest) -> str:
    """The real DMTCP where the PATH has it, else the fake."""
    if REAL:
        return "real"
    request.getfixturevalue("fake_dmtcp")
    return "fake"


@needs_root
async def test_images_that_do_not_restart_fail_validation_and_do_not_count(harness: Harness, dmtcp_tools: str) -> None:
    if dmtcp_tools == "real":
        harness.upload_inputs("v2", {"prog": compiled(harness)})
    else:
        harness.upload_inputs("v2", {"count.sh": _fake_program(harness)})
    run = harness.run("v2", JDL if dmtcp_tools == "real" else _FAKE_JDL)
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.stdout, "\n20\n")
    async with breaking_images(run):
        assert not await run.checkpoint("interval")
    await run.checkpoints.reported()  # failures are reported in the background
    assert not harness.of_type(MessageType.CHECKPOINT_DONE)
    [failed] = harness.of_type(MessageType.CHECKPOINT_FAILED)
    assert "validation failed" in failed.body["error"] and "dmtcp_restart" in failed.body["error"]
    assert await run.checkpoint("interval")  # the next, whole ones count
    run.stop()
    await asyncio.wait_for(task, 30)


_FAKE_JDL = ('Executable = "count.sh"; CheckpointStrategy = "dmtcp"; CheckpointInterval = 3600; '
             'ValidateCheckpoint = true; Environment = {FAKE_DMTCP_STATE = "n.txt"};')


def _fake_program(harness: Harness) -> Path:
    script = harness.root / "count.sh"
    script.write_text('#!/bin/sh\ni=$(cat n.txt 2>/dev/null || echo 0)\nwhile [ $i -lt 300 ]; do echo $i; '
                      'i=$((i+1)); echo $i > n.txt; sleep 0.04; done\n')
    script.chmod(0o755)
    return script
