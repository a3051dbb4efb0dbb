"""Hostile jobs against their worker and against each other, on a root worker (as on EC2).

Each test is an attack that worked on the worker before its isolation (the note on issue 12 says
which): the job's folder was the job's, logs and validation space lived in it, every job ran as
`nobody`, and a process that left the job's process group outlived it.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import textwrap
from pathlib import Path

import pytest

from cbas import jdl
from cbas.archive import Member, pack
from cbas.messages import MessageType
from tests.harness import Harness, wait_for_line
from tests.homes import reachable_tmp

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a job's isolation is a root worker's")


@pytest.fixture
def harness():
    with reachable_tmp("cbas-sec-") as root:
        yield Harness(root)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A root-only file a job must never read, write or chmod."""
    path = tmp_path / "root-only"
    path.write_text("the bus key\n")
    path.chmod(0o600)
    return path


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a reaper may be slow to collect the dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def shell_job(script: str, **fields: object) -> str:
    return jdl.write(jdl.JobDescription(executable="/bin/sh", arguments=f"-c {_quote(script)}", **fields))  # type: ignore[arg-type]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


async def test_links_in_place_of_the_logs_reach_no_root_file(harness: Harness, secret: Path) -> None:
    # the old layout: ../stdout and ../stderr in a folder of the job's, opened by root
    script = textwrap.dedent(f"""\
        for log in ../stdout ../stderr ../logs/stdout ../logs/stderr; do
          rm -f "$log" 2>/dev/null; ln -s {secret} "$log" 2>/dev/null
        done
        echo written-through-the-link
        """)
    run = harness.run("s1", jdl.write(jdl.JobDescription(executable="/bin/sh", arguments="attack.sh",
                                                          input_sandbox=("attack.sh",))))
    harness.upload_inputs("s1", {"attack.sh": script.encode()})
    await asyncio.wait_for(run.run(), 30)
    assert secret.read_text() == "the bus key\n"  # nothing appended
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.stat().st_uid == 0
    logs = harness.blobs.get_bytes("jobs/s1/logs/stdout") + harness.blobs.get_bytes("jobs/s1/logs/stderr")
    assert b"the bus key" not in logs  # and nothing of it came back through `cbas logs`
    sent = [m.body.get("stderr_tail", "") for m in harness.sent]
    assert not any("the bus key" in tail for tail in sent)


async def test_validation_space_is_out_of_the_jobs_reach_and_restores_no_setuid(harness: Harness) -> None:
    # the old validation restored, as root, into ../validate, which the job could point anywhere
    lure = harness.root / "lure"
    lure.mkdir(mode=0o777)
    script = textwrap.dedent(f"""\
        cp /bin/sh ./rootshell && chmod 6755 ./rootshell
        rm -rf ../validate; ln -s {lure} ../validate 2>/dev/null
        i=0; while [ $i -lt 600 ]; do echo $i > state.txt; i=$((i+1)); sleep 0.05; done
        """)
    text = jdl.write(jdl.JobDescription(executable="/bin/sh", arguments="attack.sh", input_sandbox=("attack.sh",),
                                        checkpoint_strategy="directory", checkpoint_interval=3600,
                                        validate_checkpoint=True))
    harness.upload_inputs("s2", {"attack.sh": script.encode()})
    run = harness.run("s2", text)
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.work / "state.txt", "3")
    assert await run.checkpoint("interval")
    run.stop()
    await asyncio.wait_for(task, 20)
    for base, _, files in os.walk(harness.root):
        for name in files:
            info = os.lstat(os.path.join(base, name))
            assert not (info.st_uid == 0 and info.st_mode & (stat.S_ISUID | stat.S_ISGID)), os.path.join(base, name)
    assert not any(lure.iterdir())


async def test_one_job_cannot_read_anothers_environment_or_write_its_files(harness: Harness) -> None:
    victim = harness.run("s3", shell_job("echo mine > mine.txt; exec sleep 20", environment={"SECRET_TOKEN": "s3cr3t-v4lue"}))
    victim_task = asyncio.create_task(victim.run())
    await wait_for_line(victim.layout.work / "mine.txt", "mine")
    spy_script = textwrap.dedent(f"""\
        for p in /proc/[0-9]*; do cat $p/environ 2>/dev/null | tr '\\0' '\\n' | grep SECRET_TOKEN; done > loot.txt
        echo pwned > {victim.layout.work}/mine.txt 2>/dev/null
        echo pwned > {victim.layout.work}/planted.txt 2>/dev/null
        for p in /proc/[0-9]*; do
          [ "$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)" = "sleep 20 " ] && kill -STOP ${{p#/proc/}} 2>/dev/null
        done
        true
        """)
    spy = harness.run("s4", shell_job(spy_script, output_sandbox=("loot.txt",)))
    await asyncio.wait_for(spy.run(), 30)
    assert "s3cr3t" not in (spy.layout.work / "loot.txt").read_text()
    assert (victim.layout.work / "mine.txt").read_text() == "mine\n"
    assert not (victim.layout.work / "planted.txt").exists()
    assert victim.process is not None  # and not stopped by the spy's kill -STOP
    assert Path(f"/proc/{victim.process.pgid}/stat").read_text().split(") ")[1][0] != "T"
    victim.stop()
    await asyncio.wait_for(victim_task, 20)
    assert victim.identity is not None and spy.identity is not None
    assert victim.identity.uid != spy.identity.uid != 0


