"""Checksums that catch a corrupt checkpoint before it is used.

A plain checkpoint is a torch.save zip whose end-of-archive comment (zip's own field for free
text, which zip readers and `torch.load` skip) holds `ddp_train crc32 XXXXXXXX`: the CRC-32 of
every byte before the comment, with the comment's length field read as zero. The file stays a
plain torch.save file: `torch.load(path, weights_only=True)` reads it unchanged. The checkpoint
dict's `checksum` entry says that a trailer must be there (so a damaged trailer is not mistaken
for a checkpoint written before checksums). Each file of a sharded checkpoint has its CRC-32 in
the directory's COMPLETE manifest. CRC-32 (zlib) runs at several GB/s: see
benchmarks/checksum_cost.py for its cost against the load time.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

ALGORITHM = "crc32"
MAGIC = b"ddp_train crc32 "
TRAILER = len(MAGIC) + 8  # the magic and eight hex digits


class Crc32Writer:
    """A binary file that computes the CRC-32 of what is written through it (torch.save writes
    sequentially to file objects, so the checksum costs no second read)."""

    def __init__(self, f: BinaryIO):
        self.f, self.crc = f, 0
        self.error: OSError | None = None  # torch.save reports a failed write as a RuntimeError: the cause

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        done = 0
        try:
            while done < len(view):  # a short write (a disk filling up) is retried: the retry raises its OSError
                written = self.f.write(view[done:])
                if not written:
                    raise OSError(errno.EIO, "the file system accepted no more bytes")
                done += written
        except OSError as e:
            self.error = self.error or e
            raise
        return done

    def flush(self) -> None:
        self.f.flush()

    def seal(self) -> None:
        """After torch.save: set the zip comment's length and append the checksum as the comment."""
        self.f.seek(-2, os.SEEK_END)
        self.f.write(struct.pack("<H", TRAILER) + MAGIC + f"{self.crc:08x}".encode())


def crc32_of(path: Path, size: int | None = None) -> int:
    """The CRC-32 of the first `size` bytes of `path` (all of it by default), read through a memory
    map (no copies: about twice as fast as reading it in blocks)."""
    size = os.path.getsize(path) if size is None else size
    if size == 0:
        return 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            return zlib.crc32(view[:size])
        finally:
            view.release()


def check_plain(path: Path) -> str | None:
    """None when `path` has no checksum trailer; "ok"; else what is wrong."""
    size = os.path.getsize(path)
    if size < TRAILER + 22:
        return None
    with open(path, "rb") as f:
        f.seek(size - TRAILER - 2)
        tail = f.read()
    if not tail[2:].startswith(MAGIC):
        return None
    if struct.unpack("<H", tail[:2])[0] != TRAILER:
        return "its checksum trailer is damaged"
    try:
        stored = int(tail[2 + len(MAGIC):], 16)
    except ValueError:
        return "its checksum trailer is damaged"
    crc = zlib.crc32(b"\0\0", crc32_of(path, size - TRAILER - 2))
    return "ok" if crc == stored else f"checksum mismatch: crc32 {crc:08x}, recorded {stored:08x}"


def check_file(path: Path, expected: dict[str, Any]) -> str | None:
    """None if `path` has the size and CRC-32 a sharded checkpoint's manifest records, else what differs."""
    size = path.stat().st_size
    if size != expected.get("size"):
        return f"{path.name} has {size} bytes, the manifest says {expected.get('size')}"
    if ALGORITHM in expected and crc32_of(path) != expected[ALGORITHM]:
        return f"{path.name} fails its checksum"
    return None
