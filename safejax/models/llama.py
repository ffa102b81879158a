"""Decoder-only transformers in Flax NNX: the Llama family (Llama 1/2/3, Alpaca, Mistral, Qwen2) and GPT-2.

Math follows the HF PyTorch references exactly.  Llama family:

* RMSNorm in float32, then ``weight * x.astype(dtype)``;
* attention with grouped-query heads (GQA), HF *half-split* RoPE (``rotate_half``), optional
  q/k/v(/o) biases (Qwen2: q/k/v only), optional sliding window (Mistral);
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``;
* final RMSNorm and an LM head (tied to the embedding when ``tie_word_embeddings``).

GPT-2 (``config.architecture == "gpt2"``) reuses the same modules with its switches
(:attr:`ModelConfig.norm_type`, :attr:`ModelConfig.position_embedding`, :attr:`ModelConfig.gated_mlp`):

* LayerNorm with a bias, statistics and affine in float32 (``input_layernorm`` = HF ``ln_1``,
  ``post_attention_layernorm`` = ``ln_2``, ``norm`` = ``ln_f``);
* no RoPE: a learned position table ``model.embed_positions.embedding [n_positions, D]``
  (``length``, ``embed``; HF ``wpe``) added to the token embedding, indexed by ``positions``;
* multi-head attention with biases on q/k/v/o (HF's fused ``c_attn`` is split into q/k/v on load);
* plain MLP ``down(act(up(x)))`` with biases (HF ``c_fc`` / ``c_proj``, ``act`` = ``hidden_act``);
* LM head tied to the token embedding.

Parameter layout (paths mirror HF names so checkpoints map 1:1, see :mod:`safejax.models.hf`)::

    model.embed_tokens.embedding            [V, D]        (vocab, embed)
    model.layers[i].input_layernorm.weight  [D]           (norm,)
    model.layers[i].self_attn.q_proj.kernel [D, H, hd]    (embed, heads, head_dim)     (+ bias [H, hd])
    model.layers[i].self_attn.k_proj.kernel [D, KV, hd]   (embed, kv_heads, head_dim)  (+ bias [KV, hd])
    model.layers[i].self_attn.v_proj.kernel [D, KV, hd]   (embed, kv_heads, head_dim)  (+ bias [KV, hd])
    model.layers[i].self_attn.o_proj.kernel [H, hd, D]    (heads, head_dim, embed)     (+ bias [D], llama only)
    model.layers[i].post_attention_layernorm.weight [D]
    model.layers[i].mlp.{gate,up}_proj.kernel [D, F]      (embed, mlp)     (GPT-2: no gate; + biases [F], [D])
    model.layers[i].mlp.down_proj.kernel      [F, D]      (mlp, embed)
    model.norm.weight                       [D]                            (GPT-2: + norm biases [D])
    model.embed_positions.embedding         [P, D]        (length, embed)  GPT-2 only
    lm_head.kernel                          [D, V]        (embed, vocab)   absent when tied

With ``scan_layers=True`` ``model.layers`` is one stacked block whose params carry a leading
``[L]`` axis named ``layers``.  Compute dtype (``config.dtype``) is separate from the parameter
dtype (``config.param_dtype``); logits and softmax are float32.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from safejax.models.config import ATTENTION_IMPLS, ModelConfig
from safejax.parallel import constrain

Array = jax.Array
# logical axes of the residual stream [B, T, D]: the batch over data x fsdp (parallel.LOGICAL_AXIS_RULES)
ACTIVATION_AXES = ("batch", "length", "embed")

# HF ACT2FN names -> jax functions (see config.ACTIVATIONS).
ACT_FNS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


# ----------------------------------------------------------------------------- building blocks


def _param(rngs: nnx.Rngs | None, init, shape, names, param_dtype) -> nnx.Param:
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(key, tuple(shape), jnp.dtype(param_dtype)))


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)``, contracting the last ``len(in_shape)`` axes of ``x``.

    kernel ``[*in_shape, *out_shape]`` (normal(initializer_range)), bias ``[*out_shape]`` (zeros).
    Inputs are cast to ``dtype``; the output has ``out_dtype`` (default ``dtype``)."""

    def __init__(self, in_shape, out_shape, names, *, use_bias: bool, bias_names=None, dtype="float32",
                 param_dtype="float32", init_std=0.02, out_dtype=None, rngs: nnx.Rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.n_in = len(in_shape)
        self.dtype = jnp.dtype(dtype).name
        self.out_dtype = jnp.dtype(out_dtype or dtype).name
        self.kernel = _param(rngs, nnx.initializers.normal(init_std), in_shape + out_shape, names, param_dtype)
        if use_bias:
            bias_names = bias_names or tuple(names)[self.n_in:]
            self.bias = _param(rngs, nnx.initializers.zeros, out_shape, bias_names, param_dtype)
        else:
            self.bias = None

    def __call__(self, x: Array) -> Array:
        dt = jnp.dtype(self.dtype)
        y = jnp.tensordot(x.astype(dt), self.kernel[...].astype(dt), axes=self.n_in,
                          preferred_element_type=jnp.dtype(self.out_dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        adapter = getattr(self, "lora", None)  # safejax.models.lora.add_lora's LoRAAdapter, if any
        if adapter is not None:
            y = y + adapter(x).astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding ``[V, D]`` (vocab, embed); ``attend`` gives tied-head logits in float32.

    ``num_embeddings`` / ``names`` build other tables (GPT-2's positions: ``[P, D]`` (length, embed))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, num_embeddings: int | None = None,
                 names: tuple[str, str] = ("vocab", "embed")):
        self.dtype = config.dtype
        rows = config.vocab_size if num_embeddings is None else int(num_embeddings)
        self.embedding = _param(rngs, nnx.initializers.normal(config.initializer_range),
                                (rows, config.hidden_size), tuple(names), config.param_dtype)

    def __call__(self, ids: Array) -> Array:
        """ids ``[B, T]`` int -> ``[B, T, D]`` in compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(jnp.dtype(self.dtype))

    def attend(self, h: Array) -> Array:
        """h ``[B, T, D]`` -> logits ``[B, T, V]`` float32 (``h @ embedding.T``)."""
        dt = jnp.dtype(self.dtype)
        return jnp.einsum("btd,vd->btv", h.astype(dt), self.embedding[...].astype(dt),
                          preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """``weight * (x / rms(x)).astype(dtype)``, the normalisation computed in float32."""

    def __init__(self, dim: int, eps: float, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        self.eps = float(eps)
        self.dtype = jnp.dtype(dtype).name
        self.weight = _param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: Array) -> Array:
        dt = jnp.dtype(self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dt) * x32.astype(dt)


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` (GPT-2), statistics and affine in float32, then cast
    to ``dtype``.  Params ``weight`` (ones) and ``bias`` (zeros), both ``[D]`` (norm,)."""

    def __init__(self, dim: int, eps: float, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        self.eps = float(eps)
        self.dtype = jnp.dtype(dtype).name
        self.weight = _param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.bias = _param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        xc = x32 - mean
        var = jnp.mean(xc * xc, axis=-1, keepdims=True)
        y = xc * lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(jnp.dtype(self.dtype))


def make_norm(config: ModelConfig, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
    """The family's norm over ``hidden_size`` (RMSNorm, or LayerNorm with a bias for GPT-2)."""
    c = config
    cls = LayerNorm if c.norm_type == "layernorm" else RMSNorm
    return cls(c.hidden_size, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)


def rope_cos_sin(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """positions ``[B, T]`` -> cos, sin ``[B, T, head_dim]`` float32 (HF half-split layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x ``[B, T, N, hd]``; cos/sin ``[B, T, hd]``.  ``x*cos + rotate_half(x)*sin`` in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rot * sin[:, :, None, :]
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (none for GPT-2: ``cos = sin = None``) and an optional KV cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        D, H, KV, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, init_std=c.initializer_range, rngs=rngs)
        qkv_bias = c.attention_bias
        o_bias = c.attention_bias and c.architecture != "qwen2"
        self.q_proj = Dense((D,), (H, hd), ("embed", "heads", "head_dim"), use_bias=qkv_bias, **kw)
        self.k_proj = Dense((D,), (KV, hd), ("embed", "kv_heads", "head_dim"), use_bias=qkv_bias, **kw)
        self.v_proj = Dense((D,), (KV, hd), ("embed", "kv_heads", "head_dim"), use_bias=qkv_bias, **kw)
        self.o_proj = Dense((H, hd), (D,), ("heads", "head_dim", "embed"), use_bias=o_bias, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = H, KV, hd
        self.dtype = c.dtype
        self.attention_impl = c.attention_impl
        self.scale = c.attn_scale

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, kv: tuple[Array, Array] | None = None,
                 cache_index: Array | int = 0) -> tuple[Array, tuple[Array, Array] | None]:
        """x ``[B, T, D]``; mask ``[B, T, S]`` bool (True = may attend); kv: cache ``([B, KV, S, hd],)*2``.

        Without a cache S = T.  With a cache the new k/v are written at slots ``[cache_index,
        cache_index + T)`` and attention runs over all S cache slots.  Returns (``[B, T, D]``, new kv)."""
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        G = H // KV
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        dt = jnp.dtype(self.dtype)
        qg = q.reshape(B, T, KV, G, hd).astype(dt)
        if kv is not None:
            # the cache is kv-head-major [B, KV, S, hd]: both attention matmuls read it in place, with no
            # per-step transposed copy of the whole cache
            ck, cv = kv
            idx = (0, 0, cache_index, 0)
            ck = lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), idx)
            cv = lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), idx)
            new_kv = (ck, cv)
            scores = jnp.einsum("btkgd,bksd->bkgts", qg, ck.astype(dt), preferred_element_type=jnp.float32)
            probs = self._masked_softmax(scores, mask)
            out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(dt), cv.astype(dt))
            return self.o_proj(out.reshape(B, T, H, hd)), new_kv
        if kv is None and self.attention_impl != "einsum":
            # full sequence (S = T, query slot t = key slot t): the mask already holds causality and padding;
            # is_causal lets a fused kernel skip the blocks above the diagonal
            out = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt), mask=mask[:, None],
                                               scale=self.scale, is_causal=True,
                                               implementation=ATTENTION_IMPLS[self.attention_impl])
            return self.o_proj(out), None
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(dt), preferred_element_type=jnp.float32)
        probs = self._masked_softmax(scores, mask)
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dt), v.astype(dt))
        out = out.reshape(B, T, H, hd)
        return self.o_proj(out), new_kv

    def _masked_softmax(self, scores: Array, mask: Array) -> Array:
        """scores ``[B, KV, G, T, S]`` float32, mask ``[B, T, S]`` -> probabilities (0 where masked)."""
        scores = scores * np.float32(self.scale)
        m = mask[:, None, None, :, :]
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.where(m, probs, 0.0)  # a fully masked row (left padding) gives zeros, never NaN


class MLP(nnx.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))`` (Llama family), or plain ``down(act(up(x)))`` with biases
    when ``not config.gated_mlp`` (GPT-2: HF ``c_fc`` = ``up_proj``, ``c_proj`` = ``down_proj``)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        bias = not c.gated_mlp
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, init_std=c.initializer_range, rngs=rngs,
                  use_bias=bias)
        self.act = c.hidden_act
        if c.gated_mlp:
            self.gate_proj = Dense((c.hidden_size,), (c.intermediate_size,), ("embed", "mlp"), **kw)
        else:
            self.gate_proj = None
        self.up_proj = Dense((c.hidden_size,), (c.intermediate_size,), ("embed", "mlp"), **kw)
        self.down_proj = Dense((c.intermediate_size,), (c.hidden_size,), ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        act = ACT_FNS[self.act]
        if self.gate_proj is None:
            return self.down_proj(act(self.up_proj(x)))
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """Pre-norm block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = make_norm(c, rngs)
        self.self_attn = Attention(c, rngs=rngs)
        self.post_attention_layernorm = make_norm(c, rngs)
        self.mlp = MLP(c, rngs=rngs)

    def __call__(self, h, cos, sin, mask, kv=None, cache_index=0):
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv, cache_index)
        h = h + a.astype(h.dtype)
        h = h + self.mlp(self.post_attention_layernorm(h)).astype(h.dtype)
        return constrain(h, ACTIVATION_AXES), kv


def _block_apply(block: DecoderBlock, h, cos, sin, mask, kv, cache_index):
    return block(h, cos, sin, mask, kv, cache_index)


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> DecoderBlock:
    """One DecoderBlock whose params have a leading ``[L]`` axis (logical name ``layers``)."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=config.num_layers,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r: nnx.Rngs) -> DecoderBlock:
        return DecoderBlock(config, rngs=r)

    return make(rngs)


# ----------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value cache, in compute dtype.

    Unrolled layers (default): ``k``, ``v`` are tuples of ``L`` arrays ``[B, KV, S_max, hd]``.
    ``scan_layers=True``: ``k``, ``v`` are stacked arrays ``[L, B, KV, S_max, hd]``.
    Slot ``s`` of the cache holds the token at column ``s`` of the (prompt + generated) buffer;
    which slots hold real tokens is given by the ``attention_mask [B, S_max]`` passed each call."""

    k: Any
    v: Any

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[-2]

    @property
    def batch_size(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[-4]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """Zero cache for ``batch`` rows and ``max_len`` slots (dtype default: ``config.dtype``)."""
    dt = jnp.dtype(dtype or config.dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    if config.scan_layers:
        z = jnp.zeros((config.num_layers,) + shape, dt)
        return KVCache(k=z, v=jnp.zeros_like(z))
    return KVCache(k=tuple(jnp.zeros(shape, dt) for _ in range(config.num_layers)),
                   v=tuple(jnp.zeros(shape, dt) for _ in range(config.num_layers)))


def default_positions(mask: Array) -> Array:
    """``max(cumsum(mask) - 1, 0)`` ``[B, S]`` int32: left padding does not shift positions."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask_3d(kv_mask: Array, q_slots: Array, sliding_window: int | None) -> Array:
    """``[B, T, S]`` bool: key slot s visible from query slot q iff s <= q, kv_mask[b, s] and
    (with a window W) q - s < W."""
    S = kv_mask.shape[-1]
    k_slots = jnp.arange(S, dtype=jnp.int32)
    causal = k_slots[None, :] <= q_slots[:, None]
    if sliding_window is not None:
        causal = causal & (q_slots[:, None] - k_slots[None, :] < sliding_window)
    return causal[None, :, :] & kv_mask.astype(bool)[:, None, :]


# ----------------------------------------------------------------------------- backbone


class Backbone(nnx.Module):
    """Embedding -> N decoder blocks -> final norm (HF ``LlamaModel`` / ``GPT2Model``, path ``model.``).

    GPT-2 adds ``embed_positions`` (learned absolute positions, indexed by ``positions``)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed_tokens = Embed(c, rngs=rngs)
        if c.position_embedding == "learned":
            self.embed_positions = Embed(c, rngs=rngs, num_embeddings=c.max_position_embeddings,
                                         names=("length", "embed"))
        else:
            self.embed_positions = None
        if c.scan_layers:
            self.layers = _stacked_blocks(c, rngs)
        else:
            self.layers = nnx.List([DecoderBlock(c, rngs=rngs) for _ in range(c.num_layers)])
        self.norm = make_norm(c, rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None,
                 cache: KVCache | None = None, cache_index: Array | int | None = None,
                 segment_ids: Array | None = None) -> tuple[Array, KVCache | None]:
        """input_ids ``[B, T]`` -> (hidden ``[B, T, D]`` after the final norm, new cache or None).

        Without a cache, ``attention_mask`` is ``[B, T]``.  With a cache it is the ``[B, S_max]``
        mask of valid cache slots (including the T new tokens at ``[cache_index, cache_index+T)``).
        ``segment_ids [B, T]`` (packed rows, no cache): a token attends only to earlier tokens of its own
        segment; pass ``positions`` that restart at 0 in every segment."""
        c = self.config
        input_ids = jnp.asarray(input_ids)
        B, T = input_ids.shape
        if cache is None:
            S = T
            start = 0
            q_slots = jnp.arange(T, dtype=jnp.int32)
        else:
            S = cache.max_len
            start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
            q_slots = start + jnp.arange(T, dtype=jnp.int32)
        kv_mask = jnp.ones((B, S), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        if kv_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {kv_mask.shape}, expected {(B, S)} "
                             f"({'[B, S_max] cache slots' if cache is not None else '[B, T]'})")
        if positions is None:
            pos_all = default_positions(kv_mask)
            positions = pos_all if cache is None else lax.dynamic_slice_in_dim(pos_all, start, T, axis=1)
        positions = jnp.asarray(positions)
        mask = attention_mask_3d(kv_mask, q_slots, c.sliding_window)
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are not supported with a KV cache")
            seg = jnp.asarray(segment_ids)
            mask = mask & (seg[:, :, None] == seg[:, None, :])
        if self.embed_positions is None:
            cos, sin = rope_cos_sin(positions, c.rope_inv_freq())
            h = self.embed_tokens(input_ids)
        else:  # learned absolute positions (GPT-2): both tables cast to the compute dtype at use, then summed
            cos = sin = None
            h = self.embed_tokens(input_ids) + self.embed_positions(positions)
        h = constrain(h, ACTIVATION_AXES)

        if c.scan_layers:
            gd, st = nnx.split(self.layers)

            def body(h, xs):
                st_l, kv = xs
                blk = nnx.merge(gd, st_l)
                return blk(h, cos, sin, mask, kv, start)

            if c.remat:
                body = jax.checkpoint(body)
            xs_kv = None if cache is None else (cache.k, cache.v)
            h, kvs = lax.scan(body, h, (st, xs_kv))
            new_cache = None if cache is None else KVCache(k=kvs[0], v=kvs[1])
        else:
            ks, vs = [], []
            apply = nnx.remat(_block_apply) if c.remat else _block_apply
            for i, blk in enumerate(self.layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                h, kv = apply(blk, h, cos, sin, mask, kv, start)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            new_cache = None if cache is None else KVCache(k=tuple(ks), v=tuple(vs))
        return self.norm(h), new_cache


class CausalLM(nnx.Module):
    """Decoder-only language model (HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` /
    ``GPT2LMHeadModel``).

    ``lm(input_ids [B, T], attention_mask [B, T] | None, positions [B, T] | None) -> logits [B, T, V] f32``.
    Decode: ``lm(ids [B, T], attention_mask=kv_mask [B, S_max], positions=[B, T], cache=cache,
    cache_index=i) -> (logits [B, T, V], new_cache)``; new k/v go to slots ``[i, i+T)``.
    Default positions: ``max(cumsum(mask) - 1, 0)``.  Packed rows: ``segment_ids=[B, T]`` (see
    :meth:`Backbone.__call__`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = Backbone(config, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense((config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), use_bias=False,
                                 dtype=config.dtype, param_dtype=config.param_dtype,
                                 init_std=config.initializer_range, out_dtype="float32", rngs=rngs)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None,
                      positions: Array | None = None, segment_ids: Array | None = None) -> Array:
        """``[B, T, D]`` hidden states after the final norm (compute dtype)."""
        return self.model(input_ids, attention_mask, positions, segment_ids=segment_ids)[0]

    def logits_from_hidden(self, h: Array) -> Array:
        """h ``[B, T, D]`` -> logits ``[B, T, V]`` float32."""
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h).astype(jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None,
                 *, cache: KVCache | None = None, cache_index: Array | int | None = None,
                 segment_ids: Array | None = None):
        h, new_cache = self.model(input_ids, attention_mask, positions, cache, cache_index, segment_ids)
        logits = self.logits_from_hidden(h)
        if cache is None:
            return logits
        return logits, new_cache
