"""Preference-model losses and metrics: reward model, cost model, token-wise variants, DPO (ALGORITHM.md §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from safejax.rl._util import check_ndim, check_same_shape, end_index, float_dtype

_log_sigmoid = jax.nn.log_sigmoid


def _cost_sign(is_safe, dtype):
    """kappa = -safety_sign: +1 for an unsafe response, -1 for a safe one."""
    return jnp.where(jnp.asarray(is_safe).astype(bool), -1.0, 1.0).astype(dtype)


def _check_bool_flags(fn, b, **flags):
    for name, f in flags.items():
        if tuple(jnp.shape(f)) != (b,):
            raise ValueError(f"safejax.rl.{fn}: {name} must have shape [{b}], got {list(jnp.shape(f))}")


# ----------------------------------------------------------------------------------------------------------------
# sequence-wise losses (the reference default)
# ----------------------------------------------------------------------------------------------------------------

def _mean(x, weights):
    """``mean(x)``, or ``sum(w x) / max(sum(w), 1)`` over the last axis with ``weights`` (broadcast; 0 = padding)."""
    if weights is None:
        return jnp.mean(x)
    w = jnp.broadcast_to(jnp.asarray(weights).astype(x.dtype), x.shape)
    return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1.0)


def reward_model_loss(better_end_scores, worse_end_scores, *, regularization=0.0, weights=None):
    """Sequence-wise Bradley-Terry reward-model loss (ALGORITHM.md §4.2).

    ``L = mean_i[-log sigmoid(R+_i - R-_i)] + eta * mean(R^2 over all 2B end scores)``.

    Args:
      better_end_scores: ``[B]`` end scores of the preferred (more helpful) sequences.
      worse_end_scores: ``[B]`` end scores of the other sequences.
      regularization: eta (scripts: 0.001; argparse default 0).
      weights: optional ``[B]`` 0/1 pair weights (packed batches: 0 on empty pair slots); the means run over
        the weighted pairs.
    Returns:
      scalar.
    """
    check_ndim("reward_model_loss", "better_end_scores", better_end_scores, (1,))
    check_same_shape("reward_model_loss", better_end_scores=better_end_scores, worse_end_scores=worse_end_scores)
    dtype = float_dtype(better_end_scores, worse_end_scores)
    hi = jnp.asarray(better_end_scores).astype(dtype)
    lo = jnp.asarray(worse_end_scores).astype(dtype)
    loss = -_mean(_log_sigmoid(hi - lo), weights)
    reg = _mean(jnp.square(jnp.stack([lo, hi])), weights)
    return loss + jnp.asarray(regularization, dtype) * reg


def cost_model_loss(safer_end_costs, unsafer_end_costs, safer_is_safe, unsafer_is_safe, *, regularization=0.0,
                    weights=None):
    """Sequence-wise cost-model loss with the sign terms (ALGORITHM.md §4.3), for 1 or K cost outputs.

    With kappa = -safety_sign (+1 unsafe, -1 safe), for one output::

        L = mean_i[-log sig(C^u_i - C^s_i) - log sig(kappa^s_i C^s_i) - log sig(kappa^u_i C^u_i)]
            + eta * mean(C^2 over all 2B end costs)

    With K outputs (one per group of harm categories) the data has a safety label per group but only an
    aggregate preference (``safer_response_id``), so::

        L = mean_i[-log sig(max_k C^u_ik - max_k C^s_ik)
                   - sum_k (log sig(kappa^s_ik C^s_ik) + log sig(kappa^u_ik C^u_ik))]
            + eta * mean(C^2 over all 2BK end costs)

    The ranking term acts on ``max_k C_ik``, a response's worst category: it is > 0 exactly when some output
    says "unsafe", matching the aggregate label (unsafe iff unsafe in some category), and for K = 1 it is the
    output itself, so K = 1 is exactly the single-output loss.  (A logsumexp would shift the zero by up to
    log K and a fixed output 0 would leave the other outputs unranked.)  The sign terms are summed over k, so
    each output's sign term weighs as much as a single cost model's.

    Args:
      safer_end_costs: ``[B]`` (or ``[B, K]``) end costs C^s of the safer sequences.
      unsafer_end_costs: ``[B]`` (or ``[B, K]``) end costs C^u of the other sequences.
      safer_is_safe: ``[B]`` (or ``[B, K]``: per group) bool safety label of the safer sequence.
      unsafer_is_safe: ``[B]`` (or ``[B, K]``) bool safety label of the unsafer sequence.
      regularization: eta.
      weights: optional ``[B]`` 0/1 pair weights, as in :func:`reward_model_loss`.
    Returns:
      scalar.
    """
    check_ndim("cost_model_loss", "safer_end_costs", safer_end_costs, (1, 2))
    check_same_shape("cost_model_loss", safer_end_costs=safer_end_costs, unsafer_end_costs=unsafer_end_costs)
    if jnp.ndim(safer_end_costs) == 1:
        _check_bool_flags("cost_model_loss", jnp.shape(safer_end_costs)[0], safer_is_safe=safer_is_safe,
                          unsafer_is_safe=unsafer_is_safe)
    else:
        check_same_shape("cost_model_loss", safer_end_costs=safer_end_costs, safer_is_safe=safer_is_safe,
                         unsafer_is_safe=unsafer_is_safe)
    dtype = float_dtype(safer_end_costs, unsafer_end_costs)
    cs = jnp.asarray(safer_end_costs).astype(dtype)
    cu = jnp.asarray(unsafer_end_costs).astype(dtype)
    ks = _cost_sign(safer_is_safe, dtype)
    ku = _cost_sign(unsafer_is_safe, dtype)
    if cs.ndim == 2 and cs.shape[1] == 1:  # K = 1: exactly the single-output loss
        cs, cu, ks, ku = cs[:, 0], cu[:, 0], ks[:, 0], ku[:, 0]
    if cs.ndim == 1:
        loss = _mean(-_log_sigmoid(cu - cs) - _log_sigmoid(ks * cs) - _log_sigmoid(ku * cu), weights)
        reg = _mean(jnp.square(jnp.stack([cs, cu])), weights)
    else:
        sign = jnp.sum(_log_sigmoid(ks * cs) + _log_sigmoid(ku * cu), axis=-1)
        loss = _mean(-_log_sigmoid(jnp.max(cu, axis=-1) - jnp.max(cs, axis=-1)) - sign, weights)
        w = None if weights is None else jnp.asarray(weights)[:, None]
        reg = _mean(jnp.square(jnp.stack([cs, cu])), w)
    return loss + jnp.asarray(regularization, dtype) * reg


# ----------------------------------------------------------------------------------------------------------------
# token-wise losses (first release)
# ----------------------------------------------------------------------------------------------------------------

def _token_window(fn, a_scores, b_scores, a_mask, b_mask, a_ids, b_ids, include_pad_bug):
    """Shared window logic for the token-wise losses.

    Returns ``(sa, sb, pair_w, reg_a, reg_b)``: the [B, T] score arrays used for the position-wise comparison,
    the [B, T] bool window of the pairwise terms, and each sequence's own [B, T] bool positions used by the
    per-sequence terms (sign terms, regulariser).
    """
    check_ndim(fn, "scores", a_scores, (2,))
    check_same_shape(fn, scores_a=a_scores, scores_b=b_scores, mask_a=a_mask, mask_b=b_mask, ids_a=a_ids,
                     ids_b=b_ids)
    dtype = float_dtype(a_scores, b_scores)
    sa = jnp.asarray(a_scores).astype(dtype)
    sb = jnp.asarray(b_scores).astype(dtype)
    t = jnp.arange(sa.shape[-1])[None, :]
    ea = end_index(a_mask)[:, None]
    eb = end_index(b_mask)[:, None]
    e = jnp.maximum(ea, eb)
    diff = jnp.asarray(a_ids) != jnp.asarray(b_ids)
    # identical pairs (data code filters them) fall back to d = E: the comparison of equal inputs has zero gradient
    d = jnp.where(jnp.any(diff, axis=-1, keepdims=True), jnp.argmax(diff, axis=-1)[:, None], e)
    d = jnp.minimum(d, e)
    window = (t >= d) & (t <= e)
    if include_pad_bug:
        return sa, sb, window, window, window
    ca = jnp.minimum(t, ea)
    cb = jnp.minimum(t, eb)
    sa_c = jnp.take_along_axis(sa, jnp.broadcast_to(ca, sa.shape), axis=-1)
    sb_c = jnp.take_along_axis(sb, jnp.broadcast_to(cb, sb.shape), axis=-1)
    own_a = (t >= jnp.minimum(d, ea)) & (t <= ea)
    own_b = (t >= jnp.minimum(d, eb)) & (t <= eb)
    return sa_c, sb_c, window, own_a, own_b


def _wmean(x, w):
    """Per-row mean of ``x`` over bool weights ``w`` (rows with no weight give 0): ``[B, T] -> [B]``."""
    wf = w.astype(x.dtype)
    return jnp.sum(jnp.where(w, x, 0), axis=-1) / jnp.maximum(jnp.sum(wf, axis=-1), 1.0)


def _token_reg(sa, sb, own_a, own_b):
    num = jnp.sum(jnp.where(own_a, jnp.square(sa), 0), -1) + jnp.sum(jnp.where(own_b, jnp.square(sb), 0), -1)
    den = jnp.sum(own_a, -1) + jnp.sum(own_b, -1)
    return num / jnp.maximum(den.astype(sa.dtype), 1.0)


_TOKEN_DOC = """
    Window (ALGORITHM.md §4.2): per pair, ``d`` = first index where the two id rows differ and
    ``E = max(end_a, end_b)`` with ``end`` the last index of each mask (masks right-padded).

    * ``include_pad_bug=True`` reproduces the reference: every term is a mean over ``t in [d, E]`` of the raw
      per-token scores, so the shorter sequence contributes its *pad-position* scores.
    * ``include_pad_bug=False`` (default, the fix): the pairwise term still runs over ``t in [d, E]``, but a
      sequence's score at ``t`` is read at ``min(t, end)`` — past its end token the shorter sequence is represented
      by its own end score (no pad scores are ever used, and the last comparison is end score vs end score, as in the
      sequence-wise loss). Per-sequence terms (sign terms, regulariser) average over each sequence's own real
      positions in the window, ``[min(d, end), end]``.
    For both modes the regulariser is ``eta * mean(s^2)`` over the positions of both sequences pooled, the loss of
    a pair is the sum of its terms, and the result is the mean over pairs. A pair with identical ids uses ``d = E``.
