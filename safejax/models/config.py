"""Model configuration for the Llama family (Llama 1/2/3, Alpaca, Mistral, Qwen2).

:class:`ModelConfig` is a frozen, hashable dataclass, so it can be passed as a static argument to
``jax.jit``.  It converts to and from a Hugging Face ``config.json`` dictionary
(:meth:`ModelConfig.from_hf_dict`, :meth:`ModelConfig.to_hf_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

# HF ``architectures`` entry -> our architecture name.
HF_CAUSAL_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# safe-rlhf score-model checkpoints (``*ForScore``): backbone under ``model.``, head ``score_head``.
HF_SCORE_ARCHITECTURES = {
    "LlamaForScore": "llama",
    "MistralForScore": "mistral",
    "Qwen2ForScore": "qwen2",
}
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
ARCHITECTURES = ("llama", "mistral", "qwen2")
# Attention over a whole sequence (training, scoring, prefill without a cache); cached decode steps always use
# the einsum path.  "einsum": two einsums with an explicit [B, KV, G, T, S] fp32 score tensor (default, every
# backend).  "xla" / "cudnn": jax.nn.dot_product_attention with that implementation; "cudnn" is the fused
# flash-attention kernel of NVIDIA GPUs (bf16/fp16 compute only).  Real positions agree across all three;
# fully masked query rows (left padding) are zeros with "einsum" and unspecified with the others.
ATTENTION_IMPLS = {"einsum": None, "xla": "xla", "cudnn": "cudnn"}
_CAUSAL_NAME = {v: k for k, v in HF_CAUSAL_ARCHITECTURES.items()}
_SCORE_NAME = {v: k for k, v in HF_SCORE_ARCHITECTURES.items()}
_HF_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

_ROPE_TYPES = ("default", "linear", "llama3")


def _dtype_name(d: Any) -> str:
    if d is None:
        return "float32"
    if isinstance(d, str):
        name = d
    else:
        name = np.dtype(d).name
    name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "f32": "float32"}.get(name, name)
    if name not in ("float32", "bfloat16", "float16", "float64"):
        raise ValueError(f"ModelConfig: unsupported dtype {d!r} (use float32, bfloat16 or float16)")
    return name


def _freeze(x: Any) -> Any:
    """Dicts -> sorted tuples of (key, value); lists -> tuples (hashability)."""
    if isinstance(x, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters (HF Llama naming in comments).

    ``dtype`` is the compute dtype of matmuls (e.g. ``"bfloat16"``); ``param_dtype`` the storage
    dtype of parameters (master weights, ``"float32"``).  Logits, softmax and norms are float32.
    ``architecture="qwen2"`` implies ``attention_bias=True`` (q/k/v biases, none on o_proj).
    ``rope_scaling`` is ``None`` or a mapping with ``rope_type`` in {``linear``, ``llama3``} plus
    its fields; it is stored as a sorted tuple of pairs to keep the config hashable (read it back
    with :attr:`rope_scaling_dict`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    architecture: str = "llama"
    sliding_window: int | None = None
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False
    attention_impl: str = "einsum"   # full-sequence attention: einsum | xla | cudnn (see ATTENTION_IMPLS)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("dtype", _dtype_name(self.dtype))
        set_("param_dtype", _dtype_name(self.param_dtype))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"ModelConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                                 f"{self.num_heads}; set head_dim explicitly")
            set_("head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim {self.head_dim} must be even for RoPE")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig: unknown attention_impl {self.attention_impl!r}; expected one of "
                             f"{tuple(ATTENTION_IMPLS)}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"ModelConfig: unknown architecture {self.architecture!r}; expected one of "
                             f"{ARCHITECTURES}")
        if self.architecture == "qwen2":
            set_("attention_bias", True)  # Qwen2 always has q/k/v biases (and none on o_proj)
        rs = self.rope_scaling
        if rs is not None:
            d = dict(rs)
            rtype = d.get("rope_type", d.get("type", "default"))
            if rtype not in _ROPE_TYPES:
                raise ValueError(f"ModelConfig: unsupported rope scaling type {rtype!r} (supported: {_ROPE_TYPES})")
            d.pop("type", None)
            d["rope_type"] = rtype
            d.pop("rope_theta", None)
            set_("rope_scaling", None if rtype == "default" else _freeze(d))
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            set_(k, _freeze(getattr(self, k)))

    # ----------------------------------------------------------------------------- derived

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies ``[head_dim // 2]`` float32, with linear / llama3 scaling (as HF)."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        rs = self.rope_scaling_dict
        if rs is None:
            return inv
        if rs["rope_type"] == "linear":
            return (inv / np.float32(rs["factor"])).astype(np.float32)
        # llama3
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", self.max_position_embeddings))
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, inv_l).astype(np.float32)

    # ----------------------------------------------------------------------------- HF mapping

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Build from a HF ``config.json`` dict (Llama / Mistral / Qwen2, causal LM or safe-rlhf score).

        ``source`` names the file in error messages; ``overrides`` replace fields (e.g. ``dtype``)."""
        arch = architecture_from_hf_dict(d, source=source)
        get = d.get
        rope_params = get("rope_parameters") or {}
        if isinstance(rope_params, Mapping) and rope_params and all(isinstance(v, Mapping)
                                                                     for v in rope_params.values()):
            raise ValueError(f"{source}: per-layer rope_parameters are not supported")
        theta = get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = get("rope_scaling") or None
        if scaling is None and rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
            scaling = dict(rope_params)
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in _ROPE_TYPES:
                raise ValueError(f"{source}: unsupported rope scaling type {rtype!r} (supported: linear, llama3)")
        if get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"{source}: unsupported hidden_act {get('hidden_act')!r} (only silu)")
        if get("mlp_bias", False):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        if get("pretraining_tp", 1) not in (1, None):
            pass  # only affects HF's training-time matmul split, not the math
        attention_bias = bool(get("attention_bias", False))
        sliding = get("sliding_window")
        if arch == "qwen2":
            attention_bias = True
            if get("use_sliding_window", False):
                raise ValueError(f"{source}: Qwen2 use_sliding_window=true is not supported")
            sliding = None
        elif arch == "llama":
            sliding = None
        head_dim = get("head_dim")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if d.get(key) is None:
                raise ValueError(f"{source}: required field '{key}' is missing")
        fields = dict(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(get("num_key_value_heads") or d["num_attention_heads"]),
            head_dim=int(head_dim) if head_dim else None,
            max_position_embeddings=int(get("max_position_embeddings", 2048)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            attention_bias=attention_bias,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            architecture=arch,
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            pad_token_id=get("pad_token_id"),
            initializer_range=float(get("initializer_range", 0.02)),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self, *, score: bool = False, score_dim: int = 1) -> dict:
        """A HF ``config.json`` dict that transformers loads (``score=True``: safe-rlhf ``*ForScore``)."""
        d: dict[str, Any] = {
            "architectures": [(_SCORE_NAME if score else _CAUSAL_NAME)[self.architecture]],
            "model_type": _HF_MODEL_TYPE[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": _thaw(self.bos_token_id),
            "eos_token_id": _thaw(self.eos_token_id),
            "pad_token_id": _thaw(self.pad_token_id),
            "attention_dropout": 0.0,
            "use_cache": True,
            "dtype": "float32",
        }
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling_dict)
        d["rope_parameters"] = rope
        d["rope_theta"] = self.rope_theta  # read by transformers 4.x
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling_dict)
        if self.architecture == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        elif self.architecture == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.architecture == "qwen2":
            d["use_sliding_window"] = False
            d["sliding_window"] = None
            d["max_window_layers"] = self.num_layers
        if score:
            d["score_dim"] = score_dim
        return d


def _thaw(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def architecture_from_hf_dict(d: Mapping[str, Any], *, source: str = "config.json") -> str:
    """Our architecture name (``llama`` / ``mistral`` / ``qwen2``) from a HF config dict."""
    archs = d.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        if a in HF_CAUSAL_ARCHITECTURES:
            return HF_CAUSAL_ARCHITECTURES[a]
        if a in HF_SCORE_ARCHITECTURES:
            return HF_SCORE_ARCHITECTURES[a]
    if archs:
        raise ValueError(f"{source}: unsupported architecture {', '.join(map(str, archs))} (supported: "
                         f"{', '.join(list(HF_CAUSAL_ARCHITECTURES) + list(HF_SCORE_ARCHITECTURES))})")
    mt = d.get("model_type")
    if mt in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[mt]
    raise ValueError(f"{source}: unsupported architecture (no 'architectures' entry, model_type={mt!r}); "
                     f"supported: {', '.join(HF_CAUSAL_ARCHITECTURES)}")


def is_score_hf_dict(d: Mapping[str, Any]) -> bool:
    archs = d.get("architectures") or []
    return any(a in HF_SCORE_ARCHITECTURES for a in archs) or "score_dim" in d
