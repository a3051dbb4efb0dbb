from pathlib import Path

import pytest

from cbas.checkpoint import archives
from cbas.local.blobs import FolderBlobStore


def _saved(tmp_path: Path) -> tuple[FolderBlobStore, archives.Manifest]:
    blobs = FolderBlobStore(tmp_path / "blobs")
    archive = tmp_path / "state.tar.zst"
    archive.write_bytes(b"pretend archive" * 100)
    manifest = archives.new_manifest("j1", "a0001-n00001", "directory", archive, stdout=10, stderr=0)
    archives.save(blobs, manifest, archive)
    return blobs, manifest


def test_a_saved_checkpoint_verifies(tmp_path: Path) -> None:
    blobs, manifest = _saved(tmp_path)
    fetched, path = archives.fetch(blobs, "j1", "a0001-n00001", tmp_path)
    assert fetched.sha256 == manifest.sha256 and path.read_bytes() == b"pretend archive" * 100
    assert fetched.stdout_bytes == 10


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b.put_bytes("jobs/j1/ckpt/a0001-n00001/state.tar.zst", b"Pretend archive" + b"pretend archive" * 99), "sha256"),
        (lambda b: b.put_bytes("jobs/j1/ckpt/a0001-n00001/state.tar.zst", b"short"), "bytes, manifest says"),
        (lambda b: b.delete("jobs/j1/ckpt/a0001-n00001/state.tar.zst"), "no state archive"),
        (lambda b: b.delete("jobs/j1/ckpt/a0001-n00001/manifest.json"), "no manifest"),
        (lambda b: b.put_bytes("jobs/j1/ckpt/a0001-n00001/manifest.json", b"{not json"), "unreadable manifest"),
    ],
)
def test_any_damage_is_detected(tmp_path: Path, damage, message: str) -> None:
    blobs, _ = _saved(tmp_path)
    damage(blobs)
    with pytest.raises(archives.CorruptCheckpoint, match=message):
        archives.fetch(blobs, "j1", "a0001-n00001", tmp_path)


def test_the_manifest_is_written_last(tmp_path: Path) -> None:
    blobs = FolderBlobStore(tmp_path / "blobs")
    order: list[str] = []
    put_file, put_bytes = blobs.put_file, blobs.put_bytes
    blobs.put_file = lambda key, *a, **k: (order.append(key), put_file(key, *a, **k))[1]  # type: ignore[method-assign]
    blobs.put_bytes = lambda key, *a, **k: (order.append(key), put_bytes(key, *a, **k))[1]  # type: ignore[method-assign]
    archive = tmp_path / "s.tar.zst"
    archive.write_bytes(b"x")
    archives.save(blobs, archives.new_manifest("j", "c", "directory", archive, 0, 0), archive)
    assert order[-1].endswith("manifest.json")
