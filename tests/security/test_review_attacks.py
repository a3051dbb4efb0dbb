"""The security review's attacks, each as a hostile test: what the attack reached must be out of
its reach now.

Each test goes through the path the review's proof of concept used (a real JobRun on a root
worker with real cgroups and slot users, the local backend's volume copies, the chunk store, the
DMTCP hook's server, the coordinator's iptables guard) and asserts the protected thing is left
as it was: nothing of a job's runs outside its cgroup or as root, no root-only file is copied
into what a job gets back, no checkpoint loses its chunks, the worker keeps its descriptors, a
stale guard lets no one in, a job's PATH runs nothing as root, DiskLimit counts what a job
writes, and a slot user's next job finds nothing of the last one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import os
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import pytest
import zstandard

from cbas import jdl
from cbas.checkpoint import coordinator_guard
from cbas.checkpoint.base import JobContext
from cbas.checkpoint.dmtcp import HookServer
from cbas.checkpoint.store import ChunkStore, CorruptCheckpoint
from cbas.local.blobs import FolderBlobStore
from cbas.local.volumes import FolderSnapshots, restore_volume
from cbas.messages import MessageType
from cbas.worker import cgroups
from tests.harness import Harness, wait_for_line, wait_running
from tests.homes import reachable_tmp

NOBODY = 65534
PYTHON = "/usr/bin/python3"  # one any user can run (the venv's may live under /root)
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _cgroups_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs a root worker"
    ok, why = cgroups.cgroup_support()
    return None if ok else f"job cgroups unavailable: {why}"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the attack is on a root worker")
needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None or not os.access(PYTHON, os.X_OK),
                                   reason=f"the attacker runs {PYTHON} through setpriv")
needs_cgroups = pytest.mark.skipif(_cgroups_missing() is not None, reason=str(_cgroups_missing()))


# --- helpers ------------------------------------------------------------------------------------
def _rm_rf(path: Path) -> None:
    """At any depth (a job's tree may be too deep for shutil.rmtree), never leaving the file system."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, env=SYSTEM_ENV)


@contextlib.contextmanager
def _reachable(prefix: str) -> Iterator[Path]:
    """tests.homes.reachable_tmp, emptied with rm -rf first (a job's tree too deep for rmtree)."""
    with reachable_tmp(prefix) as root:
        try:
            yield root
        finally:
            _rm_rf(root)


@pytest.fixture
def harness() -> Iterator[Harness]:
    with _reachable("cbas-review-") as root:
        yield Harness(root)


def alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_own(pids: Iterable[int], uid: int) -> None:
    """SIGKILL those of pids that still run as uid (a test's job user: never a pid reused by another)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid == uid:
                os.kill(pid, signal.SIGKILL)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def shell_job(script: str, shell: str = "/bin/sh", **fields: object) -> str:
    return jdl.write(jdl.JobDescription(executable=shell, arguments=f"-c {_quote(script)}", **fields))  # type: ignore[arg-type]


def _as_nobody(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- 1. code of the job's environment, before its cgroup or as root ---------------------------------
# A library every process of the job loads (LD_PRELOAD): it writes down who and where it is, and
# (once per job, the first process that loads it) starts a daemon in a session of its own.
SPY_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void record(const char *loot, const char *what) {
    char path[4096], cgroup[8192];
    int fd = open("/proc/self/cgroup", O_RDONLY);
    ssize_t n = fd >= 0 ? read(fd, cgroup, sizeof cgroup - 1) : 0;
    if (fd >= 0) close(fd);
    cgroup[n > 0 ? n : 0] = 0;
    for (char *c = cgroup; *c; c++) if (*c == '\n') *c = '|';
    snprintf(path, sizeof path, "%s/%s-%d", loot, what, getpid());
    FILE *out = fopen(path, "w");
    if (!out) return;
    fprintf(out, "%s %d %d %d %s\n", what, getpid(), getuid(), geteuid(), cgroup);
    fclose(out);
}

__attribute__((constructor)) static void spy(void) {
    const char *loot = getenv("CBAS_SEC_LOOT");
    if (!loot) return;
    if (!getenv("CBAS_SEC_FORKED")) {  /* at once: the first process, before anything else runs */
        pid_t child = fork();
        if (child == 0) {
            setsid();
            if (fork() == 0) {
                setenv("CBAS_SEC_FORKED", "1", 1);
                record(loot, "daemon");
                execl("/bin/sleep", "sleep", "60", (char *)0);
                _exit(1);
            }
            _exit(0);
        }
        if (child > 0) waitpid(child, 0, 0);
        setenv("CBAS_SEC_FORKED", "1", 1);
    }
    record(loot, "process");
}
"""

# what a shell runs first from the job's environment (bash: BASH_ENV; sh -i: ENV; PS4 with xtrace)
SHELL_SPY = textwrap.dedent("""\
    /bin/echo "shell $$ $(/usr/bin/id -u) $(/usr/bin/id -u) $(/usr/bin/tr '\\n' '|' < /proc/self/cgroup)" \\
        > "$CBAS_SEC_LOOT/shell-$$"
    /usr/bin/setsid /bin/sleep 60 < /dev/null > /dev/null 2>&1 &
    /bin/echo "daemon $! ? ? ?" > "$CBAS_SEC_LOOT/daemon-$!"
    """)
# what the job's PATH finds first: the tools a root worker might run by name
TROJAN = textwrap.dedent("""\
    #!/bin/sh
    /bin/echo "trojan-$(/usr/bin/basename "$0") $$ $(/usr/bin/id -u) $(/usr/bin/id -u) $(/usr/bin/tr '\\n' '|' < /proc/self/cgroup)" \\
        > "$CBAS_SEC_LOOT/trojan-$$"
    for tool in /usr/bin/$(/usr/bin/basename "$0") /bin/$(/usr/bin/basename "$0") /usr/sbin/$(/usr/bin/basename "$0"); do
        [ -x "$tool" ] && exec "$tool" "$@"
    done
    exit 127
    """)
TROJANS = ("sh", "bash", "dash", "python3", "env", "sleep", "unshare", "mount", "setpriv", "id", "cat", "rm",
           "setsid", "iptables", "crontab", "useradd")


def _records(loot: Path) -> list[list[str]]:
    return [path.read_text().split(" ", 4) for path in sorted(loot.iterdir()) if path.is_file()]


@needs_root
@needs_cgroups
@pytest.mark.skipif(shutil.which("cc") is None, reason="the preloaded library is compiled with cc")
async def test_the_jobs_environment_runs_nothing_before_its_cgroup_or_as_root(harness: Harness) -> None:
    # the /bin/sh gate ran with the job's environment, as the job's user, before it was put in the
    # job's cgroup: a preloaded library (any sh) or BASH_ENV/SHELLOPTS+PS4 (sh = bash) ran first, and
    # a daemon it started was in no group of the job's, and outlived it
    tools = harness.root / "tools"
    tools.mkdir(mode=0o755)
    (tools / "spy.c").write_text(SPY_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(tools / "spy.so"), str(tools / "spy.c")], check=True)
    (tools / "spy.so").chmod(0o755)
    (tools / "shell-spy.sh").write_text(SHELL_SPY)
    (tools / "shell-spy.sh").chmod(0o755)
    trojans = tools / "bin"
    trojans.mkdir(mode=0o755)
    for name in TROJANS:
        (trojans / name).write_text(TROJAN)
        (trojans / name).chmod(0o755)
    loot = harness.root / "loot"
    loot.mkdir()
    loot.chmod(0o777)
    environment = {
        "CBAS_SEC_LOOT": str(loot), "LD_PRELOAD": str(tools / "spy.so"),
        "BASH_ENV": str(tools / "shell-spy.sh"), "ENV": str(tools / "shell-spy.sh"),
        "SHELLOPTS": "xtrace", "PS4": f"$(. {tools / 'shell-spy.sh'})",
        "PATH": f"{trojans}:/usr/local/bin:/usr/bin:/bin", "PYTHONSTARTUP": str(tools / "shell-spy.sh"),
    }
    run = harness.run("escape", shell_job("sleep 1; exit 0", shell="/bin/bash", environment=environment))
    task = asyncio.create_task(run.run())
    try:
        await wait_running(run)
        assert run.cgroup is not None and run.identity is not None
        group, uid = f"/cbas/{run.cgroup.name}", run.identity.uid
        await asyncio.wait_for(task, 30)
        assert harness.of_type(MessageType.JOB_DONE), [m.body for m in harness.sent]
        await asyncio.sleep(0.3)  # a reaper may be slow to collect the dead
        records = _records(loot)
        # the attack ran: the library in the program, BASH_ENV in its bash, the trojan sleep
        kinds = {record[0] for record in records}
        assert {"process", "daemon", "shell"} <= kinds and "trojan-sleep" in kinds, records
        for what, pid, real, effective, where in records:
            if what == "daemon" and real == "?":  # started by a shell spy: only its pid is known
                continue
            assert real == effective == str(uid), f"{what} {pid} ran as uid {real}/{effective}, not the slot's {uid}"
            assert any(line.split(":", 2)[-1] == group for line in where.strip().split("|") if line), \
                f"{what} {pid} started outside the job's cgroup {group}: {where}"
        survivors = [int(r[1]) for r in records if alive(int(r[1])) and os.stat(f"/proc/{r[1]}").st_uid == uid]
        assert not survivors, f"processes of the job outlived it: {survivors}"
    finally:
        if not task.done():
            run.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
        if loot.exists() and run.identity is not None:
            _kill_own((int(r[1]) for r in _records(loot)), run.identity.uid)


