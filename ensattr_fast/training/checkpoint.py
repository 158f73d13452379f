"""Checkpoints: every member's weights, optimiser and RNG state, the code and the config.

Files are written atomically (a temporary file, then a rename), so a run killed while writing
leaves the previous checkpoint intact, and read with ``torch.load(weights_only=True)``: nothing
in them is unpickled as code. Config and architecture travel as JSON strings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .errors import CheckpointError
from .members import Ensemble, VmapEnsemble, build_ensemble
from .schedules import NoiseSchedule

__all__ = ["Checkpoint", "CheckpointError"]

FORMAT = "ensattr_fast.checkpoint/1"


def _damaged_entry(path: Path) -> Optional[str]:
    """The first entry of the checkpoint's zip archive whose CRC-32 does not match, if any.

    ``torch.load`` does not check them, so damaged weights would load silently. Entries stored
    with CRC 0 (``torch.serialization.set_crc32_options(False)``) cannot be checked."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC:
                try:
                    with archive.open(info) as entry:
                        while entry.read(1 << 22):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
    return None


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

    @property
    def data_source(self):
        """How to load the training data again: the spec its plan stored (a dict), or the
        built-in data set's name for checkpoints from before specs."""
        return self.config["data"].get("spec", self.config["data"]["name"])

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule the members were trained under (and must sample with)."""
        return NoiseSchedule(tuple(self.config["schedule"]["betas"]))

    def build(self, factory: Optional[Callable[[], nn.Module]] = None, use_ema: bool = True) -> Ensemble:
        """The ensemble with its trained weights (the EMA weights when there are some).

        ``factory`` rebuilds a member for ensembles of user modules (see VmapEnsemble)."""
        if factory is not None:
            args = {k: self.spec[k] for k in ("n_members", "data_shape")}
            ensemble = VmapEnsemble(factory, **args, spec=self.spec)
        else:
            try:
                ensemble = build_ensemble(self.spec)
            except (KeyError, TypeError, ValueError) as error:
                raise CheckpointError(f"the checkpoint's architecture {self.spec} cannot be built "
                                      f"({type(error).__name__}: {error})") from None
        state = self.ensemble
        if use_ema and self.ema is not None:
            state = {k[len("module."):]: v for k, v in self.ema.items() if k.startswith("module.")}
        self.load_state(ensemble, state)
        return ensemble.eval()

    def load_state(self, target, state: dict) -> None:
        """``target.load_state_dict(state)`` for a module or an optimiser of this checkpoint; a
        state that does not fit it (a damaged or edited file) is a CheckpointError."""
        try:
            target.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            lines = str(error).strip().splitlines()
            detail = "; ".join(line.strip() for line in lines[:3]) + (" ..." if len(lines) > 3 else "")
            raise CheckpointError(f"the checkpoint's weights do not fit its architecture {self.spec} "
                                  f"({type(error).__name__}: {detail}); the file is corrupt or was "
                                  "edited") from None

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
            damaged = _damaged_entry(path)
            if damaged is None:
                payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # weights_only refused an object that could run code
            raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain "
                                  "values; ensattr_fast never loads those, since loading them can run "
                                  "code. It is not an ensattr_fast checkpoint.") from None
        except Exception as error:  # truncated zip, foreign object
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); it is "
                "truncated, corrupt, or not an ensattr_fast checkpoint"
            ) from None
        if damaged is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt: its entry {damaged} fails its "
                                  "CRC-32 check (damaged on disk or in transfer)")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an ensattr_fast checkpoint (format {FORMAT})")
        payload.pop("format")
        try:
            for key in ("spec", "config", "unit_names"):
                payload[key] = json.loads(payload[key])
            return cls(**payload)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt ({type(error).__name__}: "
                                  f"{error})") from None
