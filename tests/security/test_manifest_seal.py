"""Checkpoint manifests are sealed with the job's checkpoint key, which no job can read: a job
that rewrites its own manifest (or one that swaps in another job's) is found out at restore, and
the checkpoint is refused by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cbas import authority
from cbas.checkpoint.store import ChunkStore, CorruptCheckpoint
from cbas.local.blobs import FolderBlobStore

MASTER_KEY = b"the master's key, for these tests"


def store_of(root: Path, job_id: str) -> ChunkStore:
    return ChunkStore(FolderBlobStore(root / "blobs"), job_id, authority.checkpoint_key(MASTER_KEY, job_id))


def saved(tmp_path: Path, job_id: str, content: bytes = b"genuine state\n") -> ChunkStore:
    state = tmp_path / f"state-{job_id}"
    state.mkdir()
    (state / "state.txt").write_bytes(content)
    store = store_of(tmp_path, job_id)
    store.save(state, "a0001-n00001", "directory", tmp_path / f"staging-{job_id}")
    return store


def body_of(blob: bytes) -> dict:  # type: ignore[type-arg]
    return json.loads(blob.rstrip(b"\n").rpartition(b"\n")[0])


def sha256_sealed(manifest: dict) -> bytes:  # type: ignore[type-arg]
    """What the old seal was: a bare sha256 anyone can recompute."""
    body = json.dumps(manifest).encode()
    return body + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n"


def test_a_genuine_manifest_restores(tmp_path: Path) -> None:
    saved(tmp_path, "ja")
    store_of(tmp_path, "ja").restore("a0001-n00001", tmp_path / "out")
    assert (tmp_path / "out" / "state.txt").read_bytes() == b"genuine state\n"


def test_a_forged_manifest_with_a_recomputed_sha256_is_refused(tmp_path: Path) -> None:
    store = saved(tmp_path, "ja")
    # the job plants its own content: a chunk it uploads, and a manifest pointing at it
    evil = b"#!/bin/sh\necho pwned\n"
    chunk_id = hashlib.sha256(evil).hexdigest()
    store.blobs.put_bytes(store.chunk_key(chunk_id), b"R" + evil)
    key = store.manifest_key("a0001-n00001")
    manifest = body_of(store.blobs.get_bytes(key))
    manifest["files"][0].update(chunks=[chunk_id], size=len(evil), mode=0o4755,
                                sha256=hashlib.sha256(chunk_id.encode()).hexdigest())
    manifest["chunk_sizes"] = {chunk_id: len(evil)}
    store.blobs.put_bytes(key, sha256_sealed(manifest))
    with pytest.raises(CorruptCheckpoint, match="a0001-n00001"):
        store_of(tmp_path, "ja").restore("a0001-n00001", tmp_path / "out")
    assert not (tmp_path / "out" / "state.txt").exists()


def test_a_manifest_of_another_job_is_refused(tmp_path: Path) -> None:
    a = saved(tmp_path, "ja", b"job a's state\n")
    b = store_of(tmp_path, "jb")
    sealed_for_a = a.blobs.get_bytes(a.manifest_key("a0001-n00001"))
    for chunk_key in a.blobs.list("jobs/ja/chunks/"):  # its chunks too, so only the seal can tell
        b.blobs.put_bytes(chunk_key.replace("jobs/ja/", "jobs/jb/", 1), a.blobs.get_bytes(chunk_key))
    b.blobs.put_bytes(b.manifest_key("a0001-n00001"), sealed_for_a)  # as it is, sealed with a's key
    with pytest.raises(CorruptCheckpoint, match="a0001-n00001"):
        b.restore("a0001-n00001", tmp_path / "out-1")
    renamed = body_of(sealed_for_a) | {"job_id": "jb"}  # or renamed to b and sealed the old way
    b.blobs.put_bytes(b.manifest_key("a0001-n00001"), sha256_sealed(renamed))
    with pytest.raises(CorruptCheckpoint, match="a0001-n00001"):
        b.restore("a0001-n00001", tmp_path / "out-2")


def test_a_store_without_the_job_key_cannot_read_its_checkpoints(tmp_path: Path) -> None:
    saved(tmp_path, "ja")
    wrong = ChunkStore(FolderBlobStore(tmp_path / "blobs"), "ja", authority.checkpoint_key(b"another master", "ja"))
    with pytest.raises(CorruptCheckpoint, match="a0001-n00001"):
        wrong.manifest("a0001-n00001")


def test_the_store_needs_a_key() -> None:
    with pytest.raises(TypeError):
        ChunkStore(FolderBlobStore(Path("/nonexistent")), "ja")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="key"):
        ChunkStore(FolderBlobStore(Path("/nonexistent")), "ja", b"")
