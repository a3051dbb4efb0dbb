"""Taking a job's state while it is held: a local copy the job cannot change, and nothing more.

While the job is held (the cgroup freezer, SIGSTOP, DMTCP's hook) each file is, in order of cost:
- unchanged since the last capture (size, times and inode as then, and not "racily clean"): its
  chunk list is reused, nothing is read;
- never changed in place (`immutable`, DMTCP's images): only opened; it is read after the job goes
  on, and its size and times must then still be what they were, or the checkpoint fails;
- changed, with last capture's bytes kept: compared with them (cbas.checkpoint.delta); only the
  chunks that differ are cut, hashed and kept, in this capture's pack;
- otherwise cloned (a reflink, where the file system has them: no bytes copied, the blocks shared
  until the job writes them) or copied (copy_file_range, page cache to page cache) into this
  capture's folder. A clone counts against the room a capture may take like a copy: the job's
  writes after it cost that much disk while the checkpoint is stored.
Hashing, compression and upload come after the job goes on (cbas.checkpoint.pipeline). Hard links
are not used for a working folder: a hard link is the job's own inode, which it can still write,
or one the worker must not read (a link the job made to another's file); the worker's copies are
root's, 0600, in a 0700 folder.

A capture never fills the worker's disk: what it copies must fit in the free space less a
reserve the job keeps (RESERVE_FRACTION of the disk, at least RESERVE_MIN). A file that does not
fit is read in place after the capture, through the descriptor opened while the job was held
(/proc/self/fd/N, never its path): an immutable one while the job runs on, any other while the
job is still held (`held_for_upload` says why; the pause is then the whole upload). A disk that
fills up all the same (something else wrote to it) makes the capture start again in place.

A file that changes while it is captured (its size or times move; a read comes short or long),
or vanishes between its listing and its opening, fails the capture: the checkpoint does not
count, the last one stays the newest.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cbas.checkpoint.chunking import StateChanged, UnsupportedFile
from cbas.checkpoint.delta import Fresh, Rest, Same, compare
from cbas.checkpoint.manifest import DirEntry, FileEntry

FICLONE = 0x40049409  # ioctl: the target shares the source's blocks, copied on write (btrfs, XFS)
DELTA_BUDGET = 64 << 20  # bytes cut and hashed while the job is held before the rest is just copied
RESERVE_FRACTION = 0.05  # of the worker's disk, left to the job by a capture's copies
RESERVE_MIN = 64 << 20
FileStamp = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


def stamp(info: os.stat_result) -> FileStamp:
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


@dataclass(frozen=True)
class Piece:
    """Bytes of a captured file on the worker's own disk: a chunk (its id known), or a run still
    to be cut (chunk_id None) that starts at a chunk boundary of the file."""

    chunk_id: str | None
    length: int
    source: Path
    offset: int


@dataclass
class Snapshot:
    """A checkpoint captured but not yet committed."""

    files: list[FileEntry]
    dirs: list[DirEntry]
    chunk_sizes: dict[str, int]
    staging: Path = Path(".")  # this capture's own folder (root's): copies and the pack
    staged: dict[str, Path] = field(default_factory=dict)  # chunks cut while held -> where they are
    pieces: dict[int, list[Piece]] = field(default_factory=dict)  # file index -> its bytes, to be cut
    pieces_kept: dict[int, list[Piece]] = field(default_factory=dict)  # unchanged files: last time's bytes
    stamps: dict[int, FileStamp] = field(default_factory=dict)  # file index -> its stamp when captured
    # immutable files opened but not read yet: index in files, path, stat, descriptor
    deferred: list[tuple[int, str, os.stat_result, int]] = field(default_factory=list)
    pinned: set[str] = field(default_factory=set)  # chunks it uses: garbage collection leaves them
    began_ns: int = 0
    room: int | None = None  # bytes the capture may still copy to the worker's disk (None: no limit)
    # files read in place (no room to copy them): index -> (descriptor, whether the job must stay held)
    in_place: dict[int, tuple[int, bool]] = field(default_factory=dict)
    held_for_upload: str | None = None  # why the job stays held until the checkpoint is stored
    # a commit holds `committing`; a release meanwhile (its caller gave up) only sets `abandoned`
    # and the commit lets the snapshot go when it stops: no descriptor it reads is closed under it
    committing: threading.Lock = field(default_factory=threading.Lock)
    abandoned: threading.Event = field(default_factory=threading.Event)

    def given_up(self, cancelled: threading.Event | None) -> bool:
        """A newer checkpoint took its place (`cancelled`), or its caller let it go (`abandoned`)."""
        return (cancelled is not None and cancelled.is_set()) or self.abandoned.is_set()

    def fits(self, size: int) -> bool:
        """Whether `size` more bytes may be copied; they are counted if so."""
        if self.room is None:
            return True
        if size > self.room:
            return False
        self.room -= size
        return True

    def read_in_place(self, index: int, relative: str, fd: int, size: int, held: bool) -> list[Piece]:
        """The file on fd, read where it is when the checkpoint is stored (a descriptor of its own)."""
        own = os.dup(fd)
        self.in_place[index] = (own, held)
        if held and self.held_for_upload is None:
            self.held_for_upload = (f"{relative} ({size} bytes) does not fit beside the job on the worker's disk: "
                                    f"the job is held until the checkpoint is stored")
        return [Piece(None, size, Path(f"/proc/self/fd/{own}"), 0)] if size else []

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def disk_room(folder: Path) -> int:
    """Bytes a capture may copy into `folder`'s file system: its free space less the job's reserve."""
    disk = os.statvfs(folder)
    total, free = disk.f_blocks * disk.f_frsize, disk.f_bavail * disk.f_frsize
    return max(0, free - max(RESERVE_MIN, int(total * RESERVE_FRACTION)))


def check_in_place(snapshot: Snapshot) -> None:
    """Files read in place must be as they were when listed (the hold, or immutability, kept them)."""
    for index, (fd, held) in snapshot.in_place.items():
        now, then = stamp(os.fstat(fd)), snapshot.stamps[index]
        if (now != then) if held else (now[:2] != then[:2]):
            raise StateChanged(f"{snapshot.files[index].path} changed while it was read in place "
                               f"({then[0]} bytes when listed, {now[0]} now)")


def check_owner(relative: str, info: os.stat_result, owner: int | None) -> None:
    """A file of the state that is not the job's (a hard link it made to another's file) is refused:
    the root worker reads nothing for the job that the job could not read itself."""
    if owner is not None and info.st_uid != owner:
        raise UnsupportedFile(f"{relative} belongs to uid {info.st_uid}, not to the job: a checkpoint holds only "
                              f"the job's own files")


class Pack:
    """This capture's chunks cut while the job was held, appended to one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        self.size = 0

    def add(self, data: bytes) -> int:
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        offset = self.size
        _write_all(self.fd, data)
        self.size += len(data)
        return offset

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_at(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes from offset (fewer only at the end of the file); read, never mapped."""
    parts, got = [], 0
    while got < length:
        data = os.pread(fd, length - got, offset + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_piece(piece: Piece) -> bytes:
    fd = os.open(piece.source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_at(fd, piece.offset, piece.length)
    finally:
        os.close(fd)


def capture_file(relative: str, info: os.stat_result, fd: int, target: Path, pack: Pack,
                 previous: list[Piece] | None, held: bool = True) -> list[Piece]:
    """The file open on fd, as pieces the worker holds: compared with `previous` (last capture's
    pieces, all cut) where there are some, else cloned or copied whole into target. A file read
    while the job is `held` must keep its ctime too; one read after (an immutable file, which
    the job may unlink or rename meanwhile, and that moves its ctime) its size and mtime."""
    size = info.st_size
    if previous and all(p.chunk_id is not None for p in previous) \
            and all(source.is_file() for source in {p.source for p in previous}):
        pieces = _compared(fd, size, target, pack, previous)
    else:
        pieces = [Piece(None, _clone_or_copy(fd, target, size, 0), target, 0)] if size else []
    got = sum(p.length for p in pieces)
    after = os.fstat(fd)
    same = stamp(after) == stamp(info) if held else (after.st_size, after.st_mtime_ns) == (size, info.st_mtime_ns)
    if got != size or not same:
        raise StateChanged(f"{relative} changed while it was captured ({size} bytes when listed, {got} read, "
                           f"{after.st_size} now): the job was not held still")
    return pieces


def _compared(fd: int, size: int, target: Path, pack: Pack, previous: list[Piece]) -> list[Piece]:
    old = [(p.chunk_id or "", p.length) for p in previous]
    parts = compare(size, lambda offset, length: read_at(fd, offset, length), old,
                    lambda index: read_piece(previous[index]), DELTA_BUDGET)
    pieces: list[Piece] = []
    for part in parts:
        if isinstance(part, Same):
            pieces.append(previous[part.index])
        elif isinstance(part, Fresh):
            pieces.append(Piece(part.chunk_id, len(part.data), pack.path, pack.add(part.data)))
        elif isinstance(part, Rest):
            pieces.append(Piece(None, _clone_or_copy(fd, target, size - part.offset, part.offset), target, 0))
    return pieces


_reflinks: dict[int, bool] = {}  # file system (st_dev) -> whether it clones whole files (FICLONE)
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF, errno.ENOSYS)


def _clone_or_copy(fd: int, target: Path, length: int, offset: int) -> int:
    """Bytes [offset, offset + length) of fd into a new file `target`; how many there were. A whole
    file is cloned where the file system can (XFS, btrfs: no byte copied, its blocks shared until
    the job writes them); a part is copied with copy_file_range, which the kernel turns into a
    clone of the block-aligned ranges on those file systems and a copy in the page cache elsewhere."""
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        device = os.fstat(out).st_dev
        if offset == 0 and _reflinks.get(device, True):
            try:
                fcntl.ioctl(out, FICLONE, fd)
                _reflinks[device] = True
                return os.fstat(out).st_size
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                _reflinks[device] = False
        return _copy(fd, out, offset, length)
    finally:
        os.close(out)


def _copy(fd: int, out: int, offset: int, length: int) -> int:
    copied, ranged = 0, True
    while True:  # to the end: a file that grew is found out by its length
        want = max(length - copied, 1 << 20)
        if ranged:
            try:
                sent = os.copy_file_range(fd, out, want, offset + copied, copied)
            except OSError as exc:  # not between these files (an older kernel, a special file system)
                if exc.errno not in _UNSUPPORTED:
                    raise
                ranged = False
                os.lseek(out, copied, os.SEEK_SET)
                continue
        else:
            sent = os.sendfile(out, fd, offset + copied, want)
        if not sent:
            return copied
        copied += sent


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
