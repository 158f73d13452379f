"""Where the members' fitted curvature (:mod:`.curvature`) is kept between runs and shared by
the ranks of a torchrun: a folder beside the checkpoint (``<checkpoint>.curvature``), one
subfolder per fit (what the curvature depends on: strategy, draws, batch) and member, each
holding kronfluence's own files for that member's factors. A member's folder appears only once
its factors are whole (they are fitted elsewhere and moved in), so a killed fit is redone and
never read half-written."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

from ..errors import StoreError

__all__ = ["FactorStore"]


@dataclasses.dataclass(frozen=True)
class FactorStore:
    """Where the members' fitted curvature is kept, and who fits it: ``root``/<fit name>/member-<m>
    holds member m's factors (kronfluence's files), and ``root``/checkpoint_hash the hash of the
    checkpoint they were fitted for (a store of another checkpoint is stale: emptied and fitted
    again). Under torchrun, rank ``rank`` of ``ranks`` fits members m = rank (mod ranks), and
    ``barrier`` waits for every rank."""

    root: Path
    checkpoint_hash: str = ""
    rank: int = 0
    ranks: int = 1
    barrier: Callable[[], None] = lambda: None

    def member(self, spec, m: int) -> Path:
        """Member m's folder under ``spec`` (a :class:`~.curvature.CurvatureSpec`): there only once its
        factors are whole."""
        return self.root / spec.fit_name / f"member-{m}"

    def prepare(self) -> None:
        """The store made, or emptied where it holds another checkpoint's fits, and marked with
        this one's. In one process, before fitting; under torchrun, by rank 0 alone before
        every rank fits (the caller's to arrange: a refusal must reach every rank)."""
        mark = self.root / "checkpoint_hash"
        if self.root.is_dir() and any(self.root.iterdir()) and not mark.is_file():
            raise StoreError(f"{self.root} is not a store of fitted curvature (it has no checkpoint_hash): "
                             "move it away, or fit elsewhere")
        if mark.is_file() and mark.read_text() != self.checkpoint_hash:  # another checkpoint's: stale
            for fit in (p for p in self.root.iterdir() if p.is_dir()):
                shutil.rmtree(fit)
        self.root.mkdir(parents=True, exist_ok=True)
        mark.write_text(self.checkpoint_hash)
