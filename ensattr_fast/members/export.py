"""Adapter members out of the ensemble: each one as a peft LoRA adapter folder
(``adapter_config.json`` and ``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained``
loads onto the plain base (:meth:`LoraEnsemble.plain_base`) to run that member alone; the label
embedding of a conditional fine-tune travels as peft's ``modules_to_save``.

Written here, not through peft's ``save_pretrained``, because the members' weights are stacked
[M, ...] in one module: peft would need each member built as its own model first. The format is
peft's: keys ``base_model.model.<layer>.lora_A.weight`` [r, fan_in] and ``lora_B.weight``
[fan_out, r], with lora_alpha / r the scale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ArchitectureError, ConfigError
from .adapters import LoraEnsemble, _LoraLinear

__all__ = ["export_adapter"]


def export_adapter(ensemble: LoraEnsemble, member: int, folder: os.PathLike) -> Path:
    """Write member ``member`` of ``ensemble`` as a peft LoRA adapter folder ``folder``."""
    if not isinstance(ensemble, LoraEnsemble):
        raise ArchitectureError(f"only adapter members export as adapters, not {type(ensemble).__name__}")
    if not 0 <= member < ensemble.n_members:
        raise ConfigError(f"member {member} is not one of the {ensemble.n_members} members")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("exporting adapters needs safetensors: pip install 'ensattr_fast[finetune]'") from None
    tensors, targets = {}, []
    for name, module in ensemble.net.named_modules():
        if isinstance(module, _LoraLinear):
            targets.append(name)
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = module.down.weight[member].T.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = module.up.weight[member].T.contiguous()
    if ensemble.net.label is not None:
        tensors["base_model.model.label.weight"] = ensemble.net.label.weight[member].T.contiguous()
        tensors["base_model.model.label.bias"] = ensemble.net.label.bias[member, 0].contiguous()
    config = dict(peft_type="LORA", task_type=None, r=ensemble.rank, lora_alpha=ensemble.alpha, lora_dropout=0.0,
                  target_modules=targets, modules_to_save=["label"] if ensemble.net.label is not None else None,
                  bias="none", fan_in_fan_out=False, init_lora_weights=True, use_rslora=False, use_dora=False,
                  base_model_name_or_path=ensemble.base_ref.get("path"), inference_mode=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt", "base_sha256": ensemble.base_ref.get("sha256", "")})
    return folder