async def test_no_process_of_a_job_outlives_it(harness: Harness) -> None:
    # setsid and a double fork used to leave the job's process group, and outlive cancel and the end
    script = "setsid sh -c 'sleep 300 & echo $! > daemon.pid; wait' & sleep 0.5; exit 0"
    run = harness.run("s5", shell_job(script))
    await asyncio.wait_for(run.run(), 30)
    assert harness.of_type(MessageType.JOB_DONE)
    pid = int((run.layout.work / "daemon.pid").read_text())
    await asyncio.sleep(0.2)
    assert not alive(pid), "the daemon outlived its job"


async def test_a_daemon_of_the_job_is_held_still_by_a_directory_checkpoint(harness: Harness) -> None:
    # SIGSTOP of the process group missed a setsid'd writer: the state changed while it was read
    script = ("setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > counter.txt; sleep 0.01; done' & "
              "sleep 60")
    text = jdl.write(jdl.JobDescription(executable="/bin/sh", arguments=f"-c {_quote(script)}",
                                        checkpoint_strategy="directory", checkpoint_interval=3600))
    run = harness.run("s6", text)
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.work / "counter.txt", "5")
    counter = run.layout.work / "counter.txt"
    async with run.checkpointer.quiesced(run.ctx, run.process):  # type: ignore[arg-type]
        held = counter.read_text()
        await asyncio.sleep(0.3)
        assert counter.read_text() == held
    run.stop()
    await asyncio.wait_for(task, 20)


async def test_a_fork_bomb_stops_at_max_processes_and_the_job_says_why(harness: Harness) -> None:
    bomb = ("import subprocess, time\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        subprocess.Popen(['sleep', '30'])\n"
            "    except OSError:\n"
            "        pass\n"
            "open('tried.txt', 'w').write('tried')\n"
            "time.sleep(3)\n")
    harness.upload_inputs("s7", {"bomb.py": bomb.encode()})
    run = harness.run("s7", jdl.write(jdl.JobDescription(executable="/usr/bin/python3", arguments="bomb.py",
                                                          input_sandbox=("bomb.py",), max_processes=20)))
    task = asyncio.create_task(run.run())
    await wait_for_line(run.layout.work / "tried.txt", "tried")
    assert run.cgroup is not None and len(run.cgroup.pids()) <= 20
    await asyncio.wait_for(task, 60)
    [failed] = harness.of_type(MessageType.JOB_FAILED)
    assert "MaxProcesses (20) reached" in failed.body["reason"]


async def test_an_archive_bomb_is_refused_with_a_reason(harness: Harness) -> None:
    bomb = harness.root / "zeros.bin"
    with open(bomb, "wb") as out:
        out.truncate(3 << 29)  # 1.5 GiB of zeros packs into a few hundred KB
    archive = harness.root / "input.tar.zst"
    pack([Member(bomb, "zeros.bin")], archive)
    bomb.unlink()
    assert archive.stat().st_size < 1 << 20
    harness.blobs.put_file("jobs/s8/input.tar.zst", archive)
    await asyncio.wait_for(harness.run("s8", shell_job("true", input_sandbox=("zeros.bin",))).run(), 60)
    [failed] = harness.of_type(MessageType.JOB_FAILED)
    assert "input sandbox cannot be unpacked" in failed.body["reason"] and "expand" in failed.body["reason"]


async def test_the_job_runs_as_a_slot_user_of_its_own_never_root(harness: Harness) -> None:
    run = harness.run("s9", shell_job("id -u > uid.txt; id -G > groups.txt"))
    await asyncio.wait_for(run.run(), 30)
    uid = int((run.layout.work / "uid.txt").read_text())
    assert uid != 0 and uid != pwd.getpwnam("nobody").pw_uid
    assert pwd.getpwuid(uid).pw_name.startswith("cbas-slot")
    assert "0" not in (run.layout.work / "groups.txt").read_text().split()


@pytest.mark.skipif(shutil.which("iptables") is None, reason="the coordinator's guard is an iptables rule")
async def test_another_job_cannot_command_a_jobs_dmtcp_coordinator(harness: Harness, fake_dmtcp: Path) -> None:
    # DMTCP's coordinator obeys whoever connects: `kill` from another job ended the computation
    harness.upload_inputs("s10", {"count.sh": b"#!/bin/sh\ni=0; while [ $i -lt 400 ]; do echo $i; i=$((i+1)); "
                                              b"sleep 0.05; done\n"})
    victim = harness.run("s10", 'Executable = "count.sh"; CheckpointStrategy = "dmtcp"; CheckpointInterval = 3600;')
    task = asyncio.create_task(victim.run())
    await wait_for_line(victim.layout.stdout, "\n5\n")
    port = victim.checkpointer.port
    attack = textwrap.dedent(f"""\
        import socket
        try:
            with socket.create_connection(("127.0.0.1", {port}), timeout=2) as s:
                s.sendall(b"kill\\n"); s.recv(16)
            print("connected")
        except OSError as exc:
            print("refused", exc)
        """)
    harness.upload_inputs("s11", {"attack.py": attack.encode()})
    spy = harness.run("s11", jdl.write(jdl.JobDescription(executable="/usr/bin/python3", arguments="attack.py",
                                                          input_sandbox=("attack.py",))))
    await asyncio.wait_for(spy.run(), 30)
    assert "refused" in spy.layout.stdout.read_text()
    assert await victim.checkpoint("interval")  # the worker (root) still commands it
    assert victim.process is not None and victim.process.process.returncode is None
    victim.stop()
    await asyncio.wait_for(task, 20)
