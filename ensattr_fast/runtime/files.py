"""The rules every file the package writes keeps: one writer at a time, outputs that appear
whole or not at all, no output written over an existing file or over an input unless asked.

- :func:`writing`: an exclusive lock held for as long as a process writes a file (an OS lock
  on ``<file>.lock`` beside it, holding the writer's process id); a second writer is refused
  with that id. The kernel drops the lock when its process dies, so a killed writer never
  blocks the next run. Re-entrant within one process.
- :func:`atomic_output`: write to a temporary name in the same folder, then rename.
- :func:`check_output`: refuse an existing output (unless ``overwrite``), an output that is one
  of the command's inputs, and a folder that cannot be written, before any work starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from ..errors import DiskError, StoreError

__all__ = ["writing", "holder", "atomic_output", "check_output", "check_space", "fault_line", "same_file",
           "open_elsewhere", "quiet_hdf5_teardown", "system_fault"]

_held: Dict[str, List] = {}  # real path of a locked file -> [lock file descriptor, depth]


def _lock_path(path: os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _key(path: os.PathLike) -> str:
    return os.path.realpath(path)


def holder(path: os.PathLike) -> Optional[str]:
    """Who holds the write lock of ``path`` ("process 123 (ensattr attribute) on host"), or None."""
    try:
        return _lock_path(path).read_text().strip() or "another process"
    except OSError:
        return None


@contextlib.contextmanager
def writing(path: os.PathLike, what: str = "file") -> Iterator[None]:
    """Hold the exclusive write lock of ``path`` for the ``with`` block, or raise
    :class:`StoreError` naming the process that holds it."""
    key = _key(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    lock = _lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)  # an output's folder (inputs are checked before)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StoreError(f"{what} {path} cannot be written: {error.strerror} ({lock})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise StoreError(f"{what} {path} is being written by {holder(path)}; wait for it to finish, "
                             "or write elsewhere") from None
        try:  # the lock file may have been removed by the writer before us: lock the one on disk
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    command = " ".join(["ensattr", *sys.argv[1:2]]) if sys.argv and "ensattr" in sys.argv[0] else "python"
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} ({command}) on {socket.gethostname()}\n".encode())
    except OSError as error:  # a full disk: no lock file left behind
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        raise DiskError(f"{what} {path} cannot be written: {fault_line(error)}") from None
    _held[key] = [fd, 1]
    _clear_stale(Path(path))
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)


def _clear_stale(path: Path) -> None:
    """Remove the temporaries a killed writer of ``path`` left (``.<name>.*.tmp*`` and
    ``<name>.*.tmp``): under its lock, nothing else writes them."""
    if not path.parent.is_dir():
        return
    for pattern in (f".{path.name}.*.tmp*", f"{path.name}.*.tmp"):
        for stale in path.parent.glob(pattern):
            with contextlib.suppress(OSError):
                stale.unlink()


def open_elsewhere(path: os.PathLike, writable: bool = False) -> List[int]:
    """Process ids of the other processes of this machine that have ``path`` open (for
    writing, with ``writable``), from Linux's ``/proc/<pid>/fd``; empty where it cannot be read."""
    target = _key(path)
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) != target:
                    continue
                flags = (proc / "fdinfo" / fd.name).read_text().split("flags:")[1].split()[0]
                if not writable or int(flags, 8) & os.O_ACCMODE != os.O_RDONLY:
                    found.append(int(proc.name))
                    break
    return found


def same_file(a: os.PathLike, b: os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: os.PathLike, option: str, overwrite: bool = False,
                 inputs: Optional[Dict[str, os.PathLike]] = None, resume: Optional[bool] = None,
                 need: int = 0) -> None:
    """Refuse, before any work, an output ``path`` (given as ``option``) that is one of
    ``inputs`` (what -> path, links resolved; ``overwrite`` cannot lift this), that exists
    (unless ``overwrite``, or ``resume`` for a step that continues an output; None: the step
    cannot), whose folder cannot be written, or whose disk has less than ``need`` bytes free."""
    for name, given in (inputs or {}).items():
        if given is not None and same_file(path, given):
            raise StoreError(f"{option} {path} is also the {name} this step reads: an output never replaces an "
                             "input, even with --overwrite; write elsewhere")
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not (overwrite or resume):
        flags = "--overwrite to replace it" + (" or --resume to continue it" if resume is not None else "")
        raise StoreError(f"{option} {path} exists; pass {flags}, or write elsewhere")
    folder = path.absolute().parent
    while not folder.exists():  # the folders an output needs are made when it is written
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK) or not _can_make_entries(folder):
        raise StoreError(f"{option} {path}: {folder} is not a folder this process can write to")
    check_space(folder, need, f"{option} {path}")


