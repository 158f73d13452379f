"""Checkpoints: every member's weights, optimiser and RNG state, the code and the config.

Files are written atomically (a temporary file, then a rename), so a run killed while writing
leaves the previous checkpoint intact, and read with ``torch.load(weights_only=True)``: nothing
in them is unpickled as code. Config and architecture travel as JSON strings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .members import Ensemble, VmapEnsemble, build_ensemble

__all__ = ["Checkpoint", "CheckpointError"]

FORMAT = "ensattr_fast.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or of another format."""


@dataclasses.dataclass
class Checkpoint:
    """What a training run leaves behind, and what sampling and attribution start from."""

    spec: dict  # architecture, see Ensemble.spec
    config: dict  # training, schedule and data settings
    ensemble: dict  # state_dict of the stacked members
    code: Tensor  # uint8 [N, M]
    unit_of: Tensor  # int64 [n_examples]
    unit_names: list
    data_fingerprint: str
    step: int = 0
    ema: Optional[dict] = None
    optimizer: Optional[dict] = None
    generator: Optional[Tensor] = None

    def build(self, factory: Optional[Callable[[], nn.Module]] = None, use_ema: bool = True) -> Ensemble:
        """The ensemble with its trained weights (the EMA weights when there are some).

        ``factory`` rebuilds a member for ensembles of user modules (see VmapEnsemble)."""
        if factory is not None:
            args = {k: self.spec[k] for k in ("n_members", "data_shape")}
            ensemble = VmapEnsemble(factory, **args, spec=self.spec)
        else:
            ensemble = build_ensemble(self.spec)
        state = self.ensemble
        if use_ema and self.ema is not None:
            state = {k[len("module."):]: v for k, v in self.ema.items() if k.startswith("module.")}
        ensemble.load_state_dict(state)
        return ensemble.eval()

    def save(self, path: os.PathLike) -> None:
        payload = dataclasses.asdict(self)
        payload.update(format=FORMAT, spec=json.dumps(self.spec), config=json.dumps(self.config),
                       unit_names=json.dumps(list(self.unit_names)))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: os.PathLike) -> "Checkpoint":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated zip, bad pickle, foreign object
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); it is "
                "truncated, corrupt, or not an ensattr_fast checkpoint"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an ensattr_fast checkpoint (format {FORMAT})")
        payload.pop("format")
        for key in ("spec", "config", "unit_names"):
            payload[key] = json.loads(payload[key])
        return cls(**payload)
