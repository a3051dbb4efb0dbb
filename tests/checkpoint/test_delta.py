"""Comparing a changed file with its last capture: no changed byte is ever missed, and the chunks
are the ones cutting the whole file would give (deduplication is unchanged)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from fastcdc import fastcdc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbas.checkpoint import chunking
from cbas.checkpoint.delta import Fresh, Rest, Same, compare
from tests.checkpoint.test_store import store_at

MIB = 1 << 20
BASE = random.Random(7).randbytes(9 * MIB)


def cut(data: bytes) -> list[bytes]:
    return [data[c.offset:c.offset + c.length]
            for c in fastcdc(memoryview(data), chunking.MIN_CHUNK, chunking.AVG_CHUNK, chunking.MAX_CHUNK)]


OLD_CHUNKS = cut(BASE)
OLD = [(hashlib.sha256(c).hexdigest(), len(c)) for c in OLD_CHUNKS]

edits = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "overwrite"]),
                           st.integers(min_value=0, max_value=len(BASE)), st.integers(min_value=1, max_value=300_000),
                           st.integers(min_value=0, max_value=255)), min_size=0, max_size=4)


def edited(data: bytes, changes: list[tuple[str, int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, at, length, value in changes:
        at = min(at, len(out) - 1) if out else 0
        if kind == "flip" and out:
            out[at] ^= 1 << (value % 8) or 1
        elif kind == "insert":
            out[at:at] = random.Random(value).randbytes(length)
        elif kind == "delete":
            del out[at:at + length]
        else:
            out[at:at + length] = random.Random(value).randbytes(min(length, len(out) - at))
    return bytes(out)


def rebuilt(parts: list, new: bytes) -> tuple[bytes, list[str]]:  # type: ignore[type-arg]
    data, ids = b"", []
    for part in parts:
        if isinstance(part, Same):
            data += OLD_CHUNKS[part.index]
            ids.append(OLD[part.index][0])
        elif isinstance(part, Fresh):
            assert hashlib.sha256(part.data).hexdigest() == part.chunk_id
            data += part.data
            ids.append(part.chunk_id)
        else:
            assert isinstance(part, Rest)
            data += new[part.offset:]
            ids += [hashlib.sha256(c).hexdigest() for c in cut(new[part.offset:])]
    return data, ids


@settings(max_examples=40, deadline=None)
@given(changes=edits, budget=st.sampled_from([0, 2 * MIB, 64 * MIB]))
def test_the_file_is_rebuilt_exactly_and_cut_as_a_whole_cutting_would(changes, budget) -> None:  # type: ignore[no-untyped-def]
    new = edited(BASE, changes)
    parts = compare(len(new), lambda at, n: new[at:at + n], OLD, lambda i: OLD_CHUNKS[i], budget)
    data, ids = rebuilt(parts, new)
    assert data == new  # every byte accounted for: compared with a kept byte, hashed, or left to cut
    assert ids == [hashlib.sha256(c).hexdigest() for c in cut(new)]


def test_an_unchanged_file_is_only_compared_and_a_small_change_costs_a_chunk_or_two() -> None:
    same = compare(len(BASE), lambda at, n: BASE[at:at + n], OLD, lambda i: OLD_CHUNKS[i], 64 * MIB)
    assert all(isinstance(p, Same) for p in same)
    flipped = bytearray(BASE)
    flipped[5 * MIB] ^= 1
    parts = compare(len(flipped), lambda at, n: bytes(flipped[at:at + n]), OLD, lambda i: OLD_CHUNKS[i], 64 * MIB)
    assert 1 <= sum(isinstance(p, Fresh) for p in parts) <= 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.integers(min_value=0, max_value=3 * MIB - 1), bit=st.integers(min_value=0, max_value=7))
def test_a_flipped_byte_in_a_kept_file_is_never_missed_through_the_store(tmp_path_factory, where: int, bit: int) -> None:
    # same size, same mtime: only the ctime says it changed, and the comparison finds the byte
    tmp = tmp_path_factory.mktemp("delta")
    state = tmp / "state"
    state.mkdir()
    big = state / "big.bin"
    big.write_bytes(BASE[:3 * MIB])
    store = store_at(tmp)
    store.save(state, "c1", "directory", tmp / "staging")
    before = big.stat()
    with open(big, "r+b") as handle:
        handle.seek(where)
        byte = handle.read(1)[0]
        handle.seek(where)
        handle.write(bytes([byte ^ (1 << bit)]))
    os.utime(big, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = store.save(state, "c2", "directory", tmp / "staging")
    assert 0 < second.new_bytes <= 2 * chunking.MAX_CHUNK + 2
    out = tmp / "out"
    store_at(tmp).restore("c2", out)
    assert (out / "big.bin").read_bytes() == big.read_bytes()


def test_the_kept_bytes_follow_the_newest_checkpoint_and_old_captures_go(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    data = bytearray(BASE[:4 * MIB])
    (state / "f").write_bytes(data)
    store = store_at(tmp_path)
    for number in range(1, 5):
        data[number * 700_000] ^= 0xFF
        (state / "f").write_bytes(data)
        store.save(state, f"c{number}", "directory", tmp_path / "staging")
        store_at(tmp_path).restore(f"c{number}", tmp_path / f"out{number}")
        assert (tmp_path / f"out{number}" / "f").read_bytes() == bytes(data)
    folders = sorted(p.name for p in (tmp_path / "staging").iterdir())
    assert len(folders) <= 4 and "capture-00004" in folders  # the first capture holds most bytes still
