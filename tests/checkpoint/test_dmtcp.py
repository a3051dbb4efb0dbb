"""The dmtcp strategy through JobRun: against a fake DMTCP (always) and the real one (marker
`dmtcp`, when dmtcp_launch is on the PATH)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from cbas.checkpoint.dmtcp import java_without_perf_data
from cbas.checkpoint.store import ChunkStore
from cbas.messages import MessageType
from tests.harness import Harness, wait_for_line, wait_running
from tests.homes import reachable_tmp

FAKE = Path(__file__).resolve().parents[1] / "fakedmtcp"
COUNTER = Path(__file__).resolve().parents[2] / "examples" / "counter"
REAL = shutil.which("dmtcp_launch")


@pytest.fixture
def harness():
    with reachable_tmp() as root:
        yield Harness(root)


def counter_jdl(n: int, extra_env: str = "") -> str:
    return (f'Executable = "counter.sh"; Arguments = "{n} input.txt"; InputSandbox = {{"input.txt"}};\n'
            f'OutputSandbox = {{"output.txt"}}; CheckpointStrategy = "dmtcp"; CheckpointInterval = 3600;\n'
            f'Environment = {{COUNTER_DELAY = "0.05", FAKE_DMTCP_STATE = "counter.state output.txt"{extra_env}}};')


async def test_fake_dmtcp_checkpoint_kill_restart_resumes(harness: Harness, fake_dmtcp: Path) -> None:
    harness.upload_inputs("d1", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"4\n"})
    first = harness.run("d1", counter_jdl(60))
    task = asyncio.create_task(first.run())
    await wait_for_line(first.layout.stdout, "progress 20/60")
    assert await first.checkpoint("notice", final=True)
    await asyncio.wait_for(task, 10)
    [done] = harness.of_type(MessageType.CHECKPOINT_DONE)
    manifest = ChunkStore(harness.blobs, "d1", harness.checkpoint_key("d1")).manifest(done.body["checkpoint_id"])
    images = [f.path for f in manifest.files if f.path.startswith(".dmtcp/ckpt_")]
    assert len(images) == 1 and images[0].endswith(".dmtcp")
    assert list((first.cache_dir).glob("cbas_dmtcp_hook-*.so"))  # the hook was built from the C source

    second = harness.run("d1", counter_jdl(60), checkpoints=[done.body["checkpoint_id"]])
    await asyncio.wait_for(second.run(), 60)
    assert second.restored_from == done.body["checkpoint_id"]
    assert harness.of_type(MessageType.JOB_DONE)
    assert (second.root / "work" / "output.txt").read_text() == "".join(f"{i} {4 * i}\n" for i in range(60))
    assert int(re.findall(r"resuming at (\d+)", (second.layout.stdout).read_text())[0]) >= 20


async def test_the_hook_holds_the_job_until_the_state_is_read(harness: Harness, fake_dmtcp: Path) -> None:
    harness.upload_inputs("d2", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"1\n"})
    run = harness.run("d2", counter_jdl(1000))
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.stdout, "progress 10/1000")
    output = run.root / "work" / "output.txt"
    checkpointer = run.checkpointer
    async with checkpointer.quiesced(run.ctx, run.process):  # type: ignore[arg-type]
        assert checkpointer.hook is not None and checkpointer.hook._held  # the plugin called and waits
        held = output.read_text()
        await asyncio.sleep(0.5)
        assert output.read_text() == held  # nothing moves while the hook is held
    await asyncio.sleep(0.5)
    assert output.read_text() != held  # and it goes on once released
    run.stop()
    await asyncio.wait_for(task, 10)


async def test_a_checkpoint_without_images_is_rejected(harness: Harness, fake_dmtcp: Path) -> None:
    harness.upload_inputs("d3", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"1\n"})
    run = harness.run("d3", counter_jdl(1000, ', FAKE_DMTCP_NO_IMAGES = "1"'))
    task = asyncio.create_task(run.run())
    await wait_running(run)
    await wait_for_line(run.layout.stdout, "progress 10/1000")
    assert not await run.checkpoint("interval")
    assert not harness.of_type(MessageType.CHECKPOINT_DONE)
    run.stop()
    await asyncio.wait_for(task, 10)


async def test_without_dmtcp_the_job_fails_with_a_clear_reason(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    await asyncio.wait_for(harness.run("d4", 'Executable = "/bin/true"; CheckpointStrategy = "dmtcp";').run(), 30)
    [failed] = harness.of_type(MessageType.JOB_FAILED)
    assert "dmtcp_launch is not on the PATH" in failed.body["reason"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["java", "-jar", "a.jar"], ["java", "-XX:-UsePerfData", "-jar", "a.jar"]),
        (["/usr/bin/java", "-XX:+UsePerfData", "Main"], ["/usr/bin/java", "-XX:+UsePerfData", "Main"]),
        (["./sim", "java"], ["./sim", "java"]),
    ],
)
def test_java_gets_perf_data_off_unless_the_user_chose(argv: list[str], expected: list[str]) -> None:
    assert java_without_perf_data(argv) == expected


# --- the real DMTCP ---------------------------------------------------------------------------

C_PROGRAM = textwrap.dedent("""\
    #include <stdio.h>
    #include <unistd.h>
    int main(void) {  /* its state is only in memory */
        long sum = 0;
        for (int i = 0; i < 60; i++) { sum += i * i; printf("%d %ld\\n", i, sum); fflush(stdout); usleep(50000); }
        return 0;
    }
    """)
PY_PROGRAM = textwrap.dedent("""\
    import time
    total = 0
    for i in range(60):  # its state is only in memory
        total += i * i
        print(i, total, flush=True)
        time.sleep(0.05)
    """)


def expected_sums() -> str:
    total, lines = 0, []
    for i in range(60):
        total += i * i
        lines.append(f"{i} {total}\n")
    return "".join(lines)


@pytest.mark.dmtcp
@pytest.mark.skipif(REAL is None, reason="the real DMTCP (dmtcp_launch) is not on the PATH")
@pytest.mark.parametrize("language", ["c", "python"])
async def test_real_dmtcp_restarts_a_killed_program_to_the_same_output(harness: Harness, language: str) -> None:
    if language == "c":
        source = harness.root / "sums.c"
        source.write_text(C_PROGRAM)
        subprocess.run(["cc", "-O2", "-o", str(harness.root / "sums"), str(source)], check=True)
        harness.upload_inputs("r1", {"sums": harness.root / "sums"})
        text = 'Executable = "sums"; CheckpointStrategy = "dmtcp"; CheckpointInterval = 3600;'
    else:
        harness.upload_inputs("r1", {"sums.py": PY_PROGRAM.encode()})
        text = 'Executable = "/usr/bin/python3"; Arguments = "sums.py"; CheckpointStrategy = "dmtcp"; CheckpointInterval = 3600;'
    first = harness.run("r1", text)
    task = asyncio.create_task(first.run())
    await wait_for_line(first.layout.stdout, "\n20 ")
    assert await first.checkpoint("notice", final=True)  # the job is killed right after
    await asyncio.wait_for(task, 20)
    [done] = harness.of_type(MessageType.CHECKPOINT_DONE)
    second = harness.run("r1", text, checkpoints=[done.body["checkpoint_id"]])
    await asyncio.wait_for(second.run(), 60)
    assert second.restored_from == done.body["checkpoint_id"]
    assert harness.of_type(MessageType.JOB_DONE), harness.sent
    stdout = (second.layout.stdout).read_text()
    numbers = [line for line in stdout.splitlines() if re.fullmatch(r"\d+ \d+", line)]
    assert "\n".join(numbers) + "\n" == expected_sums()  # every line once: resumed, not rerun
    assert second.checkpointer.hook is not None  # the hook plugin was built and loaded


@pytest.mark.dmtcp
@pytest.mark.skipif(REAL is None, reason="the real DMTCP (dmtcp_launch) is not on the PATH")
async def test_real_dmtcp_images_that_do_not_fit_on_the_disk_are_read_in_place(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """No room on the worker's disk for a copy of the images (a state as big as the disk, 1 MiB
    free beyond the job's reserve): they are read where DMTCP wrote them, after the job goes on
    (they are never changed in place), the job's small files are copied, and the restart is exact."""
    from cbas.checkpoint import store

    captured: list[tuple[set[str], str | None]] = []
    snapshot = store.ChunkStore._snapshot

    def noted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        taken = snapshot(self, *args, **kwargs)  # what it reads in place, before it is let go
        captured.append(({taken.files[i].path for i in taken.in_place}, taken.held_for_upload))
        return taken

    monkeypatch.setattr(store, "disk_room", lambda folder: 1 << 20)
    monkeypatch.setattr(store.ChunkStore, "_snapshot", noted)
    harness.upload_inputs("r9", {"sums.py": PY_PROGRAM.encode()})
    text = 'Executable = "/usr/bin/python3"; Arguments = "sums.py"; CheckpointStrategy = "dmtcp"; CheckpointInterval = 3600;'
    first = harness.run("r9", text)
    task = asyncio.create_task(first.run())
    await wait_for_line(first.layout.stdout, "\n20 ")
    assert await first.checkpoint("notice", final=True)
    await asyncio.wait_for(task, 20)
    [(in_place, held)] = captured
    assert in_place and all(path.startswith(".dmtcp/ckpt_") for path in in_place), in_place
    assert held is None, held
    [done] = harness.of_type(MessageType.CHECKPOINT_DONE)
    second = harness.run("r9", text, checkpoints=[done.body["checkpoint_id"]])
    await asyncio.wait_for(second.run(), 60)
    assert second.restored_from == done.body["checkpoint_id"]
    assert (second.layout.stdout).read_text().endswith(expected_sums()[-200:])


