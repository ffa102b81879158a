"""Critic-free RL stage: GRPO-Lagrangian (``safejax grpo-lag``) and plain GRPO (``safejax grpo``).

Four models instead of PPO-Lag's six: the actor (trained), the reference policy, the reward model and (GRPO-Lag)
the cost model, all but the actor frozen.  No value critics: the baseline of a response is the other responses to
the same prompt.  Follow one iteration:

1. ``rollout(state, frozen, prompts [B/G, P])`` (jitted): the RL stages' shared sampler and scorer
   (:func:`safejax.train.ppo.sample_and_score`) draws G = ``rollout.num_return_sequences`` responses per prompt
   (shared prefill; the G rows of a group are consecutive), scores them with the reward and cost models, and
   adds the actor's and the reference's log-probs of the response tokens.  Output: a :class:`GRPOExperience`.
2. ``update(state, exp)`` (jitted, state donated): record the raw episode costs in the multiplier's window; with
   ``grpo.kl = k1_reward`` shape the scores (``reward - beta * KL``, ``cost + beta * KL``, KL summed over the
   response); group-relative advantages of reward and cost **separately** (``grpo.advantage``); then
   ``grpo.update_iters`` epochs over mini-batches of ``grpo.micro_batch_size`` rows as nested ``lax.scan``, each
   mini-batch doing one multiplier step and one actor step on the PPO-clipped loss of the per-sequence advantage
   ``(A_r - lambda * A_c) / (1 + lambda)`` broadcast over the response tokens (token mean per sequence, then mean
   over sequences), plus ``beta * k3`` with ``grpo.kl = k3_loss``.

The KL default is ``k1_reward``: DeepSeekMath's k3 term added to the loss has a biased gradient (its gradient is
not that of KL(pi || pi_ref) under the sampled tokens; TRL issue #4967), while the k1 sum folded into the scores
is the REINFORCE-style estimate of the KL-regularised objective, and it is how Safe RLHF shapes *both* signals
(a KL step makes the reward worse and the cost higher), so the constraint sees the same KL price as the reward.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from safejax import rl
from safejax.config import ConfigError, check_range
from safejax.generation import SamplingConfig
from safejax.models.functional import ModelDef
from safejax.parallel import MeshConfig
from safejax.sections import ExportSection, LoopSection, ModelSection
from safejax.train.optim import OptimConfig, make_accumulating_optimizer, step_log
from safejax.train.lagrange_stage import LagrangeSection, cost_metrics, lagrange_micro_step, lagrange_state_init
from safejax.train.ppo import Frozen, PPODataSection, _token_log_probs, sample_and_score
from safejax.train.state import ModelState, apply_gradients

log = logging.getLogger("safejax")

GRPO_ALGORITHMS = ("grpo-lag", "grpo")
KL_MODES = ("k1_reward", "k3_loss")
DEFAULT_BETA = {"k1_reward": 0.01, "k3_loss": 0.04}  # Safe RLHF's kl_coeff; DeepSeekMath's beta


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class GRPOSection:
    """The critic-free update.  The group size G is ``rollout.num_return_sequences`` (>= 2).

    Attributes:
      advantage: ``dr_grpo`` (default) = s - group mean (Dr. GRPO); ``grpo`` = (s - group mean) / (group std,
        ddof 1, + eps) (DeepSeekMath); ``rloo`` = s - mean of the other G - 1.  Applied to reward and cost
        separately.  Why not ``grpo`` by default: dividing the *cost* by its group std turns the small cost
        differences among answers that are all safe (the group of every benign prompt) into unit-sized
        advantages, so the policy is pushed along the cost model's noise -- towards refusals -- and reward and
        cost lose the common scale that ``(A_r - lambda A_c) / (1 + lambda)`` and the threshold assume.  On the
        built-in task (seeds 0, 1, 2) ``grpo`` lost benign helpfulness in one seed of three (21% refusals),
        ``dr_grpo`` kept it in all three.
      kl: ``k1_reward`` (default): ``beta * sum_t (lp_old - lp_ref)`` subtracted from each response's reward and
        added to its cost before the group normalisation (Safe RLHF's shaping of both signals; an unbiased
        gradient of the KL-regularised objective).  ``k3_loss``: DeepSeekMath's ``beta * k3`` per-token term
        added to the loss (its gradient is biased, TRL #4967).
      beta: the KL weight; None = 0.01 for ``k1_reward`` (Safe RLHF's kl_coeff), 0.04 for ``k3_loss``
        (DeepSeekMath).
      eps: added to the group std (``grpo`` advantages).
      clip_range_ratio: epsilon of the PPO ratio clip.
      update_iters: epochs over one rollout batch.
      micro_batch_size: rows per mini-batch update (any divisor of ``train.batch_size``; the advantages are
        computed on the whole batch first, so a mini-batch need not hold whole groups).
      mask_sampled_special: a pad or unk token the actor samples inside a response is masked out (as PPO's
        ``ppo.mask_sampled_special``).
    """

    advantage: str = "dr_grpo"
    kl: str = "k1_reward"
    beta: float | None = None
    eps: float = 1e-6
    clip_range_ratio: float = 0.2
    update_iters: int = 1
    micro_batch_size: int = 16
    mask_sampled_special: bool = True

    @property
    def kl_coeff(self) -> float:
        """The KL weight in use (``beta``, or the default of the KL mode)."""
        return DEFAULT_BETA[self.kl] if self.beta is None else float(self.beta)

    def validate(self) -> None:
        check_range("grpo.advantage", self.advantage, choices=rl.GROUP_ADVANTAGE_METHODS)
        check_range("grpo.kl", self.kl, choices=KL_MODES)
        if self.beta is not None:
            check_range("grpo.beta", self.beta, low=0.0)
        check_range("grpo.eps", self.eps, low=0.0)
        check_range("grpo.clip_range_ratio", self.clip_range_ratio, low=0.0, low_open=True)
        check_range("grpo.update_iters", self.update_iters, low=1)
        check_range("grpo.micro_batch_size", self.micro_batch_size, low=1)


@dataclasses.dataclass
class GRPOConfig:
    """``safejax grpo-lag | grpo``.  ``data``, ``rollout``, ``lagrange``, ``train``, ``export`` are the PPO stage's
    sections (same keys, same meaning); ``data.ptx`` is not supported here.

    Attributes:
      algorithm: ``grpo-lag`` (reward with the cost constraint) or ``grpo`` (reward only).
      out_dir: run folder (checkpoints, metrics, ``hf/`` export of the actor).
      seed: drives sampling and data order.
      actor: the SFT policy; also the frozen reference.
      reward_model, cost_model: score-model folders (cost_model required for grpo-lag, ignored by grpo).
      data: prompts, eval_prompts, prompt_width, max_length, prompt_buckets, skip_bad_rows (PPO's section).
      rollout: sampling; ``num_return_sequences`` is the group size G (>= 2).
      grpo: the update (:class:`GRPOSection`).
      lagrange: the multiplier, as PPO-Lag's (threshold in the cost model's units; window of raw episode costs).
      actor_optim: the actor's optimizer.
      train: batch_size (responses per iteration = prompts x G), max_steps, epochs, checkpoints, logging.
      mesh: device mesh.
      allow_config_change: resume with a changed config.
      export: dtype of ``out_dir/hf``.
    """

    algorithm: str = "grpo-lag"
    out_dir: str = "runs/grpo-lag"
    seed: int = 42
    actor: ModelSection = dataclasses.field(default_factory=ModelSection)
    reward_model: str = ""
    cost_model: str = ""
    data: PPODataSection = dataclasses.field(default_factory=PPODataSection)
    rollout: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(num_return_sequences=8))
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    lagrange: LagrangeSection = dataclasses.field(default_factory=LagrangeSection)
    actor_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=1e-6, schedule="constant", warmup_ratio=0.0, weight_decay=0.0))
    train: LoopSection = dataclasses.field(default_factory=LoopSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    allow_config_change: bool = False
    export: ExportSection = dataclasses.field(default_factory=ExportSection)

    def validate(self) -> None:
        check_range("algorithm", self.algorithm, choices=GRPO_ALGORITHMS)
        g = self.rollout.num_return_sequences
        if g < 2:
            raise ConfigError(f"config key 'rollout.num_return_sequences' = {g} is the group size G of "
                              f"{self.algorithm} and must be >= 2 (group-relative advantages need a group)")
        if self.train.batch_size % g:
            raise ConfigError(f"config key 'train.batch_size' = {self.train.batch_size} must be a multiple of "
                              f"'rollout.num_return_sequences' = {g} (the group size: G responses per prompt)")
        if self.train.batch_size % self.grpo.micro_batch_size:
            raise ConfigError(f"config key 'train.batch_size' = {self.train.batch_size} must be a multiple of "
                              f"'grpo.micro_batch_size' = {self.grpo.micro_batch_size}")
        d = self.data
        if d.ptx:
            raise ConfigError(f"config key 'data.ptx' = {d.ptx}: {self.algorithm} has no ptx term; leave it empty")
        for key in ("reward_model",) + (("cost_model",) if self.algorithm == "grpo-lag" else ()):
            if not getattr(self, key):
                raise ConfigError(f"config key '{key}' is required for algorithm '{self.algorithm}'")


# ----------------------------------------------------------------------------- state


@struct.dataclass
class GRPOState:
    """Everything that must survive a restart: the actor and the multiplier (frozen models are separate)."""

    step: jax.Array            # [] int32: completed iterations (prompt batches)
    actor: ModelState
    lagrange: Any  # rl.LagrangeState or rl.PIDLagrangeState (lagrange.rule); carried by grpo too (its window reports the episode cost; lambda unused)
    rng: jax.Array             # raw key data


@struct.dataclass
class GRPOExperience:
    """One rollout batch of ``B = prompts x G`` rows, groups consecutive.  ``[B, N]`` arrays are the response
    actions (shifted positions ``P-1 .. L-2``)."""

    sequences: jax.Array       # [B, L]
    attention_mask: jax.Array  # [B, L]
    old_log_probs: jax.Array   # [B, N]
    ref_log_probs: jax.Array   # [B, N]
    reward: jax.Array          # [B] RM end score
    cost: jax.Array            # [B] CM end score ([B, K] for a cost model with K outputs; zeros without one)
    mask: jax.Array            # [B, N] float32 action mask


@dataclasses.dataclass(frozen=True, eq=False)
class GRPOModels:
    actor: ModelDef         # also the reference policy's def
    reward: ModelDef
    cost: ModelDef | None   # None for grpo
    num_constraints: int = 1  # K: the cost model's score_dim


# ----------------------------------------------------------------------------- pure pieces


def costs_kb(cost):
    """End costs ``[B]`` or ``[B, K]`` -> ``[K, B]`` (the constraint axis first, as the rl core takes it)."""
    return cost.reshape(cost.shape[0], -1).T


def grpo_advantages(cfg: GRPOConfig, exp: GRPOExperience, lag: bool):
    """``(adv_r [B], adv_c [K, B], reward signal [B], cost signal [K, B])``: the (k1-shaped, with ``grpo.kl =
    k1_reward``) scores and their group-relative advantages, each constraint normalised on its own; ``adv_c`` is
    zeros without the constraint."""
    gc, g = cfg.grpo, cfg.rollout.num_return_sequences
    r, c = exp.reward, costs_kb(exp.cost)
    if gc.kl == "k1_reward":
        r, c = rl.kl_shaped_scores(r, c, exp.old_log_probs, exp.ref_log_probs, exp.mask, kl_coeff=gc.kl_coeff)
    adv = functools.partial(rl.group_advantages, group_size=g, method=gc.advantage, eps=gc.eps)
    adv_r = adv(r)
    adv_c = jax.vmap(adv)(c) if lag else jnp.zeros_like(c)
    return adv_r, adv_c, r, c


class GRPOPhases:
    """The GRPO phases of one config and prompt width: ``rollout`` and ``update``, pure functions (``ppo_loop``'s
    ``make_rollout`` / ``make_update`` jit them, as for PPO); holds the actor's optimizer, no training state.
    ``total_updates``: actor micro-steps of the whole run (the schedule's span)."""

    def __init__(self, cfg: GRPOConfig, models: GRPOModels, prompt_width: int, eos_id: int, pad_id: int,
                 total_updates: int, unk_id: int | None = None, max_new_tokens: int | None = None):
        self.cfg = cfg
        self.models = models
        self.P = prompt_width
        self.eos_id, self.pad_id = eos_id, pad_id
        self.unk_id = None if unk_id is None or unk_id == eos_id else unk_id
        self.lag = cfg.algorithm == "grpo-lag"
        self.sampling = (cfg.rollout if max_new_tokens is None
                         else dataclasses.replace(cfg.rollout, max_new_tokens=max_new_tokens))
        self.actor_tx, self.actor_sched = make_accumulating_optimizer(cfg.actor_optim, total_updates,
                                                                      models.actor.hf_names())

    def init_lagrange(self):
        """The multiplier state of the K constraints (PPO-Lag's rule and settings: ``lagrange.rule``)."""
        return lagrange_state_init(self.cfg.lagrange, self.models.num_constraints)

    def lagrange_step(self, lag):
        """One multiplier update from the window (every micro-step, as PPO-Lag), for either rule."""
        return lagrange_micro_step(self.cfg.lagrange, lag)

    def rollout(self, state: GRPOState, frozen: Frozen, prompt_ids, prompt_mask) -> GRPOExperience:
        seq, mask, reward, cost = sample_and_score(self, state, frozen, prompt_ids, prompt_mask,
                                                   mask_sampled_special=self.cfg.grpo.mask_sampled_special)
        start, actor = self.P - 1, self.models.actor
        old_lp = _token_log_probs(actor.merge(state.actor.params), seq, mask, start)
        ref_lp = _token_log_probs(actor.merge(frozen.ref), seq, mask, start)
        return GRPOExperience(seq, mask, old_lp, ref_lp, reward, cost, mask[:, self.P:].astype(jnp.float32))

    def actor_loss(self, params, mb, lam):
        """``(loss, new log-probs [M, N])`` of one mini-batch ``mb`` (``seq``, ``attn``, ``old_lp``, ``ref_lp``,
        ``mask`` and the sequence advantages ``adv_r [M]``, ``adv_c [M, K]``) at multipliers ``lam [K]``."""
        gc = self.cfg.grpo
        lp = _token_log_probs(self.models.actor.merge(params), mb["seq"], mb["attn"], self.P - 1)
        k3 = gc.kl == "k3_loss"
        loss = rl.grpo_actor_loss(lp, mb["old_lp"], mb["adv_r"], mb["mask"], clip_range_ratio=gc.clip_range_ratio,
                                  cost_advantages=mb["adv_c"].T if self.lag else None, multiplier=lam,
                                  ref_log_probs=mb["ref_lp"] if k3 else None, kl_coeff=gc.kl_coeff if k3 else 0.0)
        return loss, lp

    def update(self, state: GRPOState, exp: GRPOExperience, ptx=None):
        """``(new state, metrics)``; ``ptx`` is accepted for the shared jit wrapper and must be None."""
        del ptx
        cfg, gc = self.cfg, self.cfg.grpo
        lag_state = rl.lagrange_record(state.lagrange, costs_kb(exp.cost))
        adv_r, adv_c, r_sig, c_sig = grpo_advantages(cfg, exp, self.lag)
        data = dict(seq=exp.sequences, attn=exp.attention_mask, old_lp=exp.old_log_probs, ref_lp=exp.ref_log_probs,
                    mask=exp.mask, adv_r=adv_r, adv_c=adv_c.T)
        nmb = exp.sequences.shape[0] // gc.micro_batch_size
        data = jax.tree.map(lambda x: x.reshape(nmb, gc.micro_batch_size, *x.shape[1:]), data)

        def micro_step(carry, mb):
            actor_s, lag = carry
            if self.lag:
                lag = self.lagrange_step(lag)
            lam = jax.lax.stop_gradient(rl.multiplier(lag))  # [K]; unused by grpo
            (loss, lp), grads = jax.value_and_grad(self.actor_loss, has_aux=True)(actor_s.params, mb, lam)
            actor_s = apply_gradients(actor_s, grads, self.actor_tx)
            ratio = jnp.exp(jnp.where(mb["mask"] != 0, jax.lax.stop_gradient(lp) - mb["old_lp"], 0.0))
            out = {"actor_loss": loss, "actor_grad_norm": step_log(actor_s.opt_state).grad_norm,
                   "ratio": rl.masked_mean(ratio, mb["mask"])}
            return (actor_s, lag), out

        def epoch(carry, _):
            return jax.lax.scan(micro_step, carry, data)

        (actor_s, lag_state), steps = jax.lax.scan(epoch, (state.actor, lag_state), None, length=gc.update_iters)
        new_state = state.replace(step=state.step + 1, actor=actor_s, lagrange=lag_state)
        mk = exp.mask
        metrics = {
            "actor_loss": jnp.mean(steps["actor_loss"]), "ratio": jnp.mean(steps["ratio"]),
            "actor_grad_norm": jnp.mean(steps["actor_grad_norm"]), "actor_lr": step_log(actor_s.opt_state).lr,
            "reward": jnp.mean(exp.reward), "shaped_reward": jnp.mean(r_sig),
            "kl_divergence": jnp.mean(jnp.sum((exp.old_log_probs - exp.ref_log_probs) * mk, axis=-1)),
            "mean_generated_length": jnp.mean(jnp.sum(mk, axis=-1)),
            "reward_group_std": jnp.mean(jnp.std(exp.reward.reshape(-1, cfg.rollout.num_return_sequences), axis=1)),
        }
        if self.models.cost is not None:  # per constraint + the aggregate keys (K > 1: mean cost, summed lambda)
            metrics.update(cost_metrics(cfg.lagrange, exp.cost, lag_state, with_lambda=self.lag))
        if self.lag:
            metrics["shaped_cost"] = jnp.mean(c_sig)
        return new_state, {"train/" + k: v for k, v in metrics.items()}
