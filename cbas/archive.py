"""tar + zstd archives of input, prologue and output sandboxes, and their safe unpacking.

Archives are untrusted input: unpacking refuses absolute paths, '..', links and device files,
and bounds the total size, so nothing can be written outside the target directory.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import zstandard

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
