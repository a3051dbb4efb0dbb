"""The job's cgroup: every process a job starts is tracked, frozen, killed and limited through it,
so neither `setsid`, double forks nor daemons escape a checkpoint's freeze or outlive the job.

Tracking, freezing and killing use cgroup v2 where a cgroup2 hierarchy has cgroup.freeze (the
unified mount at the root, or root/unified on hybrid machines), else the v1 freezer. Each limit
goes to v2 where that hierarchy has the controller, else to the v1 controller; a limit nothing
can enforce is listed in JobCgroup.unenforced. Groups are <hierarchy>/cbas/<name>, root-owned:
a job's process (another user) can neither leave its group nor make one.

A job's first process must join the group before it runs anything of the job's, or what it
forks first could run outside: cbas.worker.launch waits, as root, until add(pid) is done.

Every method is synchronous and bounded in time: the worker calls them through asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

log = structlog.get_logger(__name__)

ROOT = Path("/sys/fs/cgroup")
PARENT = "cbas"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_POLL = 0.01  # seconds between reads while waiting on the kernel
_CONTROLLER = {"processes": "pids", "memory": "memory"}  # limit -> controller

class CgroupError(OSError):
    pass


class CgroupUnavailable(CgroupError):
    """No cgroup can track a job here (the reason says why)."""


@dataclass(frozen=True)
class Limits:
    max_processes: int | None = None
    memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if any(v is not None and v < 1 for v in (self.max_processes, self.memory_bytes)):
            raise ValueError(f"limits must be positive: {self}")


@dataclass(frozen=True)
class Mount:
    path: Path
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: from the mount options; v2: read from cgroup.controllers
    read_only: bool


def parse_mountinfo(text: str, root: Path = ROOT) -> list[Mount]:
    """The cgroup hierarchies mounted at or under root, as /proc/self/mountinfo lists them."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        path = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
        if path != root and root not in path.parents:
            continue
        read_only = "ro" in fields[5].split(",") or "ro" in tail[2].split(",")
        v2 = tail[0] == "cgroup2"
        controllers = frozenset() if v2 else frozenset(tail[2].split(",")) & {"freezer", "pids", "memory"}
        mounts.append(Mount(path, 2 if v2 else 1, controllers, read_only))
    return mounts


def _mounts(root: Path) -> list[Mount]:
    with open("/proc/self/mountinfo") as f:
        found = parse_mountinfo(f.read(), root)
    # v2's controllers are what its root offers (none on hybrid machines that keep them in v1)
    return [Mount(m.path, 2, frozenset(_read(m.path / "cgroup.controllers").split()), m.read_only)
            if m.version == 2 else m for m in found]


def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):  # cgroup.procs of a big group needs several reads
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _keyed(path: Path) -> dict[str, str]:
    """A flat-keyed cgroup file (cgroup.events, pids.events, memory.oom_control) as a dict."""
    return dict(line.split(None, 1) for line in _read(path).splitlines() if " " in line)


def _wait(done: Callable[[], bool], until: float) -> bool:
    while not done():
        if time.monotonic() >= until:
            return False
        time.sleep(_POLL)
    return True


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"not a cgroup name (letters, digits, '-', '_', '.'): {name!r}")


def _parent(mount: Mount) -> Path:
    parent = mount.path / PARENT
    parent.mkdir(mode=0o755, exist_ok=True)
    return parent


def _tracking(root: Path) -> tuple[Path, str, list[Mount]]:
    """The cbas/ folder that tracks, freezes and kills ("v2" or "v1" freezer), and the mounts."""
    if os.geteuid() != 0:
        raise CgroupUnavailable("the worker is not root: it cannot make cgroups")
    mounts = _mounts(root)
    if not mounts:
        raise CgroupUnavailable(f"no cgroup filesystem is mounted at or under {root}")
    problems = [f"{m.path} is mounted read-only" for m in mounts if m.read_only]
    for mount in sorted((m for m in mounts if m.version == 2 and not m.read_only), key=lambda m: m.path != root):
        if (_parent(mount) / "cgroup.freeze").exists():  # only non-root v2 groups have the file
            return mount.path / PARENT, "v2", mounts
        problems.append(f"{mount.path} has no cgroup.freeze (Linux older than 5.2)")
    for mount in (m for m in mounts if "freezer" in m.controllers and not m.read_only):
        return _parent(mount), "v1", mounts
    raise CgroupUnavailable("; ".join(problems + ["no writable v1 freezer is mounted"]))