"""


def token_wise_reward_model_loss(better_scores, worse_scores, better_mask, worse_mask, better_ids, worse_ids, *,
                                 regularization=0.0, include_pad_bug=False):
    """Token-wise reward-model loss: ``mean_t -log sigmoid(s+_t - s-_t)`` per pair, + regulariser, mean over pairs.

    Args:
      better_scores, worse_scores: ``[B, T]`` per-token scores of the two sequences of each pair (right-padded
        together to the same T).
      better_mask, worse_mask: ``[B, T]`` attention masks (1 on real tokens).
      better_ids, worse_ids: ``[B, T]`` int token ids (used for the divergence index d).
      regularization: eta.
      include_pad_bug: reproduce the reference window including pad positions (see below).
    Returns:
      scalar.
    """
    sp, sm, win, own_p, own_m = _token_window("token_wise_reward_model_loss", better_scores, worse_scores,
                                              better_mask, worse_mask, better_ids, worse_ids, include_pad_bug)
    per_pair = _wmean(-_log_sigmoid(sp - sm), win)
    per_pair = per_pair + jnp.asarray(regularization, sp.dtype) * _token_reg(sp, sm, own_p, own_m)
    return jnp.mean(per_pair)


def token_wise_cost_model_loss(safer_costs, unsafer_costs, safer_mask, unsafer_mask, safer_ids, unsafer_ids,
                               safer_is_safe, unsafer_is_safe, *, regularization=0.0, include_pad_bug=False):
    """Token-wise cost-model loss: the three sequence-wise terms, each averaged over the window, per pair.

    ``L_i = mean_t[-log sig(c^u_t - c^s_t)] + mean_t[-log sig(kappa^s c^s_t)] + mean_t[-log sig(kappa^u c^u_t)]
    + eta * mean(c^2)``, then the mean over pairs; kappa = -safety_sign.

    Args:
      safer_costs, unsafer_costs: ``[B, T]`` per-token costs.
      safer_mask, unsafer_mask: ``[B, T]`` attention masks.
      safer_ids, unsafer_ids: ``[B, T]`` token ids.
      safer_is_safe, unsafer_is_safe: ``[B]`` bool safety labels.
      regularization: eta.
      include_pad_bug: reproduce the reference window including pad positions.
    Returns:
      scalar.
    """
    fn = "token_wise_cost_model_loss"
    ss, su, win, own_s, own_u = _token_window(fn, safer_costs, unsafer_costs, safer_mask, unsafer_mask,
                                              safer_ids, unsafer_ids, include_pad_bug)
    _check_bool_flags(fn, ss.shape[0], safer_is_safe=safer_is_safe, unsafer_is_safe=unsafer_is_safe)
    ks = _cost_sign(safer_is_safe, ss.dtype)[:, None]
    ku = _cost_sign(unsafer_is_safe, ss.dtype)[:, None]
    per_pair = (_wmean(-_log_sigmoid(su - ss), win)
                + _wmean(-_log_sigmoid(ks * ss), own_s)
                + _wmean(-_log_sigmoid(ku * su), own_u))
    per_pair = per_pair + jnp.asarray(regularization, ss.dtype) * _token_reg(ss, su, own_s, own_u)
    return jnp.mean(per_pair)


token_wise_reward_model_loss.__doc__ += _TOKEN_DOC
token_wise_cost_model_loss.__doc__ += _TOKEN_DOC


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------

def reward_accuracy(better_end_scores, worse_end_scores):
    """``mean 1[R+ > R-]`` over ``[B]`` pairs (ties count wrong). Returns a float scalar."""
    check_same_shape("reward_accuracy", better_end_scores=better_end_scores, worse_end_scores=worse_end_scores)
    dtype = float_dtype(better_end_scores, worse_end_scores)
    return jnp.mean((jnp.asarray(better_end_scores) > jnp.asarray(worse_end_scores)).astype(dtype))


def cost_accuracy(safer_end_costs, unsafer_end_costs):
    """``mean 1[C^u > C^s]`` over ``[B]`` pairs (ties count wrong). Returns a float scalar."""
    check_same_shape("cost_accuracy", safer_end_costs=safer_end_costs, unsafer_end_costs=unsafer_end_costs)
    dtype = float_dtype(safer_end_costs, unsafer_end_costs)
    return jnp.mean((jnp.asarray(unsafer_end_costs) > jnp.asarray(safer_end_costs)).astype(dtype))


def cost_sign_accuracy(safer_end_costs, unsafer_end_costs, safer_is_safe, unsafer_is_safe):
    """Fraction of the 2B responses with ``kappa * C > 0`` (kappa = +1 unsafe, -1 safe); ``C == 0`` counts wrong.

    Args: ``[B]`` costs and ``[B]`` bool safety labels of the safer and unsafer responses. Returns a float scalar.
    """
    check_same_shape("cost_sign_accuracy", safer_end_costs=safer_end_costs, unsafer_end_costs=unsafer_end_costs,
                     safer_is_safe=safer_is_safe, unsafer_is_safe=unsafer_is_safe)
    dtype = float_dtype(safer_end_costs, unsafer_end_costs)
    c = jnp.concatenate([jnp.asarray(safer_end_costs), jnp.asarray(unsafer_end_costs)]).astype(dtype)
    k = _cost_sign(jnp.concatenate([jnp.asarray(safer_is_safe), jnp.asarray(unsafer_is_safe)]), dtype)
    return jnp.mean((k * c > 0).astype(dtype))


def reward_model_metrics(better_end_scores, worse_end_scores):
    """Reward-model metrics dict: ``accuracy``, ``reward_mean``/``reward_std`` over all 2B scores,
    ``better_reward_mean``, ``worse_reward_mean``. Inputs ``[B]``; values are float scalars."""
    dtype = float_dtype(better_end_scores, worse_end_scores)
    hi = jnp.asarray(better_end_scores).astype(dtype)
    lo = jnp.asarray(worse_end_scores).astype(dtype)
    allr = jnp.concatenate([hi, lo])
    return {
        "accuracy": reward_accuracy(hi, lo),
        "reward_mean": jnp.mean(allr),
        "reward_std": jnp.std(allr),
        "better_reward_mean": jnp.mean(hi),
        "worse_reward_mean": jnp.mean(lo),
    }


def cost_model_metrics(safer_end_costs, unsafer_end_costs, safer_is_safe, unsafer_is_safe):
    """Cost-model metrics dict: ``accuracy`` (ranking), ``accuracy_sign``, ``cost_mean``/``cost_std`` over all 2B
    costs, ``safer_cost_mean``, ``unsafer_cost_mean``. Inputs ``[B]``; values are float scalars."""
    dtype = float_dtype(safer_end_costs, unsafer_end_costs)
    cs = jnp.asarray(safer_end_costs).astype(dtype)
    cu = jnp.asarray(unsafer_end_costs).astype(dtype)
    allc = jnp.concatenate([cs, cu])
    return {
        "accuracy": cost_accuracy(cs, cu),
        "accuracy_sign": cost_sign_accuracy(cs, cu, safer_is_safe, unsafer_is_safe),
        "cost_mean": jnp.mean(allc),
        "cost_std": jnp.std(allc),
        "safer_cost_mean": jnp.mean(cs),
        "unsafer_cost_mean": jnp.mean(cu),
    }


# ----------------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------------

def dpo_log_ratios(better_log_probs, worse_log_probs, ref_better_log_probs, ref_worse_log_probs, better_ids,
                   worse_ids, better_mask, worse_mask, *, reference_window_bug=False):
    """Per-pair summed log-ratios ``log pi - log pi_ref`` over the response window (ALGORITHM.md §4.4).

    Token indices of the window are ``[d, end]`` (``d`` = first index where the id rows differ, ``end`` = the last
    index of each sequence's own mask). Shifted log-prob ``j`` scores token ``j + 1``, so the correct shifted window
    is ``[d - 1, end - 1]`` (default). ``reference_window_bug=True`` reproduces the reference, which sums the
    shifted array over ``[d, end]`` (skipping the first divergent token and adding one position past the end).

    Args:
      better_log_probs, worse_log_probs: ``[B, L-1]`` policy log-probs of the shifted sequences.
      ref_better_log_probs, ref_worse_log_probs: ``[B, L-1]`` reference-model log-probs.
      better_ids, worse_ids: ``[B, L]`` token ids. better_mask, worse_mask: ``[B, L]`` attention masks.
      reference_window_bug: see above.
    Returns:
      ``(better_log_ratio [B], worse_log_ratio [B])``.
    """
    fn = "dpo_loss"
    check_ndim(fn, "better_log_probs", better_log_probs, (2,))
    check_same_shape(fn, better_log_probs=better_log_probs, worse_log_probs=worse_log_probs,
                     ref_better_log_probs=ref_better_log_probs, ref_worse_log_probs=ref_worse_log_probs)
    shp = check_same_shape(fn, better_ids=better_ids, worse_ids=worse_ids, better_mask=better_mask,
                           worse_mask=worse_mask)
    b, l1 = jnp.shape(better_log_probs)
    if tuple(shp) != (b, l1 + 1):
        raise ValueError(f"safejax.rl.{fn}: ids/masks must be [B, L] = [{b}, {l1 + 1}] for [B, L-1] log-probs, "
                         f"got {list(shp)}")
    dtype = float_dtype(better_log_probs, worse_log_probs, ref_better_log_probs, ref_worse_log_probs)
    diff = jnp.asarray(better_ids) != jnp.asarray(worse_ids)
    d = jnp.argmax(diff, axis=-1)[:, None]  # identical pairs: d = 0 (data code filters them)
    eb = end_index(better_mask)[:, None]
    ew = end_index(worse_mask)[:, None]
    j = jnp.arange(l1)[None, :]
    shift = 0 if reference_window_bug else 1

    def window_sum(lp, end):
        w = (j >= d - shift) & (j <= end - shift)
        return jnp.sum(jnp.where(w, jnp.asarray(lp).astype(dtype), 0), axis=-1)

    better = window_sum(better_log_probs, eb) - window_sum(ref_better_log_probs, eb)
    worse = window_sum(worse_log_probs, ew) - window_sum(ref_worse_log_probs, ew)
    return better, worse


def dpo_window_loss(better_log_probs, worse_log_probs, ref_better_log_probs, ref_worse_log_probs, better_ids,
                    worse_ids, better_mask, worse_mask, *, scale_coeff, reference_window_bug=False):
    """The reference's token-level DPO loss ``mean_i -log sigmoid(beta * [(log pi+ - log ref+) - (log pi- -
    log ref-)])`` summed over :func:`dpo_log_ratios`' response window (:func:`safejax.rl.dpo_loss` takes the sums).

    Arguments as :func:`dpo_log_ratios`; ``scale_coeff`` is beta (script: 0.1). Reference log-probs are constants.
    Implicit rewards for logging are ``scale_coeff * dpo_log_ratios(...)``.

    Returns:
      scalar.
    """
    sg = jax.lax.stop_gradient
    better, worse = dpo_log_ratios(better_log_probs, worse_log_probs, sg(jnp.asarray(ref_better_log_probs)),
                                   sg(jnp.asarray(ref_worse_log_probs)), better_ids, worse_ids, better_mask,
                                   worse_mask, reference_window_bug=reference_window_bug)
    return -jnp.mean(_log_sigmoid(jnp.asarray(scale_coeff, better.dtype) * (better - worse)))
