"""What every step does before it writes: the checks of its outputs run on the rank that
writes them, and every rank stops with the same error."""

from __future__ import annotations

import contextlib
import os
from typing import Callable

from .. import errors
from ..runtime import distributed
from ..runtime.files import writing
from ..store import check_results, read_hdf5, recover_after_kill, unreadable
from ..store.recovery import open_for_appending


def on_writer(check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 only (it alone writes the files) and raise its error, if any,
    on every rank."""
    refused = None
    distributed.barrier()  # no rank is still reading a file the check may open to write
    if distributed.world().main:
        try:
            check()
        except errors.EnsattrError as error:
            refused = (type(error).__name__, str(error))
    refused = distributed.broadcast_object(refused)
    if refused is not None:
        raise getattr(errors, refused[0])(refused[1])


def writer_lock(path: os.PathLike, what: str):
    """The write lock of ``path`` on rank 0 (the rank that writes it); nothing elsewhere."""
    return writing(path, what) if distributed.world().main else contextlib.nullcontext()


def existing(results: os.PathLike) -> None:
    """Refuse a results file to add to that is not there (before a lock would make its folder)."""
    if not os.path.isfile(results):
        raise unreadable(results, "no such file")


def recovered(results: os.PathLike) -> None:
    """A results file to add to, made sound where a killed writer left it open, and refused when
    its contents do not agree with themselves (damaged by a fault, or edited). Under the lock."""
    recover_after_kill(results)
    open_for_appending(results).close()  # a plain reader elsewhere refuses every writer: say so before the work
    with read_hdf5(results) as f:
        check_results(f)