def _enable_v2(mount: Mount, controller: str) -> bool:
    """Let cbas/ and its groups use a v2 controller: enabled in the root's and cbas/'s subtree."""
    if controller not in mount.controllers or mount.read_only:
        return False
    try:
        for folder in (mount.path, _parent(mount)):
            if controller not in _read(folder / "cgroup.subtree_control").split():
                _write(folder / "cgroup.subtree_control", f"+{controller}")
    except OSError as exc:
        log.warning("cgroup.controller_unavailable", controller=controller, error=str(exc))
        return False
    return True


def _place_limits(mounts: list[Mount], limits: Limits) -> tuple[dict[str, tuple[int, Path]], list[str]]:
    """Where each limit is enforced (limit -> (version, cbas/ folder)), and the limits nowhere."""
    placed, unenforced = {}, []
    wanted = {"processes": limits.max_processes, "memory": limits.memory_bytes}
    for limit in (k for k, v in wanted.items() if v is not None):
        controller = _CONTROLLER[limit]
        v2 = next((m for m in mounts if m.version == 2 and _enable_v2(m, controller)), None)
        v1 = next((m for m in mounts if controller in m.controllers and not m.read_only), None)
        if v2 is not None:
            placed[limit] = (2, v2.path / PARENT)
        elif v1 is not None:
            placed[limit] = (1, _parent(v1))
        else:
            unenforced.append(limit)
    return placed, unenforced