# --- 2. what a slot user left in the host's scratch folders -------------------------------------------
@needs_root
@needs_cgroups
async def test_a_later_job_on_the_same_slot_finds_nothing_the_last_one_left_in_tmp(harness: Harness) -> None:
    token = secrets.token_hex(6)
    # a root 1777 folder inside /tmp, as systemd-tmpfiles makes /tmp/.X11-unix on AL2023
    shared_below = Path(f"/tmp/cbas-review-shared-{token}")
    shared_below.mkdir(mode=0o700)
    shared_below.chmod(0o1777)
    left = [Path(f"/tmp/cbas-review-left-{token}"), Path(f"/dev/shm/cbas-review-left-{token}"),
            Path(f"/run/lock/cbas-review-left-{token}"), shared_below / "left"]
    left = [path for path in left if path.parent.is_dir()]
    leave = "umask 077; " + "; ".join(f"echo private-of-first > {path}" for path in left)
    take = "; ".join(f"cat {path} >> got.txt 2>/dev/null; echo tampered > {path} 2>/dev/null" for path in left)
    try:
        for attempt in range(3):  # another session may take the slot in between: then again
            first = harness.run(f"first{attempt}", shell_job(leave))
            await asyncio.wait_for(first.run(), 30)
            second = harness.run(f"second{attempt}", shell_job(f"touch got.txt; {take}; true"))
            await asyncio.wait_for(second.run(), 30)
            assert first.identity is not None and second.identity is not None
            if first.identity.uid == second.identity.uid:
                break
            for path in left:
                path.unlink(missing_ok=True)
        else:
            pytest.skip("the two jobs never ran on the same slot (other sessions use the slots)")
        assert len(harness.of_type(MessageType.JOB_DONE)) == 2 * (attempt + 1)
        got = (second.layout.work / "got.txt").read_text()
        assert "private-of-first" not in got, "the next job of the slot read the last one's file"
        assert not any(path.exists() for path in left), "a slot job's files in /tmp outlived its slot"
    finally:
        for path in left:
            path.unlink(missing_ok=True)
        shared_below.rmdir()


