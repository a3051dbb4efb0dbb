"""JobRun through real processes, a real folder blob store, and the real checkpointers."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest

from cbas import jdl
from cbas.archive import Member, pack
from cbas.checkpoint.store import ChunkStore
from cbas.messages import MessageType
from tests.harness import Harness, wait_for_line
from tests.homes import reachable_tmp
from tests.processes import wait_until_gone

COUNTER = Path(__file__).resolve().parents[2] / "examples" / "counter"


@pytest.fixture
def harness():
    with reachable_tmp() as root:
        yield Harness(root)


COUNTER_JDL = jdl.write(jdl.JobDescription(
    executable="counter.sh", arguments="40 input.txt", input_sandbox=("input.txt",),
    output_sandbox=("output.txt",), checkpoint_interval=3600, environment={"COUNTER_DELAY": "0.05"},
))


def expected_counter(n: int, k: int) -> str:
    return "".join(f"{i} {i * k}\n" for i in range(n))


async def test_a_job_runs_to_completion_and_its_output_is_uploaded(harness: Harness) -> None:
    harness.upload_inputs("j1", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"3\n"})
    run = harness.run("j1", COUNTER_JDL)
    await asyncio.wait_for(run.run(), 30)
    [done] = harness.of_type(MessageType.JOB_DONE)
    assert done.body["exit_code"] == 0 and done.body["missing_outputs"] == []
    out = harness.root / "out"
    from cbas.archive import unpack

    archive = harness.root / "o.tar.zst"
    harness.blobs.get_file("jobs/j1/output.tar.zst", archive)
    unpack(archive, out)
    assert (out / "output.txt").read_text() == expected_counter(40, 3)
    assert b"done: counted to 40" in harness.blobs.get_bytes("jobs/j1/logs/stdout")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
async def test_a_root_worker_runs_the_job_as_the_job_user(harness: Harness) -> None:
    text = jdl.write(jdl.JobDescription(executable="/bin/sh", arguments="-c 'id -u > uid.txt'", output_sandbox=("uid.txt",)))
    run = harness.run("j2", text)
    await asyncio.wait_for(run.run(), 30)
    assert harness.of_type(MessageType.JOB_DONE)
    uid = (run.root / "work" / "uid.txt").read_text().strip()
    import pwd

    assert uid != "0" and pwd.getpwuid(int(uid)).pw_name.startswith("cbas-slot")  # a user of its own


async def test_a_failing_executable_reports_exit_code_and_stderr_tail(harness: Harness) -> None:
    text = jdl.write(jdl.JobDescription(executable="/bin/sh", arguments="-c 'echo line1 >&2; echo boom >&2; exit 3'"))
    await asyncio.wait_for(harness.run("j3", text).run(), 30)
    [failed] = harness.of_type(MessageType.JOB_FAILED)
    assert failed.body["exit_code"] == 3
    assert failed.body["reason"] == "exited with code 3"
    assert failed.body["stderr_tail"].splitlines()[-1] == "boom"


async def test_a_missing_executable_is_a_clear_failure(harness: Harness) -> None:
    await asyncio.wait_for(harness.run("j4", 'Executable = "no-such-program";').run(), 30)
    [failed] = harness.of_type(MessageType.JOB_FAILED)
    assert "neither in the input sandbox nor on the PATH" in failed.body["reason"]


async def test_a_failing_prologue_fails_the_job_before_it_starts(harness: Harness) -> None:
    scratch = harness.root / "pro"
    scratch.mkdir()
    (scratch / "setup.sh").write_text("#!/bin/sh\necho setting up\nexit 7\n")
    pack([Member(scratch / "setup.sh", "setup.sh")], scratch / "p.tar.zst")
    harness.blobs.put_file("jobs/j5/prologue.tar.zst", scratch / "p.tar.zst")
    text = 'Executable = "/bin/true"; Prologue = {"setup.sh"};'
    await asyncio.wait_for(harness.run("j5", text).run(), 30)
    [failed] = harness.of_type(MessageType.JOB_FAILED)
    assert failed.body["reason"] == "prologue setup.sh exited with code 7"
    assert b"setting up" in harness.blobs.get_bytes("jobs/j5/logs/stdout")


async def test_a_prologue_built_into_the_image_is_not_run_again(harness: Harness) -> None:
    scratch = harness.root / "pro"
    scratch.mkdir()
    (scratch / "setup.sh").write_text("#!/bin/sh\nexit 7\n")  # would fail the job if it ran
    pack([Member(scratch / "setup.sh", "setup.sh")], scratch / "p.tar.zst")
    harness.blobs.put_file("jobs/j5b/prologue.tar.zst", scratch / "p.tar.zst")
    run = harness.run("j5b", 'Executable = "/bin/true"; Prologue = {"setup.sh"}; BuildImage = true;')
    run.start = run.start.model_copy(update={"prologue_in_image": True})
    await asyncio.wait_for(run.run(), 30)
    assert harness.of_type(MessageType.JOB_FAILED) == [] and len(harness.of_type(MessageType.JOB_DONE)) == 1


async def test_directory_checkpoint_then_restore_resumes_instead_of_restarting(harness: Harness) -> None:
    harness.upload_inputs("j6", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"5\n"})
    text = COUNTER_JDL.replace('Arguments = "40 input.txt"', 'Arguments = "60 input.txt"')
    first = harness.run("j6", text)
    task = asyncio.create_task(first.run())
    await wait_for_line(first.layout.stdout, "progress 20/60")
    assert await first.checkpoint("notice", final=True)  # final: the job is stopped after it
    await asyncio.wait_for(task, 10)
    [ckpt] = harness.of_type(MessageType.CHECKPOINT_DONE)
    assert ckpt.body["final"] and ckpt.body["size_bytes"] > 0
    assert not harness.of_type(MessageType.JOB_DONE)  # a stopped job reports nothing

    second = harness.run("j6", text, checkpoints=[ckpt.body["checkpoint_id"]])
    await asyncio.wait_for(second.run(), 30)
    assert second.restored_from == ckpt.body["checkpoint_id"]
    assert harness.of_type(MessageType.JOB_DONE)
    assert (second.root / "work" / "output.txt").read_text() == expected_counter(60, 5)
    stdout = (second.layout.stdout).read_text()
    resumed_at = int(stdout.split("resuming at ")[1].split()[0])
    assert resumed_at >= 20  # it went on from the checkpoint, not from zero
    assert stdout.count("starting: counting") == 1  # the log was rewound to the checkpoint, not repeated


async def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(harness: Harness) -> None:
    harness.upload_inputs("j7", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"2\n"})
    text = COUNTER_JDL.replace('Arguments = "40 input.txt"', 'Arguments = "50 input.txt"')
    first = harness.run("j7", text)
    task = asyncio.create_task(first.run())
    await wait_for_line(first.layout.stdout, "progress 10/50")
    assert await first.checkpoint("interval")
    await wait_for_line(first.layout.stdout, "progress 20/50")
    assert await first.checkpoint("notice", final=True)
    await asyncio.wait_for(task, 10)
    older, newer = [m.body["checkpoint_id"] for m in harness.of_type(MessageType.CHECKPOINT_DONE)]
    store = ChunkStore(harness.blobs, "j7", harness.checkpoint_key("j7"))
    only_newer = set(store.manifest(newer).chunk_sizes) - set(store.manifest(older).chunk_sizes)
    key = store.chunk_key(sorted(only_newer)[0])
    data = bytearray(harness.blobs.get_bytes(key))
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    harness.blobs.put_bytes(key, bytes(data))

    second = harness.run("j7", text, checkpoints=[newer, older])
    await asyncio.wait_for(second.run(), 30)
    assert second.bad_checkpoints == [newer]
    assert second.restored_from == older
    assert (second.root / "work" / "output.txt").read_text() == expected_counter(50, 2)


SIGNAL_JOB = textwrap.dedent("""\
    #!/bin/sh
    # counts to 30; on SIGUSR1 saves its count in $CBAS_CHECKPOINT_DIR and says so with .done
    i=0
    if [ -f "$CBAS_CHECKPOINT_DIR/count" ]; then i=$(cat "$CBAS_CHECKPOINT_DIR/count"); echo "restored $i"; fi
    trap 'echo $i > "$CBAS_CHECKPOINT_DIR/count"; touch "$CBAS_CHECKPOINT_DIR/.done"' USR1
    while [ $i -lt 30 ]; do i=$((i + 1)); echo "$i" >> out.txt; sleep 0.05; done
    """)


async def test_signal_strategy_checkpoints_through_the_job_and_restores_its_directory(harness: Harness) -> None:
    harness.upload_inputs("j8", {"job.sh": SIGNAL_JOB.encode()})
    text = 'Executable = "job.sh"; CheckpointStrategy = "signal"; CheckpointInterval = 3600;'
    first = harness.run("j8", text)
    task = asyncio.create_task(first.run())
    await wait_for_line(first.root / "work" / "out.txt", "10")
    assert await first.checkpoint("notice", final=True)
    await asyncio.wait_for(task, 10)
    [ckpt] = harness.of_type(MessageType.CHECKPOINT_DONE)

    second = harness.run("j8", text, checkpoints=[ckpt.body["checkpoint_id"]])
    await asyncio.wait_for(second.run(), 30)
    assert harness.of_type(MessageType.JOB_DONE)
    restored = int((second.layout.stdout).read_text().split("restored ")[1].split()[0])
    assert restored >= 10
    assert (second.root / "checkpoint" / "count").read_text().strip() == str(restored)


async def test_signal_strategy_gives_up_on_a_job_that_never_answers(harness: Harness) -> None:
    text = 'Executable = "/bin/sh"; Arguments = "-c \'trap \\"\\" USR1; sleep 30\'"; CheckpointStrategy = "signal";'
    harness.settings = harness.settings.model_copy(update={"signal_checkpoint_timeout": 0.5})
    run = harness.run("j9", text)
    run.checkpointer.timeout = 0.5  # type: ignore[attr-defined]
    task = asyncio.create_task(run.run())
    for _ in range(200):
        if run.phase == "running":
            break
        await asyncio.sleep(0.05)
    assert not await run.checkpoint("interval")
    assert not harness.of_type(MessageType.CHECKPOINT_DONE)
    run.stop()
    await asyncio.wait_for(task, 10)


async def test_stop_kills_the_whole_process_group(harness: Harness) -> None:
    text = 'Executable = "/bin/sh"; Arguments = "-c \'sleep 60 & sleep 60; wait\'";'
    run = harness.run("j10", text)
    task = asyncio.create_task(run.run())
    for _ in range(200):
        if run.phase == "running":
            break
        await asyncio.sleep(0.05)
    pgid = run.process.pgid  # type: ignore[union-attr]
    run.stop()
    await asyncio.wait_for(task, 10)
    assert wait_until_gone([pgid]) == []  # the background sleep too, not just the leader
    assert not harness.of_type(MessageType.JOB_FAILED)  # a stopped job reports nothing


async def test_validated_checkpoints_count_only_when_a_test_restore_works(harness: Harness, monkeypatch) -> None:
    harness.upload_inputs("v1", {"counter.sh": COUNTER / "counter.sh", "input.txt": b"2\n"})
    text = COUNTER_JDL.replace('Arguments = "40 input.txt"', 'Arguments = "1000 input.txt"') + "ValidateCheckpoint = true;\n"
    run = harness.run("v1", text)
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.stdout, "progress 10/1000")
    assert await run.checkpoint("interval")
    store_put = harness.blobs.put_bytes

    def corrupting_put(key, data):  # a storage fault that keeps the upload "successful"
        store_put(key, b"R" + b"garbage" if "/chunks/" in key else data)

    monkeypatch.setattr(harness.blobs, "put_bytes", corrupting_put)
    await wait_for_line(run.layout.stdout, "progress 20/1000")
    assert not await run.checkpoint("interval")  # uploaded, but it does not restore: it does not count
    assert len(harness.of_type(MessageType.CHECKPOINT_DONE)) == 1
    run.stop()
    await asyncio.wait_for(task, 10)