async def test_without_the_plugin_it_checkpoints_after_the_resume_and_warns(
    harness: Harness, fake_dmtcp: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    shutil.rmtree(fake_dmtcp / "include")  # no dmtcp.h: the hook cannot be built
    harness.upload_inputs("d5", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"1\n"})
    run = harness.run("d5", counter_jdl(1000))
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.stdout, "progress 10/1000")
    assert await run.checkpoint("interval")
    assert run.checkpointer.hook is None
    assert "dmtcp.no_hook" in capsys.readouterr().out
    assert harness.of_type(MessageType.CHECKPOINT_DONE)
    run.stop()
    await asyncio.wait_for(task, 10)


async def test_a_dmtcp_too_old_fails_the_job_saying_so(harness: Harness, fake_dmtcp: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DMTCP_VERSION", "3.1.2")
    await asyncio.wait_for(harness.run("d6", 'Executable = "/bin/true"; CheckpointStrategy = "dmtcp";').run(), 30)
    [failed] = harness.of_type(MessageType.JOB_FAILED)
    assert "DMTCP 3.1 is too old" in failed.body["reason"] and "4.2 or newer" in failed.body["reason"]


@pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as users of their own")
async def test_a_program_dmtcp_cannot_checkpoint_fails_its_checkpoint_with_a_reason(
    harness: Harness, fake_dmtcp: Path,
) -> None:
    # without the plugin, DMTCP keeps SIGUSR2, not the signal it checkpoints with: a program that
    # holds that one is never checkpointed (observed on 4.2.0 and 5.0); the worker gives up, saying why
    shutil.rmtree(fake_dmtcp / "include")
    program = b"import signal, time\nsignal.signal(62, lambda *_: None)\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.05)\n"
    harness.upload_inputs("d7", {"hold.py": program})
    run = harness.run("d7", 'Executable = "/usr/bin/python3"; Arguments = "hold.py"; CheckpointStrategy = "dmtcp"; '
                            'CheckpointInterval = 3600;')
    task = asyncio.create_task(run.run())
    await wait_running(run)
    await wait_for_line(run.layout.stdout, "tick")
    run.checkpointer.write_timeout = 3.0  # type: ignore[attr-defined]
    assert not await run.checkpoint("interval")
    await run.checkpoints.reported()  # failures are reported in the background
    [failed] = harness.of_type(MessageType.CHECKPOINT_FAILED)
    assert "DMTCP did not write its images within 3s" in failed.body["error"]
    run.stop()
    await asyncio.wait_for(task, 20)
