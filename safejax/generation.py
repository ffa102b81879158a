"""Jitted rollout sampler: one prefill call, then a decode loop over a preallocated KV cache.

Shapes are static: prompts are left-padded to a fixed width ``P`` (every prompt ends at column
``P-1``), and at most ``max_new_tokens = N`` decode steps run; a row that emitted EOS keeps
producing ``pad`` with mask 0, and the loop (a ``lax.while_loop``) stops as soon as every row has
emitted EOS, leaving the remaining columns ``pad`` as the full loop would.  Outputs are ``[B, P+N]``.
With ``num_return_sequences = G`` each prompt is prefilled once and its KV cache shared by its G
consecutive output rows (``B = prompts x G``).

Positions follow one rule everywhere (generation and scoring): they follow the sequence layout, i.e. the column
minus the row's left-padding (:func:`positions_from_mask`), as the reference's ``arange`` positions do up to a
per-row shift; a token masked out inside a sequence (a hole) keeps its column's position.
Sampling supports temperature, top-k, top-p and the HF repetition penalty; ``greedy=True`` takes the
argmax (equal to ``transformers`` greedy ``generate``).

The sampler runs on whatever shardings the actor's params already have (the training mesh): no
resharded copy of the actor is made for generation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from safejax.config import check_range
from safejax.models import init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    repetition_penalty: float = 1.0
    greedy: bool = False
    # cast the matmul weights (every ``kernel`` and ``embedding``) to the compute dtype once, before the decode
    # loop: with fp32 master weights and bf16 compute, each decode step then reads 2 bytes per weight, not 4.
    # Exact: the model casts those weights to the compute dtype at use anyway (norms and biases stay as stored).
    cast_weights: bool = True
    # G samples per prompt: each prompt is prefilled once and its KV cache copied to its G consecutive rows
    num_return_sequences: int = 1
    # stop the decode loop once every row has emitted EOS (outputs unchanged; False = always N steps)
    early_exit: bool = True

    def validate(self) -> None:
        check_range("rollout.max_new_tokens", self.max_new_tokens, low=1)
        check_range("rollout.num_return_sequences", self.num_return_sequences, low=1)
        check_range("rollout.temperature", self.temperature, low=0.0, low_open=True)
        check_range("rollout.top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_range("rollout.top_k", self.top_k, low=0)
        check_range("rollout.repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)


class GenerationOutput(NamedTuple):
    sequences: jax.Array        # [B, P+N] int32: left-padded prompt, then response, pad after EOS
    attention_mask: jax.Array   # [B, P+N] bool: 1 on real prompt and response tokens (EOS included)
    response_lengths: jax.Array  # [B] int32: generated tokens incl. EOS
    decode_steps: jax.Array | int = 0  # [] int32: decode steps the loop ran (< N when every row ended early)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """``[B, T]`` mask -> ``[B, T]`` int32 positions ``max(t - first_real_t, 0)``: the left-padding offset only.

    Equal to ``cumsum(mask) - 1`` on the real tokens of a mask without holes; after a hole (a token masked
    out inside the sequence, e.g. a sampled unk) the later tokens keep their layout positions, not shifted by one."""
    t = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    first = jnp.argmax(mask.astype(jnp.bool_), axis=-1).astype(jnp.int32)
    return jnp.maximum(t[None, :] - first[:, None], 0)


def process_logits(logits: jax.Array, seen: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Apply repetition penalty, temperature, top-k and top-p to ``logits [B, V]`` (float32).

    ``seen [B, V]`` marks tokens already in the sequence (prompt included), as in HF."""
    logits = logits.astype(jnp.float32)
    if cfg.repetition_penalty != 1.0:
        pen = jnp.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = jnp.where(seen, pen, logits)
    if cfg.greedy:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    neg = jnp.finfo(jnp.float32).min
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (cum - probs) < cfg.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


MATMUL_WEIGHT_NAMES = ("kernel", "embedding")


def cast_matmul_weights(lm: Any) -> Any:
    """A view of module ``lm`` whose ``kernel``/``embedding`` params are stored in ``lm.config.dtype``.

    Bit-exact for safejax models (``Dense`` and ``Embed`` cast those weights at use); norm scales and
    biases keep their dtype.  A no-op when the params already have the compute dtype.  Call inside jit."""
    dt = jnp.dtype(lm.config.dtype)
    graphdef, params, rest = nnx.split(lm, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)

    def cast(path, x):
        name = getattr(path[-1], "key", None)
        if name in MATMUL_WEIGHT_NAMES and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt:
            return x.astype(dt)
        return x

    cast_pure = jax.tree_util.tree_map_with_path(cast, pure)
    if all(a is b for a, b in zip(jax.tree.leaves(pure), jax.tree.leaves(cast_pure))):
        return lm
    nnx.replace_by_pure_dict(params, cast_pure)
    return nnx.merge(graphdef, params, rest)


class DecodeState(NamedTuple):
    """Carry of the decode loop for ``B`` rows (``B = prompts x num_return_sequences``), total width ``P+N``."""

    cache: Any                 # KVCache, ``[B, P+N, KV, hd]`` per layer (compute dtype)
    tokens: jax.Array          # [B, P+N] int32: prompt, then sampled tokens, pad beyond
    kv_mask: jax.Array         # [B, P+N] bool: real cache slots
    done: jax.Array            # [B] bool: EOS emitted
    last_pos: jax.Array        # [B] int32: position of the last token written
    seen: jax.Array            # [B, V] bool: tokens in the sequence (repetition penalty only; else all False)
    next_logits: jax.Array     # [B, V] float32: logits for the next token


def repeat_rows(x: Any, g: int, axis: int = 0) -> Any:
    """Each row of ``x`` (along ``axis``) repeated ``g`` times consecutively (``jnp.repeat``); identity for g=1."""
    return x if g == 1 else jnp.repeat(x, g, axis=axis)


