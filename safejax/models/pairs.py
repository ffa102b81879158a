"""Scoring both sides of a preference pair (better/worse or safer/unsafer) with a score model."""

from __future__ import annotations

import jax.numpy as jnp

from safejax.generation import positions_from_mask


# (first, second) field names of a pair batch, per kind
PAIR_FIELDS = {"reward": ("better", "worse"), "cost": ("safer", "unsafer")}


def pair_scores(sm, batch: dict, kind: str):
    """Score both sides of a pair batch in one forward pass.

    Returns ``(scores_a [B, L], scores_b [B, L], end_a [B], end_b [B])`` for (better, worse) or
    (safer, unsafer)."""
    a, b = PAIR_FIELDS[kind]
    ids = jnp.concatenate([batch[f"{a}_ids"], batch[f"{b}_ids"]], axis=0)
    mask = jnp.concatenate([batch[f"{a}_mask"], batch[f"{b}_mask"]], axis=0)
    out = sm(ids, attention_mask=mask, positions=positions_from_mask(mask))
    n = batch[f"{a}_ids"].shape[0]
    return out.scores[:n], out.scores[n:], out.end_scores[:n], out.end_scores[n:]
