"""``ensattr lds``: the linear datamodeling score of every influence matrix of a results file,
against models of the ensemble's own architecture retrained on random halves of the units."""

from __future__ import annotations

import os
from typing import Dict, Optional

from ..checkpoint import Checkpoint
from ..data import load_data
from ..errors import StoreError
from ..evaluation.lds import lds_table
from ..files import same_file
from ..store import open_results

__all__ = ["lds_step"]


def lds_step(results: os.PathLike, checkpoint_path: os.PathLike, references: os.PathLike, halves: int = 32,
             seeds: int = 2, steps: Optional[int] = None, draws: int = 256, rows: Optional[int] = None,
             device: str = "cpu") -> Dict[str, dict]:
    """LDS per method (see :func:`ensattr_fast.evaluation.lds.lds_table`); the reference models
    are kept in ``references`` and trained there when missing."""
    for what, given in (("--checkpoint", checkpoint_path), ("--results", results)):
        if same_file(references, given):
            raise StoreError(f"--references {references} is also the {what} this step reads; give another file")
    checkpoint = Checkpoint.load(checkpoint_path)
    with open_results(results) as r:
        r.check_code(checkpoint.code, str(checkpoint_path))
    return lds_table(results, checkpoint_path, load_data(checkpoint.data_source), references, halves, seeds,
                     steps, draws, rows, device)