SYSV_IPC = textwrap.dedent("""\
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    key, leave = int(sys.argv[1]), sys.argv[2] == "leave"
    create = 0o1000 | 0o600 if leave else 0  # IPC_CREAT
    found = []
    shm = libc.shmget(key, 4096, create)
    if shm >= 0:
        address = libc.shmat(shm, None, 0)
        if leave:
            ctypes.memmove(address, b"private-of-first", 16)
        else:
            found.append("shm:" + ctypes.string_at(address, 16).decode(errors="replace"))
    if libc.msgget(key, create) >= 0 and not leave:
        found.append("msg")
    if libc.semget(key, 1, create) >= 0 and not leave:
        found.append("sem")
    print(" ".join(found))
    """)


@needs_root
@needs_cgroups
async def test_a_later_job_on_the_same_slot_finds_no_system_v_ipc_object_of_the_last_one(harness: Harness) -> None:
    # shared memory, queues and semaphores outlive their processes (kernel.shm_rmid_forced = 0)
    key = 0x5EC00000 + secrets.randbelow(0xFFFF)
    script = harness.root / "ipc.py"
    script.write_text(SYSV_IPC)
    script.chmod(0o644)
    try:
        for attempt in range(3):
            first = harness.run(f"first{attempt}", shell_job(f"{PYTHON} {script} {key} leave"))
            await asyncio.wait_for(first.run(), 30)
            second = harness.run(f"second{attempt}", shell_job(f"{PYTHON} {script} {key} take > got.txt"))
            await asyncio.wait_for(second.run(), 30)
            assert first.identity is not None and second.identity is not None
            if first.identity.uid == second.identity.uid:
                break
        else:
            pytest.skip("the two jobs never ran on the same slot (other sessions use the slots)")
        assert (second.layout.work / "got.txt").read_text().strip() == "", \
            "the next job of the slot found the last one's System V IPC objects"
    finally:
        for flag in ("-M", "-Q", "-S"):
            subprocess.run(["ipcrm", flag, str(key)], capture_output=True)


# --- 3. DiskLimit against what it did not count --------------------------------------------------------
def _deep(levels: int) -> str:
    return f"i=0; while [ $i -lt {levels} ]; do mkdir d && cd d || exit 9; i=$((i+1)); done; "


