"""LoRA adapters in PEFT's on-disk layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a LoRA weight ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]`` (torch ``Linear`` layout), where ``<module>`` is the HF module path
(``model.layers.3.self_attn.q_proj``).  Our adapter ``lora_a [*in, r]`` / ``lora_b [r, *out]`` flattens its
in/out axes the way the HF kernel does (``q_proj [D, H, hd]`` <-> ``[H*hd, D]``), then transposes; a scanned
layer stack is written layer by layer.  Llama-family models only: GPT-2 keeps q/k/v fused in one HF
``c_attn`` Conv1D, which our per-projection adapters do not map onto.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from safejax.config import ConfigError
from safejax.models.lora import ADAPTER, LoRADef

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def model_config(ldef: LoRADef):
    """The :class:`~safejax.models.config.ModelConfig` of a LoRA model's base."""
    return ldef.base.merge(ldef.base.abstract_params()).config


def peft_tensors(ldef: LoRADef, trained: dict) -> dict[str, np.ndarray]:
    """PEFT tensor name -> float32 array of every adapter in ``trained`` (host arrays)."""
    config = model_config(ldef)
    if config.architecture == "gpt2":
        raise ConfigError("PEFT adapters can be written for Llama-family models only (GPT-2 fuses q/k/v into "
                              "one c_attn); the merged HF folder holds the trained weights")
    flat = flatten_dict(trained)
    out = {}
    for k, a in flat.items():
        if ADAPTER not in k or k[-1] != "lora_a":
            continue
        module = k[:k.index(ADAPTER)]
        a, b = np.asarray(a, np.float32), np.asarray(flat[k[:-1] + ("lora_b",)], np.float32)
        stacked = config.scan_layers and module[:2] == ("model", "layers")
        layers = [(f"{i}", a[i], b[i]) for i in range(a.shape[0])] if stacked else [(None, a, b)]
        for idx, a_l, b_l in layers:
            parts = [str(p) for p in module]
            if idx is not None:
                parts.insert(2, idx)
            name = "base_model.model." + ".".join(parts)
            r = a_l.shape[-1]
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_l.reshape(-1, r).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_l.reshape(r, -1).T)
    return out


def _target_modules(names: list[str]) -> list[str] | str:
    """PEFT ``target_modules``: the adapted modules' last names when every layer is adapted alike, else a regex
    that matches exactly the adapted module paths."""
    mods = sorted({n[len("base_model.model."):-len(".lora_A.weight")] for n in names if n.endswith(".lora_A.weight")})
    by_leaf: dict[str, set[str]] = {}
    for m in mods:
        by_leaf.setdefault(m.rsplit(".", 1)[-1], set()).add(re.sub(r"\.\d+\.", ".N.", m))
    layers = {re.search(r"\.layers\.(\d+)\.", m).group(1) for m in mods if re.search(r"\.layers\.(\d+)\.", m)}
    per_leaf = {leaf: sum(1 for m in mods if m.rsplit(".", 1)[-1] == leaf) for leaf in by_leaf}
    uniform = all(len(v) == 1 for v in by_leaf.values()) and all(
        n == (len(layers) if ".layers." in next(iter(by_leaf[leaf])) else 1) for leaf, n in per_leaf.items())
    if uniform:
        return sorted(by_leaf)
    return "(" + "|".join(re.escape(m) for m in mods) + ")"


def write_peft_adapter(ldef: LoRADef, trained: dict, path: str | os.PathLike, *, base_model: str = "",
                       task_type: str = "CAUSAL_LM") -> Path:
    """Write the adapters of ``trained`` (a :class:`LoRADef`'s trained params) as a PEFT LoRA folder at
    ``path``: ``peft.PeftModel.from_pretrained(base, path)`` gives the model safejax trained (before merging).
    Only process 0 writes."""
    path = Path(path)
    tensors = peft_tensors(ldef, jax.device_get(trained))
    if jax.process_index() != 0:
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = ldef.cfg
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model or None,
        "r": int(cfg.rank), "lora_alpha": float(cfg.alpha), "lora_dropout": float(cfg.dropout),
        "target_modules": _target_modules(list(tensors)), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path

