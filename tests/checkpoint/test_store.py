"""The chunked checkpoint store: exact round trips, dedupe, verification, garbage collection."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbas.checkpoint.store import ChunkStore, CorruptCheckpoint, StateChanged, UnsupportedFile, seal, unseal
from cbas.local.blobs import FolderBlobStore

MIB = 1 << 20
KEY = b"checkpoint key of job "  # a key per job, as the master derives them


def store_at(tmp: Path, job: str = "j") -> ChunkStore:
    return ChunkStore(FolderBlobStore(tmp / "blobs"), job, KEY + job.encode())


def tree_of(root: Path) -> dict[str, tuple[bytes | None, int]]:
    out = {}
    for path in sorted(root.rglob("*")):
        out[path.relative_to(root).as_posix()] = (None if path.is_dir() else path.read_bytes(), path.stat().st_mode & 0o777)
    return out


names = st.from_regex(r"[a-z0-9_.]{1,6}", fullmatch=True).filter(lambda n: n not in (".", ".."))
trees = st.dictionaries(
    st.lists(names, min_size=1, max_size=3).map("/".join),
    st.one_of(st.none(), st.tuples(st.binary(max_size=3000), st.sampled_from([0o600, 0o644, 0o755, 0o400]))),
    max_size=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees)
def test_any_tree_round_trips_exactly(tmp_path_factory, tree) -> None:
    root = tmp_path_factory.mktemp("state")
    for name, value in tree.items():
        path = root / name
        if any((root / p).is_file() for p in _prefixes(name)) or path.exists():
            continue
        if value is None:  # an (empty) folder
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(value[0])
            path.chmod(value[1])
    store = store_at(tmp_path_factory.mktemp("s"))
    store.save(root, "c1", "directory", tmp_path_factory.mktemp("staging"))
    out = tmp_path_factory.mktemp("out")
    store_at(store.blobs.root.parent).restore("c1", out)  # a fresh store: nothing remembered
    assert tree_of(out) == tree_of(root)


def _prefixes(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def test_links_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "link").symlink_to("/etc/passwd")
    with pytest.raises(UnsupportedFile, match="link is a symbolic link"):
        store_at(tmp_path).snapshot(tmp_path / "state", tmp_path / "staging")


def big_state(root: Path, size: int, seed: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "big.bin").write_bytes(random.Random(seed).randbytes(size))
    return root / "big.bin"


def test_unchanged_state_stores_nothing_and_small_changes_little(tmp_path: Path) -> None:
    state = tmp_path / "state"
    big = big_state(state, 16 * MIB)
    store = store_at(tmp_path)
    first = store.save(state, "c1", "directory", tmp_path / "staging")
    assert first.new_bytes >= 16 * MIB  # incompressible: stored raw, plus a byte of header per chunk
    assert store.save(state, "c2", "directory", tmp_path / "staging").new_bytes == 0
    data = bytearray(big.read_bytes())
    data[5 * MIB:5 * MIB] = b"inserted" * 1000  # an insertion shifts everything after it
    data[12 * MIB] ^= 1
    big.write_bytes(data)
    third = store.save(state, "c3", "directory", tmp_path / "staging")
    assert 0 < third.new_bytes < 10 * MIB  # content-defined chunks: only the chunks around the edits
    out = tmp_path / "out"
    store_at(tmp_path).restore("c3", out)
    assert (out / "big.bin").read_bytes() == bytes(data)


def test_a_file_rewritten_with_its_old_mtime_is_still_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    big = big_state(state, 2 * MIB)
    store = store_at(tmp_path)
    store.save(state, "c1", "directory", tmp_path / "staging")
    before = big.stat()
    data = bytearray(big.read_bytes())
    data[100] ^= 0xFF
    big.write_bytes(data)
    os.utime(big, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime; ctime moves
    store.save(state, "c2", "directory", tmp_path / "staging")
    out = tmp_path / "out"
    store_at(tmp_path).restore("c2", out)
    assert (out / "big.bin").read_bytes() == bytes(data)


def stored_blobs(tmp: Path) -> list[Path]:
    return sorted(p for p in (tmp / "blobs").rglob("*") if p.is_file())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(min_value=0), where=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_a_flipped_bit_anywhere_is_detected_on_restore(tmp_path_factory, which: int, where: int, bit: int) -> None:
    tmp = tmp_path_factory.mktemp("flip")
    state = tmp / "state"
    big_state(state, 3 * MIB)
    (state / "small.txt").write_text("compressible " * 1000)
    store_at(tmp).save(state, "c1", "directory", tmp / "staging")
    blobs = stored_blobs(tmp)
    victim = blobs[which % len(blobs)]
    data = bytearray(victim.read_bytes())
    data[where % len(data)] ^= 1 << bit
    victim.write_bytes(data)
    with pytest.raises(CorruptCheckpoint):
        store_at(tmp).restore("c1", tmp / "out")


def test_a_manifest_cannot_write_outside_the_target(tmp_path: Path) -> None:
    state = tmp_path / "state"
    big_state(state, 1000)
    store = store_at(tmp_path)
    store.save(state, "c1", "directory", tmp_path / "staging")
    key = store.manifest_key("c1")
    manifest = json.loads(unseal(store.blobs.get_bytes(key), KEY + b"j"))
    manifest["files"][0]["path"] = "../escaped.bin"
    store.blobs.put_bytes(key, seal(json.dumps(manifest).encode(), KEY + b"j"))  # correctly sealed, still refused
    with pytest.raises(CorruptCheckpoint, match="not a plain relative path"):
        store_at(tmp_path).restore("c1", tmp_path / "out")
    assert not (tmp_path / "escaped.bin").exists()


def test_garbage_collection_keeps_the_newest_and_what_they_use(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = store_at(tmp_path)
    for number in range(1, 5):
        big_state(state, MIB, seed=number)  # a new state each time
        (state / "shared.txt").write_text("same in every checkpoint")
        store.save(state, f"c{number}", "directory", tmp_path / "staging")
    aged(tmp_path)  # older than the grace period
    dropped, removed = store.collect_garbage(keep=2, protect=["c1"])
    assert dropped == ["c2"] and removed >= 1
    assert store.checkpoint_ids() == ["c1", "c3", "c4"]
    for checkpoint_id in ("c1", "c3", "c4"):
        store_at(tmp_path).restore(checkpoint_id, tmp_path / f"out-{checkpoint_id}")
    assert (tmp_path / "out-c4" / "big.bin").read_bytes() == (state / "big.bin").read_bytes()


def test_a_file_that_vanishes_while_the_state_is_read_fails_the_capture(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # a job not held still (DMTCP without its hook) may rename a file between listing and reading:
    # the state read would be one that never was (issue 13: it fails, with the reason)
    state = tmp_path / "state"
    state.mkdir()
    (state / "keep.txt").write_bytes(b"kept")
    (state / "gone.tmp").write_bytes(b"renamed away")
    store = store_at(tmp_path)
    real_open = os.open

    def racing_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith("gone.tmp"):
            os.unlink(state / "gone.tmp")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("os.open", racing_open)
    with pytest.raises(StateChanged, match="gone.tmp vanished"):
        store.snapshot(state, tmp_path / "staging")
    monkeypatch.undo()
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())


def aged(tmp: Path, seconds: float = 7200) -> None:
    """Every blob written so far, as if written `seconds` ago."""
    for path in (tmp / "blobs").rglob("*"):
        if path.is_file():
            then = path.stat().st_mtime - seconds
            os.utime(path, (then, then))


def test_a_zombie_of_an_older_attempt_never_collects_what_the_newer_attempt_reuses(tmp_path: Path) -> None:
    """The master gave up on attempt 1's machine (it still runs, cut off) and started attempt 2
    from a0001-n00002. The zombie goes on checkpointing and collecting: keeping its own newest,
    it would delete the chunks attempt 2 reuses, and attempt 2's next checkpoint would name
    chunks that are gone."""
    state, zombie_state = tmp_path / "state", tmp_path / "zombie-state"
    zombie = store_at(tmp_path)
    for number in (1, 2):
        big_state(zombie_state, MIB, seed=number)
        zombie.save(zombie_state, f"a0001-n0000{number}", "directory", tmp_path / "staging")
    newer = store_at(tmp_path)
    newer.restore("a0001-n00002", state)
    newer.claim_attempt(2, "a0001-n00002")
    for number in (3, 4):  # the zombie's state moves on; the chunks of n00002 are no longer its
        big_state(zombie_state, MIB, seed=number)
        zombie.save(zombie_state, f"a0001-n0000{number}", "directory", tmp_path / "staging")
    aged(tmp_path)  # long ago: no grace period saves them
    snapshot = newer.snapshot(state, tmp_path / "staging-2")  # unchanged since the restore: reuses
    assert zombie.collect_garbage(keep=1, attempt=1) == ([], 0)
    newer.commit(snapshot, "a0002-n00001", "directory")
    newer.release(snapshot)
    store_at(tmp_path).restore("a0002-n00001", tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == (state / "big.bin").read_bytes()


def test_chunks_younger_than_the_grace_period_are_never_collected(tmp_path: Path) -> None:
    """Another writer's commit under way (its chunks stored, its manifest not yet): they stay
    until they are older than the grace period, unless a manifest comes to use them."""
    from cbas.checkpoint.pipeline import cut_and_store
    state = tmp_path / "state"
    big_state(state, MIB, seed=1)
    store_at(tmp_path).save(state, "a0001-n00001", "directory", tmp_path / "staging")
    big_state(state, MIB, seed=2)
    writer = store_at(tmp_path)
    snapshot = writer.snapshot(state, tmp_path / "staging-w")
    cut_and_store(writer, snapshot, None, cutters=1, workers=2)  # stored, no manifest yet
    collector = store_at(tmp_path)
    assert collector.collect_garbage(keep=1, attempt=1) == ([], 0)
    aged(tmp_path)
    dropped, removed = collector.collect_garbage(keep=1, attempt=1)
    assert dropped == [] and removed >= 1  # old enough, and no manifest uses them: gone
    writer.release(snapshot)
