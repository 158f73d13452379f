"""Checkpoints: every member's weights, optimiser and RNG state, the code and the config.

Files are written atomically (a temporary file, then a rename), so a run killed while writing
leaves the previous checkpoint intact, and read with ``torch.load(weights_only=True)``: nothing
in them is unpickled as code. Config and architecture travel as JSON strings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..diffusion.schedules import NoiseSchedule
from ..errors import CheckpointError, DiskError
from ..members import Ensemble, VmapEnsemble, build_ensemble
from ..runtime.files import fault_line

__all__ = ["Checkpoint", "CheckpointError", "load_base", "base_of"]

FORMAT = "ensattr_fast.checkpoint/1"


def _scan(path: Path) -> Tuple[str, Optional[str]]:
    """One sequential read of the checkpoint: its SHA-256 (the hash results files record), and
    the first entry of its zip archive whose CRC-32 does not match, if any.

    ``torch.load`` does not check the CRCs, so damaged weights would load silently; hashing and
    checking in the same pass reads the file once (the load then maps it, and finds its pages in
    the page cache). Entries stored with CRC 0 (``torch.serialization.set_crc32_options(False)``)
    cannot be checked; compressed entries (torch stores none) are checked through ``zipfile``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        with zipfile.ZipFile(f) as archive:  # the central directory at the end: a small read
            infos = archive.infolist()
        spans = []
        for info in infos:
            f.seek(info.header_offset + 26)  # the local header's name and extra field lengths
            name_length, extra_length = struct.unpack("<HH", f.read(4))
            start = info.header_offset + 30 + name_length + extra_length
            spans.append([start, start + info.compress_size, info, 0])
        f.seek(0)
        at = 0
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
            for span in spans:
                lo, hi = max(span[0], at), min(span[1], at + len(block))
                if lo < hi:
                    span[3] = zlib.crc32(block[lo - at : hi - at], span[3])
            at += len(block)
    for _, _, info, crc in spans:
        if not info.CRC:
            continue
        if info.compress_type == zipfile.ZIP_STORED:
            if crc != info.CRC:
                return digest.hexdigest(), info.filename
        elif _damaged_compressed(path, info):
            return digest.hexdigest(), info.filename
    return digest.hexdigest(), None


def _damaged_compressed(path: Path, info: zipfile.ZipInfo) -> bool:
    with zipfile.ZipFile(path) as archive:
        try:
            with archive.open(info) as entry:
                while entry.read(1 << 22):
                    pass
        except zipfile.BadZipFile:
            return True
    return False


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
            base = base_of(self.spec)
            try:
                ensemble = build_ensemble(self.spec, base)
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
        """Write the checkpoint to ``path`` atomically (a temporary file, then a rename); a file
        that cannot be written (a full disk) leaves the previous one as it was and raises one
        :class:`CheckpointError` naming the cause."""
        payload = dataclasses.asdict(self)
        payload.update(format=FORMAT, spec=json.dumps(self.spec), config=json.dumps(self.config),
                       unit_names=json.dumps(list(self.unit_names)))
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        except OSError as error:
            raise DiskError(f"checkpoint {path} cannot be written: {fault_line(error)}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as error:  # torch reports a failed write as a RuntimeError
            Path(tmp).unlink(missing_ok=True)
            cause = fault_line(error) if isinstance(error, OSError) else _write_fault(path, error)
            raise DiskError(f"checkpoint {path} cannot be written ({cause}); the previous checkpoint, "
                            "if any, is as it was") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: os.PathLike) -> "Checkpoint":
        """The checkpoint in ``path``, read once: its CRCs checked and its SHA-256 taken in one
        pass (``.file_hash``, what results files record as ``checkpoint_hash``), then loaded
        with ``weights_only`` from a map of the file. ``.path`` is where it was read."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        before = _identity(path)
        try:
            digest, damaged = _scan(path)
            if damaged is None:
                payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
        if _identity(path) != before:
            raise CheckpointError(f"checkpoint {path} was replaced while it was read (is a training run writing "
                                  "it?); read it again when that run has written it")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an ensattr_fast checkpoint (format {FORMAT})")
        payload.pop("format")
        try:
            for key in ("spec", "config", "unit_names"):
                payload[key] = json.loads(payload[key])
            checkpoint = cls(**payload)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt ({type(error).__name__}: "
                                  f"{error})") from None
        checkpoint.path, checkpoint.file_hash = path, digest
        return checkpoint


def _write_fault(path: Path, error: RuntimeError) -> str:
    """What made torch's writer fail: a full disk where it is full, else its own words."""
    if shutil.disk_usage(path.parent).free < (1 << 20):
        return "no space left on device"
    return " ".join(str(error).split())[:200]


def _identity(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _folder_hash(folder: Path) -> str:
    """SHA-256 over a model folder's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        with open(file, "rb") as f:  # in blocks: a model's weights need not fit in memory twice
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_base(path: os.PathLike) -> Tuple[Ensemble, dict]:
    """The base model a fine-tune's members train on (``--base``): the one model of the
    checkpoint ``path`` (its EMA weights where it has them), or a diffusers ``UNet2DModel``
    folder (``save_pretrained``), frozen, and where it came from ({"path", "sha256"}: what an
    adapter checkpoint keeps, to find and check it again)."""
    path = Path(path)
    if path.is_dir():  # a diffusers model folder (save_pretrained)
        from ..members import load_members

        try:
            base = load_members([path])
        except (OSError, ValueError, ImportError) as error:
            raise CheckpointError(f"--base {path}: not a diffusers UNet2DModel folder ({error})") from None
        return base.requires_grad_(False), dict(path=str(path.resolve()), sha256=_folder_hash(path))
    if not path.is_file():
        raise CheckpointError(f"--base {path}: no such file (a base is a checkpoint of one model: "
                              "train --all-units --models 1, or a diffusers model folder)")
    checkpoint = Checkpoint.load(path)
    if checkpoint.spec.get("base"):
        raise CheckpointError(f"--base {path} holds adapter members; a base is one model of its own")
    if checkpoint.spec.get("n_members") != 1:
        raise CheckpointError(f"--base {path} holds {checkpoint.spec.get('n_members')} models; a base is one model "
                              "(train --all-units --models 1)")
    return checkpoint.build().requires_grad_(False), dict(path=str(path.resolve()), sha256=checkpoint.file_hash)


def base_of(spec: dict) -> Optional[Ensemble]:
    """The base that the adapter members of ``spec`` were trained on (None for members of their
    own), found where the spec says, and refused when it is missing or no longer the same file."""
    if not spec.get("base"):
        return None
    ref = spec["base"]
    path = Path(ref["path"])
    if not path.is_file():
        raise CheckpointError(f"the members' base {path} is missing: adapter members run only on the base they "
                              "were trained on")
    base, now = load_base(path)
    if now["sha256"] != ref["sha256"]:
        raise CheckpointError(f"the members' base {path} has changed since they were trained on it (SHA-256 "
                              f"{ref['sha256'][:12]}... then, {now['sha256'][:12]}... now): adapters on another base "
                              "are other models")
    return base
