"""The chunked checkpoint store: content-defined chunks, stored once, verified on restore.

A checkpoint is a directory's files, each cut into content-defined chunks (FastCDC, ~1 MiB on
average). A chunk is stored once per job under its sha256, zstd-compressed unless it does not
compress; a manifest listing files, modes, sizes and chunk lists, written last, makes the
checkpoint exist. A new checkpoint stores only chunks the job does not have yet, so a small change
to a big state costs little. Restore checks every chunk's sha256 and length.

    jobs/<id>/chunks/<sha256[:2]>/<sha256>
    jobs/<id>/ckpt/<checkpoint id>/manifest.json

Taking a checkpoint has two halves: snapshot() reads the state while the job is quiesced (it
chunks, hashes, and copies only new chunks to a local staging folder), commit() uploads them and
the manifest after the job has been let go.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import zstandard
from fastcdc import fastcdc
from pydantic import BaseModel, ValidationError

from cbas.backends import BlobNotFound, BlobStore
from cbas.models import utcnow

MIN_CHUNK = 256 * 1024
AVG_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
_RAW, _ZSTD = b"R", b"Z"
_SAMPLE = 64 * 1024


class CorruptCheckpoint(RuntimeError):
    pass


class UnsupportedFile(ValueError):
    pass


class FileEntry(BaseModel):
    path: str  # relative, '/'-separated
    mode: int
    size: int
    chunks: list[str]  # chunk sha256 ids, in order
    sha256: str  # sha256 of the chunk id list: the file's identity, verified through its chunks


class DirEntry(BaseModel):
    path: str
    mode: int


class Manifest(BaseModel):
    format: int = 1
    job_id: str
    checkpoint_id: str
    strategy: str
    created_at: str = ""
    files: list[FileEntry]
    dirs: list[DirEntry] = []
    chunk_sizes: dict[str, int]  # raw length of every chunk the files use
    total_bytes: int
    new_bytes: int  # bytes this checkpoint had to store (compressed)
    stdout_bytes: int = 0  # log lengths when taken: a restore rewinds the logs to them
    stderr_bytes: int = 0


@dataclass
class Snapshot:
    """A checkpoint taken but not yet committed: its file list and the new chunks, staged."""

    files: list[FileEntry]
    dirs: list[DirEntry]
    chunk_sizes: dict[str, int]
    staged: dict[str, Path] = field(default_factory=dict)  # new chunk id -> staged blob

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _list_id(chunk_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(chunk_ids).encode()).hexdigest()


def _encode(data: memoryview | bytes) -> bytes:
    """zstd, unless a sample shows the data does not compress (then raw, and no time lost)."""
    sample = bytes(data[:_SAMPLE])
    if len(zstandard.ZstdCompressor(level=1).compress(sample)) > 0.95 * len(sample):
        return _RAW + bytes(data)
    compressed = zstandard.ZstdCompressor(level=3).compress(data)
    return _ZSTD + compressed if len(compressed) < len(data) else _RAW + bytes(data)


def _decode(blob: bytes, chunk_id: str) -> bytes:
    kind, body = blob[:1], blob[1:]
    if kind == _RAW:
        return body
    if kind == _ZSTD:
        try:
            return zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_CHUNK)
        except zstandard.ZstdError as exc:
            raise CorruptCheckpoint(f"chunk {chunk_id[:12]} does not decompress: {exc}") from None
    raise CorruptCheckpoint(f"chunk {chunk_id[:12]} has an unknown encoding")


FileStamp = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


def _stamp(info: os.stat_result) -> FileStamp:
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


class ChunkStore:
    """One job's checkpoints in a blob store. Transfers run in parallel, bounded by `workers`.

    Like restic or git, a file whose size, times and inode are what they were at the previous
    snapshot (or restore) is not read again: its chunk list is reused. A file changed after that
    snapshot began is always read ("racily clean" files are not trusted).
    """

    def __init__(self, blobs: BlobStore, job_id: str, workers: int = 8) -> None:
        self.blobs = blobs
        self.job_id = job_id
        self.workers = workers
        self._known: set[str] | None = None
        self._seen: dict[str, tuple[FileStamp, FileEntry]] = {}  # path -> stamp and entry last time
        self._seen_since_ns = 0  # when the snapshot that filled _seen began
        self._sizes: dict[str, int] = {}  # chunk id -> raw length, for reused entries

    # --- keys ---------------------------------------------------------------------------------
    def chunk_key(self, chunk_id: str) -> str:
        return f"jobs/{self.job_id}/chunks/{chunk_id[:2]}/{chunk_id}"

    def manifest_key(self, checkpoint_id: str) -> str:
        return f"jobs/{self.job_id}/ckpt/{checkpoint_id}/manifest.json"

    def known_chunks(self) -> set[str]:
        """Chunks already stored for this job (listed once, then kept up to date)."""
        if self._known is None:
            self._known = {key.rsplit("/", 1)[1] for key in self.blobs.list(f"jobs/{self.job_id}/chunks/")}
        return self._known

    # --- taking a checkpoint ----------------------------------------------------------------------
    def snapshot(self, root: Path, staging: Path, exclude: frozenset[str] = frozenset()) -> Snapshot:
        """Chunk and hash every file under root; copy the chunks not stored yet into staging."""
        staging.mkdir(parents=True, exist_ok=True)
        known = self.known_chunks()
        snapshot = Snapshot(files=[], dirs=[], chunk_sizes={})
        began_ns = time.time_ns()
        seen: dict[str, tuple[FileStamp, FileEntry]] = {}
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            for path, relative in _walk(root, exclude):
                try:
                    info = path.lstat()
                except FileNotFoundError:
                    continue  # gone since it was listed: only a job not held still can do that
                if stat.S_ISDIR(info.st_mode):
                    snapshot.dirs.append(DirEntry(path=relative, mode=stat.S_IMODE(info.st_mode)))
                    continue
                entry = self._unchanged(relative, info, known)
                if entry is None:
                    try:
                        ids = self._chunk_file(path, pool, known, snapshot, staging)
                    except FileNotFoundError:
                        continue  # (DMTCP without its hook: the files after the resume, best effort)
                    entry = FileEntry(path=relative, mode=stat.S_IMODE(info.st_mode), size=info.st_size,
                                      chunks=ids, sha256=_list_id(ids))
                else:
                    snapshot.chunk_sizes.update((c, self._sizes[c]) for c in entry.chunks)
                snapshot.files.append(entry)
                seen[relative] = (_stamp(info), entry)
        self._seen, self._seen_since_ns = seen, began_ns
        self._sizes.update(snapshot.chunk_sizes)
        return snapshot

    def _unchanged(self, relative: str, info: os.stat_result, known: set[str]) -> FileEntry | None:
        previous = self._seen.get(relative)
        if previous is None or previous[0] != _stamp(info) or info.st_mtime_ns >= self._seen_since_ns:
            return None
        entry = previous[1]
        if entry.mode != stat.S_IMODE(info.st_mode) or not all(c in known and c in self._sizes for c in entry.chunks):
            return None
        return entry

    def remember(self, root: Path, manifest: "Manifest") -> None:
        """After a restore: the files just written are known, so the next snapshot skips them."""
        self._sizes.update(manifest.chunk_sizes)
        self.known_chunks().update(manifest.chunk_sizes)
        began = time.time_ns()
        self._seen = {}
        for entry in manifest.files:
            self._seen[entry.path] = (_stamp((root / entry.path).lstat()), entry)
        self._seen_since_ns = began

    def _chunk_file(self, path: Path, pool: ThreadPoolExecutor, known: set[str], snapshot: Snapshot,
                    staging: Path) -> list[str]:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return []
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    # hash each chunk in the pool as soon as its boundary is found (hashlib lets go
                    # of the GIL), so cutting and hashing overlap
                    bounds, futures = [], []
                    for chunk in fastcdc(view, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK):
                        bounds.append((chunk.offset, chunk.length))
                        futures.append(pool.submit(_sha256, view[chunk.offset:chunk.offset + chunk.length]))
                    ids = [future.result() for future in futures]
                    new = []
                    for chunk_id, (offset, length) in zip(ids, bounds):
                        snapshot.chunk_sizes[chunk_id] = length
                        if chunk_id not in known and chunk_id not in snapshot.staged:
                            snapshot.staged[chunk_id] = staging / chunk_id
                            new.append((chunk_id, offset, length))

                    def stage(item: tuple[str, int, int]) -> None:
                        chunk_id, offset, length = item
                        (staging / chunk_id).write_bytes(_encode(view[offset:offset + length]))

                    list(pool.map(stage, new))
                finally:
                    view.release()
        return ids

    def commit(self, snapshot: Snapshot, checkpoint_id: str, strategy: str, stdout_bytes: int = 0,
               stderr_bytes: int = 0) -> Manifest:
        """Upload the new chunks, then the manifest: only then does the checkpoint exist."""
        staged = list(snapshot.staged.items())

        def upload(item: tuple[str, Path]) -> int:
            chunk_id, path = item
            size = path.stat().st_size
            self.blobs.put_file(self.chunk_key(chunk_id), path)
            return size

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            new_bytes = sum(pool.map(upload, staged))
        manifest = Manifest(
            job_id=self.job_id, checkpoint_id=checkpoint_id, strategy=strategy, created_at=utcnow().isoformat(),
            files=snapshot.files, dirs=snapshot.dirs, chunk_sizes=snapshot.chunk_sizes,
            total_bytes=snapshot.total_bytes, new_bytes=new_bytes, stdout_bytes=stdout_bytes, stderr_bytes=stderr_bytes,
        )
        self.blobs.put_bytes(self.manifest_key(checkpoint_id), seal(manifest.model_dump_json().encode()))
        self.known_chunks().update(snapshot.staged)
        for path in snapshot.staged.values():
            path.unlink(missing_ok=True)
        return manifest

    def save(self, root: Path, checkpoint_id: str, strategy: str, staging: Path) -> Manifest:
        """snapshot() and commit() in one call, for callers that need no pause in between."""
        return self.commit(self.snapshot(root, staging), checkpoint_id, strategy)

    # --- restoring ----------------------------------------------------------------------------------
    def manifest(self, checkpoint_id: str) -> Manifest:
        try:
            manifest = Manifest.model_validate(json.loads(unseal(self.blobs.get_bytes(self.manifest_key(checkpoint_id)))))
        except BlobNotFound:
            raise CorruptCheckpoint(f"checkpoint {checkpoint_id} has no manifest") from None
        except (ValueError, ValidationError) as exc:
            raise CorruptCheckpoint(f"checkpoint {checkpoint_id} has an unreadable manifest: {str(exc)[:200]}") from None
        if manifest.job_id != self.job_id or manifest.checkpoint_id != checkpoint_id:
            raise CorruptCheckpoint(f"checkpoint {checkpoint_id}'s manifest names another checkpoint")
        for entry in manifest.files:
            if _list_id(entry.chunks) != entry.sha256:
                raise CorruptCheckpoint(f"checkpoint {checkpoint_id}: {entry.path}'s chunk list does not match its sha256")
            if sum(manifest.chunk_sizes.get(c, -1) for c in entry.chunks) != entry.size:
                raise CorruptCheckpoint(f"checkpoint {checkpoint_id}: {entry.path}'s chunks do not add up to its size")
        return manifest

    def restore(self, checkpoint_id: str, target: Path) -> Manifest:
        """Write the checkpoint's files into target, verifying every chunk on the way."""
        manifest = self.manifest(checkpoint_id)
        target.mkdir(parents=True, exist_ok=True)
        for entry in manifest.dirs:
            directory = _inside(target, entry.path)
            directory.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for entry in manifest.files:
                self._restore_file(entry, manifest, _inside(target, entry.path), pool)
        for entry in manifest.dirs:
            _inside(target, entry.path).chmod(entry.mode | 0o700)
        self.remember(target, manifest)
        return manifest

    def _fetch_chunk(self, chunk_id: str, expected: int) -> bytes:
        try:
            data = _decode(self.blobs.get_bytes(self.chunk_key(chunk_id)), chunk_id)
        except BlobNotFound:
            raise CorruptCheckpoint(f"chunk {chunk_id[:12]} is missing") from None
        if len(data) != expected or hashlib.sha256(data).hexdigest() != chunk_id:
            raise CorruptCheckpoint(f"chunk {chunk_id[:12]} does not match its sha256")
        return data

    def _restore_file(self, entry: FileEntry, manifest: Manifest, path: Path, pool: ThreadPoolExecutor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sizes = manifest.chunk_sizes
        with open(path, "wb") as out:
            for data in pool.map(lambda c: self._fetch_chunk(c, sizes[c]), entry.chunks):
                out.write(data)
        path.chmod(entry.mode)

    # --- forgetting -----------------------------------------------------------------------------------
    def checkpoint_ids(self) -> list[str]:
        keys = self.blobs.list(f"jobs/{self.job_id}/ckpt/")
        return sorted({key.split("/")[3] for key in keys if key.endswith("/manifest.json")})

    def collect_garbage(self, keep: int = 3, protect: Iterable[str] = ()) -> tuple[list[str], int]:
        """Keep the newest `keep` checkpoints (and `protect`ed ones); delete other manifests and
        every chunk no kept manifest uses. Returns the deleted checkpoint ids and chunk count."""
        ids = self.checkpoint_ids()
        kept = set(ids[-keep:]) | (set(protect) & set(ids))
        dropped = [cid for cid in ids if cid not in kept]
        used: set[str] = set()
        for cid in kept:
            try:
                used.update(self.manifest(cid).chunk_sizes)
            except CorruptCheckpoint:
                continue
        for cid in dropped:
            self.blobs.delete(self.manifest_key(cid))
        removed = 0
        for key in self.blobs.list(f"jobs/{self.job_id}/chunks/"):
            chunk_id = key.rsplit("/", 1)[1]
            if chunk_id not in used:
                self.blobs.delete(key)
                removed += 1
                self.known_chunks().discard(chunk_id)
        return dropped, removed


def seal(body: bytes) -> bytes:
    """A manifest carries its own sha256 on a last line, so any flipped byte is noticed."""
    return body + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n"


def unseal(blob: bytes) -> bytes:
    body, _, trailer = blob.rstrip(b"\n").rpartition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != trailer:
        raise ValueError("the manifest does not match its sha256")
    return body


def _inside(root: Path, relative: str) -> Path:
    """A manifest path as a path under root; a manifest is untrusted input."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise CorruptCheckpoint(f"manifest path {relative!r} is not a plain relative path")
    return root.joinpath(*parts)


def _walk(root: Path, exclude: frozenset[str]) -> Iterable[tuple[Path, str]]:
    """Every directory and regular file below root, sorted; anything else is refused."""
    for base, dirs, files in os.walk(root):
        dirs.sort()
        base_path = Path(base)
        for name in sorted(dirs) + sorted(files):
            if base_path == root and name in exclude:
                continue
            path = base_path / name
            relative = path.relative_to(root).as_posix()
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:
                continue  # gone since the folder was listed
            if stat.S_ISLNK(mode):
                raise UnsupportedFile(f"{relative} is a symbolic link; checkpoints hold only files and folders")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsupportedFile(f"{relative} is not a regular file or folder")
            yield path, relative
        dirs[:] = [d for d in dirs if not (base_path == root and d in exclude)]


def clear_directory(directory: Path) -> None:
    """Empty a folder before a restore, so files created after the checkpoint do not linger."""
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
