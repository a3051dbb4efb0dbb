"""Reading a job's state into chunks: the walk that opens nothing through a link, content-defined
cutting (FastCDC, ~1 MiB on average) of each file as it is read, and the chunks' encoding.

Files are read, never mapped (a file truncated while it is read is a short read, not a SIGBUS),
block by block, so a file of any size costs a few blocks of memory.
"""

from __future__ import annotations

import os
import stat
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterator

import zstandard
from fastcdc import fastcdc

from cbas.checkpoint.manifest import CorruptCheckpoint
from cbas.untrusted import MAX_DEPTH, depth_below

MIN_CHUNK = 256 * 1024
AVG_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
_RAW, _ZSTD = b"R", b"Z"
_SAMPLE = 64 * 1024
# read this much of a file at a time: under glibc's 32 MiB mmap threshold, so the buffers are reused,
# not mapped and faulted in afresh for every block (that was half the time of reading 32 MiB ones)
BLOCK = 16 * 1024 * 1024
_PROBE = 64 * 1024


class UnsupportedFile(ValueError):
    pass


class StateChanged(UnsupportedFile):
    """A file changed, grew, shrank or vanished while it was captured."""


def excluded(relative: str, patterns: frozenset[str]) -> bool:
    return any(fnmatchcase(relative, pattern) for pattern in patterns)


def _cuts(view: memoryview) -> list[memoryview]:
    return [view[c.offset:c.offset + c.length] for c in fastcdc(view, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)]


def first_cut(view: bytes | memoryview) -> int:
    """Where the first chunk of `view` ends: a file's cut when view holds MAX_CHUNK bytes from a
    boundary, or all that is left of the file."""
    return next(iter(fastcdc(view, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK))).length


def pieces(fd: int, size: int) -> Iterator[list[memoryview]]:
    """The file's content-defined chunks, a block's worth at a time: views of bytes read once,
    that nothing changes (what is hashed is what is stored). A block's last cut is where the block
    ends, not where the content says: that tail is cut again with the next block (FastCDC's
    choice at a byte depends only on the bytes before it, so no cut falls inside the tail).
    `size` (what fstat said) keeps small files' reads small; a file that grew is read to its end."""
    tail: memoryview | None = None
    left = size
    while True:
        block = os.read(fd, min(BLOCK, left) if left > 0 else _PROBE)  # past the size: the end, or more
        left -= len(block)
        if not block:
            if tail is not None:
                yield [tail]
            return
        rest = memoryview(block)
        cut: list[memoryview] = []
        if tail is not None:  # the chunk that spans the two blocks: the only bytes copied
            joint = memoryview(bytes(tail) + block[:MAX_CHUNK])
            first = joint[:first_cut(joint)]
            cut.append(first)
            rest = rest[len(first) - len(tail):]
        cut += _cuts(rest) if len(rest) else []
        tail = cut.pop()  # FastCDC's last chunk ends where the data does: cut it again with more
        if cut:
            yield cut


def encode(data: memoryview | bytes) -> bytes:
    """zstd, unless a sample shows the data does not compress (then raw, and no time lost)."""
    sample = bytes(data[:_SAMPLE])
    if len(zstandard.ZstdCompressor(level=1).compress(sample)) > 0.95 * len(sample):
        return _RAW + data  # one copy (bytes + a view), not two
    compressed = zstandard.ZstdCompressor(level=3).compress(data)
    return _ZSTD + compressed if len(compressed) < len(data) else _RAW + data


def decode(blob: bytes, chunk_id: str) -> bytes | memoryview:
    kind, body = blob[:1], memoryview(blob)[1:]  # a view: a raw chunk is not copied again
    if kind == _RAW:
        return body
    if kind == _ZSTD:
        try:
            return zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_CHUNK)
        except zstandard.ZstdError as exc:
            raise CorruptCheckpoint(f"chunk {chunk_id[:12]} does not decompress: {exc}") from None
    raise CorruptCheckpoint(f"chunk {chunk_id[:12]} has an unknown encoding")


def walk(root: Path, exclude: frozenset[str]) -> Iterator[tuple[str, os.stat_result, int | None]]:
    """Every folder (descriptor None) and regular file (an O_NOFOLLOW descriptor, the caller's to
    close) below root, sorted, skipping paths matching `exclude`; anything else is refused."""
    for base, dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        if depth_below(root, base) >= MAX_DEPTH:
            raise UnsupportedFile(f"folders nested more than {MAX_DEPTH} deep; a checkpoint holds no such tree")
        prefix = "" if base == str(root) else os.path.relpath(base, root).replace(os.sep, "/") + "/"
        kept = []
        for name in sorted(dirs) + sorted(files):
            relative = prefix + name
            if excluded(relative, exclude):
                continue
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise StateChanged(f"{relative} vanished while the state was captured") from None
            if stat.S_ISLNK(info.st_mode):
                raise UnsupportedFile(f"{relative} is a symbolic link; checkpoints hold only files and folders")
            if stat.S_ISDIR(info.st_mode):
                kept.append(name)
                yield relative, info, None
                continue
            if not stat.S_ISREG(info.st_mode):
                raise UnsupportedFile(f"{relative} is not a regular file or folder")
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                raise StateChanged(f"{relative} vanished while the state was captured") from None
            except OSError as exc:
                raise UnsupportedFile(f"{relative} cannot be read: {exc.strerror}") from None
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):  # swapped between the listing and the open
                os.close(fd)
                raise UnsupportedFile(f"{relative} is not a regular file or folder")
            yield relative, opened, fd
        dirs[:] = sorted(kept)