@needs_root
@pytest.mark.parametrize("where", ["stdout", "deep-tree"])
async def test_disk_limit_counts_the_logs_and_a_tree_too_deep_to_walk(harness: Harness, where: str) -> None:
    # 40 MB past DiskLimit = 5 MiB: written to stdout (the logs were not counted), or below 1100
    # folders (measuring raised RecursionError, and the job ran on unmeasured)
    write = {"stdout": "head -c 40000000 /dev/zero; ",
             "deep-tree": _deep(1100) + "head -c 40000000 /dev/zero > big; "}[where]
    run = harness.run("disk", shell_job(write + "sleep 3; exit 0", disk_limit=5))
    await asyncio.wait_for(run.run(), 60)
    assert not harness.of_type(MessageType.JOB_DONE), "40 MB written past DiskLimit = 5 MiB, and the job is done"
    [failed] = harness.of_type(MessageType.JOB_FAILED)
    assert "DiskLimit" in failed.body["reason"], failed.body


# --- 4. a failed kill hands on a uid whose processes live on -----------------------------------------------
@needs_root
@needs_cgroups
async def test_a_job_whose_processes_cannot_be_killed_keeps_its_slot_and_fails(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # a job that ran the worker out of descriptors (test 5) made its cgroup's kill fail: the
    # failure was swallowed, the job reported done and its slot user given to the next job
    def cannot(self: cgroups.JobCgroup, timeout: float = 10.0) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(cgroups.JobCgroup, "kill", cannot)
    run = harness.run("stuck", shell_job("setsid sleep 300 < /dev/null > /dev/null 2>&1 & echo $! > daemon.pid; "
                                         "sleep 0.3; exit 0"))
    names: list[str] = []
    task = asyncio.create_task(run.run())
    try:
        await wait_running(run)
        assert run.cgroup is not None and run.identity is not None
        names.append(run.cgroup.name)
        await asyncio.wait_for(task, 30)
        assert not harness.of_type(MessageType.JOB_DONE), "a job whose processes live on was reported done"
        [failed] = harness.of_type(MessageType.JOB_FAILED)
        assert "could not" in failed.body["reason"], failed.body
        lock = harness.settings.job_slot_dir / f"slot{run.identity.name.removeprefix('cbas-slot')}.lock"
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # still held: no other job gets this uid
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        monkeypatch.undo()
        if not task.done():
            run.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
        pid_file = run.layout.work / "daemon.pid"
        if run.identity is not None and pid_file.exists() and pid_file.read_text().strip().isdigit():
            _kill_own([int(pid_file.read_text())], run.identity.uid)
        for name in names:
            with contextlib.suppress(Exception):
                cgroups.kill_cgroup(name, timeout=5)
        if run.identity is not None:
            run.identity.release()


# --- 5. idle connections to the DMTCP hook's socket ------------------------------------------------------
HOLDER = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); held.append(s)  # never sends a line
open(sys.argv[3], "w").write("holding")
time.sleep(60)
"""


def _fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # none left to list them with
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@needs_root
@needs_setpriv
async def test_idle_hook_connections_leave_the_worker_its_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    # the hook took any number of connections and waited on each for a line, for ever: a job ran
    # the root worker out of descriptors (then it could not open its cgroups' files to kill them)
    from cbas.checkpoint import dmtcp

    monkeypatch.setattr(dmtcp, "HOOK_LINE_TIMEOUT", 1.0, raising=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with _reachable("cbas-review-hook-") as folder:
        flag = folder / "loot" / "holding"
        flag.parent.mkdir()
        flag.parent.chmod(0o777)
        hook = HookServer(folder / "hook.sock", (NOBODY, NOBODY))
        await hook.start()
        before = _fds()
        holder = None
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (before + 300, hard))  # 1024 less what a worker uses
            holder = subprocess.Popen(_as_nobody(PYTHON, "-I", "-c", HOLDER, str(hook.path), "400", str(flag)),
                                      start_new_session=True, cwd="/", stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if flag.exists():
                    break
            await asyncio.sleep(0.3)
            try:
                Path("/proc/self/status").read_text()  # what JobCgroup.pids() and kill() do first
                opened = None
            except OSError as exc:
                opened = exc
            held = _fds() - before
            assert opened is None, f"the worker cannot open a file now ({held} fds held by the job): {opened}"
            assert held <= getattr(dmtcp, "MAX_HOOK_CONNECTIONS", 64) + 8, f"the job's idle connections hold {held} of the worker's fds"
            for _ in range(200):  # past the line timeout the silent ones are let go
                if _fds() - before <= 8:
                    break
                await asyncio.sleep(0.05)
            assert _fds() - before <= 8, f"idle connections still hold {_fds() - before} fds"
            reader, writer = await asyncio.open_unix_connection(str(hook.path))  # the real caller still gets through
            writer.write(b"checkpoint-written\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"ok\n"
            writer.close()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            if holder is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(holder.pid, signal.SIGKILL)
                holder.wait()
            await hook.close()


# --- 6. OutputSandbox through a link swapped in while it is archived ----------------------------------------
OUTPUT_RACER = r"""
import os, sys
work, secret, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
out, tmp = os.path.join(work, "out"), os.path.join(work, ".swap")
for i in range(200):
    open(os.path.join(out, f"f{i:04d}"), "w").write("y")
