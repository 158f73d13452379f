"""Opening a file again after its writer was killed, in place.

HDF5 marks a file open for writing in its superblock (the "file consistency flags", set while a
writer or an SWMR writer holds it) and refuses to open it again until the mark is cleared; a
writer killed by SIGKILL never clears it. Every block this package writes is flagged done only
after it is on disk, so such a file's contents are sound: recovery clears the mark in place,
as HDF5's ``h5clear -s`` does (the flags byte and the superblock's checksum), and nothing else.
It runs only while this process holds the file's write lock (no live writer of ours) and no
other process has the file open for writing; the file is never copied or replaced.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import StoreError
from ..runtime.files import open_elsewhere, writing

__all__ = ["recover_after_kill", "open_for_appending", "unreadable"]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


#: lookup3's mix and final rounds: (x, y, z, rotation) over v = [a, b, c]
_MIX = ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4))
_FINAL = ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24))


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum of HDF5's metadata."""
    n, i = len(data), 0
    v = [(0xDEADBEEF + n + initval) & _MASK] * 3

    def add(block: bytes) -> None:
        for k in range(3):
            v[k] = (v[k] + int.from_bytes(block[4 * k : 4 * k + 4], "little")) & _MASK

    while n > 12:
        add(data[i : i + 12])
        for x, y, z, r in _MIX:
            v[x] = ((v[x] - v[y]) & _MASK) ^ _rot(v[y], r)
            v[y] = (v[y] + v[z]) & _MASK
        n, i = n - 12, i + 12
    if n == 0:
        return v[2]
    add(data[i : i + n] + bytes(12 - n))
    for x, y, r in _FINAL:
        v[x] = ((v[x] ^ v[y]) - _rot(v[y], r)) & _MASK
    return v[2]


def _clear_consistency_flags(path: Path) -> None:
    """Clear the file consistency flags of a version 2 or 3 superblock at offset 0, in place."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(48 + 8 * 4))
        if head[:8] != _SIGNATURE or head[8] not in (2, 3):
            raise StoreError(f"{path} was left open by a killed writer, but its superblock (version "
                             f"{head[8] if len(head) > 8 else '?'}) is not one this package writes")
        size = 12 + 4 * head[9]  # signature .. root object header address, then the checksum
        stored = int.from_bytes(head[size : size + 4], "little")
        if lookup3(bytes(head[:size])) != stored:
            raise StoreError(f"{path}: its superblock is damaged (checksum mismatch)")
        head[11] = 0
        head[size : size + 4] = lookup3(bytes(head[:size])).to_bytes(4, "little")
        f.seek(0)
        f.write(head[: size + 4])
        f.flush()
        os.fsync(f.fileno())


def unreadable(path: os.PathLike, detail, what: str = "results file") -> StoreError:
    """The one error for a file that HDF5 cannot open."""
    text = " ".join(str(detail).split())
    if "open for SWMR writing" in text or "already open for write" in text:
        return StoreError(f"{what} {path} was left open by a writer that stopped (a crash or a kill): run the step "
                          "that writes it again (it makes the file sound), or `h5clear -s` it")
    if "unable to lock file" in text:
        return StoreError(f"{what} {path} is held open by another process ({text[:160]}); close it there first")
    return StoreError(f"{what} {path} cannot be read ({text[:300]}); it is missing, truncated or not HDF5")


def _marked_open(path: Path) -> bool:
    """Whether the superblock says a writer has the file open (read from the bytes, without
    opening the file through HDF5, so that readers elsewhere are never locked out)."""
    with open(path, "rb") as f:
        head = f.read(12)
    return len(head) == 12 and head[:8] == _SIGNATURE and head[8] in (2, 3) and head[11] != 0


def recover_after_kill(path: os.PathLike) -> bool:
    """Make a file left by a killed writer writable again, in place; True if it had to."""
    path = Path(path)
    if not path.is_file() or not _marked_open(path):
        return False
    with writing(path, "results file"):
        writers = open_elsewhere(path, writable=True)
        if writers:
            raise StoreError(f"results file {path} is open for writing in process {writers[0]}; "
                             "wait for it to finish, or write elsewhere")
        _clear_consistency_flags(path)
        return True


def open_for_appending(path: os.PathLike):
    """``path`` open to add to (after recovery, where its last writer was killed); a file that
    HDF5 cannot open is one :class:`StoreError`."""
    import h5py

    recover_after_kill(path)
    # a lock held for a moment (another rank's read closing, a handle not yet collected) is
    # waited out, about 3 s; one held longer is refused in one line
    for wait in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, None):
        try:
            return h5py.File(path, "a", libver="latest")
        except OSError as error:
            if wait is not None and "unable to lock file" in str(error):
                time.sleep(wait)
                continue
            readers = open_elsewhere(path)
            # HDF5 lets no writer in while a plain (not SWMR) reader holds the file
            if readers and "unable to lock file" in str(error):
                raise StoreError(f"results file {path} is open in process {readers[0]}, which reads it without "
                                 "SWMR: close it there (ensattr_fast.open_results reads a file while it is "
                                 "written), then run this again") from None
            raise unreadable(path, error) from None
