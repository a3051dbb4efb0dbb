"""A checkpoint's manifest: what files and folders it holds, in which chunks, sealed.

Pure records and checks (no I/O). A manifest is written last, so it makes the checkpoint exist;
it is sealed with an HMAC under the job's checkpoint key, and read back as untrusted input.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from pydantic import BaseModel


class CorruptCheckpoint(RuntimeError):
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


def list_id(chunk_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(chunk_ids).encode()).hexdigest()


_SEAL_CONTEXT = b"cbas-manifest-v2\n"


def _seal_of(body: bytes, key: bytes) -> bytes:
    return hmac.new(key, _SEAL_CONTEXT + body, hashlib.sha256).hexdigest().encode()


def seal(body: bytes, key: bytes) -> bytes:
    """A manifest carries an HMAC-SHA256 under the job's checkpoint key on a last line: a flipped
    byte, a manifest the job wrote itself, or one of another job (another key) is refused."""
    return body + b"\n" + _seal_of(body, key) + b"\n"


def unseal(blob: bytes, key: bytes) -> bytes:
    body, _, trailer = blob.rstrip(b"\n").rpartition(b"\n")
    if not hmac.compare_digest(_seal_of(body, key), trailer):
        raise ValueError("its seal does not match: changed, forged, or of another job")
    return body


def inside(root: Path, relative: str) -> Path:
    """A manifest path as a path under root; a manifest is untrusted input."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise CorruptCheckpoint(f"manifest path {relative!r} is not a plain relative path")
    return root.joinpath(*parts)