open(os.path.join(out, "x"), "w").write("i" * size)
open(os.path.join(work, "ready"), "w").write("1")
while True:
    with open(tmp, "w") as f:
        f.write("i" * size)
    os.rename(tmp, os.path.join(out, "x"))
    os.symlink(secret, tmp); os.rename(tmp, os.path.join(out, "x"))
"""


@needs_root
@needs_setpriv
def test_the_output_sandbox_never_archives_a_root_only_file_through_a_swapped_link(harness: Harness) -> None:
    # _upload_outputs checked with lstat, then the archive opened the name as root: a process of
    # the job that lived on swapped the file for a link, and output.tar.zst held a root-only file
    secret = harness.root / "machine.key"
    secret.write_text("MACHINE-KEY-0123456789abcdef\n")
    secret.chmod(0o600)
    run = harness.run("outrace", jdl.write(jdl.JobDescription(executable="/bin/true", output_sandbox=("out",))))
    run.layout.root.mkdir(mode=0o711)
    run.layout.scratch.mkdir(mode=0o700, parents=True)
    work = run.layout.work
    (work / "out").mkdir(parents=True)
    for path in (work, work / "out"):
        os.chown(path, NOBODY, NOBODY)
    ctx = JobContext(job_id="outrace", workdir=work, checkpoint_dir=run.layout.checkpoint, stdout=run.layout.stdout,
                     stderr=run.layout.stderr, env={}, user=(NOBODY, NOBODY))
    racer = subprocess.Popen(_as_nobody(PYTHON, "-I", "-c", OUTPUT_RACER, str(work), str(secret),
                                        str(secret.stat().st_size)), start_new_session=True)
    try:
        assert _wait_for(work / "ready", 10)
        deadline, attempts, errors = time.monotonic() + 4.0, 0, []
        while time.monotonic() < deadline and attempts < 400:
            attempts += 1
            try:
                run._upload_outputs(ctx)  # as JobRun._finish calls it
            except Exception as exc:  # the old archive's lstat-then-open, losing a race (not a leak)
                errors.append(type(exc).__name__)
                continue
            raw = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(harness.blobs.get_bytes("jobs/outrace/output.tar.zst"))).read()
            assert b"MACHINE-KEY" not in raw, f"attempt {attempts}: output.tar.zst holds the root-only file"
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                links = [member.name for member in tar.getmembers() if not (member.isfile() or member.isdir())]
            assert not links, f"attempt {attempts}: links in the output: {links}"
        assert attempts - len(errors) >= 20, f"too few uploads to tell: {attempts} attempts, errors {errors[:5]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(racer.pid, signal.SIGKILL)
        racer.wait()


# --- 7. a volume snapshot through a link swapped in while it is copied -----------------------------------------
SWAPPED = ["x0", "x1"]  # each a file, then a link to the secret, back and forth (more: copytree fails more)
VOLUME_RACER = r"""
import os, sys
work, secret, outside = sys.argv[1], sys.argv[2], sys.argv[3]
os.chdir(work)
for i in range(100):
    with open(f"f{i:04d}", "w") as f:
        f.write("x" * 100)
names = ["x0", "x1"]
for name in names:
    open(name, "w").write("innocent\n")
open("ready", "w").write("1")
tmp = os.path.join(outside, "tmp")
while True:  # atomic renames: a name is always there, a file or a link
    for name in names:
        if os.path.islink(name):
            with open(tmp, "w") as f:
                f.write("innocent\n")
        else:
            os.symlink(secret, tmp)
        os.rename(tmp, name)
