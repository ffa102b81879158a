"""Score models: the causal-LM backbone plus a linear head (reward / cost models, critics).

Layout mirrors safe-rlhf's ``LlamaForScore``: backbone under ``model.`` and
``score_head.{weight [score_dim, D], bias [score_dim]}`` (here ``score_head.kernel [D, score_dim]``).
GPT-2 score models (safe-rlhf ``GPT2ForScore``) use the same module; on disk their backbone sits under
``transformer.`` with GPT-2's tensor names (mapped by :mod:`safejax.models.hf`), the head is the same.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from safejax.models.config import ModelConfig
from safejax.models.llama import Backbone, Dense

Array = jax.Array


class ScoreOutput(NamedTuple):
    """``scores [B, T]`` float32 (``[B, T, score_dim]`` when score_dim > 1) and ``end_scores [B]``
    (``[B, score_dim]``): the score at the last index where ``attention_mask == 1``."""

    scores: Array
    end_scores: Array


def end_index(attention_mask: Array | None, length: int, batch: int) -> Array:
    """``[B]`` int32: last index where mask == 1 (T-1 when mask is None; 0 for an all-zero row)."""
    if attention_mask is None:
        return jnp.full((batch,), length - 1, jnp.int32)
    m = jnp.asarray(attention_mask).astype(bool)
    idx = jnp.arange(length, dtype=jnp.int32)
    return jnp.max(jnp.where(m, idx[None, :], 0), axis=-1)


def gather_end(values: Array, end: Array) -> Array:
    """values ``[B, T, ...]``, end ``[B]`` -> ``[B, ...]``."""
    return jnp.take_along_axis(values, end.reshape((-1, 1) + (1,) * (values.ndim - 2)), axis=1)[:, 0]


class ScoreModel(nnx.Module):
    """Backbone + ``score_head`` Linear (bias init 0, weight normal(initializer_range)), fp32 output.

    ``sm(input_ids [B, T], attention_mask [B, T] | None, positions [B, T] | None) -> ScoreOutput``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, score_dim: int = 1, bias: bool = True,
                 score_type: str | None = None):
        self.config = config
        self.score_dim = int(score_dim)
        self.score_type = score_type
        self.model = Backbone(config, rngs=rngs)
        self.score_head = make_score_head(config, self.score_dim, bias, rngs)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None,
                      positions: Array | None = None, segment_ids: Array | None = None) -> Array:
        return self.model(input_ids, attention_mask, positions, segment_ids=segment_ids)[0]

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 positions: Array | None = None, segment_ids: Array | None = None) -> ScoreOutput:
        """Packed rows (``segment_ids``): ``end_scores`` is the row's last real token; gather each segment's
        end from ``scores`` instead."""
        h = self.hidden_states(input_ids, attention_mask, positions, segment_ids)
        scores = self.score_head(h).astype(jnp.float32)  # [B, T, score_dim]
        if self.score_dim == 1:
            scores = scores[..., 0]
        B, T = h.shape[:2]
        end = end_index(attention_mask, T, B)
        return ScoreOutput(scores=scores, end_scores=gather_end(scores, end))


def make_score_head(config: ModelConfig, score_dim: int, bias: bool, rngs: nnx.Rngs) -> Dense:
    """The ``score_head`` Linear ``[D] -> [score_dim]`` with float32 output."""
    return Dense((config.hidden_size,), (score_dim,), ("embed", "score"), use_bias=bias, bias_names=("score",),
                 dtype=config.dtype, param_dtype=config.param_dtype, init_std=config.initializer_range,
                 out_dtype="float32", rngs=rngs)
