"""cbas.worker.cgroups on the machine's real cgroups, with real processes.

Each hostile test does what plain process-group killing would do first (os.killpg on the job's
process group) and shows that it misses the process, then shows the cgroup does not.
Each test's groups are killed and removed, and its processes killed by their own pid, even when
it fails; every command carries the test's token so no other process is ever killed by pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from cbas.worker import cgroups
from cbas.worker.cgroups import (
    CgroupUnavailable, JobCgroup, Limits, cgroup_support, create_job_cgroup, kill_cgroup, parse_mountinfo,
)

ROOT = Path("/sys/fs/cgroup")
# the test's own processes (trusted) wait for a line on stdin, the cue that they are in the group,
# then become the program (same pid); the worker's jobs go through cbas.worker.launch instead
GATE_ARGV = ["/bin/sh", "-c", 'read -r _ || exit 111; exec "$@" </dev/null', "cbas-gate"]


def gated_argv(argv: list[str]) -> list[str]:
    return [*GATE_ARGV, *argv]

# double fork + setsid: the job's process ends at once, the daemon lives on in a session of its own
DAEMON = r"""
import os, sys, time
if os.fork(): os._exit(0)
os.setsid()
if os.fork(): os._exit(0)
with open(sys.argv[1] + ".tmp", "w") as f: f.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

# a grandchild in a session of its own appends a line every 20 ms: its progress is the file's size
TICKER = ('setsid /bin/sh -c \'echo $$ > "$1.tmp"; mv "$1.tmp" "$1"; '
          'while :; do echo x >> "$2"; sleep 0.02; done\' ticker "$1" "$2" "$3" & wait')


