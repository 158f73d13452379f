"""``lds``: the linear datamodeling score of every influence matrix of a results file, against
models of the ensemble's own architecture retrained on random halves of the units."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from ..errors import StoreError
from ..evaluation.lds import lds_table
from ..runtime.files import check_output, same_file
from ..store import open_results
from .metrics import json_output
from .options import LdsOptions
from .session import Session

__all__ = ["lds"]


def lds(session: Session, options: LdsOptions, progress: bool = True) -> Dict[str, dict]:
    """LDS per method (see :func:`ensattr_fast.evaluation.lds.lds_table`): mean over queries,
    its 95% interval and the number of queries. The reference models are kept in
    ``options.references`` and trained there when missing; ``options.json``: the table is also
    written there."""
    references = options.references
    if references is None:
        raise StoreError("lds needs a file for its reference models (--references)")
    inputs = session.inputs()
    for what, given in inputs.items():  # the reference models are trained into this file when it is missing
        if same_file(references, given):
            raise StoreError(f"--references {references} is also the {what} this step reads; give another file")
    if not Path(references).exists():
        check_output(references, "--references", inputs=inputs)
    write = json_output(options.json, options.overwrite, dict(inputs, **{"--references": references}))
    checkpoint = session.checkpoint
    with open_results(session.check_results()) as r:
        r.check_code(checkpoint.code, str(session.checkpoint_path))
    table = lds_table(session.results, checkpoint, session.data(), references, options.halves,
                      options.models_per_half, options.steps, options.draws, options.samples, options.device,
                      progress)
    write(table)
    return table