"""


def _volume(root: Path) -> tuple[Path, Path]:
    """A machine's disk laid out as the local cloud does (0711 down to the job's work folder)."""
    disk = root / "disk"
    work = disk / "job" / "work"
    work.mkdir(parents=True)
    disk.chmod(0o711)
    (disk / "job").chmod(0o711)
    return disk / "job", work


@needs_root
@needs_setpriv
def test_a_volume_snapshot_never_copies_a_root_only_file_through_a_swapped_link(tmp_path: Path) -> None:
    # FolderSnapshots.snapshot was shutil.copytree as root: a job process not held meanwhile
    # swapped a file for a link, and the next machine's disk held the root-only file as work/x
    with _reachable("cbas-review-vol-") as root:
        secret = root / "master.key"
        secret.write_text("THE MASTER KEY\n")
        secret.chmod(0o600)
        volume, work = _volume(root)
        outside = root / "outside"
        outside.mkdir()
        for path in (work, outside):
            os.chown(path, NOBODY, NOBODY)
        racer = subprocess.Popen(_as_nobody(PYTHON, "-I", "-c", VOLUME_RACER, str(work), str(secret),
                                            str(outside)), start_new_session=True)
        try:
            assert _wait_for(work / "ready", 20)
            snapshots = FolderSnapshots(root / "home", volume)
            deadline, taken, errors, snapshot_id = time.monotonic() + 4.0, 0, [], None
            while time.monotonic() < deadline and taken < 30:
                if snapshot_id is not None:
                    _rm_rf(snapshots.root / snapshot_id)
                try:
                    snapshot_id = snapshots.snapshot("job", f"c{taken + len(errors)}")
                except Exception as exc:  # copytree meeting a name mid-rename: not a leak
                    snapshot_id = None
                    errors.append(type(exc).__name__)
                    continue
                taken += 1
                for name in SWAPPED:
                    copied = snapshots.root / snapshot_id / "volume" / "work" / name
                    # a link stays a link; a name swapped while it is copied may be left out
                    assert copied.is_symlink() or not copied.exists() or "MASTER KEY" not in copied.read_text(), \
                        f"snapshot {taken} holds the root-only file as work/{name}"
            assert taken >= 3 and snapshot_id is not None, f"too few snapshots to tell: {taken}, errors {errors[:5]}"
            restored = root / "restored"
            restore_volume(root / "home", snapshot_id, restored)  # the next machine's disk, from the last
            for name in SWAPPED:
                copied = restored / "work" / name
                assert copied.is_symlink() or not copied.exists() or "MASTER KEY" not in copied.read_text()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(racer.pid, signal.SIGKILL)
            racer.wait()


# --- 8. a job's setuid file through a volume snapshot and restore --------------------------------------------
@needs_root
@needs_setpriv
def test_a_jobs_setuid_file_does_not_come_back_setuid_root_on_the_next_machines_disk() -> None:
    # the copies (copytree -> copystat, as root) kept setuid and made root the owner: the job's
    # harmless `chmod 4755` became a root shell for every local user on the next machine's disk
    with _reachable("cbas-review-suid-") as root:
        home = root / "home"
        home.mkdir(mode=0o700)
        machines = root / "machines"
        machines.mkdir(mode=0o711)
        volume, work = _volume(machines / "i-old")
        (machines / "i-old").chmod(0o711)
        shell = work / "rootshell"
        shutil.copy("/bin/bash", shell)
        os.chown(shell, NOBODY, NOBODY)
        os.chmod(shell, 0o6755)
        os.chown(work, NOBODY, NOBODY)
        os.chmod(work, 0o755)
        try:
            snapshot = FolderSnapshots(home, volume).snapshot("job", "a0001-n00001")
            new = machines / "i-new"
            new.mkdir(mode=0o711)
            restore_volume(home, snapshot, new / "job")
            for copied in (home / "snapshots" / snapshot / "volume" / "work" / "rootshell", new / "job" / "work" / "rootshell"):
                info = copied.lstat()
                assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{copied}: {oct(info.st_mode)} uid {info.st_uid}"
            ran = subprocess.run(_as_nobody(str(new / "job" / "work" / "rootshell"), "-p", "-c", "id -u"),
                                 capture_output=True, text=True)
            assert ran.stdout.split()[:1] != ["0"], "another local user became root through the copy"
        finally:
            for base, _, files in os.walk(root):
                for name in files:
                    with contextlib.suppress(OSError):
                        os.chmod(os.path.join(base, name), 0o600, follow_symlinks=False)


# --- 9. garbage collection against a checkpoint committed meanwhile ------------------------------------------------
class PausingBlobs(FolderBlobStore):
    """Holds the collecting thread just before it lists the chunks (a slow list on S3)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.collector: threading.Thread | None = None
        self.at_chunk_listing = threading.Event()
        self.go_on = threading.Event()

    def list_modified(self, prefix: str) -> dict[str, float]:
        if threading.current_thread() is self.collector and prefix.endswith("/chunks/"):
            self.at_chunk_listing.set()
            assert self.go_on.wait(10)
        return super().list_modified(prefix)


