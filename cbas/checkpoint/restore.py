"""Putting a checkpoint back: every chunk fetched, decompressed, verified and written in parallel.

Each file is made at its full size first; then a pool of threads takes chunks in order across
all files, fetches one, checks its length and SHA-256 (never skipped: a chunk that does not match
fails the restore) and writes it at its offset (pwrite). At most a bounded number of chunks is in
memory at a time.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from cbas.backends import BlobNotFound, BlobStore
from cbas.checkpoint.chunking import decode
from cbas.checkpoint.manifest import CorruptCheckpoint, FileEntry, Manifest, inside

IN_FLIGHT = 32


def fetch_chunk(blobs: BlobStore, key: str, chunk_id: str, expected: int) -> bytes | memoryview:
    try:
        data = decode(blobs.get_bytes(key), chunk_id)
    except BlobNotFound:
        raise CorruptCheckpoint(f"chunk {chunk_id[:12]} is missing") from None
    if len(data) != expected or hashlib.sha256(data).hexdigest() != chunk_id:
        raise CorruptCheckpoint(f"chunk {chunk_id[:12]} does not match its sha256")
    return data


OPEN_AT_ONCE = 256  # files open at a time: a state of many small files needs no more descriptors


def restore_files(blobs: BlobStore, chunk_key: Callable[[str], str], manifest: Manifest, target: Path,
                  workers: int) -> None:
    """Write the manifest's folders and files below target."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in manifest.dirs:
        inside(target, entry.path).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(manifest.files), OPEN_AT_ONCE):
            _restore_some(blobs, chunk_key, manifest, manifest.files[start:start + OPEN_AT_ONCE], target, pool)
    for entry in manifest.dirs:
        inside(target, entry.path).chmod((entry.mode | 0o700) & 0o777)


def _restore_some(blobs: BlobStore, chunk_key: Callable[[str], str], manifest: Manifest, entries: list[FileEntry],
                  target: Path, pool: ThreadPoolExecutor) -> None:
    sizes = manifest.chunk_sizes
    opened: list[tuple[int, FileEntry]] = []
    try:
        pending: list[Future[None]] = []
        for entry in entries:
            path = inside(target, entry.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            opened.append((fd, entry))
            os.ftruncate(fd, entry.size)
            offset = 0
            for chunk_id in entry.chunks:
                pending.append(pool.submit(_write, blobs, chunk_key(chunk_id), chunk_id, sizes[chunk_id], fd, offset))
                offset += sizes[chunk_id]
                if len(pending) > IN_FLIGHT:
                    pending.pop(0).result()
        for future in pending:
            future.result()
        for fd, entry in opened:
            os.fchmod(fd, entry.mode & 0o777)  # never setuid, setgid or sticky
    finally:
        for fd, _ in opened:
            os.close(fd)


def _write(blobs: BlobStore, key: str, chunk_id: str, expected: int, fd: int, offset: int) -> None:
    data = memoryview(fetch_chunk(blobs, key, chunk_id, expected))
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
