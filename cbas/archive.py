"""tar + zstd archives of input, prologue and output sandboxes, and their safe unpacking.

Archives are untrusted input: unpacking refuses absolute paths, '..', links and device files,
and bounds the total size, so nothing can be written outside the target directory.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import zstandard

from cbas.untrusted import MAX_DEPTH, UnsafePath, open_beneath

MAX_UNPACKED_BYTES = 64 << 30
# a sandbox may expand this many times its packed size, past RATIO_FLOOR bytes: real data packs
# well, but not a thousandfold (a 96 KB archive of 3 GiB of zeros is a bomb, not a data set)
MAX_RATIO = 1000
RATIO_FLOOR = 1 << 30
_CHUNK = 1 << 20


class ArchiveError(ValueError):
    pass


@dataclass(frozen=True)
class Member:
    """A file to archive: where it is now, and its name inside the archive."""

    source: Path
    name: str


def pack(members: Iterable[Member], target: Path, level: int = 3) -> int:
    """Write a tar.zst of the given regular files and directories; returns its size in bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    compressor = zstandard.ZstdCompressor(level=level, threads=-1)
    with open(target, "wb") as raw, compressor.stream_writer(raw, closefd=False) as compressed:
        with tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for member in members:
                _add(tar, member)
    return target.stat().st_size


def pack_beneath(base: Path, names: Iterable[str], target: Path, level: int = 3) -> list[str]:
    """Archive the files and folders `names` below base, a folder a job controls: every entry is
    opened from its folder's descriptor without following a link, and read through that
    descriptor (a name swapped for a link meanwhile is never followed). Returns the names that
    are missing or not plain files and folders (links among them); nothing is written without any."""
    missing: list[str] = []
    opened: list[tuple[str, int]] = []
    for name in names:
        try:
            opened.append((name, open_beneath(base, name.strip("/"))))
        except (OSError, UnsafePath):
            missing.append(name)
    if opened:
        target.parent.mkdir(parents=True, exist_ok=True)
        compressor = zstandard.ZstdCompressor(level=level, threads=-1)
        with open(target, "wb") as raw, compressor.stream_writer(raw, closefd=False) as compressed:
            with tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for name, fd in opened:
                    if not _add_fd(tar, fd, name.strip("/")):
                        missing.append(name)
    return missing


def _add_fd(tar: tarfile.TarFile, fd: int, name: str) -> bool:
    """Add the file or folder open at fd (closing it); False if it is neither."""
    stack = [(fd, name)]
    added = True
    while stack:  # iterative: no depth is too deep
        fd, arcname = stack.pop()
        try:
            info = os.fstat(fd)
            entry = tarfile.TarInfo(arcname)
            entry.mode, entry.mtime = stat.S_IMODE(info.st_mode) & 0o777, int(info.st_mtime)
            if stat.S_ISDIR(info.st_mode):
                entry.type = tarfile.DIRTYPE
                tar.addfile(entry)
                with os.scandir(fd) as children:
                    names = sorted(child.name for child in children)
                for child in reversed(names):
                    try:
                        stack.append((os.open(child, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                              dir_fd=fd), f"{arcname}/{child}"))
                    except OSError:  # a link, or gone: left out
                        continue
            elif stat.S_ISREG(info.st_mode):
                entry.size = info.st_size
                with os.fdopen(os.dup(fd), "rb") as handle:
                    tar.addfile(entry, _Exactly(handle, info.st_size))
            else:
                added = added and arcname != name
        finally:
            os.close(fd)
    return added


class _Exactly:
    """A file read as exactly `size` bytes (a file the job grew or truncated meanwhile is cut or
    padded, never a broken archive)."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle, self.left = handle, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.handle.read(n)
        data += b"\0" * (n - len(data))
        self.left -= len(data)
        return data


def _add(tar: tarfile.TarFile, member: Member) -> None:
    source = member.source
    if source.is_symlink():
        raise ArchiveError(f"{source} is a symbolic link; links are not archived (copy the file instead)")
    if source.is_dir():
        tar.add(source, arcname=member.name, recursive=False)
        for child in sorted(source.iterdir()):
            _add(tar, Member(child, f"{member.name}/{child.name}"))
    elif source.is_file():
        tar.add(source, arcname=member.name, recursive=False)
    else:
        raise ArchiveError(f"{source} is not a regular file or directory")


def pack_directory(directory: Path, target: Path, exclude: frozenset[str] = frozenset()) -> int:
    """Archive the contents of a directory (not the directory itself)."""
    members = [Member(child, child.name) for child in sorted(directory.iterdir()) if child.name not in exclude]
    return pack(members, target)


def _check(member: tarfile.TarInfo, target: Path) -> Path:
    name = member.name
    if name.startswith("/") or os.path.isabs(name):
        raise ArchiveError(f"archive member {name!r} has an absolute path")
    parts = Path(name).parts
    if ".." in parts:
        raise ArchiveError(f"archive member {name!r} leaves the target directory")
    if len(parts) > MAX_DEPTH:
        raise ArchiveError(f"archive member {name[:80]!r}... is nested more than {MAX_DEPTH} folders deep")
    if not (member.isfile() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "device or special file"
        raise ArchiveError(f"archive member {name!r} is a {kind}; only files and directories are accepted")
    destination = (target / name).resolve()
    if destination != target and target not in destination.parents:
        raise ArchiveError(f"archive member {name!r} leaves the target directory")
    if member.isfile() and (destination == target or destination.is_dir()):
        raise ArchiveError(f"archive member {name!r} is a file where a directory is")
    return destination


def unpack(source: Path | BinaryIO, target: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> list[str]:
    """Unpack a tar.zst into target; returns the member names. Refuses anything unsafe, and an
    archive that would expand past max_bytes or MAX_RATIO times its own size."""
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    handle = open(source, "rb") if isinstance(source, Path) else source
    if isinstance(source, Path):
        max_bytes = min(max_bytes, max(RATIO_FLOOR, MAX_RATIO * source.stat().st_size))
    total = 0
    names: list[str] = []
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(handle)
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                destination = _check(member, target)
                names.append(member.name)
                if member.isdir():
                    destination.mkdir(parents=True, exist_ok=True)
                    destination.chmod((member.mode & 0o777) | 0o700)  # never setuid, setgid or sticky
                    continue
                total += member.size
                if total > max_bytes:
                    raise ArchiveError(f"archive would expand to more than {max_bytes} bytes "
                                       f"(at most {MAX_RATIO} times its size, and the job's DiskLimit)")
                destination.parent.mkdir(parents=True, exist_ok=True)
                extracted = tar.extractfile(member)
                assert extracted is not None
                with open(destination, "wb") as out:
                    while chunk := extracted.read(_CHUNK):
                        out.write(chunk)
                destination.chmod(member.mode & 0o777)
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise ArchiveError(f"archive is corrupt: {exc}") from None
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:  # a file and a folder of one name
        raise ArchiveError(f"archive members clash: {exc.strerror}: {exc.filename}") from None
    finally:
        if isinstance(source, Path):
            handle.close()
    return names


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
