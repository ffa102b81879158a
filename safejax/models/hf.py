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

import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils

from safejax.errors import ModelFileError
from safejax.models.config import ModelConfig, architecture_from_hf_dict
from safejax.models.hf_names import param_specs, variable_sharding_names, variable_value
from safejax.models.llama import CausalLM
from safejax.models.safetensors_files import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, TensorFiles
from safejax.models.score import ScoreModel, make_score_head
from safejax.parallel import LOGICAL_AXIS_RULES, Rules, sharding_for, use_mesh
from safejax.paths import resolve_model_dir

CONFIG_NAME = "config.json"

_CAUSAL_ALIASES = {"causal_lm", "causal", "lm", "causallm"}
_SCORE_ALIASES = {"score", "score_model", "reward", "cost", "critic"}


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
                    score_dim: int | None = None, rules: Rules = LOGICAL_AXIS_RULES, **config_overrides) -> CausalLM | ScoreModel:
    """Load an HF folder into a :class:`CausalLM` or :class:`ScoreModel`.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` / ``model.safetensors.index.json``, or a
        stage's out_dir (its ``hf/`` folder is loaded).
      dtype: compute dtype (``None`` = ``"float32"``); ``param_dtype``: storage dtype of params.
      model_type: ``None`` = auto (a ``score_head.weight`` tensor => ScoreModel, else CausalLM),
        ``"causal_lm"`` or ``"score"`` (on a causal-LM checkpoint: backbone loaded, fresh score head
        with ``score_dim`` outputs, the LM head ignored).
      mesh: build each param directly into its NamedSharding (from its logical axis names, placed by ``rules``,
        the run's logical-axis table).
      seed: RNG seed for freshly initialised parameters (a new score head).
      config_overrides: other :class:`ModelConfig` fields, e.g. ``remat=True``, ``scan_layers=True``.
    """
    path = resolve_model_dir(path)  # a stage's out_dir -> out_dir/hf; a missing path fails naming the cwd
    d = read_hf_config(path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    architecture_from_hf_dict(d, source=cfg_path)  # unsupported architecture -> ValueError first
    files = TensorFiles.from_folder(path)
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
        with use_mesh(mesh, rules):
            abstract = nnx.eval_shape(ctor)
    else:
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(ctor)
    graphdef, state = nnx.split(abstract)
    specs = param_specs(state, cfg.scan_layers, cfg.architecture)

    fresh: dict[tuple, Any] = {}
    if fresh_head:
        if mesh is not None:
            with use_mesh(mesh, rules):
                head = make_score_head(cfg, sdim, True, nnx.Rngs(seed))
        else:
            with nnx.use_eager_sharding(False):
                head = make_score_head(cfg, sdim, True, nnx.Rngs(seed))
        for p, v in nnx.to_flat_state(nnx.state(head)):
            fresh[("score_head",) + tuple(p)] = variable_value(v)

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
            sharding = sharding_for(spec.shape, variable_sharding_names(var), mesh, rules)
            arr = jax.make_array_from_callback(
                spec.shape, sharding, lambda idx, s=spec: np.ascontiguousarray(s.read(files, idx).astype(pdt)))
        else:
            arr = jnp.asarray(spec.read(files, ()).astype(pdt))
        var.set_value(arr)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- saving


def hf_state_dict(model: CausalLM | ScoreModel, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (``[out, in]`` Linear weights) of a model, gathered to the host."""
    specs = param_specs(nnx.state(model, nnx.Param), model.config.scan_layers, model.config.architecture)
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[int, np.ndarray]] = {}
    for spec, var in specs:
        x = variable_value(var)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # multi-host: gather the shards

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
        safetensors.numpy.save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- vocabulary


def resize_token_embeddings(model: CausalLM | ScoreModel, new_vocab_size: int,
                            rules: Rules = LOGICAL_AXIS_RULES) -> CausalLM | ScoreModel:
    """Grow (or shrink) the vocabulary in place; returns ``model``.

    New rows of the embedding ``[V, D]`` and of an untied LM head ``[D, V]`` are the mean of the
    existing ones (float32 mean, cast back).  A tied head (GPT-2, Qwen2 tied) follows the embedding;
    GPT-2's position table is untouched.  Shardings are recomputed for the new shape (by ``rules``)."""
    new_v = int(new_vocab_size)
    if new_v <= 0:
        raise ValueError(f"resize_token_embeddings: new_vocab_size must be positive, got {new_vocab_size}")
    cfg: ModelConfig = model.config
    old_v = cfg.vocab_size

    def resized(var, axis: int):
        x = variable_value(var)
        if new_v <= old_v:
            y = jax.lax.slice_in_dim(x, 0, new_v, axis=axis)
        else:
            mean = jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True).astype(x.dtype)
            reps = [1] * x.ndim
            reps[axis] = new_v - old_v
            y = jnp.concatenate([x, jnp.tile(mean, reps)], axis=axis)
        sh = getattr(x, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            y = jax.device_put(y, sharding_for(y.shape, variable_sharding_names(var), sh.mesh, rules))
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
