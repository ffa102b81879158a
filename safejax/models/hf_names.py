"""How our parameters map onto HF tensor names and layouts (Llama / Mistral / Qwen2 / GPT-2 families)."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
from flax import nnx

from safejax.models.config import ModelConfig

# Dense modules whose kernel contracts two input axes ([H, hd] -> D); all others contract one.
_TWO_IN_AXES = {"o_proj"}


class _ParamSpec:
    """How one of our parameters maps onto HF tensors.

    kind: ``identity`` (same layout), ``kernel`` (ours ``[*in, *out]`` = HF ``[prod(out), prod(in)]``.T,
    torch ``nn.Linear``), ``conv1d`` (ours ``[*in, *out]`` = HF ``[prod(in), prod(out)]``, GPT-2 ``Conv1D``),
    ``bias`` (ours ``[*out]`` = HF ``[prod(out)]``).  ``stacked``: leading ``[L]`` axis, one HF
    tensor per layer (``{i}`` in ``hf_name``).  ``fused = (part, parts)``: the HF tensor holds ``parts``
    equal column blocks (last axis) and ours is block ``part`` (GPT-2 ``c_attn`` = q | k | v)."""

    def __init__(self, path: tuple, hf_name: str, kind: str, n_in: int, shape: tuple[int, ...], stacked: bool,
                 fused: tuple[int, int] | None = None):
        self.path, self.hf_name, self.kind, self.n_in, self.shape, self.stacked = path, hf_name, kind, n_in, shape, stacked
        self.fused = fused

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape

    @property
    def _cols(self) -> int:
        """Width of our block along the HF tensor's last axis."""
        s = self.layer_shape
        return math.prod(s[self.n_in:]) if self.kind in ("kernel", "conv1d") else math.prod(s)

    @property
    def col_offset(self) -> int:
        return 0 if self.fused is None else self.fused[0] * self._cols

    def hf_shape(self) -> tuple[int, ...]:
        """Shape of the (whole, possibly fused) HF tensor of one layer."""
        s = self.layer_shape
        parts = 1 if self.fused is None else self.fused[1]
        if self.kind == "kernel":
            return (math.prod(s[self.n_in:]), math.prod(s[:self.n_in]))
        if self.kind == "conv1d":
            return (math.prod(s[:self.n_in]), self._cols * parts)
        if self.kind == "bias":
            return (math.prod(s) * parts,)
        return s

    def hf_names(self, num_layers: int) -> list[str]:
        if self.stacked:
            return [self.hf_name.format(i=i) for i in range(num_layers)]
        return [self.hf_name]

    # ours -> HF, full arrays (for a fused spec: our column block only, see hf_state_dict)
    def to_hf(self, x: np.ndarray) -> list[np.ndarray]:
        xs = list(x) if self.stacked else [x]
        out = []
        for a in xs:
            if self.kind == "kernel":
                a = a.reshape(math.prod(a.shape[:self.n_in]), -1).T
            elif self.kind == "conv1d":
                a = a.reshape(math.prod(a.shape[:self.n_in]), -1)
            elif self.kind == "bias":
                a = a.reshape(-1)
            out.append(np.ascontiguousarray(a))
        return out

    # HF -> ours, one block (index = tuple of slices over our shape)
    def read(self, files: _TensorFiles, index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(slice(*s.indices(d)) for s, d in zip(index, self.shape)) if index else \
            tuple(slice(0, d) for d in self.shape)
        if self.stacked:
            layers = range(*index[0].indices(self.shape[0]))
            return np.stack([self._read_one(files, self.hf_name.format(i=i), index[1:]) for i in layers])
        return self._read_one(files, self.hf_name, index)

    def _read_one(self, files: _TensorFiles, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        s = self.layer_shape
        if self.kind == "identity":
            return files.read(name, idx)
        off = self.col_offset
        if self.kind == "bias":
            rng, rest = _flat_range(s, idx)
            blk = files.read(name, (_shift(rng, off),))
            return blk.reshape((rng.stop - rng.start) // math.prod(s[1:]), *s[1:])[(slice(None),) + rest]
        n = self.n_in
        in_s, out_s = s[:n], s[n:]
        in_r, in_rest = _flat_range(in_s, idx[:n])
        out_r, out_rest = _flat_range(out_s, idx[n:])
        if self.kind == "conv1d":
            blk = files.read(name, (in_r, _shift(out_r, off)))  # already [n_in_flat, n_out_flat]
        else:
            blk = files.read(name, (out_r, in_r)).T  # [n_in_flat, n_out_flat]
        blk = blk.reshape((in_r.stop - in_r.start) // math.prod(in_s[1:]), *in_s[1:],
                          (out_r.stop - out_r.start) // math.prod(out_s[1:]), *out_s[1:])
        return blk[(slice(None),) + in_rest + (slice(None),) + out_rest]


def _flat_range(shape: Sequence[int], idx: Sequence[slice]) -> tuple[slice, tuple[slice, ...]]:
    """Flat row range covering ``idx[0]`` of a row-major ``shape`` (other axes taken whole), plus
    the remaining slices to apply after reshaping."""
    inner = math.prod(shape[1:])
    a = idx[0]
    return slice(a.start * inner, a.stop * inner), tuple(idx[1:])


def _shift(s: slice, offset: int) -> slice:
    return slice(s.start + offset, s.stop + offset)


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


# GPT-2: our (Llama-style) HF name -> GPT-2 name, and the layout of the GPT-2 tensor.  ``L`` matches a layer
# index or the ``{i}`` placeholder of stacked layers.  Kinds: "conv1d" for Conv1D weights ([in, out]),
# "fused" for a third of c_attn (q | k | v), None to keep the kind derived from the leaf name.
_L = r"(\d+|\{i\})"
_GPT2_NAMES: tuple[tuple[re.Pattern, str, str | None], ...] = tuple((re.compile(a + "$"), b, k) for a, b, k in (
    (r"model\.embed_tokens\.weight", r"transformer.wte.weight", None),
    (r"model\.embed_positions\.weight", r"transformer.wpe.weight", None),
    (r"model\.norm\.(weight|bias)", r"transformer.ln_f.\1", None),
    (rf"model\.layers\.{_L}\.input_layernorm\.(weight|bias)", r"transformer.h.\1.ln_1.\2", None),
    (rf"model\.layers\.{_L}\.post_attention_layernorm\.(weight|bias)", r"transformer.h.\1.ln_2.\2", None),
    (rf"model\.layers\.{_L}\.self_attn\.[qkv]_proj\.(weight|bias)", r"transformer.h.\1.attn.c_attn.\2", "fused"),
    (rf"model\.layers\.{_L}\.self_attn\.o_proj\.(weight|bias)", r"transformer.h.\1.attn.c_proj.\2", "conv1d"),
    (rf"model\.layers\.{_L}\.mlp\.up_proj\.(weight|bias)", r"transformer.h.\1.mlp.c_fc.\2", "conv1d"),
    (rf"model\.layers\.{_L}\.mlp\.down_proj\.(weight|bias)", r"transformer.h.\1.mlp.c_proj.\2", "conv1d"),
))
_QKV_PART = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _gpt2_spec(spec: _ParamSpec) -> _ParamSpec:
    """Re-target a Llama-style spec at GPT-2's tensor names and Conv1D layouts (lm_head / score_head keep
    their ``nn.Linear`` layout and names)."""
    if not spec.hf_name.startswith("model."):
        return spec
    for pat, repl, kind in _GPT2_NAMES:
        m = pat.match(spec.hf_name)
        if m is None:
            continue
        spec.hf_name = m.expand(repl)
        if spec.kind == "kernel" and kind is not None:
            spec.kind = "conv1d"
        if kind == "fused":
            spec.fused = (_QKV_PART[spec.path[-2]], 3)
        return spec
    raise ValueError(f"safejax.models.hf: no GPT-2 mapping for parameter {_path_str(spec.path)}")


def param_specs(model_state: nnx.State, stacked_layers: bool, architecture: str = "llama"
                 ) -> list[tuple[_ParamSpec, Any]]:
    """(spec, Variable) for every parameter of a model state, in a fixed order."""
    out = []
    for path, var in nnx.to_flat_state(model_state):
        path = tuple(path)
        leaf = path[-1]
        parent = path[-2] if len(path) > 1 else ""
        shape = tuple(variable_value(var).shape)
        stacked = stacked_layers and len(path) > 1 and path[0] == "model" and path[1] == "layers"
        parts = [str(p) for p in path]
        if stacked:
            parts = parts[:2] + ["{i}"] + parts[2:]
        parts[-1] = {"kernel": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
        hf_name = ".".join(parts)
        if leaf == "kernel":
            kind, n_in = "kernel", (2 if parent in _TWO_IN_AXES else 1)
        elif leaf == "bias":
            kind, n_in = "bias", 0
        elif leaf in ("weight", "embedding"):
            kind, n_in = "identity", 0
        else:
            raise ValueError(f"safejax.models.hf: no HF mapping for parameter {_path_str(path)}")
        spec = _ParamSpec(path, hf_name, kind, n_in, shape, stacked)
        if architecture == "gpt2":
            spec = _gpt2_spec(spec)
        out.append((spec, var))
    return out


def hf_param_names(state: nnx.State, config: ModelConfig) -> dict:
    """HF tensor name of every parameter, as a nested dict shaped like ``state.to_pure_dict()``.

    Stacked layers (``scan_layers``) carry ``{i}`` in their name; a GPT-2 q/k/v block names its fused ``c_attn``."""
    out: dict = {}
    for spec, _ in param_specs(state, config.scan_layers, config.architecture):
        d = out
        for k in spec.path[:-1]:
            d = d.setdefault(k, {})
        d[spec.path[-1]] = spec.hf_name
    return out


def variable_value(var):
    return var.get_value() if hasattr(var, "get_value") else var[...]


def variable_sharding_names(var) -> tuple | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
