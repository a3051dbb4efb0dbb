from pathlib import Path

import pytest

from cbas.backends import BlobNotFound
from cbas.local.blobs import FolderBlobStore


def test_put_get_list_delete(tmp_path: Path) -> None:
    blobs = FolderBlobStore(tmp_path / "blobs")
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * (3 << 20))
    moved: list[int] = []
    blobs.put_file("jobs/a/input.tar.zst", source, progress=moved.append)
    assert sum(moved) == 3 << 20 and len(moved) == 3  # progress per 1 MiB chunk
    blobs.put_bytes("jobs/a/jdl", b"Executable = \"x\"")
    blobs.put_bytes("jobs/b/jdl", b"other")
    assert blobs.list("jobs/a/") == ["jobs/a/input.tar.zst", "jobs/a/jdl"]
    assert blobs.size("jobs/a/input.tar.zst") == 3 << 20
    out = tmp_path / "out" / "copy.bin"
    blobs.get_file("jobs/a/input.tar.zst", out)
    assert out.read_bytes() == source.read_bytes()
    blobs.delete("jobs/a/jdl")
    assert not blobs.exists("jobs/a/jdl")
    with pytest.raises(BlobNotFound):
        blobs.get_bytes("jobs/a/jdl")
    with pytest.raises(BlobNotFound):
        blobs.get_file("jobs/zzz", out)


def test_writes_are_atomic_and_leave_no_partial_file(tmp_path: Path) -> None:
    blobs = FolderBlobStore(tmp_path)
    blobs.put_bytes("k", b"old")

    class Broken(Exception):
        pass

    def explode(out: object) -> None:
        out.write(b"half")  # type: ignore[attr-defined]
        raise Broken

    with pytest.raises(Broken):
        blobs._write("k", explode)
    assert blobs.get_bytes("k") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_keys_cannot_escape_the_folder(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        FolderBlobStore(tmp_path).put_bytes(key, b"x")
