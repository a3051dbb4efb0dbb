"""Hostile input, generated: the JDL parser, the archive unpacker and the master's message
endpoint never crash on it; they refuse it clearly, and nothing changes."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbas import jdl
from cbas.archive import ArchiveError, unpack
from cbas.messages import MessageType, Ping, envelope
from tests.master.test_app import AUTH, setup, signed, snapshot  # noqa: F401 (the fixture)

JDL_WORDS = st.sampled_from(["Executable", "Arguments", "Prologue", "InputSandbox", "=", ";", "{", "}", ",",
                             '"', '"x"', "true", "12", "-3", "1e9", "#", "\n", " ", "[", "]", "Environment",
                             "Deadline", '"36h"', "CheckpointStrategy", '"volume"', "\\", "\x00", "é"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(JDL_WORDS, max_size=60).map("".join)))
def test_the_jdl_parser_accepts_or_refuses_with_a_position(text: str) -> None:
    try:
        description = jdl.parse(text)
    except jdl.JDLError as exc:
        assert str(exc).startswith("<jdl>:")  # where it went wrong
    else:
        assert jdl.parse(jdl.write(description)) == description


def tar_zst(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


NAMES = st.sampled_from(["a", "b/c", "../x", "/etc/passwd", "a/../../y", "./d", "a/./b", "", ".", "e/"])
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                         tarfile.FIFOTYPE])


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    members = []
    for _ in range(draw(st.integers(0, 5))):
        info = tarfile.TarInfo(draw(NAMES))
        info.type = draw(KINDS)
        data = draw(st.binary(max_size=64)) if info.type == tarfile.REGTYPE else b""
        info.size = len(data)
        info.linkname = draw(NAMES)
        info.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o777]))
        members.append((info, data))
    blob = tar_zst(members)
    if draw(st.booleans()):  # and corrupt it somewhere
        at = draw(st.integers(0, max(0, len(blob) - 1)))
        blob = blob[:at] + bytes([blob[at] ^ draw(st.integers(1, 255))]) + blob[at + 1:] if blob else blob
    return blob


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(archives())
def test_the_unpacker_never_writes_outside_its_target(tmp_path: Path, blob: bytes) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    target = root / "target"
    target.mkdir()
    try:
        unpack(io.BytesIO(blob), target)
    except ArchiveError:
        pass
    outside = [p for p in root.rglob("*") if target not in p.parents and p != target]
    assert outside == []
    for path in target.rglob("*"):
        assert not path.is_symlink() and (path.is_file() or path.is_dir())  # no links, devices or fifos
        assert not path.stat().st_mode & 0o6000  # no setuid or setgid bits


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_the_message_endpoint_refuses_garbage_with_a_4xx_and_changes_nothing(setup, data) -> None:  # noqa: F811
    master, client = setup
    before = await snapshot(master)
    genuine = json.loads(signed(master, envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", "master")))
    kind = data.draw(st.sampled_from(["bytes", "json", "mutated", "huge"]))
    if kind == "bytes":
        body = data.draw(st.binary(max_size=512))
    elif kind == "json":
        body = json.dumps(data.draw(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                                 lambda inner: st.lists(inner, max_size=4)
                                                 | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                                                 max_leaves=12))).encode()
    elif kind == "mutated":
        field = data.draw(st.sampled_from(sorted(genuine)))
        genuine[field] = data.draw(st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.integers())))
        body = json.dumps(genuine).encode()
    else:
        body = b'{"Type": "Notification", "Message": "' + b"A" * (2 << 20) + b'"}'
    response = await client.post("/messages", data=body)
    if kind == "mutated" and genuine == json.loads(signed(master, envelope(
            MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", "master"))):
        return  # (never: ids and times differ) a mutation that changed nothing would be accepted
    assert 400 <= response.status < 500, (kind, response.status, await response.text())
    assert "error" in await response.json()
    assert await snapshot(master) == before


@pytest.mark.parametrize("headers", [{}, AUTH])
async def test_a_huge_api_body_is_refused(setup, headers) -> None:  # noqa: F811
    _, client = setup
    response = await client.post("/api/jobs", data=b"{" + b" " * (2 << 20) + b"}", headers=headers)
    assert response.status in (401, 413)