def check_space(folder: os.PathLike, need: int, what: str) -> None:
    """Refuse, before the work, an output of about ``need`` bytes on a disk with less free."""
    if need <= 0:
        return
    folder = Path(folder).absolute()
    while not folder.exists():  # an output's folders are made when it is written
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise StoreError(f"{what} needs about {_size(need)} and the disk of {folder} has {_size(free)} free; "
                         "free some space, or write elsewhere")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_HDF5_FAULT = re.compile(r"errno = (\d+), error message = '([^']*)'")


def fault_line(error: BaseException, path: Optional[os.PathLike] = None) -> str:
    """One line for a fault of the system (a full disk, a read-only or forbidden folder, a file
    held elsewhere), from an OSError or the long text HDF5 gives: the cause and the file."""
    text = " ".join(str(error).split())
    found = _HDF5_FAULT.search(text)
    number = getattr(error, "errno", None)
    if found:  # HDF5: "... write failed: time = ..., filename = ..., errno = 28, error message = '...', buf = 0x..."
        number, cause = int(found.group(1)), found.group(2)
    elif isinstance(error, OSError) and error.strerror:
        cause = error.strerror
    else:
        cause = text
    if number in _CAUSES:
        cause = _CAUSES[number]
    where = path or getattr(error, "filename", None)
    name = re.search(r"filename = '([^']*)'", text)
    where = where or (name.group(1) if name else None)
    return f"{cause}: {where}" if where else cause


def system_fault(error: BaseException) -> bool:
    """Whether ``error`` is the system refusing a read or write (an OSError with its errno, or
    HDF5's text for one), not a fault of the package or its input."""
    if isinstance(error, OSError) and error.errno is not None:
        return True
    text = str(error)
    return isinstance(error, (OSError, RuntimeError)) and ("errno =" in text or "file write failed" in text)


def _teardown_noise(error: BaseException, traceback) -> bool:
    """Whether ``error`` is HDF5 failing, once more, to flush a file whose write the system
    already refused, as h5py frees one of that file's handles (``ObjectID._dealloc``)."""
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    where = traceback.tb_frame.f_code if traceback is not None else None
    return (isinstance(error, (OSError, RuntimeError)) and where is not None and where.co_name.endswith("_dealloc")
            and where.co_filename.endswith("_objects.pyx") and _HDF5_FAULT.search(" ".join(str(error).split())))


def quiet_hdf5_teardown() -> None:
    """Drop the messages h5py prints as it frees the handles of a file whose last write failed.

    After a full disk or a read-only remount, HDF5 cannot flush the file, so every dataset and
    group handle still held (in a caller's variables, in a traceback) fails to close when Python
    frees it, and Cython prints each failure twice, traceback and all (through ``sys.excepthook``
    and ``sys.unraisablehook``): dozens of tracebacks after the one line that already named the
    fault. Only those are dropped; every other error still reaches the hooks installed before.
    Installed by the command line at start and by a writer at its first fault; idempotent."""
    if getattr(sys.unraisablehook, "_ensattr", False):
        return
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(info):
        if not _teardown_noise(info.exc_value, info.exc_traceback):
            previous_unraisable(info)

    def excepthook(kind, error, traceback):
        if not _teardown_noise(error, traceback):
            previous_except(kind, error, traceback)

    unraisable._ensattr = excepthook._ensattr = True
    sys.unraisablehook, sys.excepthook = unraisable, excepthook


_CAUSES = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}


def _can_make_entries(folder: Path) -> bool:
    """Whether a file can be made in ``folder``: ``os.access`` says yes to root everywhere, even
    in /proc, so make (and remove) an empty folder there."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".ensattr-probe-"))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def atomic_output(path: os.PathLike) -> Iterator[Path]:
    """``with atomic_output(path) as tmp:`` write ``tmp``; it becomes ``path`` (renamed, after
    an fsync) only when the block ends without an error, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                               suffix=f".tmp{path.suffix}")  # the real suffix last: writers infer formats
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
