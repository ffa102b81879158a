"""HF checkpoint folders <-> safejax models (safetensors only, never a pickle).

* :func:`load_pretrained` reads ``config.json`` plus ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` (Llama / Mistral / Qwen2 / GPT-2 causal LMs, and safe-rlhf
  ``*ForScore`` score models).  With ``mesh=`` every parameter is built directly into its
  NamedSharding from a memory map of the file (``jax.make_array_from_callback``), so no device
  ever holds the whole model.
* :func:`save_pretrained` writes a folder that ``transformers.AutoModelForCausalLM`` loads as-is
  (float32 ``model.safetensors`` + ``config.json`` [+ tokenizer]).
* :func:`resize_token_embeddings`, :func:`check_tokenizer_fits`: vocabulary / tokenizer agreement.

HF stores ``nn.Linear`` weights as ``[out, in]``; our kernels are ``[in..., out...]`` (see
:mod:`safejax.models.llama` for the layout), so weights are transposed and reshaped on the way.

GPT-2 checkpoints use other names (``transformer.wte`` / ``wpe`` / ``h.{i}.ln_1`` / ``attn.c_attn`` /
``attn.c_proj`` / ``mlp.c_fc`` / ``mlp.c_proj`` / ``ln_f``) and ``Conv1D`` weights stored ``[in, out]``
(not transposed).  Its fused ``c_attn [D, 3D]`` (bias ``[3D]``) holds q, k, v as three consecutive
column blocks: our separate ``q_proj`` / ``k_proj`` / ``v_proj`` are column slices of it (split on load,
read lazily block by block; concatenated again on save).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safejax.errors import ModelFileError
from safejax.models.config import ModelConfig, architecture_from_hf_dict
from safejax.models.llama import CausalLM
from safejax.models.score import ScoreModel, make_score_head
from safejax.paths import resolve_model_dir
from safejax.parallel import sharding_for, use_mesh

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Dense modules whose kernel contracts two input axes ([H, hd] -> D); all others contract one.
_TWO_IN_AXES = {"o_proj"}
_CAUSAL_ALIASES = {"causal_lm", "causal", "lm", "causallm"}
_SCORE_ALIASES = {"score", "score_model", "reward", "cost", "critic"}


# ----------------------------------------------------------------------------- safetensors reading


class _TensorFiles:
    """Name -> tensor access over one or more ``.safetensors`` files, memory mapped.

    Uses ``safetensors.safe_open(framework="numpy")`` and ``get_slice``; dtypes numpy lacks
    (bfloat16, float8) are read from a ``np.memmap`` of the same bytes viewed as ``ml_dtypes``."""

    _ML = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

    def __init__(self, files: Mapping[str, str]):
        from safetensors import safe_open

        self.file_of = dict(files)  # tensor name -> file path
        self._handles = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        for path in sorted(set(self.file_of.values())):
            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except Exception as e:  # noqa: BLE001 - corrupt / not a safetensors file
                raise ModelFileError(f"{path}: cannot open as safetensors ({e})") from e

    @classmethod
    def from_folder(cls, folder: str) -> "_TensorFiles":
        index = os.path.join(folder, WEIGHTS_INDEX_NAME)
        single = os.path.join(folder, WEIGHTS_NAME)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelFileError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
            files = {name: os.path.join(folder, fn) for name, fn in weight_map.items()}
            for fn in sorted(set(files.values())):
                if not os.path.exists(fn):
                    raise ModelFileError(f"{index}: lists shard {os.path.basename(fn)} which is missing from {folder}")
            return cls(files)
        if os.path.exists(single):
            tf = cls({})
            from safetensors import safe_open

            try:
                h = safe_open(single, framework="numpy")
            except Exception as e:  # noqa: BLE001
                raise ModelFileError(f"{single}: cannot open as safetensors ({e})") from e
            tf._handles[single] = h
            tf.file_of = {k: single for k in h.keys()}
            return tf
        others = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if others:
            tf = cls({})
            from safetensors import safe_open

            for fn in others:
                h = safe_open(fn, framework="numpy")
                tf._handles[fn] = h
                tf.file_of.update({k: fn for k in h.keys()})
            return tf
        bins = sorted(glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
                      + glob.glob(os.path.join(folder, "*.pth")))
        if bins:
            raise ModelFileError(
                f"{folder}: only PyTorch pickle weights found ({', '.join(os.path.basename(b) for b in bins)}); "
                "safejax reads safetensors only and never unpickles. Convert the folder first, e.g. "
                "`transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
                "safe_serialization=True)`.")
        raise ModelFileError(f"{folder}: no weights found (expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def _header(self, path: str) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        return self._headers[path]

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``tensor[index]`` (index: one slice per axis, explicit start/stop) as numpy."""
        path = self.file_of[name]
        sl = self._handles[path].get_slice(name)
        dt = sl.get_dtype()
        if dt in self._ML:
            base, header = self._header(path)
            info = header[name]
            start, _ = info["data_offsets"]
            ml = jnp.dtype(self._ML[dt])
            mm = np.memmap(path, dtype=np.uint8 if ml.itemsize == 1 else np.uint16, mode="r",
                           offset=base + start, shape=tuple(info["shape"]))
            return np.asarray(mm[index]).view(ml)
        if len(index) == 0:
            return np.asarray(self._handles[path].get_tensor(name))
        return np.asarray(sl[index])


