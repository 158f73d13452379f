"""Where each command's files are: the command line's file flags (``--out``, ``--plan``,
``--checkpoint``, ``--results``), which config files may also give; an
:class:`~ensattr_fast.Audit` keeps the same files in its work folder instead, and records them
under these names beside the step's options."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

__all__ = ["FileRole", "STEP_FILES"]


@dataclasses.dataclass(frozen=True)
class FileRole:
    """A file a step reads or writes: its flag's name (``out`` for ``--out``), whether the
    command line requires it, and its help."""

    name: str
    required: bool
    help: str
    default: Optional[str] = None


#: the files of every command, by command: the command line's file flags (an
#: :class:`~ensattr_fast.Audit` keeps them in its work folder instead)
STEP_FILES: Dict[str, Tuple[FileRole, ...]] = {
    "demo": (FileRole("out", False, "folder of the demo's files", "demo"),),
    "plan": (FileRole("out", True, "plan file (HDF5)"),),
    "train": (FileRole("plan", True, "plan file"), FileRole("out", True, "checkpoint file")),
    "sample": (FileRole("checkpoint", True, "checkpoint"), FileRole("out", True, "results file (HDF5)")),
    "ablate": (FileRole("checkpoint", True, "checkpoint"), FileRole("results", True, "results file")),
    "audit": (FileRole("checkpoint", True, "checkpoint of group units"), FileRole("results", True, "results file")),
    "attribute": (FileRole("checkpoint", True, "checkpoint"),
                  FileRole("results", True, "results file holding the samples")),
    "metrics": (FileRole("results", True, "results file"),
                FileRole("checkpoint", False, "also run the false-attribution protocol")),
    "lds": (FileRole("checkpoint", True, "checkpoint"), FileRole("results", True, "results file")),
    "memorization": (FileRole("checkpoint", True, "the encoded ensemble"),
                     FileRole("out", True, "new HDF5 file (/memorization)")),
    "report": (FileRole("results", True, "results file"), FileRole("out", True, "the report's picture (.png)")),
    "export": (FileRole("checkpoint", True, "checkpoint"),
               FileRole("out", True, "folder of the member folders (member-00, member-01, ...)")),
}
