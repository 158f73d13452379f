"""The rules every step keeps about the files it writes."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import StoreError


def refuse_overwrite(path: os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an existing output unless told to."""
    if Path(path).exists() and not overwrite:
        raise StoreError(f"{path} exists; pass --overwrite to replace it, or write elsewhere")