class Env:
    def __init__(self) -> None:
        self.token = f"cbas-cgroup-test-{uuid.uuid4().hex[:8]}"
        self.names: list[str] = []
        self.popens: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def make(self, limits: Limits = Limits()) -> JobCgroup:
        name = f"test-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        return create_job_cgroup(name, limits)

    def start(self, cg: JobCgroup, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """The lead's pattern: gated, its own process group, in the group before the program runs."""
        proc = subprocess.Popen(gated_argv([*argv, self.token]), stdin=subprocess.PIPE, process_group=0,
                                **kwargs)  # type: ignore[call-overload]
        self.popens.append(proc)
        cg.add(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        proc.stdin = None  # communicate() must not flush it again
        return proc

    def pid_from(self, path: Path) -> int:
        assert wait_for(path.exists, 5), f"{path} never appeared"
        pid = int(path.read_text())
        self.pids.append(pid)
        return pid

    def clean_up(self) -> list[Path]:
        for proc in self.popens:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for pid in self.pids:  # by pid, only if it is still ours
            with contextlib.suppress(OSError):
                if self.token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        for name in self.names:
            with contextlib.suppress(Exception):
                kill_cgroup(name, timeout=3)  # what the processes started (sleeps) without the token
        left = [p for name in self.names for p in [*ROOT.glob(f"*/cbas/{name}"), ROOT / "cbas" / name] if p.exists()]
        for folder in left:  # the module failed: by hand, so a broken module leaves nothing either
            with contextlib.suppress(OSError):
                for pid in map(int, (folder / "cgroup.procs").read_text().split()):  # in our group: ours
                    os.kill(pid, signal.SIGKILL)
        for folder in left:
            wait_for(lambda: not (folder / "cgroup.procs").read_text().strip(), 3)
            with contextlib.suppress(OSError):
                folder.rmdir()
        return left


@pytest.fixture
def env() -> Iterator[Env]:
    ok, why = cgroup_support() if os.geteuid() == 0 else (False, "not root")
    if not ok:
        pytest.skip(f"job cgroups unavailable: {why}")
    env = Env()
    try:
        yield env
    finally:
        left = env.clean_up()
    assert not left, f"kill_cgroup left groups behind (removed by hand): {left}"


def wait_for(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_a_daemon_is_tracked_and_killed(env: Env, tmp_path: Path) -> None:
    group = env.make()
    top = env.start(group, [sys.executable, "-c", DAEMON, str(tmp_path / "pid")])
    assert top.wait(5) == 0
    daemon = env.pid_from(tmp_path / "pid")
    assert daemon in group.pids()
    assert os.getsid(daemon) != os.getsid(0) and os.getpgid(daemon) != top.pid  # left our session
    with contextlib.suppress(ProcessLookupError):  # process-group killing: the group is empty
        os.killpg(top.pid, signal.SIGKILL)
    time.sleep(0.1)
    assert alive(daemon)
    group.kill(timeout=5)
    assert wait_for(lambda: not alive(daemon), 2)
    assert group.pids() == set()


def test_freeze_stops_a_setsid_grandchild(env: Env, tmp_path: Path) -> None:
    group = env.make()
    counter = tmp_path / "counter"
    top = env.start(group, ["/bin/sh", "-c", TICKER, "top", str(tmp_path / "pid"), str(counter)])
    ticker = env.pid_from(tmp_path / "pid")
    assert os.getsid(ticker) == ticker and wait_for(lambda: size(counter) > 0, 5)
    os.killpg(top.pid, signal.SIGSTOP)  # process-group stopping misses the grandchild
    try:
        before = size(counter)
        assert wait_for(lambda: size(counter) > before, 2)
    finally:
        os.killpg(top.pid, signal.SIGCONT)
    group.freeze(timeout=5)
    try:
        before = size(counter)
        time.sleep(0.3)
        assert size(counter) == before
    finally:
        group.thaw()
    assert wait_for(lambda: size(counter) > before, 2)


def test_max_processes_stops_a_fork_bomb(env: Env, tmp_path: Path) -> None:
    group = env.make(Limits(max_processes=5))
    with open(tmp_path / "err", "wb") as err:  # a file: the sleeps would hold a pipe open
        bomb = env.start(group, ["/bin/sh", "-c", 'i=0; while [ $i -lt 50 ]; do sleep 30 & i=$((i+1)); done',
                                 "bomb"], stderr=err)
    bomb.wait(10)
    assert b"fork" in (tmp_path / "err").read_bytes().lower()  # dash: "Cannot fork"
    assert 1 <= len(group.pids()) <= 4  # the shell (gone now) counted as one of the five
    version, folder = group.limits["processes"]
    if (folder / "pids.peak").exists():
        assert int((folder / "pids.peak").read_text()) <= 5
    assert group.limit_hit() == ["processes"]


def test_memory_limit_kills_a_hog_without_swap(env: Env) -> None:
    group = env.make(Limits(memory_bytes=64 << 20))
    hog = ("chunks = []\nfor _ in range(64):\n    chunks.append(b'\\x01' * (8 << 20))\n"  # 512 MiB, touched
           "print('survived', flush=True)")
    proc = env.start(group, [sys.executable, "-c", hog], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == -signal.SIGKILL and b"survived" not in out
    assert group.limit_hit() == ["memory"]
    version, folder = group.limits["memory"]
    if version == 1 and (folder / "memory.memsw.limit_in_bytes").exists():
        assert int((folder / "memory.memsw.limit_in_bytes").read_text()) == 64 << 20
    if version == 2 and (folder / "memory.swap.max").exists():
        assert (folder / "memory.swap.max").read_text().strip() == "0"


def test_kill_cgroup_ends_a_group_whose_worker_died(env: Env, tmp_path: Path) -> None:
    group = env.make(Limits(max_processes=20, memory_bytes=256 << 20))
    env.start(group, [sys.executable, "-c", DAEMON, str(tmp_path / "pid")]).wait(5)
    daemon = env.pid_from(tmp_path / "pid")
    name, dirs = group.name, list(group.dirs)
    assert len(dirs) >= 2 and all(d.is_dir() for d in dirs)
    del group  # the worker is gone: only the name is left
    kill_cgroup(name)
    assert wait_for(lambda: not alive(daemon), 2)
    assert not any(d.exists() for d in dirs)
    kill_cgroup(name)
    kill_cgroup(f"never-made-{uuid.uuid4().hex[:8]}")


def test_remove_twice_is_fine(env: Env) -> None:
    group = env.make(Limits(max_processes=3))
    group.remove()
    group.remove()
    assert not any(d.exists() for d in group.dirs)
    group.kill(timeout=1)  # nothing left to kill: fine too


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "../x", "x y", "a\n", "/abs", "x" * 300])
def test_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError):
        create_job_cgroup(name, Limits())
    with pytest.raises(ValueError):
        kill_cgroup(name)


def test_the_gate_holds_the_program_until_it_is_in_the_group(env: Env) -> None:
    group = env.make()
    prog = 'cat /proc/self/cgroup; sleep 30 & sleep 30 & echo started; wait'
    proc = subprocess.Popen(gated_argv(["/bin/sh", "-c", prog, "prog", env.token]), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, process_group=0)
    env.popens.append(proc)
    time.sleep(0.2)
    assert proc.poll() is None and b"cbas-gate" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    group.add(proc.pid)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    seen: list[str] = []
    for line in iter(proc.stdout.readline, b""):
        seen.append(line.decode().strip())
        if seen[-1] == "started":
            break
    # cat is the first process the program forks: it started inside every hierarchy of the group
    assert sum(line.endswith(f"/cbas/{group.name}") for line in seen) == len(group.dirs), seen
    assert proc.pid in group.pids() and len(group.pids()) == 3  # the program (same pid) + 2 sleeps
    assert os.readlink(f"/proc/{proc.pid}/fd/0") == "/dev/null"


def test_the_gate_never_runs_the_program_if_the_worker_dies_first() -> None:
    proc = subprocess.Popen(gated_argv(["/bin/echo", "ran"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = proc.communicate(b"", timeout=5)  # stdin closed, no line: the worker is gone
    assert proc.returncode == 111 and out == b""


def test_a_job_user_cannot_leave_its_group(env: Env) -> None:
    group = env.make(Limits(max_processes=50, memory_bytes=256 << 20))
    targets = [d.parent.parent / "cgroup.procs" for d in group.dirs]  # each hierarchy's root
    targets += [d.parent / "cgroup.procs" for d in group.dirs]  # cbas/ itself
    targets += [d / "escape" for d in group.dirs]  # a group of its own inside
    targets += [d / f for d in group.dirs for f in ("cgroup.freeze", "cgroup.kill", "pids.max", "memory.max",
                                                     "memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
                if (d / f).exists()]  # thawing itself, raising its limits
    script = ("import json, os, sys\nres = {}\n"
              "for t in sys.argv[1:-1]:\n"
              "    try:\n"
              "        os.mkdir(t) if t.endswith('/escape') else open(t, 'w').write(str(os.getpid()))\n"
              "        res[t] = 'moved'\n"
              "    except OSError as e:\n"
              "        res[t] = e.errno\n"
              "print(json.dumps({'tried': res, 'cgroup': open('/proc/self/cgroup').read()}))")
    python = "/usr/bin/python3"  # the venv's python lives under /root, out of nobody's reach
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {python} for the user nobody")
    proc = env.start(group, [python, "-c", script, *map(str, targets)], stdout=subprocess.PIPE,
                     user=65534, group=65534, extra_groups=[], cwd="/")
    out, _ = proc.communicate(timeout=10)
    report = json.loads(out)
    assert set(report["tried"].values()) <= {errno.EACCES, errno.EPERM}, report["tried"]
    inside = [line for line in report["cgroup"].splitlines() if line.endswith(f"/cbas/{group.name}")]
    assert len(inside) == len(group.dirs), report["cgroup"]


def test_v2_without_cgroup_kill_freezes_and_kills_in_rounds(env: Env, tmp_path: Path) -> None:
    group = env.make()
    if group.freezer != "v2":
        pytest.skip("no v2 freezer here")
    older = dataclasses.replace(group, can_kill=False)  # what kernels 5.2-5.13 offer
    env.start(older, [sys.executable, "-c", DAEMON, str(tmp_path / "pid")]).wait(5)
    daemon = env.pid_from(tmp_path / "pid")
    older.kill(timeout=5)
    assert wait_for(lambda: not alive(daemon), 2)


def test_the_v1_freezer_tracks_freezes_and_kills(env: Env, tmp_path: Path) -> None:
    """The fallback where no v2 hierarchy has cgroup.freeze (a group on the v1 freezer only)."""
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text(), ROOT)
    freezers = [m for m in mounts if "freezer" in m.controllers and not m.read_only]
    if not freezers:
        pytest.skip("no v1 freezer here")
    name = f"test-{uuid.uuid4().hex[:10]}"
    env.names.append(name)
    folder = freezers[0].path / cgroups.PARENT / name
    folder.mkdir(parents=True)
    group = JobCgroup(name, folder, "v1", [folder])
    counter = tmp_path / "counter"
    env.start(group, ["/bin/sh", "-c", TICKER, "top", str(tmp_path / "pid"), str(counter)])
    ticker = env.pid_from(tmp_path / "pid")
    assert ticker in group.pids() and wait_for(lambda: size(counter) > 0, 5)
    group.freeze(timeout=5)
    before = size(counter)
    time.sleep(0.3)
    assert size(counter) == before
    group.kill(timeout=5)  # frozen: v1 tasks die once thawed, which kill does
    assert wait_for(lambda: not alive(ticker), 2)
    assert group.describe() == "cgroup v1 (freezer)"


HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
39 31 0:36 / /sys/fs/cgroup/pids ro,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
42 31 0:39 / /mnt/other\\040cg rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_mountinfo_parsing() -> None:
    mounts = {str(m.path): m for m in parse_mountinfo(HYBRID, Path("/sys/fs/cgroup"))}
    assert set(mounts) == {"/sys/fs/cgroup/memory", "/sys/fs/cgroup/freezer", "/sys/fs/cgroup/cpu,cpuacct",
                           "/sys/fs/cgroup/pids", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"}
    assert mounts["/sys/fs/cgroup/memory"].controllers == {"memory"}
    assert mounts["/sys/fs/cgroup/cpu,cpuacct"].controllers == set()
    assert mounts["/sys/fs/cgroup/pids"].read_only and not mounts["/sys/fs/cgroup/freezer"].read_only
    assert mounts["/sys/fs/cgroup/unified"].version == 2
    assert [str(m.path) for m in parse_mountinfo(HYBRID, Path("/mnt/other cg"))] == ["/mnt/other cg"]
    (unified,) = parse_mountinfo(UNIFIED, Path("/sys/fs/cgroup"))
    assert unified.version == 2 and unified.path == Path("/sys/fs/cgroup")


def test_no_cgroup_filesystem_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(CgroupUnavailable):
        create_job_cgroup("nothing-here", Limits(), root=tmp_path)
    ok, why = cgroup_support(tmp_path)
    assert not ok and why
