"""Model configuration for the supported decoder-only families.

* Llama family (Llama 1/2/3, Alpaca, Mistral, Qwen2): RMSNorm, RoPE, SwiGLU MLP, grouped-query attention.
* GPT-2 (``GPT2LMHeadModel``): LayerNorm with bias, learned absolute position embeddings, plain
  ``act(fc(x))`` MLP with biases, biased q/k/v/o projections, tied LM head.

The family only changes a few switches (:attr:`ModelConfig.norm_type`, :attr:`ModelConfig.position_embedding`,
:attr:`ModelConfig.gated_mlp`, :attr:`ModelConfig.hidden_act`); the modules are shared.

:class:`ModelConfig` is a frozen, hashable dataclass, so it can be passed as a static argument to
``jax.jit``.  It converts to and from a Hugging Face ``config.json`` dictionary
(:meth:`ModelConfig.from_hf_dict`, :meth:`ModelConfig.to_hf_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from safejax.errors import ModelFileError

# HF ``architectures`` entry -> our architecture name.
HF_CAUSAL_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
# safe-rlhf score-model checkpoints (``*ForScore``): backbone under ``model.`` (GPT-2: ``transformer.``),
# head ``score_head``.
HF_SCORE_ARCHITECTURES = {
    "LlamaForScore": "llama",
    "MistralForScore": "mistral",
    "Qwen2ForScore": "qwen2",
    "GPT2ForScore": "gpt2",
}
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}
ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# MLP activations (HF ``ACT2FN`` names).  "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast" are the tanh
# approximation of GELU, "gelu" the exact (erf) one.
ACTIVATIONS = ("silu", "swish", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")
# Attention over a whole sequence (training, scoring, prefill without a cache); cached decode steps always use
# the einsum path.  "einsum": two einsums with an explicit [B, KV, G, T, S] fp32 score tensor (default, every
# backend).  "xla" / "cudnn": jax.nn.dot_product_attention with that implementation; "cudnn" is the fused
# flash-attention kernel of NVIDIA GPUs (bf16/fp16 compute only).  Real positions agree across all three;
# fully masked query rows (left padding) are zeros with "einsum" and unspecified with the others.
ATTENTION_IMPLS = {"einsum": None, "xla": "xla", "cudnn": "cudnn"}
_CAUSAL_NAME = {v: k for k, v in HF_CAUSAL_ARCHITECTURES.items()}
_SCORE_NAME = {v: k for k, v in HF_SCORE_ARCHITECTURES.items()}
_HF_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}

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
        raise ModelFileError(f"ModelConfig: unsupported dtype {d!r} (use float32, bfloat16 or float16)")
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
    ``architecture="gpt2"`` implies ``attention_bias=True`` (q/k/v and o biases), ``num_kv_heads ==
    num_heads``, LayerNorm (``rms_norm_eps`` is then GPT-2's ``layer_norm_epsilon``), learned positions
    (``max_position_embeddings`` rows, HF ``n_positions``; positions at or beyond it are out of range)
    and a plain ``act(up(x))`` MLP with ``hidden_act`` (HF ``activation_function``, ``intermediate_size``
    = HF ``n_inner``).  ``scale_attn_weights=False`` drops the ``1/sqrt(head_dim)`` score scale (GPT-2 only).
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
    hidden_act: str = "silu"         # MLP activation (ACTIVATIONS); the Llama family requires silu
    scale_attn_weights: bool = True  # scores * head_dim**-0.5 (GPT-2's scale_attn_weights)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("dtype", _dtype_name(self.dtype))
        set_("param_dtype", _dtype_name(self.param_dtype))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ModelFileError(f"ModelConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                                 f"{self.num_heads}; set head_dim explicitly")
            set_("head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ModelFileError(f"ModelConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ModelFileError(f"ModelConfig: unknown attention_impl {self.attention_impl!r}; expected one of "
                             f"{tuple(ATTENTION_IMPLS)}")
        if self.architecture not in ARCHITECTURES:
            raise ModelFileError(f"ModelConfig: unknown architecture {self.architecture!r}; expected one of "
                             f"{ARCHITECTURES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ModelFileError(f"ModelConfig: unsupported hidden_act {self.hidden_act!r}; expected one of "
                             f"{ACTIVATIONS}")
        if self.architecture in LLAMA_FAMILY:
            if self.head_dim % 2:
                raise ModelFileError(f"ModelConfig: head_dim {self.head_dim} must be even for RoPE")
            if self.hidden_act not in ("silu", "swish"):
                raise ModelFileError(f"ModelConfig: the {self.architecture} MLP uses silu, got hidden_act "
                                 f"{self.hidden_act!r}")
            if not self.scale_attn_weights:
                raise ModelFileError("ModelConfig: scale_attn_weights=False is only supported for gpt2")
        if self.architecture == "qwen2":
            set_("attention_bias", True)  # Qwen2 always has q/k/v biases (and none on o_proj)
        if self.architecture == "gpt2":
            set_("attention_bias", True)  # GPT-2's c_attn / c_proj always carry biases
            if self.num_kv_heads != self.num_heads:
                raise ModelFileError(f"ModelConfig: gpt2 has no grouped-query attention; num_kv_heads "
                                 f"{self.num_kv_heads} must equal num_heads {self.num_heads}")
            if self.head_dim * self.num_heads != self.hidden_size:
                raise ModelFileError(f"ModelConfig: gpt2 needs head_dim * num_heads == hidden_size, got "
                                 f"{self.head_dim} * {self.num_heads} != {self.hidden_size}")
            if self.sliding_window is not None:
                raise ModelFileError("ModelConfig: gpt2 has no sliding-window attention (sliding_window must be None)")
        rs = self.rope_scaling
        if rs is not None:
            d = dict(rs)
            rtype = d.get("rope_type", d.get("type", "default"))
            if rtype not in _ROPE_TYPES:
                raise ModelFileError(f"ModelConfig: unsupported rope scaling type {rtype!r} (supported: {_ROPE_TYPES})")
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
    def norm_type(self) -> str:
        """``"rmsnorm"`` (Llama family) or ``"layernorm"`` (GPT-2: LayerNorm with a bias)."""
        return "layernorm" if self.architecture == "gpt2" else "rmsnorm"

    @property
    def position_embedding(self) -> str:
        """``"rope"`` (Llama family) or ``"learned"`` (GPT-2: absolute position table added to the tokens)."""
        return "learned" if self.architecture == "gpt2" else "rope"

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU ``down(act(gate(x)) * up(x))`` (Llama family) vs plain ``down(act(up(x)))`` with biases."""
        return self.architecture != "gpt2"

    @property
    def attn_scale(self) -> float:
        """Multiplier of the attention scores: ``head_dim ** -0.5`` (1.0 when ``scale_attn_weights`` is off)."""
        return float(self.head_dim) ** -0.5 if self.scale_attn_weights else 1.0

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
        """Build from a HF ``config.json`` dict (Llama / Mistral / Qwen2 / GPT-2, causal LM or safe-rlhf score).

        ``source`` names the file in error messages; ``overrides`` replace fields (e.g. ``dtype``)."""
        arch = architecture_from_hf_dict(d, source=source)
        if arch == "gpt2":
            return cls._from_gpt2_dict(d, source=source, **overrides)
        get = d.get
        rope_params = get("rope_parameters") or {}
        if isinstance(rope_params, Mapping) and rope_params and all(isinstance(v, Mapping)
                                                                     for v in rope_params.values()):
            raise ModelFileError(f"{source}: per-layer rope_parameters are not supported")
        theta = get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = get("rope_scaling") or None
        if scaling is None and rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
            scaling = dict(rope_params)
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in _ROPE_TYPES:
                raise ModelFileError(f"{source}: unsupported rope scaling type {rtype!r} (supported: linear, llama3)")
        if get("hidden_act", "silu") not in ("silu", "swish"):
            raise ModelFileError(f"{source}: unsupported hidden_act {get('hidden_act')!r} (only silu)")
        if get("mlp_bias", False):
            raise ModelFileError(f"{source}: mlp_bias=true is not supported")
        if get("pretraining_tp", 1) not in (1, None):
            pass  # only affects HF's training-time matmul split, not the math
        attention_bias = bool(get("attention_bias", False))
        sliding = get("sliding_window")
        if arch == "qwen2":
            attention_bias = True
            if get("use_sliding_window", False):
                raise ModelFileError(f"{source}: Qwen2 use_sliding_window=true is not supported")
            sliding = None
        elif arch == "llama":
            sliding = None
        head_dim = get("head_dim")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if d.get(key) is None:
                raise ModelFileError(f"{source}: required field '{key}' is missing")
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

    @classmethod
    def _from_gpt2_dict(cls, d: Mapping[str, Any], *, source: str, **overrides) -> "ModelConfig":
        """GPT-2 ``config.json`` (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``, ``n_inner``, ...)."""

        def first(*keys, default=None):
            for k in keys:
                if d.get(k) is not None:
                    return d[k]
            return default

        for keys in (("vocab_size",), ("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"),
                     ("n_head", "num_attention_heads")):
            if first(*keys) is None:
                raise ModelFileError(f"{source}: required field '{keys[0]}' is missing")
        if d.get("scale_attn_by_inverse_layer_idx", False):
            raise ModelFileError(f"{source}: 'scale_attn_by_inverse_layer_idx': true is not supported (safejax does "
                             "not implement GPT-2's extra 1/(layer_idx+1) attention-score scale)")
        if d.get("add_cross_attention", False):
            raise ModelFileError(f"{source}: add_cross_attention=true is not supported (decoder-only GPT-2 only)")
        act = d.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ModelFileError(f"{source}: unsupported activation_function {act!r} (supported: {', '.join(ACTIVATIONS)})")
        # reorder_and_upcast_attn only changes HF's mixed-precision order of operations; our scores and softmax
        # are float32 anyway, so it is accepted and ignored.
        D = int(first("n_embd", "hidden_size"))
        inner = first("n_inner", "intermediate_size")
        heads = int(first("n_head", "num_attention_heads"))
        fields = dict(
            vocab_size=int(d["vocab_size"]),
            hidden_size=D,
            intermediate_size=int(inner) if inner else 4 * D,
            num_layers=int(first("n_layer", "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=heads,
            max_position_embeddings=int(first("n_positions", "max_position_embeddings", default=1024)),
            rms_norm_eps=float(first("layer_norm_epsilon", default=1e-5)),
            attention_bias=True,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            architecture="gpt2",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            initializer_range=float(d.get("initializer_range", 0.02)),
            hidden_act=act,
            scale_attn_weights=bool(d.get("scale_attn_weights", True)),
        )
        fields.update(overrides)
        return cls(**fields)

    def _to_gpt2_dict(self, *, score: bool, score_dim: int) -> dict:
        d: dict[str, Any] = {
            "architectures": [(_SCORE_NAME if score else _CAUSAL_NAME)["gpt2"]],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_embd": self.hidden_size,
            "n_layer": self.num_layers,
            "n_head": self.num_heads,
            "n_positions": self.max_position_embeddings,
            "n_inner": self.intermediate_size,
            "activation_function": self.hidden_act,
            "layer_norm_epsilon": self.rms_norm_eps,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": _thaw(self.bos_token_id),
            "eos_token_id": _thaw(self.eos_token_id),
            "pad_token_id": _thaw(self.pad_token_id),
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "attn_pdrop": 0.1,
            "use_cache": True,
            "dtype": "float32",
        }
        if score:
            d["score_dim"] = score_dim
        return d

    def to_hf_dict(self, *, score: bool = False, score_dim: int = 1) -> dict:
        """A HF ``config.json`` dict that transformers loads (``score=True``: safe-rlhf ``*ForScore``)."""
        if self.architecture == "gpt2":
            return self._to_gpt2_dict(score=score, score_dim=score_dim)
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
    """Our architecture name (``llama`` / ``mistral`` / ``qwen2`` / ``gpt2``) from a HF config dict."""
    archs = d.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        if a in HF_CAUSAL_ARCHITECTURES:
            return HF_CAUSAL_ARCHITECTURES[a]
        if a in HF_SCORE_ARCHITECTURES:
            return HF_SCORE_ARCHITECTURES[a]
    if archs:
        raise ModelFileError(f"{source}: unsupported architecture {', '.join(map(str, archs))} (supported: "
                         f"{', '.join(list(HF_CAUSAL_ARCHITECTURES) + list(HF_SCORE_ARCHITECTURES))})")
    mt = d.get("model_type")
    if mt in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[mt]
    raise ModelFileError(f"{source}: unsupported architecture (no 'architectures' entry, model_type={mt!r}); "
                     f"supported: {', '.join(HF_CAUSAL_ARCHITECTURES)}")


def is_score_hf_dict(d: Mapping[str, Any]) -> bool:
    archs = d.get("architectures") or []
    return any(a in HF_SCORE_ARCHITECTURES for a in archs) or "score_dim" in d
