"""File operations of the root worker in folders a job controls.

A job can turn any name in its own folders into a symbolic link, a FIFO or a device at any
moment. So every component below a trusted folder is opened with O_NOFOLLOW from the folder's
fd, files are checked to be regular files on the open descriptor, and trees are walked with
fwalk, which holds each folder open: a folder swapped for a link while it is walked is never
followed.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

JobUser = tuple[int, int]


class UnsafePath(OSError):
    """A job-controlled path that is a link, a device or otherwise not what the worker expects."""


def chown_tree(root: Path, user: JobUser) -> None:
    """Give a tree to the job, never following a link."""
    for _, dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in dirs + files:
            os.chown(name, *user, dir_fd=dir_fd, follow_symlinks=False)


def open_beneath(base: Path, relative: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open base/relative without following a link anywhere below base; base itself is trusted."""
    parts = [part for part in relative.split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise UnsafePath(f"{relative!r} is not a plain relative path")
    dir_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                raise
            except OSError:  # ENOTDIR or ELOOP: a file or a link where a folder should be
                raise UnsafePath(f"{base}/{relative}: {part} is not a folder") from None
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the last component is a link
                raise UnsafePath(f"{base}/{relative} is a symbolic link") from None
            raise
    finally:
        os.close(dir_fd)


def read_job_file(base: Path, relative: str, limit: int = 64 * 1024) -> bytes:
    """A small regular file the job could have tampered with (never a link, FIFO or device)."""
    fd = open_beneath(base, relative)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f"{base}/{relative} is not a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def make_executable(base: Path, relative: str) -> bool:
    """chmod a+rx of a regular file of the job's; False if it is not one (a link is not)."""
    try:
        fd = open_beneath(base, relative)
    except (FileNotFoundError, UnsafePath, IsADirectoryError):
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        os.fchmod(fd, stat.S_IMODE(info.st_mode) | 0o555)
        return True
    finally:
        os.close(fd)


def remove_beneath(base: Path, relative: str) -> None:
    """Unlink a file of the job's (a link is removed itself, never what it points at)."""
    parts = relative.rsplit("/", 1)
    folder, name = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
    dir_fd = open_beneath(base, folder, os.O_RDONLY | os.O_DIRECTORY) if folder else os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)


def tree_size(root: Path) -> int:
    total = 0
    for base, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except FileNotFoundError:
                continue
    return total


def tail(path: Path, lines: int) -> str:
    """The last lines of a log."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, OSError):
        return ""
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(max(0, size - 64 * 1024))
        return b"\n".join(handle.read().splitlines()[-lines:]).decode(errors="replace")
