"""Taking the state: what is read while the job is held, what after, and what a job cannot turn."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbas.checkpoint.store import StateChanged, UnsupportedFile
from tests.checkpoint.test_store import store_at

IMAGE = frozenset({".dmtcp/ckpt_*.dmtcp"})


def test_an_immutable_file_is_read_after_the_hold_as_it_was_then(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / ".dmtcp").mkdir(parents=True)
    image = state / ".dmtcp" / "ckpt_a.dmtcp"
    image.write_bytes(b"generation 1" * 100_000)
    store = store_at(tmp_path)
    snapshot = store.snapshot(state, tmp_path / "staging", immutable=IMAGE)
    assert [f.path for f in snapshot.files] == [".dmtcp/ckpt_a.dmtcp"] and not snapshot.staged  # only opened
    # the job goes on: DMTCP writes its next image as a new file and renames it over the old one
    (state / ".dmtcp" / "next").write_bytes(b"generation 2" * 100_000)
    os.replace(state / ".dmtcp" / "next", image)
    store.commit(snapshot, "c1", "dmtcp")
    store.release(snapshot)
    out = tmp_path / "out"
    store_at(tmp_path).restore("c1", out)
    assert (out / ".dmtcp" / "ckpt_a.dmtcp").read_bytes() == b"generation 1" * 100_000


def test_a_file_truncated_while_it_is_read_fails_the_checkpoint_not_the_worker(tmp_path: Path) -> None:
    # read through mmap, this killed the whole worker with SIGBUS; what was read of a torn image
    # is no checkpoint either (issue 13: a file that changes while captured fails it cleanly)
    state = tmp_path / "state"
    (state / ".dmtcp").mkdir(parents=True)
    image = state / ".dmtcp" / "ckpt_a.dmtcp"
    image.write_bytes(os.urandom(8 << 20))
    store = store_at(tmp_path)
    snapshot = store.snapshot(state, tmp_path / "staging", immutable=IMAGE)
    os.truncate(image, 3 << 20)  # in place: the open descriptor sees it
    with pytest.raises(StateChanged, match="changed while it was captured"):
        store.commit(snapshot, "c1", "dmtcp")
    store.release(snapshot)
    assert store_at(tmp_path).checkpoint_ids() == []  # nothing half-written counts


def test_excluded_paths_are_left_out_links_included(tmp_path: Path) -> None:
    # DMTCP writes its restart script as a symbolic link, in the images' folder and the working one
    state = tmp_path / "state"
    (state / ".dmtcp").mkdir(parents=True)
    (state / "data.txt").write_text("kept")
    for folder in (state, state / ".dmtcp"):
        (folder / "dmtcp_restart_script_x.sh").write_text("#!/bin/sh\n")
        (folder / "dmtcp_restart_script.sh").symlink_to("dmtcp_restart_script_x.sh")
    store = store_at(tmp_path)
    exclude = frozenset({"dmtcp_restart_script*.sh", ".dmtcp/dmtcp_restart_script*.sh"})
    snapshot = store.snapshot(state, tmp_path / "staging", exclude=exclude)
    assert [f.path for f in snapshot.files] == ["data.txt"]
    with pytest.raises(UnsupportedFile, match="symbolic link"):  # a link anywhere else is still refused
        store.snapshot(state, tmp_path / "staging2")


def test_a_restore_never_grants_setuid_or_setgid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "sub").mkdir(parents=True)
    (state / "shell").write_bytes(b"\x7fELF")
    os.chmod(state / "shell", 0o6755)
    os.chmod(state / "sub", 0o3775)
    store = store_at(tmp_path)
    store.save(state, "c1", "directory", tmp_path / "staging")
    out = tmp_path / "out"
    store_at(tmp_path).restore("c1", out)
    assert (out / "shell").stat().st_mode & 0o7777 == 0o755
    assert (out / "sub").stat().st_mode & 0o7000 == 0


def test_collecting_garbage_spares_the_chunks_a_snapshot_under_way_reuses(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "big.bin").write_bytes(os.urandom(2 << 20))
    store = store_at(tmp_path)
    store.save(state, "c1", "directory", tmp_path / "s1")
    (state / "big.bin").rename(tmp_path / "kept.bin")
    (state / "other.bin").write_bytes(os.urandom(1 << 20))
    store.save(state, "c2", "directory", tmp_path / "s2")
    (state / "other.bin").unlink()
    (tmp_path / "kept.bin").rename(state / "big.bin")
    fresh = store_at(tmp_path)  # as after a restart: c1's chunks are known, not read again
    snapshot = fresh.snapshot(state, tmp_path / "s3")
    assert not snapshot.staged  # reuses c1's chunks
    fresh.gc_grace_seconds = 0  # no grace: the pin alone must spare them
    fresh.collect_garbage(keep=1)  # c1 goes; its chunks are pinned by the snapshot under way
    fresh.commit(snapshot, "c3", "directory")
    fresh.release(snapshot)
    out = tmp_path / "out"
    store_at(tmp_path).restore("c3", out)  # would be "chunk ... is missing" without the pin
    assert (out / "big.bin").read_bytes() == (state / "big.bin").read_bytes()


def test_a_folder_swapped_for_a_link_is_refused_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("root only")
    state = tmp_path / "state"
    state.mkdir()
    (state / "sub").symlink_to(secret)
    with pytest.raises(UnsupportedFile):
        store_at(tmp_path).snapshot(state, tmp_path / "staging")


@pytest.mark.parametrize("zeros", [False, True])
def test_reading_block_by_block_cuts_exactly_where_cutting_the_whole_file_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zeros: bool) -> None:
    from fastcdc import fastcdc

    from cbas.checkpoint import chunking

    monkeypatch.setattr(chunking, "BLOCK", 5 << 20)  # many block boundaries in a small file
    data = (bytes(7 << 20) if zeros else b"") + os.urandom((23 << 20) + 12345)
    path = tmp_path / "state.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        streamed = [bytes(piece) for block in chunking.pieces(fd, len(data)) for piece in block]
    finally:
        os.close(fd)
    whole = [data[c.offset:c.offset + c.length]
             for c in fastcdc(memoryview(data), chunking.MIN_CHUNK, chunking.AVG_CHUNK, chunking.MAX_CHUNK)]
    assert streamed == whole  # the same chunks: deduplication across checkpoints is unchanged


def test_a_state_over_its_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    from cbas.checkpoint.store import StateTooLarge

    state = tmp_path / "state"
    state.mkdir()
    with open(state / "sparse.bin", "wb") as out:
        out.truncate(1 << 40)  # a terabyte of nothing: reading it would hold the job for an hour
    with pytest.raises(StateTooLarge, match="StateSizeLimit"):
        store_at(tmp_path).snapshot(state, tmp_path / "staging", size_limit=1 << 20)