def _set_limits(placed: dict[str, tuple[int, Path]], limits: Limits) -> None:
    for limit, (version, group) in placed.items():
        if limit == "processes":
            _write(group / "pids.max", str(limits.max_processes))
        elif version == 2:
            _write(group / "memory.max", str(limits.memory_bytes))
            if (group / "memory.swap.max").exists():  # swap would let the job outgrow its limit
                _write(group / "memory.swap.max", "0")
        else:
            _write(group / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (group / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no swap either
                _write(group / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))


@dataclass
class JobCgroup:
    name: str
    tracking: Path  # the group that freezes and kills
    freezer: str | None  # "v2", "v1", or None (leftovers without a freezer: kill_cgroup only)
    dirs: list[Path]  # every folder of the group, tracking first
    can_kill: bool = False  # tracking has v2's cgroup.kill (Linux 5.14)
    limits: dict[str, tuple[int, Path]] = field(default_factory=dict)  # limit -> (version, group)
    unenforced: list[str] = field(default_factory=list)

    def add(self, pid: int) -> None:
        for folder in self.dirs:  # tracking first: a pid in any folder is in the tracking one
            _write(folder / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for folder in self.dirs:
            try:
                found.update(int(p) for p in _read(folder / "cgroup.procs").split())
            except FileNotFoundError:  # removed already
                pass
        return found

    def _set_frozen(self, frozen: bool) -> None:
        if self.freezer == "v2":
            _write(self.tracking / "cgroup.freeze", "1" if frozen else "0")
        elif self.freezer == "v1":
            _write(self.tracking / "freezer.state", "FROZEN" if frozen else "THAWED")

    def _frozen(self) -> bool:
        if self.freezer == "v2":
            return _keyed(self.tracking / "cgroup.events").get("frozen") == "1"
        return self.freezer == "v1" and _read(self.tracking / "freezer.state").strip() == "FROZEN"

    def freeze(self, timeout: float = 10.0) -> None:
        """Stop every process of the group; raises (thawed again) if the kernel takes too long."""
        if self.freezer is None:
            raise CgroupError(f"cgroup {self.name} has no freezer")
        self._set_frozen(True)
        if not _wait(self._frozen, time.monotonic() + timeout):
            self.thaw()
            raise CgroupError(f"cgroup {self.name} did not freeze within {timeout} s")
        log.info("cgroup.frozen", cgroup=self.name)

    def thaw(self) -> None:
        self._set_frozen(False)
        log.info("cgroup.thawed", cgroup=self.name)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL every process of the group and wait until none is left (raises on timeout)."""
        deadline, first = time.monotonic() + timeout, True
        while self.pids():
            if time.monotonic() >= deadline:
                raise CgroupError(f"cgroup {self.name} still holds {sorted(self.pids())} after {timeout} s")
            if self.can_kill and first:  # atomic: races no fork
                _write(self.tracking / "cgroup.kill", "1")
            else:  # no cgroup.kill, or a straggler outside the tracking group (a half-done add)
                self._kill_round(deadline)
            first = False
            _wait(lambda: not self.pids(), min(deadline, time.monotonic() + 0.5))
        log.info("cgroup.killed", cgroup=self.name)

    def _kill_round(self, deadline: float) -> None:
        # frozen, nobody forks and no pid read can be reused before its SIGKILL (without a
        # freezer, only leftovers kill_cgroup found, a pid could be reused: a tiny window)
        if self.freezer is not None:
            self._set_frozen(True)
            _wait(self._frozen, min(deadline, time.monotonic() + 1.0))  # best effort (D state)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.freezer is not None:
            self._set_frozen(False)  # v1 frozen tasks die only once thawed

    def remove(self) -> None:
        """Remove every folder of the (empty) group; removing it twice is fine."""
        errors = []
        for folder in reversed(self.dirs):
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        log.info("cgroup.removed", cgroup=self.name)

    def limit_hit(self) -> list[str]:
        """The limits the group's processes ran into. Only what broke the job counts: memory.events'
        `max` and v1's memory.failcnt also count reclaiming page cache, so they are not read."""
        hit = []
        for limit, (version, group) in self.limits.items():
            try:
                if limit == "processes":
                    counts = _keyed(group / "pids.events")
                    hit += [limit] if int(counts.get("max", "0")) > 0 else []
                else:
                    counts = _keyed(group / ("memory.events" if version == 2 else "memory.oom_control"))
                    hit += [limit] if int(counts.get("oom_kill", "0")) > 0 or int(counts.get("oom", "0")) > 0 \
                        or counts.get("under_oom") == "1" else []
            except FileNotFoundError:  # removed already: nothing to say
                pass
        return hit

    def describe(self) -> str:
        v2 = (["freeze"] + (["kill"] if self.can_kill else [])) if self.freezer == "v2" else []
        v1 = ["freezer"] if self.freezer == "v1" else []
        for limit, (version, _) in self.limits.items():
            (v2 if version == 2 else v1).append(_CONTROLLER[limit])
        parts = [f"v2 ({', '.join(v2)})"] if v2 else []
        parts += [f"v1 ({', '.join(v1)})"] if v1 else []
        unenforced = f", unenforced: {', '.join(self.unenforced)}" if self.unenforced else ""
        return "cgroup " + " + ".join(parts) + unenforced


def create_job_cgroup(name: str, limits: Limits, root: Path = ROOT) -> JobCgroup:
    _check_name(name)
    dirs: list[Path] = []
    try:
        tracking, freezer, mounts = _tracking(root)
        placed, unenforced = _place_limits(mounts, limits)
        placed = {limit: (version, parent / name) for limit, (version, parent) in placed.items()}
        dirs = list(dict.fromkeys([tracking / name] + [group for _, group in placed.values()]))
        for folder in dirs:
            folder.mkdir(mode=0o755, exist_ok=True)  # exists: a restarted worker's attempt, same job
        _set_limits(placed, limits)
    except CgroupUnavailable:
        raise
    except OSError as exc:
        for folder in dirs:  # what was made (busy ones, a restarted worker's, stay)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise CgroupUnavailable(f"cgroup {name} could not be made: {exc}") from exc
    group = JobCgroup(name, dirs[0], freezer, dirs, (dirs[0] / "cgroup.kill").exists(), placed, unenforced)
    log.info("cgroup.created", cgroup=name, support=group.describe())
    return group


def _existing(name: str, root: Path) -> JobCgroup | None:
    """The folders a group called name left in any hierarchy, freezer first."""
    found = [(m, m.path / PARENT / name) for m in _mounts(root) if (m.path / PARENT / name).is_dir()]
    if not found:
        return None
    kinds = [("v2" if m.version == 2 and (d / "cgroup.freeze").exists() else
              "v1" if "freezer" in m.controllers else None, d) for m, d in found]
    kinds.sort(key=lambda kd: {"v2": 0, "v1": 1, None: 2}[kd[0]])
    tracking = kinds[0][1]
    return JobCgroup(name, tracking, kinds[0][0], [d for _, d in kinds], (tracking / "cgroup.kill").exists())


def kill_cgroup(name: str, root: Path = ROOT, timeout: float = 10.0) -> None:
    """Kill and remove the group called name wherever it is (its JobCgroup is gone: the worker
    died); nothing to do if there is none."""
    _check_name(name)
    if os.geteuid() != 0:
        return
    group = _existing(name, root)
    if group is not None:
        group.kill(timeout)
        group.remove()


def cgroup_support(root: Path = ROOT) -> tuple[bool, str]:
    """Whether job cgroups can be made here, and which (or why not)."""
    try:
        tracking, freezer, _ = _tracking(root)
    except OSError as exc:  # CgroupUnavailable, or cbas/ could not be made
        return False, str(exc)
    return True, f"cgroup {freezer} tracking in {tracking}"
