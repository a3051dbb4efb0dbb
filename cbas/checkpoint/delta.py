"""Finding a file's unchanged chunks without hashing them: an exact comparison with the bytes
the worker captured last time (pure logic; the reads are passed in).

The previous version of a file is a list of chunks whose bytes the worker kept (cbas.checkpoint
.capture). Walking the new version from the start, while it is in step with the old one (at a
chunk boundary of both), the next old chunk's bytes are compared with the same number of new
bytes: equal bytes are the same chunk, with the id already known, and cut where a full cutting
would cut (FastCDC's cut after a boundary depends only on the bytes after it). Where they differ,
chunks are cut and hashed from the last boundary on, until one of them is an old chunk again (a
change, or an insertion that shifts the rest, costs a chunk or two around it). So no changed byte
is missed: every byte is either compared with a kept byte or hashed. A file that does not fall
into step again within `budget` bytes is left, from that boundary on, to be cut after the job
goes on (`Rest`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from cbas.checkpoint.chunking import MAX_CHUNK, first_cut

ReadAt = Callable[[int, int], bytes]  # offset, length -> bytes (fewer at the end of the file)


@dataclass(frozen=True)
class Same:
    """The old chunk `index` again: bytes compared equal."""

    index: int


@dataclass(frozen=True)
class Fresh:
    """A chunk cut and hashed here; its bytes are kept for the next comparison."""

    chunk_id: str
    data: bytes


@dataclass(frozen=True)
class Rest:
    """The file from `offset` (a chunk boundary) to its end, still to be cut."""

    offset: int


Part = Same | Fresh | Rest


def compare(size: int, read_new: ReadAt, old: list[tuple[str, int]], read_old: Callable[[int], bytes],
            budget: int) -> list[Part]:
    """The new file (`size` bytes) as parts: old chunks (`old`: ids and lengths, in order) found
    again, fresh chunks, and perhaps a rest. Fresh chunks are at most about `budget` bytes."""
    first_index: dict[str, int] = {}
    for index, (chunk_id, _) in enumerate(old):
        first_index.setdefault(chunk_id, index)
    parts: list[Part] = []
    position, in_step, cut_here = 0, 0 if old else None, 0
    while position < size:
        if in_step is not None and in_step < len(old):
            length = old[in_step][1]
            last = in_step == len(old) - 1  # cut where the old file ended: a cut only if this one ends too
            if (position + length == size) if last else (position + length <= size):
                if read_new(position, length) == read_old(in_step):
                    parts.append(Same(in_step))
                    position += length
                    in_step += 1
                    continue
        in_step = None
        if cut_here >= budget:
            parts.append(Rest(position))
            return parts
        wanted = min(MAX_CHUNK, size - position)
        window = read_new(position, wanted)
        if len(window) < wanted:
            break  # shorter than it said: the caller finds the file changed
        data = window[:first_cut(window)]
        chunk_id = hashlib.sha256(data).hexdigest()
        parts.append(Fresh(chunk_id, data))
        position += len(data)
        cut_here += len(data)
        if chunk_id in first_index:
            in_step = first_index[chunk_id] + 1
    return parts
