import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cbas.archive import ArchiveError, Member, pack, pack_directory, unpack


def _tar_zst(path: Path, add) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        add(tar)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return path


def _file(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, io.BytesIO(data) if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_file("/etc/evil"), "absolute path"),
        (_file("../evil"), "leaves the target"),
        (_file("a/../../evil"), "leaves the target"),
        (_file("link", kind=tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
        (_file("hard", kind=tarfile.LNKTYPE, link="x"), "is a link"),
        (_file("dev", kind=tarfile.CHRTYPE), "device or special"),
        (_file("fifo", kind=tarfile.FIFOTYPE), "device or special"),
    ],
)
def test_unsafe_members_are_refused_and_nothing_escapes(tmp_path: Path, member, message: str) -> None:
    archive = _tar_zst(tmp_path / "bad.tar.zst", lambda tar: tar.addfile(*member))
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match=message):
        unpack(archive, target)
    assert not (tmp_path / "evil").exists()
    assert list(target.iterdir()) == []


def test_size_bound(tmp_path: Path) -> None:
    archive = _tar_zst(tmp_path / "big.tar.zst", lambda tar: tar.addfile(*_file("big", b"0" * 1000)))
    with pytest.raises(ArchiveError, match="more than 999 bytes"):
        unpack(archive, tmp_path / "t", max_bytes=999)


def test_corrupt_archive_is_a_clear_error(tmp_path: Path) -> None:
    archive = tmp_path / "c.tar.zst"
    archive.write_bytes(b"definitely not zstd")
    with pytest.raises(ArchiveError, match="corrupt"):
        unpack(archive, tmp_path / "t")


def test_links_are_not_packed(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "link").symlink_to("/etc/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        pack_directory(tmp_path / "src", tmp_path / "out.tar.zst")


names = st.from_regex(r"[a-z0-9_]{1,8}", fullmatch=True)
trees = st.dictionaries(
    st.lists(names, min_size=1, max_size=3).map(lambda parts: "/".join(parts)),
    st.tuples(st.binary(max_size=2000), st.sampled_from([0o600, 0o644, 0o755, 0o700])),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(trees)
def test_any_tree_round_trips_with_contents_and_modes(tmp_path_factory, tree) -> None:
    src = tmp_path_factory.mktemp("src")
    written = {}
    for name, (data, mode) in tree.items():
        path = src / name
        if any(parent in written or (src / parent).is_file() for parent in _parents(name)):
            continue
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        written[name] = (data, mode)
    archive = tmp_path_factory.mktemp("a") / "t.tar.zst"
    pack_directory(src, archive)
    out = tmp_path_factory.mktemp("out")
    unpack(archive, out)
    for name, (data, mode) in written.items():
        assert (out / name).read_bytes() == data
        assert (out / name).stat().st_mode & 0o777 == mode


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def test_pack_named_members(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("A")
    pack([Member(tmp_path / "a.txt", "data/a.txt")], tmp_path / "o.tar.zst")
    assert unpack(tmp_path / "o.tar.zst", tmp_path / "out") == ["data/a.txt"]
    assert (tmp_path / "out" / "data" / "a.txt").read_text() == "A"
    assert os.path.exists(tmp_path / "out" / "data")