def test_garbage_collection_never_deletes_a_checkpoint_committed_while_it_ran(tmp_path: Path) -> None:
    # N's collection listed the manifests, M was committed and unpinned, then N's collection
    # deleted M's chunks (used by no manifest it had listed, pinned by nobody): M, reported
    # CHECKPOINT_DONE, could never be restored
    blobs = PausingBlobs(tmp_path / "blobs")
    store = ChunkStore(blobs, "job", b"k" * 32)
    store.gc_grace_seconds = 0  # no grace period: what spares the new chunks must be the pins
    state = tmp_path / "state"
    state.mkdir()
    (state / "data").write_bytes(os.urandom(3 << 20))
    store.save(state, "a0001-n00001", "directory", tmp_path / "stage1")
    collector = threading.Thread(target=lambda: store.collect_garbage(keep=3))
    blobs.collector = collector
    collector.start()
    try:
        assert blobs.at_chunk_listing.wait(10)
        newest = os.urandom(3 << 20)
        (state / "data").write_bytes(newest)  # the job goes on
        store.save(state, "a0001-n00002", "directory", tmp_path / "stage2")  # snapshot, commit, release
    finally:
        blobs.go_on.set()
        collector.join(10)
    assert not collector.is_alive()
    fresh = ChunkStore(FolderBlobStore(tmp_path / "blobs"), "job", b"k" * 32)  # the next machine's
    try:
        fresh.restore("a0001-n00002", tmp_path / "restored")
    except CorruptCheckpoint as exc:
        pytest.fail(f"the newest checkpoint lost its chunks to a collection that ran meanwhile: {exc}")
    assert (tmp_path / "restored" / "data").read_bytes() == newest


# --- 10. a coordinator guard left behind by a killed worker ------------------------------------------------------
PROBE = ("import socket, sys\n"
         "try:\n"
         "    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2).close(); print('connected')\n"
         "except OSError as exc:\n"
         "    print('refused', exc)\n")


def _iptables_missing() -> str | None:
    if os.geteuid() != 0:
        return "iptables rules need root"
    if shutil.which("iptables", path=SYSTEM_ENV["PATH"]) is None:
        return "the coordinator's guard is an iptables rule"
    if subprocess.run(["iptables", "-w", "5", "-n", "-L", "OUTPUT"], capture_output=True, env=SYSTEM_ENV).returncode:
        return "iptables is not usable here"
    return None


def _probe(uid: int, port: int) -> str:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", PYTHON, "-I", "-c",
                           PROBE, str(port)], capture_output=True, text=True, timeout=20).stdout.strip()


def _rules_named(part: str) -> list[str]:
    listing = subprocess.run(["iptables", "-w", "5", "-S"], capture_output=True, text=True, env=SYSTEM_ENV).stdout
    return [line for line in listing.splitlines() if part in line]


@needs_setpriv
@pytest.mark.skipif(_iptables_missing() is not None, reason=str(_iptables_missing()))
def test_a_stale_guard_neither_locks_out_the_ports_next_owner_nor_lets_its_old_uid_in() -> None:
    # a guard never released (its worker SIGKILLed) stood first in its chains: the port's next
    # coordinator refused its own job's uid, and let the stale uid (another job's now) through
    token = secrets.token_hex(4)
    stale, fresh = f"review-{token}-stale", f"review-{token}-fresh"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        assert coordinator_guard.guard(stale, port, NOBODY)  # job A's, left behind
        assert coordinator_guard.guard(fresh, port, 1)  # job B's coordinator, later, on the same port
        own, old = _probe(1, port), _probe(NOBODY, port)
        assert own == "connected", f"the port's owner (uid 1) is locked out: {own}"
        assert old.startswith("refused"), f"the stale guard's uid {NOBODY} still gets in: {old}"
    finally:
        coordinator_guard.release(stale)
        coordinator_guard.release(fresh)
        listener.close()
    assert not _rules_named(f"review-{token}")


@needs_setpriv
@pytest.mark.skipif(_iptables_missing() is not None, reason=str(_iptables_missing()))
def test_the_job_reaches_its_coordinator_at_every_instant_its_guard_is_put_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # the guard's rules went in reject first: for a few milliseconds the job's own uid was reset,
    # and a DMTCP program talking to its coordinator then (right after a restart) died with 99
    token = secrets.token_hex(4)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    real, seen = coordinator_guard._iptables, []

    def then_probe(*args: str) -> subprocess.CompletedProcess[str]:
        result = real(*args)
        if args[:1] == ("-I",):
            seen.append(_probe(NOBODY, port))
        return result

    monkeypatch.setattr(coordinator_guard, "_iptables", then_probe)
    try:
        assert coordinator_guard.guard(f"review-{token}", port, NOBODY)
        assert seen and all(result == "connected" for result in seen), f"after each rule went in: {seen}"
    finally:
        coordinator_guard.release(f"review-{token}")
        listener.close()
    assert not _rules_named(f"review-{token}")