# ----------------------------------------------------------------------------- name / layout mapping


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


def _param_specs(model_state: nnx.State, stacked_layers: bool, architecture: str = "llama"
                 ) -> list[tuple[_ParamSpec, Any]]:
    """(spec, Variable) for every parameter of a model state, in a fixed order."""
    out = []
    for path, var in nnx.to_flat_state(model_state):
        path = tuple(path)
        leaf = path[-1]
        parent = path[-2] if len(path) > 1 else ""
        shape = tuple(_value(var).shape)
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
    for spec, _ in _param_specs(state, config.scan_layers, config.architecture):
        d = out
        for k in spec.path[:-1]:
            d = d.setdefault(k, {})
        d[spec.path[-1]] = spec.hf_name
    return out


def _value(var):
    return var.get_value() if hasattr(var, "get_value") else var[...]


def _sharding_names(var) -> tuple | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


# ----------------------------------------------------------------------------- loading


def read_hf_config(path: str) -> dict:
    """The ``config.json`` of an HF folder as a dict (ValueError naming the file when absent/bad)."""
    if not os.path.isdir(path):
        raise ModelFileError(f"{path}: not a directory (expected an HF model folder with {CONFIG_NAME})")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise ModelFileError(f"{cfg_path}: missing; an HF model folder needs {CONFIG_NAME} next to its weights")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except ValueError as e:
        raise ModelFileError(f"{cfg_path}: invalid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ModelFileError(f"{cfg_path}: expected a JSON object")
    return d


def load_pretrained(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = "float32",
                    model_type: str | None = None, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                    score_dim: int | None = None, **config_overrides) -> CausalLM | ScoreModel:
    """Load an HF folder into a :class:`CausalLM` or :class:`ScoreModel`.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` / ``model.safetensors.index.json``, or a
        stage's out_dir (its ``hf/`` folder is loaded).
      dtype: compute dtype (``None`` = ``"float32"``); ``param_dtype``: storage dtype of params.
      model_type: ``None`` = auto (a ``score_head.weight`` tensor => ScoreModel, else CausalLM),
        ``"causal_lm"`` or ``"score"`` (on a causal-LM checkpoint: backbone loaded, fresh score head
        with ``score_dim`` outputs, the LM head ignored).
      mesh: build each param directly into its NamedSharding (from its logical axis names).
      seed: RNG seed for freshly initialised parameters (a new score head).
      config_overrides: other :class:`ModelConfig` fields, e.g. ``remat=True``, ``scan_layers=True``.
    """
    path = resolve_model_dir(path)  # a stage's out_dir -> out_dir/hf; a missing path fails naming the cwd
    d = read_hf_config(path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    architecture_from_hf_dict(d, source=cfg_path)  # unsupported architecture -> ValueError first
    files = _TensorFiles.from_folder(path)
    names = files.names()
    is_score_ckpt = "score_head.weight" in names
    if model_type is None:
        kind = "score" if is_score_ckpt else "causal_lm"
    elif str(model_type).lower() in _CAUSAL_ALIASES:
        kind = "causal_lm"
    elif str(model_type).lower() in _SCORE_ALIASES:
        kind = "score"
    else:
        raise ValueError(f"load_pretrained: model_type must be None, 'causal_lm' or 'score', got {model_type!r}")
    cfg = ModelConfig.from_hf_dict(d, source=cfg_path, dtype=dtype or "float32", param_dtype=param_dtype,
                                   **config_overrides)
    if kind == "causal_lm" and is_score_ckpt and not cfg.tie_word_embeddings and "lm_head.weight" not in names:
        raise ModelFileError(f"{path}: a score-model checkpoint (score_head.weight, no lm_head.weight) cannot be "
                         "loaded as a causal LM; use model_type='score'")

    fresh_head = kind == "score" and not is_score_ckpt
    if kind == "score":
        if is_score_ckpt:
            sdim = int(files.shape("score_head.weight")[0])
            if score_dim is not None and score_dim != sdim:
                raise ModelFileError(f"{files.file_of['score_head.weight']}: tensor score_head.weight has "
                                 f"score_dim {sdim}, but score_dim={score_dim} was requested")
            bias = "score_head.bias" in names
        else:
            sdim, bias = int(score_dim or 1), True
        score_type = d.get("score_type")

        def ctor():
            return ScoreModel(cfg, rngs=nnx.Rngs(seed), score_dim=sdim, bias=bias, score_type=score_type)
    else:
        def ctor():
            return CausalLM(cfg, rngs=nnx.Rngs(seed))


    if mesh is not None:
        with use_mesh(mesh):
            abstract = nnx.eval_shape(ctor)
    else:
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(ctor)
    graphdef, state = nnx.split(abstract)
    specs = _param_specs(state, cfg.scan_layers, cfg.architecture)

    fresh: dict[tuple, Any] = {}
    if fresh_head:
        if mesh is not None:
            with use_mesh(mesh):
                head = make_score_head(cfg, sdim, True, nnx.Rngs(seed))
        else:
            with nnx.use_eager_sharding(False):
                head = make_score_head(cfg, sdim, True, nnx.Rngs(seed))
        for p, v in nnx.to_flat_state(nnx.state(head)):
            fresh[("score_head",) + tuple(p)] = _value(v)

    # validate every tensor up front: missing tensors and shape mismatches name the file and tensor
    for spec, _ in specs:
        if spec.path in fresh:
            continue
        for name in spec.hf_names(cfg.num_layers):
            if name not in names:
                where = ", ".join(sorted({os.path.basename(f) for f in files.file_of.values()})) or "(none)"
                raise ModelFileError(f"{path}: tensor {name} is missing from the checkpoint files ({where}) "
                                 f"but {CONFIG_NAME} requires it")
            got, want = files.shape(name), spec.hf_shape()
            if tuple(got) != tuple(want):
                raise ModelFileError(f"{files.file_of[name]}: tensor {name} has shape {list(got)} but "
                                 f"{CONFIG_NAME} implies {list(want)}")

    used = {n for spec, _ in specs for n in spec.hf_names(cfg.num_layers)}
    # GPT-2 checkpoints may carry the old causal-mask buffers attn.bias / attn.masked_bias
    ignorable = ("lm_head.", "score_head.", "normalizer.", "rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
    unexpected = sorted(n for n in names - used if not any(n.startswith(p) or n.endswith(p) for p in ignorable))
    if unexpected:
        warnings.warn(f"{path}: {len(unexpected)} checkpoint tensors are not used by the "
                      f"{cfg.architecture} model: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")

    pdt = jnp.dtype(cfg.param_dtype)
    for spec, var in specs:
        if spec.path in fresh:
            arr = fresh[spec.path]
        elif mesh is not None:
            sharding = sharding_for(spec.shape, _sharding_names(var), mesh)
            arr = jax.make_array_from_callback(
                spec.shape, sharding, lambda idx, s=spec: np.ascontiguousarray(s.read(files, idx).astype(pdt)))
        else:
            arr = jnp.asarray(spec.read(files, ()).astype(pdt))
        var.set_value(arr)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- saving


def hf_state_dict(model: CausalLM | ScoreModel, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (``[out, in]`` Linear weights) of a model, gathered to the host."""
    specs = _param_specs(nnx.state(model, nnx.Param), model.config.scan_layers, model.config.architecture)
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[int, np.ndarray]] = {}
    for spec, var in specs:
        x = _value(var)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # multi-host: gather the shards
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
        x = np.asarray(jax.device_get(x)).astype(dtype)
        for name, a in zip(spec.hf_names(model.config.num_layers), spec.to_hf(x)):
            if spec.fused is None:
                out[name] = a
            else:
                fused.setdefault(name, {})[spec.fused[0]] = a
                if len(fused[name]) == spec.fused[1]:  # all column blocks seen: concatenate in order
                    parts = fused.pop(name)
                    out[name] = np.ascontiguousarray(np.concatenate([parts[j] for j in range(spec.fused[1])],
                                                                    axis=-1))
    if fused:
        raise ValueError(f"hf_state_dict: incomplete fused tensors {sorted(fused)}")
    return out


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}


def save_pretrained(model: CausalLM | ScoreModel, path: str | os.PathLike, *, tokenizer: Any = None,
                    dtype: str = "float32") -> str:
    """Write ``config.json`` + ``model.safetensors`` in ``dtype`` (``float32`` or ``bfloat16``: half the size)
    (+ the tokenizer) to ``path``.

    A CausalLM folder loads with ``transformers.AutoModelForCausalLM.from_pretrained`` (GPT-2: as
    ``GPT2LMHeadModel``, tied head omitted as HF does); a ScoreModel is written in safe-rlhf's ``*ForScore``
    layout (``score_head.weight [score_dim, D]``; GPT-2 backbone under ``transformer.``)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg: ModelConfig = model.config
    if isinstance(model, ScoreModel):
        d = cfg.to_hf_dict(score=True, score_dim=model.score_dim)
        d["bias"] = model.score_head.bias is not None
        if model.score_type is not None:
            d["score_type"] = model.score_type
    elif isinstance(model, CausalLM):
        d = cfg.to_hf_dict()
    else:
        raise ValueError(f"save_pretrained: expected a CausalLM or ScoreModel, got {type(model).__name__}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"save_pretrained: dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    d["dtype"] = dtype
    tensors = hf_state_dict(model, dtype=EXPORT_DTYPES[dtype])
    if jax.process_index() == 0:
        stale = os.path.join(path, WEIGHTS_INDEX_NAME)
        if os.path.exists(stale):
            os.remove(stale)
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- vocabulary


def resize_token_embeddings(model: CausalLM | ScoreModel, new_vocab_size: int) -> CausalLM | ScoreModel:
    """Grow (or shrink) the vocabulary in place; returns ``model``.

    New rows of the embedding ``[V, D]`` and of an untied LM head ``[D, V]`` are the mean of the
    existing ones (float32 mean, cast back).  A tied head (GPT-2, Qwen2 tied) follows the embedding;
    GPT-2's position table is untouched.  Shardings are recomputed for the new shape."""
    new_v = int(new_vocab_size)
    if new_v <= 0:
        raise ValueError(f"resize_token_embeddings: new_vocab_size must be positive, got {new_vocab_size}")
    cfg: ModelConfig = model.config
    old_v = cfg.vocab_size

    def resized(var, axis: int):
        x = _value(var)
        if new_v <= old_v:
            y = jax.lax.slice_in_dim(x, 0, new_v, axis=axis)
        else:
            mean = jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True).astype(x.dtype)
            reps = [1] * x.ndim
            reps[axis] = new_v - old_v
            y = jnp.concatenate([x, jnp.tile(mean, reps)], axis=axis)
        sh = getattr(x, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            y = jax.device_put(y, sharding_for(y.shape, _sharding_names(var), sh.mesh))
        var.set_value(y)

    resized(model.model.embed_tokens.embedding, 0)
    if isinstance(model, CausalLM) and model.lm_head is not None:
        resized(model.lm_head.kernel, 1)
    new_cfg = cfg.replace(vocab_size=new_v)
    model.config = new_cfg
    model.model.config = new_cfg
    return model


def check_tokenizer_fits(tokenizer: Any, config: ModelConfig | Any, path: str | os.PathLike | None = None) -> None:
    """Raise ValueError when ``len(tokenizer)`` exceeds the model's embedding rows (``path`` named)."""
    cfg = getattr(config, "config", config)
    n = len(tokenizer)
    if n > cfg.vocab_size:
        where = f"{os.fspath(path)}: " if path is not None else ""
        raise ModelFileError(f"{where}tokenizer has {n} tokens but the model's embedding has only {cfg.vocab_size} "
                         f"rows; call safejax.models.resize_token_embeddings(model, {n}) or use the matching "
                         "tokenizer")
