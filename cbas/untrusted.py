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
import subprocess
from pathlib import Path

JobUser = tuple[int, int]


class UnsafePath(OSError):
    """A job-controlled path that is a link, a device or otherwise not what the worker expects."""


SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # root's tools, whatever PATH says
MAX_DEPTH = 512  # folders in folders: deeper than any job needs, well short of Python's recursion


class TooDeep(UnsafePath):
    """A tree nested deeper than MAX_DEPTH folders (a job that made one is refused, not followed)."""


def depth_below(root: Path, base: str) -> int:
    relative = os.path.relpath(base, root)
    return 0 if relative == "." else relative.count(os.sep) + 1


def check_depth(root: Path, base: str) -> None:
    if depth_below(root, base) >= MAX_DEPTH:
        raise TooDeep(f"{root} has folders nested more than {MAX_DEPTH} deep")


def chown_tree(root: Path, user: JobUser) -> None:
    """Give a tree to the job, never following a link."""
    for base, dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        check_depth(root, base)
        for name in dirs + files:
            os.chown(name, *user, dir_fd=dir_fd, follow_symlinks=False)


def remove_tree(path: Path) -> None:
    """rm -rf, at any depth, never following a link or leaving the file system (shutil.rmtree
    recurses, and with ignore_errors leaves a deep tree behind, silently)."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, env=SYSTEM_ENV)


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
    """Bytes of the files below root; TooDeep for a tree no job needs (a limit fails closed)."""
    total = 0
    for base, _, files in os.walk(root):
        check_depth(root, base)
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


def copy_tree(source: Path, target: Path) -> None:
    """Copy a tree the job may change while it is copied (the local twin of a disk snapshot):
    every entry is opened from its folder's descriptor without following a link; links are
    copied as links, files and folders with their modes less setuid and setgid (root owns the
    copy: a setuid file of the job's must not become a setuid-root one), sockets, FIFOs and
    devices left out. target is made 0700; its contents keep their modes."""
    target.mkdir(mode=0o700)
    stack = [(os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC), target)]
    while stack:  # iterative: a tree thousands of folders deep is no RecursionError
        dir_fd, out = stack.pop()
        try:
            with os.scandir(dir_fd) as entries:
                for entry in entries:
                    _copy_entry(entry, dir_fd, out / entry.name, stack)
        finally:
            os.close(dir_fd)


def _copy_entry(entry: os.DirEntry[str], dir_fd: int, dest: Path, stack: list[tuple[int, Path]]) -> None:
    try:
        info = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(info.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(entry.name, dir_fd=dir_fd), dest)
    elif stat.S_ISDIR(info.st_mode):
        try:
            fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:  # swapped for something else since it was listed
            return
        dest.mkdir(mode=0o700)
        os.chmod(dest, mode)
        stack.append((fd, dest))
    elif stat.S_ISREG(info.st_mode):
        try:
            fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                while os.sendfile(out, fd, None, 1 << 30):
                    pass
                os.fchmod(out, mode)
            finally:
                os.close(out)
        finally:
            os.close(fd)
