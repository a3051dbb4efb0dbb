"""Who a job runs as: its own unprivileged uid, never the worker's (HTCondor's slot users).

A root worker takes a free slot, `cbas-slot<N>`, for the attempt: an account made on first use
(no home, no shell), held with a lock file while the job runs, and never handed out while any
process of that uid is still alive. So jobs on one host cannot read each other's environment,
signal each other or write each other's files. CBAS_JOB_USER names one fixed user instead, or
"worker" to run jobs as a non-root worker's own user (no isolation: said on every job).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from cbas.untrusted import SYSTEM_ENV

log = structlog.get_logger(__name__)

SLOTS = "slots"
WORKER = "worker"
SLOT_PREFIX = "cbas-slot"
KILL_ROUNDS = 40  # of 50 ms: a killed process is gone within a few


class JobUserUnavailable(RuntimeError):
    pass


@dataclass
class JobIdentity:
    name: str
    uid: int
    gid: int
    shared: str | None = None  # why this identity isolates the job from nothing, if so
    _lock_fd: int | None = field(default=None, repr=False)

    @property
    def user(self) -> tuple[int, int] | None:
        """(uid, gid) to drop to, or None when the worker already is this user."""
        return None if self.uid == os.geteuid() else (self.uid, self.gid)

    def release(self) -> None:
        """Give the slot back, leaving nothing of this job's for the next one of this uid: its
        processes (killed), its files in the host's shared scratch folders, its crontab."""
        if self._lock_fd is not None:
            sweep(self.uid, self.name)
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None


def acquire(setting: str, slot_dir: Path, slots: int = 64) -> JobIdentity:
    """The identity of one attempt; raises JobUserUnavailable with what to do."""
    root = os.geteuid() == 0
    if setting == WORKER or (not root and setting == _own_name()):
        if root:
            raise JobUserUnavailable("CBAS_JOB_USER=worker would run jobs as root; jobs never run as root")
        return JobIdentity(_own_name(), os.geteuid(), os.getegid(),
                           shared="the job runs as the worker's own user: it can read the worker's files and "
                                  "other jobs of this worker's user")
    if not root:
        raise JobUserUnavailable(
            f"this worker is not root, so it cannot run jobs as {setting!r} (or as a user of their own); "
            f"run the worker as root, or set CBAS_JOB_USER=worker to run jobs as {_own_name()!r} without isolation")
    if setting != SLOTS:
        try:
            entry = pwd.getpwnam(setting)
        except KeyError:
            raise JobUserUnavailable(f"job user {setting!r} does not exist on this machine") from None
        if entry.pw_uid == 0:
            raise JobUserUnavailable(f"job user {setting!r} is root; jobs never run as root")
        return JobIdentity(setting, entry.pw_uid, entry.pw_gid,
                           shared=f"every job of this machine runs as {setting!r}")
    return _take_slot(slot_dir, slots)


def _own_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _take_slot(slot_dir: Path, slots: int) -> JobIdentity:
    slot_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    busy = _uids_in_use()
    for number in range(1, slots + 1):
        fd = os.open(slot_dir / f"slot{number}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        name = f"{SLOT_PREFIX}{number}"
        entry = _slot_account(name)
        if entry.pw_uid in busy:  # a process of an earlier job lives on: not this uid
            log.warning("job_user.slot_busy", slot=name, uid=entry.pw_uid)
            os.close(fd)
            continue
        return JobIdentity(name, entry.pw_uid, entry.pw_gid, _lock_fd=fd)
    raise JobUserUnavailable(f"all {slots} job slots of this machine are in use")


@retry(retry=retry_if_exception_type(subprocess.CalledProcessError), stop=stop_after_attempt(8),
       wait=wait_random_exponential(multiplier=0.1, max=2.0), reraise=True)
def _useradd(name: str) -> None:
    try:  # another worker may have made it since we looked
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    # useradd refuses while /etc/passwd is locked by another useradd: retried
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "--comment", "CBAS job slot", name],
                   check=True, capture_output=True, text=True, env=SYSTEM_ENV)


def _slot_account(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    try:
        _useradd(name)
    except FileNotFoundError:
        raise JobUserUnavailable("useradd is not on this machine: create the cbas-slot<N> users, or set "
                                 "CBAS_JOB_USER") from None
    except subprocess.CalledProcessError as exc:
        raise JobUserUnavailable(f"could not create job user {name}: {exc.stderr.strip()}") from None
    log.info("job_user.created", user=name)
    return pwd.getpwnam(name)


# world-writable folders where a job may leave files for the next job of its uid
SHARED_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run/lock")
# System V IPC objects outlive their processes (kernel.shm_rmid_forced is 0 by default):
# /proc/sysvipc file, ipcrm flag, the columns holding the owner's and the creator's uid
_SYSV_IPC = (("shm", "-m", ("uid", "cuid")), ("msg", "-q", ("uid", "cuid")), ("sem", "-s", ("uid", "cuid")))


def _process_uids() -> dict[int, set[int]]:
    """pid -> its real, effective, saved and filesystem uids (a setuid program's included), for
    every process but zombies (dead: nothing left to run or to hold)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as status:
                for line in status:
                    if line.startswith("State:") and line.split()[1] == "Z":
                        break
                    if line.startswith("Uid:"):
                        found[int(entry.name)] = {int(uid) for uid in line.split()[1:]}
                        break
        except OSError:
            continue
    return found


def _uids_in_use() -> set[int]:
    uids: set[int] = set()
    for found in _process_uids().values():
        uids |= found
    return uids


def sweep(uid: int, name: str) -> None:
    """Kill what still runs as uid; remove what it left for the next job of its uid: its files in
    the shared scratch folders (and in world-writable folders below them, root's /tmp/.X11-unix
    say), its System V IPC objects, its crontab."""
    for _ in range(KILL_ROUNDS):  # until none is left (a fork meanwhile is caught by the next round)
        alive = [pid for pid, uids in _process_uids().items() if uid in uids]
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
        time.sleep(0.05)
    for path in _owned_in_shared_folders(uid):
        subprocess.run(["rm", "-rf", "--one-file-system", "--", path], capture_output=True, env=SYSTEM_ENV)
    for flag, ipc_id in _sysv_ipc_of(uid):
        subprocess.run(["ipcrm", flag, ipc_id], capture_output=True, env=SYSTEM_ENV)
    if shutil.which("crontab", path=SYSTEM_ENV["PATH"]):
        subprocess.run(["crontab", "-r", "-u", name], capture_output=True, env=SYSTEM_ENV)


def _owned_in_shared_folders(uid: int) -> list[str]:
    """What uid owns in the shared folders. The uid can create entries only in folders it owns
    (removed whole) or world-writable ones (looked into, links never followed): nothing else."""
    found, folders = [], list(SHARED_SCRATCH)
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_uid == uid:
                found.append(entry.path)
            elif stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_IWOTH and len(folders) < 4096:
                folders.append(entry.path)
    return found


def _sysv_ipc_of(uid: int) -> list[tuple[str, str]]:
    """(ipcrm flag, id) of every System V shared memory segment, queue and semaphore set that uid
    owns or created."""
    found = []
    for kind, flag, columns in _SYSV_IPC:
        try:
            header, *rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except (OSError, ValueError):
            continue
        names = header.split()
        for row in rows:
            values = dict(zip(names, row.split()))
            if any(values.get(column) == str(uid) for column in columns):
                found.append((flag, values[names[1]]))  # shmid / msqid / semid
    return found
