"""``export``: members of a trained ensemble as folders other tools load, one folder per member
(``member-00``, ``member-01``, ... under ``--out``), with the EMA weights that sampling uses:

* adapter members (``train --base``): peft's LoRA format (:func:`~ensattr_fast.members.export.export_adapter`),
  which ``peft.PeftModel.from_pretrained`` loads onto the base;
* diffusers members (``--arch diffusers``, ``seed-cifar10``): ``UNet2DModel.save_pretrained``
  folders, which ``UNet2DModel.from_pretrained`` (or a diffusers pipeline) loads.

The built-in MLP and UNet members have no format outside this package; they are refused in one
line (``plain_member`` gives any of them as a plain torch module in Python)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List

from ..errors import ArchitectureError, ConfigError, StoreError
from ..members.adapters import LoraEnsemble
from ..members.export import export_adapter
from ..runtime.files import check_output
from .options import ExportOptions
from .session import Session

__all__ = ["export"]


def _writer(ensemble):
    """How one member is written, or one line saying why the ensemble's members cannot be."""
    if isinstance(ensemble, LoraEnsemble):
        return lambda m, folder: export_adapter(ensemble, m, folder)
    if ensemble.spec().get("kind") == "diffusers":
        from ..members.diffusers_unet import save_member

        return lambda m, folder: save_member(ensemble, m, folder)
    raise ArchitectureError(f"export writes adapter members (peft) and diffusers members (save_pretrained); these "
                            f"are {ensemble.spec().get('kind')} members, which no other tool loads: use "
                            f"ensattr_fast.members.plain_member in Python for one as a torch module")


def _check_folder(folder: Path, overwrite: bool, inputs) -> None:
    """Refuse a member folder that exists (unless ``overwrite``) or holds a file this step reads
    (an input is never replaced, whatever ``overwrite`` says)."""
    for name, path in inputs.items():
        if folder.resolve() in Path(path).resolve().parents:
            raise StoreError(f"--out {folder.parent}: {folder} holds the {name} this step reads; export elsewhere")
    if folder.exists() and not overwrite:
        raise StoreError(f"--out {folder.parent}: {folder} exists; pass --overwrite to replace it, or export "
                         "elsewhere")
    check_output(folder / ".export", "--out", True)  # its folder can be written, with room


def export(session: Session, out: os.PathLike, options: ExportOptions = ExportOptions()) -> List[Path]:
    """Write the members ``options.members`` (default: all) of the checkpoint as folders under
    ``out``; returns them. Every folder is checked before any is written: an existing one is
    replaced only with ``options.overwrite``. Each is written beside its place and moved there
    whole, so a failed export leaves no half-written member."""
    ensemble = session.ensemble()
    write = _writer(ensemble)
    members = list(range(ensemble.n_members)) if options.members is None else list(options.members)
    outside = [m for m in members if not 0 <= m < ensemble.n_members]
    if outside:
        raise ConfigError(f"--members: member {outside[0]} is not one of the {ensemble.n_members} members "
                          f"(0..{ensemble.n_members - 1})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"--out {out} is a file; export writes a folder of member folders")
    inputs = session.inputs(("checkpoint",), base=getattr(ensemble, "base_ref", {}).get("path"))
    folders = [out / f"member-{m:02d}" for m in members]
    for folder in folders:
        _check_folder(folder, options.overwrite, inputs)
    out.mkdir(parents=True, exist_ok=True)
    for m, folder in zip(members, folders):
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write(m, partial)
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    return folders