def prefill(lm: Any, prompt_ids: jax.Array, prompt_mask: jax.Array, cfg: SamplingConfig, *,
            pad_token_id: int) -> DecodeState:
    """Run the prompts through ``lm`` once and return the decode state for ``B0 x G`` rows.

    ``prompt_ids``/``prompt_mask`` are ``[B0, P]`` (left-padded).  With ``G = cfg.num_return_sequences > 1``
    each prompt is prefilled once and its KV cache, mask and next-token logits are copied to its ``G``
    consecutive rows (rows ``b*G .. b*G+G-1`` continue prompt ``b``): prefill FLOPs are those of ``B0`` rows,
    and the result equals prefilling the repeated prompts row by row.  Call inside jit."""
    b0, p = prompt_ids.shape
    g = cfg.num_return_sequences
    n = cfg.max_new_tokens
    prompt_mask = prompt_mask.astype(jnp.bool_)
    cache = init_cache(lm.config, b0, p + n, jnp.dtype(lm.config.dtype))
    kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((b0, n), jnp.bool_)], axis=1)
    positions = positions_from_mask(prompt_mask)
    h, cache = lm.model(prompt_ids, kv_mask, positions, cache, 0)
    # the LM head on the last prompt position only: no [B0, P, V] float32 logits of which one column is used
    next_logits = lm.logits_from_hidden(h[:, -1:, :])[:, 0, :].astype(jnp.float32)
    # share the prompt's work among its G samples: the cache's batch axis is -4 (unrolled or stacked layers)
    cache = jax.tree.map(lambda x: repeat_rows(x, g, axis=-4), cache)
    prompt_ids, kv_mask, positions, next_logits = (repeat_rows(x, g) for x in
                                                   (prompt_ids, kv_mask, positions, next_logits))
    b = b0 * g
    vocab = next_logits.shape[-1]
    seen = jnp.zeros((b, vocab), jnp.bool_)
    if cfg.repetition_penalty != 1.0:
        seen = seen.at[jnp.arange(b)[:, None], prompt_ids].set(True)
    tokens = jnp.concatenate([prompt_ids.astype(jnp.int32), jnp.full((b, n), pad_token_id, jnp.int32)], axis=1)
    return DecodeState(cache, tokens, kv_mask, jnp.zeros((b,), jnp.bool_), positions[:, -1], seen, next_logits)


def decode_step(lm: Any, state: DecodeState, t: jax.Array, key: jax.Array, cfg: SamplingConfig, *,
                prompt_width: int, eos_token_id: int, pad_token_id: int) -> DecodeState:
    """Sample token ``t`` (0-based) of every row, write it at column ``P + t`` and run it through ``lm``.

    A row that is already done writes ``pad`` with mask 0.  ``key`` is folded with ``t``, so a token depends
    only on (key, t, row logits), never on how many steps ran before."""
    cache, tokens, kv_mask, done, last_pos, seen, next_logits = state
    b = tokens.shape[0]
    logits_t = process_logits(next_logits, seen, cfg)
    if cfg.greedy:
        tok = jnp.argmax(logits_t, axis=-1).astype(jnp.int32)
    else:
        tok = jax.random.categorical(jax.random.fold_in(key, t), logits_t, axis=-1).astype(jnp.int32)
    tok = jnp.where(done, pad_token_id, tok)
    col = prompt_width + t
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, col))
    kv_mask = jax.lax.dynamic_update_slice(kv_mask, (~done)[:, None], (0, col))
    if cfg.repetition_penalty != 1.0:
        seen = seen.at[jnp.arange(b), tok].set(True)
    pos = last_pos + 1
    logits, cache = lm(tok[:, None], attention_mask=kv_mask, positions=pos[:, None], cache=cache, cache_index=col)
    done = done | (tok == eos_token_id)
    return DecodeState(cache, tokens, kv_mask, done, pos, seen, logits[:, -1, :].astype(jnp.float32))


def generate(lm: Any, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array, cfg: SamplingConfig, *,
             eos_token_id: int, pad_token_id: int) -> GenerationOutput:
    """Sample up to ``cfg.max_new_tokens`` tokens after left-padded prompts, ``cfg.num_return_sequences`` per prompt.

    The decode loop stops once every row is done (``cfg.early_exit``); the columns it did not reach are ``pad``
    with mask 0, exactly what the full ``N``-step loop writes there, so the outputs are the same either way.

    Args:
      lm: a ``safejax.models.CausalLM`` (call inside ``jax.jit``; build it with ``ModelDef.merge``).
      prompt_ids: ``[B0, P]`` int32, left-padded.
      prompt_mask: ``[B0, P]`` (1 = real token).
      key: a PRNG key (ignored when ``cfg.greedy``).

    Returns:
      ``[B, P+N]`` outputs with ``B = B0 * num_return_sequences``; the samples of prompt ``b`` are rows
      ``b*G .. b*G+G-1``.
    """
    if cfg.cast_weights:
        lm = cast_matmul_weights(lm)
    p = prompt_ids.shape[1]
    n = cfg.max_new_tokens
    state = prefill(lm, prompt_ids, prompt_mask, cfg, pad_token_id=pad_token_id)

    def body(carry):
        t, st = carry
        st = decode_step(lm, st, t, key, cfg, prompt_width=p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        return t + 1, st

    def cond(carry):
        t, st = carry
        running = t < n
        if cfg.early_exit:
            running = running & ~jnp.all(st.done)
        return running

    steps, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    lengths = jnp.sum(state.kv_mask[:, p:], axis=-1).astype(jnp.int32)
    return GenerationOutput(state.tokens, state.kv_mask, lengths, steps)
