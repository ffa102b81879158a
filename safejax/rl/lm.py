"""Language-model log-probabilities and the SFT / ptx loss (ALGORITHM.md §4.1, §5.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from safejax.rl._util import check_ndim, float_dtype


def log_probs_from_logits(logits, labels):
    """``log softmax(logits)[labels]`` computed in float32 (float64 if the logits are float64).

    The caller does the shift: for a sequence ``x``, pass ``logits[:, :-1]`` and ``labels = x[:, 1:]``.
    Labels outside ``[0, V)`` (e.g. -100) are clipped into range; mask them yourself.

    Args:
      logits: ``[B, T, V]`` (any float dtype).
      labels: ``[B, T]`` int token ids.
    Returns:
      ``[B, T]`` log-probabilities.
    """
    check_ndim("log_probs_from_logits", "logits", logits, (3,))
    if tuple(jnp.shape(labels)) != tuple(jnp.shape(logits)[:2]):
        raise ValueError(f"safejax.rl.log_probs_from_logits: labels shape {list(jnp.shape(labels))} must equal "
                         f"logits shape[:2] {list(jnp.shape(logits)[:2])}")
    x = jnp.asarray(logits)
    x = x.astype(float_dtype(x))
    v = x.shape[-1]
    idx = jnp.clip(jnp.asarray(labels).astype(jnp.int32), 0, v - 1)
    picked = jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(x, axis=-1)


def sft_loss(logits, labels, loss_mask=None, *, group_rows: int = 0):
    """Token-mean cross-entropy over the whole batch (HF causal-LM loss; SFT and ptx).

    ``L = -sum_{b,t} m[b,t] * log p(labels[b,t]) / max(sum m, 1)``. The caller shifts: ``logits[:, :-1]`` with
    ``labels = ids[:, 1:]``.

    Args:
      logits: ``[B, T, V]``.
      labels: ``[B, T]`` int ids to predict; -100 (any negative) marks ignored positions when ``loss_mask`` is None.
      loss_mask: ``[B, T]`` bool/int, 1 where the label counts; default ``labels >= 0``.
      group_rows: the unit of the mean.  0: one token mean over the whole batch.  ``n > 0`` (the reference's
        unit): a token mean over each group of ``n`` consecutive rows -- its per-rank micro-batch -- then the mean
        of the group means, so each group weighs the same however many tokens it holds.  ``B`` must be a
        multiple of ``n``.
    Returns:
      scalar.
    """
    lp = log_probs_from_logits(logits, labels)
    m = (jnp.asarray(labels) >= 0) if loss_mask is None else (jnp.asarray(loss_mask) != 0)
    if m.shape != lp.shape:
        raise ValueError(f"safejax.rl.sft_loss: loss_mask shape {list(m.shape)} must equal labels shape "
                         f"{list(lp.shape)}")
    if group_rows and group_rows != m.shape[0]:
        if m.shape[0] % group_rows:
            raise ValueError(f"safejax.rl.sft_loss: batch of {m.shape[0]} rows is not a multiple of "
                             f"group_rows={group_rows}")
        lp = lp.reshape(-1, group_rows * lp.shape[1])
        m = m.reshape(lp.shape)
        per_group = -jnp.sum(jnp.where(m, lp, 0), axis=-1) / jnp.maximum(jnp.sum(m, axis=-1).astype(lp.dtype), 1.0)
        return jnp.mean(per_group)
    total = jnp.sum(jnp.where(m, lp, 0))
    return -total / jnp.maximum(jnp.sum(m).astype(lp.dtype), 1.0)