@pytest.mark.skipif(_iptables_missing() is not None, reason=str(_iptables_missing()))
async def test_a_terminated_machines_guards_are_all_released(tmp_path: Path) -> None:
    # nothing swept the guards of a worker killed with its machine (the local cloud's terminate and
    # spot reclaim SIGKILL it): its rules stood, first in their chains, for the port's next owner
    from cbas.local.cloud import LocalCloud, MachineRecord
    from cbas.models import Machine
    from cbas.settings import Settings

    token = secrets.token_hex(4)
    machine, neighbour = f"i-rv{token}", f"i-rv{token}0"  # one name a prefix of the other's
    listeners = [socket.socket() for _ in range(3)]
    for listener in listeners:  # ports nobody else uses while the rules stand
        listener.bind(("127.0.0.1", 0))
    ports = [listener.getsockname()[1] for listener in listeners]
    # named as the worker names them: <instance>-<job>-a<attempt>-<port>
    names = [f"{machine}-job1-a1-{ports[0]}", f"{machine}-job2-a3-{ports[1]}", f"{neighbour}-job1-a1-{ports[2]}"]
    (tmp_path / "home").mkdir(mode=0o700)
    cloud = LocalCloud(Settings(home=tmp_path / "home"))
    disk = tmp_path / "disk"
    disk.mkdir()
    cloud._save(MachineRecord(machine=Machine(instance_id=machine, zone="z1", instance_type="c5.large",
                                              market="spot", price=0.03, state="running", tags={}), disk=str(disk)))
    try:
        for name, port in zip(names, ports):
            assert coordinator_guard.guard(name, port, NOBODY)
        await cloud.terminate(machine)  # its worker was SIGKILLed: nothing of it released them
        assert not _rules_named(f"cbas:{machine}-"), "a terminated machine's coordinator guards are left"
        assert _rules_named(f"cbas:{neighbour}-"), "another machine's guard went with it"
    finally:
        for name in names:
            coordinator_guard.release(name)
        for listener in listeners:
            listener.close()
    assert not _rules_named(f"rv{token}")


# --- 11. a job's PATH in the root part of a validation restart -------------------------------------------------------
COUNT = b'#!/bin/sh\ni=$(cat n.txt 2>/dev/null || echo 0)\nwhile [ $i -lt 300 ]; do echo $i; i=$((i+1)); echo $i > n.txt; sleep 0.04; done\n'
ROOT_TROJAN = textwrap.dedent("""\
    #!/bin/sh
    echo "uid=$(/usr/bin/id -u) ran $0 in $(/bin/pwd)" >> {loot}
    name=$(/usr/bin/basename "$0")
    for tool in /usr/bin/$name /bin/$name /usr/sbin/$name /sbin/$name; do
        [ -x "$tool" ] && exec "$tool" "$@"
    done
    exit 127
    """)


@needs_root
@needs_cgroups
async def test_a_validation_restart_runs_none_of_the_jobs_tools_as_root(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # ValidateCheckpoint with dmtcp ran its restart as root with the job's environment: unshare,
    # mount and setpriv were found by the job's PATH ("work:..."), in the job's own folder
    from tests.fakedmtcp.fixtures import install

    loot = harness.root / "loot"
    loot.mkdir()
    loot.chmod(0o777)
    trojan = ROOT_TROJAN.format(loot=loot / "ran.txt").encode()
    names = ("unshare", "mount", "setpriv", "env", "sh", "nsenter")
    harness.upload_inputs("pathjob", {"count.sh": COUNT, **{name: trojan for name in names}})
    (harness.root / "dmtcp").mkdir(mode=0o755)
    monkeypatch.setenv("PATH", f"{install(harness.root / 'dmtcp')}:{os.environ['PATH']}")
    run = harness.run("pathjob", jdl.write(jdl.JobDescription(
        executable="count.sh", input_sandbox=("count.sh", *names), checkpoint_strategy="dmtcp",
        checkpoint_interval=3600, validate_checkpoint=True,
        environment={"FAKE_DMTCP_STATE": "n.txt", "PATH": "work:.:/usr/local/bin:/usr/bin:/bin"})))
    task = asyncio.create_task(run.run())
    try:
        await wait_for_line(run.layout.stdout, "\n10\n")
        counted = await run.checkpoint("interval")
        assert counted, [m.body for m in harness.of_type(MessageType.CHECKPOINT_FAILED)]
        # validated by a restart (in a cgroup of its own), not only by a restore
        assert any(name.endswith("-validate") for name in run.cgroups_file.read_text().split())
    finally:
        run.stop()
        await asyncio.wait_for(task, 30)
    ran = (loot / "ran.txt").read_text() if (loot / "ran.txt").exists() else ""
    assert "uid=0 " not in ran, f"the job's own tools ran as root:\n{ran}"
