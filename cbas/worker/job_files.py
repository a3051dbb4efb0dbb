"""The job's folders on its machine, and the few file operations the root worker does in them.

    disk/job              root 0711   nothing in it can be created, renamed or replaced by the job
    disk/job/work         job 0700    the working directory (input sandbox; directory/dmtcp state)
    disk/job/checkpoint   job 0700    $CBAS_CHECKPOINT_DIR (signal state, DMTCP's tmpdir)
    disk/job/prologue     root 0755   prologue scripts, run as the job
    disk/job/logs         root 0700   stdout, stderr: the job writes them only through its fds
    disk/job/hook         root 0711   the DMTCP hook's socket (owned by the job, 0600)
    disk/worker           root 0700   staging, scratch and validation space, the machine key

The job's own folders are hostile ground: what the worker does in them goes through
cbas.untrusted.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cbas.untrusted import JobUser, UnsafePath, chown_tree, remove_tree

@dataclass(frozen=True)
class JobLayout:
    disk: Path

    @property
    def root(self) -> Path:
        return self.disk / "job"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def prologue(self) -> Path:
        return self.root / "prologue"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def stdout(self) -> Path:
        return self.logs / "stdout"

    @property
    def stderr(self) -> Path:
        return self.logs / "stderr"

    @property
    def hook(self) -> Path:
        return self.root / "hook"

    @property
    def worker(self) -> Path:
        return self.disk / "worker"

    @property
    def staging(self) -> Path:
        return self.worker / "staging"

    @property
    def scratch(self) -> Path:
        return self.worker / "scratch"

    @property
    def validate(self) -> Path:
        return self.worker / "validate"


def lay_out(layout: JobLayout, user: JobUser | None) -> None:
    """A fresh set of folders for an attempt: nothing of an earlier one is kept."""
    remove_tree(layout.root)
    for sub in ("staging", "scratch", "validate"):
        remove_tree(layout.worker / sub)
    layout.root.mkdir(parents=True)
    for path in (layout.work, layout.checkpoint, layout.prologue, layout.logs, layout.hook):
        path.mkdir()
    layout.stdout.touch()
    layout.stderr.touch()
    secure(layout, user)


def secure(layout: JobLayout, user: JobUser | None) -> None:
    """Owners and modes as the layout says, for a fresh layout or a disk made from a snapshot
    (whose folders the job may have changed): the worker's parts root's, the job's parts the job's."""
    layout.worker.mkdir(mode=0o700, exist_ok=True)
    for sub in (layout.staging, layout.scratch, layout.validate):
        sub.mkdir(mode=0o700, exist_ok=True)
    for path, mode in ((layout.root, 0o711), (layout.prologue, 0o755), (layout.logs, 0o700), (layout.hook, 0o711),
                       (layout.worker, 0o700)):
        _own_folder(path, None, mode)
    for log in (layout.stdout, layout.stderr):
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePath(f"{log} is not a regular file")
            os.fchmod(fd, 0o600)
            if os.geteuid() == 0:
                os.fchown(fd, 0, 0)
        finally:
            os.close(fd)
    for path in (layout.work, layout.checkpoint):
        _own_folder(path, user, 0o700)
        if user is not None:
            chown_tree(path, user)


def _own_folder(path: Path, user: JobUser | None, mode: int) -> None:
    """path must be a real folder (a link in its place is refused); set its owner and mode."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{path} is not a folder")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, *(user or (0, 0)))
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
