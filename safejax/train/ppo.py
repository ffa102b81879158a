"""Safe RLHF's RL stage: PPO-Lagrangian, with plain PPO and fixed-nu reward shaping as baselines.

One trainer serves the three algorithms; they differ only in small functions
(:func:`scalar_signals`, and which actor loss and critics are used).  Follow one iteration:

1. ``rollout_fn(state, frozen, prompts)`` (jitted): sample responses with the actor
   (:mod:`safejax.generation`), then score the sequences: actor and reference log-probs, reward
   and cost end scores, values of the reward and cost critics.  Output: an ``Experience`` batch.
2. ``update_fn(state, experience, ptx)`` (jitted, state donated): record episode costs in the
   Lagrange state, KL-shape the per-token rewards/costs, GAE for both, then ``update_iters`` epochs
   over mini-batches as nested ``lax.scan``; each mini-batch does the lambda step (``lagrange.rule``), the actor
   step (clipped surrogate on ``(A_r - sum_k lambda_k A_c,k)/(1 + sum_k lambda_k)``, plus ptx) and the two
   critic steps.  K constraints = the cost model's K outputs (:mod:`safejax.train.lagrange_stage`).

Index conventions (ALGORITHM.md §5.1): prompts are left-padded to a fixed width ``P``; shifted
arrays have length ``L-1``; response actions are the shifted positions ``[P-1, L-2]``, i.e. a
static slice of width ``N = max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from safejax import rl
from safejax.generation import generate, positions_from_mask
from safejax.models.functional import ModelDef
from safejax.models.lora import LoRADef, base_def, merge_role
from safejax.train.lagrange_stage import LagrangeSection, cost_metrics, lagrange_micro_step  # noqa: F401
from safejax.train.ppo_config import PPOConfig, PPODataSection, PPOSection  # noqa: F401 (re-exported)
from safejax.train.optim import make_accumulating_optimizer, step_log
from safejax.train.state import ModelState, apply_gradients

log = logging.getLogger("safejax")



# ----------------------------------------------------------------------------- state


@struct.dataclass
class PPOState:
    """Everything that must survive a restart (frozen models are separate)."""

    step: jax.Array                 # [] int32: completed iterations (prompt batches)
    actor: ModelState
    reward_critic: ModelState
    cost_critic: ModelState | None  # None for ppo / reward shaping
    lagrange: rl.LagrangeState | rl.PIDLagrangeState  # K constraints, windows [K, W] (lagrange.rule)
    rng: jax.Array                  # raw key data


@struct.dataclass
class Frozen:
    """Read-only models: reference policy, reward model, cost model."""

    ref: Any
    reward: Any
    cost: Any


@struct.dataclass
class Experience:
    """One rollout batch.  Shifted-response arrays are ``[B, N]`` (actions ``P-1 .. L-2``); with K > 1 cost outputs
    the cost arrays carry a trailing constraint axis, as the cost model returns them."""

    sequences: jax.Array      # [B, L]
    attention_mask: jax.Array  # [B, L]
    old_log_probs: jax.Array  # [B, N]
    ref_log_probs: jax.Array  # [B, N]
    reward: jax.Array         # [B] RM end score
    cost: jax.Array           # [B] CM end score ([B, K] for K cost outputs)
    reward_values: jax.Array  # [B, N]
    cost_values: jax.Array    # [B, N] ([B, N, K])
    mask: jax.Array           # [B, N] float32 action mask


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
    actor: ModelDef | LoRADef     # also the reference policy's def (a LoRA actor's: its base)
    reward_critic: ModelDef | LoRADef  # a LoRA critic's base is the reward model's params
    cost_critic: ModelDef | LoRADef | None  # None unless ppo-lag; a LoRA one's base is the cost model's
    reward: ModelDef
    cost: ModelDef | None         # None when no cost model is given (plain PPO may omit it)
    num_constraints: int = 1      # K: the cost model's score_dim (its outputs are the K constraints' costs)


# ----------------------------------------------------------------------------- the small per-algorithm functions


def scalar_signals(algorithm: str, reward, cost, nu: float):
    """End-of-episode signals fed to the critics: (reward signal, cost signal or None)."""
    if algorithm == "ppo-lag":
        return reward, cost
    if algorithm == "ppo-reward-shaping":
        return rl.reward_shaping(reward, cost, nu=nu), None
    return reward, None


# ----------------------------------------------------------------------------- pure pieces


def _k_first(x):
    """Cost arrays of the mini-batch: ``[M, N]`` (K = 1) unchanged, ``[M, N, K]`` -> ``[K, M, N]``."""
    return x if x.ndim == 2 else jnp.moveaxis(x, -1, 0)


def _one(x):
    """A ``[K]`` multiplier array as the trace keeps it: a scalar for K = 1, else ``[K]``."""
    return x[0] if x.shape[0] == 1 else x


def data_flat(data: dict, key: str):
    """``[nmb, M, ...]`` mini-batched array of ``data`` back to ``[B, ...]``."""
    x = data[key]
    return x.reshape(-1, *x.shape[2:])


def special_token_mask(seq, pad_id: int, unk_id: int | None):
    """``[B, L]`` bool: ``(seq != pad) & (seq != unk)`` -- the reference's rollout mask rule (unk skipped if None)."""
    keep = seq != pad_id
    if unk_id is not None:
        keep = keep & (seq != unk_id)
    return keep


def _token_log_probs(lm, seq, mask, start):
    """``[B, L-1-start]`` log-probs of the response actions.  The LM head runs on positions ``[start, L-2]``
    only: the prompt's ``[B, start, V]`` float32 logits are never built (a third of them at P=128, N=256)."""
    h = lm.hidden_states(seq, attention_mask=mask, positions=positions_from_mask(mask))
    logits = lm.logits_from_hidden(h[:, start:-1])
    return rl.log_probs_from_logits(logits, seq[:, start + 1:])


def _values(sm, seq, mask, start):
    out = sm(seq, attention_mask=mask, positions=positions_from_mask(mask))
    return out.scores[:, start:-1]


def _end_scores(sm, seq, mask):
    return sm(seq, attention_mask=mask, positions=positions_from_mask(mask)).end_scores


def sample_and_score(phases, state, frozen: Frozen, prompt_ids, prompt_mask, *, mask_sampled_special: bool):
    """The rollout shared by the RL stages (PPO family, GRPO family): sample with the actor of ``state`` (key:
    ``state.rng`` folded with ``state.step``), cut responses at ``data.max_length`` when set, mask sampled pad/unk
    tokens, then the reward and cost models' end scores.  ``phases`` supplies ``cfg.data``, ``models`` (``actor``,
    ``reward``, ``cost`` defs), ``sampling``, ``P``, ``eos_id``, ``pad_id``, ``unk_id``.  ``prompt_ids, prompt_mask``:
    ``[B/G, P]``.  Returns ``(seq [B, L], mask [B, L], reward [B], cost [B])`` (cost zeros without a cost model)."""
    m = phases.models
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    actor = merge_role(m.actor, state.actor.params, frozen.ref)  # a LoRA actor: adapters over the shared base
    gen = generate(actor, prompt_ids, prompt_mask, key, phases.sampling,
                   eos_token_id=phases.eos_id, pad_token_id=phases.pad_id)
    seq, mask = gen.sequences, gen.attention_mask
    if phases.cfg.data.max_length:  # the reference's budget: max_length - the batch's longest prompt
        budget = phases.cfg.data.max_length - jnp.max(jnp.sum(prompt_mask.astype(jnp.int32), axis=-1))
        keep = jnp.arange(seq.shape[1]) < phases.P + budget
        seq, mask = jnp.where(keep, seq, phases.pad_id), mask & keep
    if mask_sampled_special:
        mask = mask & special_token_mask(seq, phases.pad_id, phases.unk_id)
    reward = _end_scores(m.reward.merge(frozen.reward), seq, mask)
    cost = _end_scores(m.cost.merge(frozen.cost), seq, mask) if m.cost is not None else jnp.zeros_like(reward)
    return seq, mask, reward, cost


class PPOPhases:
    """The PPO phases of one config and prompt width: ``rollout`` and ``update``, pure functions (:func:`make_rollout`
    and :func:`make_update` in ``ppo_loop`` jit them); holds the optimizers, no training state.

    ``total_updates`` is the number of RL micro-steps of the whole run (iterations x update_iters x
    mini-batches); each model's schedule spans ``total_updates // grad_accum`` optimizer updates, with or
    without ptx (the reference's ptx doubling of steps and accumulation cancels).  ``trace=True`` adds
    ``metrics["trace"]``: per-micro-step values stacked ``[update_iters, mini-batches, ...]`` (lambda, losses,
    lr and gradient norm of each optimizer, new log-probs / ratios / values) and the experience's KL-shaped
    rewards, advantages and returns ``[B, N]`` -- what the golden parity test compares."""

    def __init__(self, cfg: PPOConfig, models: Models, mesh, prompt_width: int, eos_id: int, pad_id: int,
                 total_updates: int, ptx_enabled: bool, unk_id: int | None = None, trace: bool = False,
                 max_new_tokens: int | None = None):
        self.cfg = cfg
        self.models = models
        self.P = prompt_width
        self.eos_id, self.pad_id = eos_id, pad_id
        self.unk_id = None if unk_id is None or unk_id == eos_id else unk_id
        self.algorithm = cfg.algorithm
        self.lag = cfg.algorithm == "ppo-lag"
        self.ptx_enabled = ptx_enabled
        self.trace = trace
        self.sampling = (cfg.rollout if max_new_tokens is None
                         else dataclasses.replace(cfg.rollout, max_new_tokens=max_new_tokens))
        self.actor_tx, self.actor_sched = make_accumulating_optimizer(cfg.actor_optim, total_updates,
                                                                      models.actor.hf_names())
        self.critic_tx, self.critic_sched = make_accumulating_optimizer(cfg.critic_optim, total_updates,
                                                                        models.reward_critic.hf_names())

    # ---- rollout + experience (no gradients)
    def rollout(self, state: PPOState, frozen: Frozen, prompt_ids, prompt_mask):
        seq, mask, reward, cost = sample_and_score(self, state, frozen, prompt_ids, prompt_mask,
                                                   mask_sampled_special=self.cfg.ppo.mask_sampled_special)
        old_lp, ref_lp, rv, cv = self.score(state, frozen.ref, seq, mask, frozen)
        return Experience(seq, mask, old_lp, ref_lp, reward, cost, rv, cv, self.action_mask(mask))

    def score(self, state: PPOState, ref_params, seq, mask, frozen: Frozen | None = None):
        """Actor and reference log-probs and the two critics' values of the response actions, each ``[B, N]``
        (cost values are zeros without a cost critic).  ``seq, mask``: ``[B, L]``.  LoRA models need
        ``frozen`` (their shared bases; ``ref_params`` is then the actor's base)."""
        m, start = self.models, self.P - 1
        fz = frozen or Frozen(None, None, None)
        old_lp = _token_log_probs(merge_role(m.actor, state.actor.params, ref_params), seq, mask, start)
        ref_lp = _token_log_probs(base_def(m.actor).merge(ref_params), seq, mask, start)
        rv = _values(merge_role(m.reward_critic, state.reward_critic.params, fz.reward), seq, mask, start)
        cv = (_values(merge_role(m.cost_critic, state.cost_critic.params, fz.cost), seq, mask, start) if self.lag
              else jnp.zeros_like(rv))
        return old_lp, ref_lp, rv, cv

    def action_mask(self, mask):
        """``[B, L]`` sequence mask -> ``[B, N]`` float32 mask of the response actions (shifted by one)."""
        return mask[:, self.P:].astype(jnp.float32)

    # ---- update phase
    def prepare(self, state: PPOState, exp: Experience):
        """Record the batch's episode costs, KL-shape rewards / costs and run GAE (reference ``rl_step`` up to
        the losses).  Returns ``(lagrange_state, data, extras)``; ``data`` holds the ``[B, ...]`` arrays the
        micro-steps consume.  With K > 1 constraints the cost arrays are ``[B, N, K]`` (each cost KL-shaped and
        run through GAE on its own, vmapped over K); K = 1 keeps ``[B, N]`` and today's arithmetic."""
        pc, lc = self.cfg.ppo, self.cfg.lagrange
        k = self.models.num_constraints
        cost_kb = exp.cost[None, :] if k == 1 else exp.cost.T  # [K, B]
        lag_state = rl.lagrange_record(state.lagrange, cost_kb)
        r_sig, c_sig = scalar_signals(self.algorithm, exp.reward, exp.cost if k == 1 else cost_kb, lc.lambda_init)
        rewards, costs = rl.kl_shaped_rewards(r_sig, c_sig, exp.old_log_probs, exp.ref_log_probs, exp.mask,
                                              kl_coeff=pc.kl_coeff, clip_range_score=pc.clip_range_score)
        adv_r, ret_r = rl.gae(exp.reward_values, rewards, exp.mask, gamma=pc.gamma, lam=pc.gae_lambda)
        if self.lag and k == 1:
            adv_c, ret_c = rl.gae(exp.cost_values, costs, exp.mask, gamma=pc.gamma, lam=pc.gae_lambda)
        elif self.lag:  # costs [K, B, N]; values [B, N, K]
            gae_k = jax.vmap(lambda v, c: rl.gae(v, c, exp.mask, gamma=pc.gamma, lam=pc.gae_lambda))
            adv_c, ret_c = gae_k(jnp.moveaxis(exp.cost_values, -1, 0), costs)
            costs, adv_c, ret_c = (jnp.moveaxis(x, 0, -1) for x in (costs, adv_c, ret_c))
        else:
            costs = jnp.zeros_like(rewards)
            adv_c, ret_c = jnp.zeros_like(adv_r), jnp.zeros_like(ret_r)
        data = dict(seq=exp.sequences, attn=exp.attention_mask, old_lp=exp.old_log_probs, mask=exp.mask,
                    adv_r=adv_r, ret_r=ret_r, v_r=exp.reward_values, adv_c=adv_c, ret_c=ret_c, v_c=exp.cost_values)
        extras = dict(rewards=rewards, costs=costs, r_sig=r_sig)
        return lag_state, data, extras

    def actor_grads(self, params, mb, pb, lam, base=None, key=None):
        """Gradient the actor's optimizer receives for one micro-step: ``grad L_actor``, or with a ptx
        micro-batch ``pb`` ``(grad L_actor + ptx_coeff * grad L_ptx) / 2`` (the reference accumulates the RL
        and the ptx micro-steps).  Returns ``(grads, metrics)``; metrics hold the losses and the new
        log-probs / ratios ``[M, N]``.  A LoRA actor: ``params`` are its adapters over the frozen ``base``,
        ``key`` drives its dropout."""
        pc, start = self.cfg.ppo, self.P - 1

        def actor_loss(params):
            lm = merge_role(self.models.actor, params, base, key)
            lp = _token_log_probs(lm, mb["seq"], mb["attn"], start)
            if self.lag:
                loss = rl.ppo_lag_actor_loss(lp, mb["old_lp"], mb["adv_r"], _k_first(mb["adv_c"]), mb["mask"],
                                             multiplier=lam, clip_range_ratio=pc.clip_range_ratio)
            else:
                loss = rl.ppo_actor_loss(lp, mb["old_lp"], mb["adv_r"], mb["mask"],
                                         clip_range_ratio=pc.clip_range_ratio)
            return loss, lp

        def ptx_loss(params):
            lm = merge_role(self.models.actor, params, base, None if key is None else jax.random.fold_in(key, 1))
            seg = pb.get("segment_ids")  # packed ptx rows (data.ptx_pack)
            logits = lm(pb["input_ids"], attention_mask=pb["attention_mask"], segment_ids=seg,
                        positions=positions_from_mask(pb["attention_mask"]) if seg is None else pb["positions"])
            return rl.sft_loss(logits[:, :-1], pb["input_ids"][:, 1:], pb["loss_mask"][:, 1:],
                               group_rows=pc.ptx_token_mean_rows)

        (a_loss, lp), grads = jax.value_and_grad(actor_loss, has_aux=True)(params)
        lp = jax.lax.stop_gradient(lp)
        metrics = {"actor_loss": a_loss, "log_probs": lp,
                   "ratios": jnp.exp(jnp.where(mb["mask"] != 0, lp - mb["old_lp"], 0.0))}
        if pb is not None:
            p_loss, p_grads = jax.value_and_grad(ptx_loss)(params)
            grads = jax.tree.map(lambda g, h: 0.5 * (g + pc.ptx_coeff * h), grads, p_grads)
            metrics["ptx_loss"] = p_loss
        return grads, metrics

    def critic_grads(self, params, mb, which: str, base=None, key=None):
        """``which`` = 'r' | 'c': ``(grads, (loss, new values [M, N]))`` of the clipped value loss (a LoRA
        critic: ``params`` = adapters + head over the frozen ``base``, dropout keyed by ``key``)."""
        pc, start = self.cfg.ppo, self.P - 1

        def critic_loss(params):
            sm = merge_role(self.models.reward_critic if which == "r" else self.models.cost_critic, params, base, key)
            v = _values(sm, mb["seq"], mb["attn"], start)
            if v.ndim == 3:  # K cost heads [M, N, K]: the mean over K of each head's clipped value loss
                per_k = jax.vmap(lambda v_, o_, g_: rl.value_loss(v_, o_, g_, mb["mask"],
                                                                  clip_range_value=pc.clip_range_value),
                                 in_axes=-1)(v, mb[f"v_{which}"], mb[f"ret_{which}"])
                return jnp.mean(per_k), v
            return rl.value_loss(v, mb[f"v_{which}"], mb[f"ret_{which}"], mb["mask"],
                                 clip_range_value=pc.clip_range_value), v

        (loss, v), grads = jax.value_and_grad(critic_loss, has_aux=True)(params)
        return grads, (loss, jax.lax.stop_gradient(v))

    def update(self, state: PPOState, exp: Experience, ptx: dict | None, frozen: Frozen | None = None):
        cfg = self.cfg
        pc, lc = cfg.ppo, cfg.lagrange
        lag_state, data, extras = self.prepare(state, exp)
        b = exp.sequences.shape[0]
        mbs = pc.micro_batch_size
        nmb = b // mbs
        data = jax.tree.map(lambda x: x.reshape(nmb, mbs, *x.shape[1:]), data)
        if ptx is not None:
            ptx = jax.tree.map(lambda x: x.reshape(nmb, x.shape[0] // nmb, *x.shape[1:]), ptx)

        def apply(tx, ms: ModelState, grads, name, out):
            ms = apply_gradients(ms, grads, tx)
            log_ = step_log(ms.opt_state)
            out.update({f"{name}_lr": log_.lr, f"{name}_grad_norm": log_.grad_norm, f"{name}_updates": log_.count})
            return ms

        def micro_step(carry, xs):
            actor_s, rc_s, cc_s, lag = carry
            mb, pb, key = xs
            sgd = isinstance(lag, rl.LagrangeState)
            out = {"log_lambda_before": _one(lag.log_lambda)} if sgd else {"lambda_before": _one(rl.multiplier(lag))}
            if self.lag:
                lag = lagrange_micro_step(lc, lag)
            lam = _one(rl.multiplier(lag)) if self.lag else jnp.float32(0.0)
            if sgd:
                out["log_lambda"] = _one(lag.log_lambda)
            out["lambda_used"] = lam
            a_grads, a_out = self.actor_grads(actor_s.params, mb, pb, jax.lax.stop_gradient(lam), fz.ref,
                                              jax.random.fold_in(key, 0))
            out.update(a_out)
            if self.lag:
                out["combined_advantages"] = rl.combined_advantages(mb["adv_r"], _k_first(mb["adv_c"]), lam)
            actor_s = apply(self.actor_tx, actor_s, a_grads, "actor", out)
            r_grads, (out["reward_critic_loss"], out["reward_values"]) = self.critic_grads(
                rc_s.params, mb, "r", fz.reward, jax.random.fold_in(key, 2))
            rc_s = apply(self.critic_tx, rc_s, r_grads, "reward_critic", out)
            if self.lag:
                c_grads, (out["cost_critic_loss"], out["cost_values"]) = self.critic_grads(
                    cc_s.params, mb, "c", fz.cost, jax.random.fold_in(key, 3))
                cc_s = apply(self.critic_tx, cc_s, c_grads, "cost_critic", out)
            return (actor_s, rc_s, cc_s, lag), out

        fz = frozen or Frozen(None, None, None)
        # LoRA dropout: one key per micro-step from the state's rng (unused, so compiled away, without dropout)
        it_key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), 1 << 20)

        def epoch(carry, e):
            return jax.lax.scan(micro_step, carry, (data, ptx, jax.random.split(jax.random.fold_in(it_key, e), nmb)))

        carry = (state.actor, state.reward_critic, state.cost_critic, lag_state)
        (actor_s, rc_s, cc_s, lag_state), steps = jax.lax.scan(epoch, carry, jnp.arange(pc.update_iters))
        metrics = {k: jnp.mean(steps[k]) for k in ("actor_loss", "ptx_loss", "reward_critic_loss", "cost_critic_loss")
                   if k in steps}
        new_state = state.replace(step=state.step + 1, actor=actor_s, reward_critic=rc_s, cost_critic=cc_s,
                                  lagrange=lag_state)
        metrics.update(self._experience_metrics(exp, extras["rewards"], extras["costs"], data_flat(data, "adv_r"),
                                                data_flat(data, "ret_r"), data_flat(data, "adv_c"),
                                                data_flat(data, "ret_c"), lag_state, extras["r_sig"]))
        # the lr the last optimizer update of this iteration applied (0 before the first update)
        metrics["actor_lr"] = step_log(actor_s.opt_state).lr
        metrics["reward_critic_lr"] = step_log(rc_s.opt_state).lr
        if self.lag:
            metrics["cost_critic_lr"] = step_log(cc_s.opt_state).lr
        out = {"train/" + k: v for k, v in metrics.items()}
        if self.trace:
            out["trace"] = dict(steps, **{k: extras[k] for k in ("rewards", "costs")},
                                **{k: data_flat(data, k) for k in ("adv_r", "ret_r", "adv_c", "ret_c")})
        return new_state, out

    def _experience_metrics(self, exp, rewards, costs, adv_r, ret_r, adv_c, ret_c, lag, r_sig):
        mk = exp.mask
        k = self.models.num_constraints
        if k > 1:  # the aggregate cost metrics below average the K constraints (see cost_metrics)
            costs, adv_c, ret_c = (jnp.mean(x, axis=-1) for x in (costs, adv_c, ret_c))
        seq_sum = lambda x: jnp.mean(jnp.sum(x * mk, axis=-1))  # noqa: E731
        lengths = jnp.sum(mk, axis=-1)
        out = {
            "reward": jnp.mean(exp.reward),
            "kl_divergence": seq_sum(exp.old_log_probs - exp.ref_log_probs),
            "mean_generated_length": jnp.mean(lengths),
            "max_generated_length": jnp.max(lengths),
        }
        if self.models.cost is not None:  # plain PPO without a cost model has no cost to report
            out.update(cost_metrics(self.cfg.lagrange, exp.cost, lag, with_lambda=self.lag))
        if self.algorithm == "ppo-reward-shaping":
            out.update({"nu": jnp.float32(self.cfg.lagrange.lambda_init), "shaped_reward": jnp.mean(r_sig),
                        "shaped_reward_with_kl_penalty": seq_sum(rewards),
                        "shaped_reward_advantage": rl.masked_mean(adv_r, mk),
                        "shaped_reward_return": rl.masked_mean(ret_r, mk),
                        "shaped_reward_value": rl.masked_mean(exp.reward_values, mk)})
        else:
            out.update({"reward_with_kl_penalty": seq_sum(rewards),
                        "reward_advantage": rl.masked_mean(adv_r, mk), "reward_return": rl.masked_mean(ret_r, mk),
                        "reward_value": rl.masked_mean(exp.reward_values, mk)})
        if self.lag:
            cv = exp.cost_values if k == 1 else jnp.mean(exp.cost_values, axis=-1)
            out.update({"cost_with_kl_penalty": seq_sum(costs),
                        "cost_advantage": rl.masked_mean(adv_c, mk), "cost_return": rl.masked_mean(ret_c, mk),
                        "cost_value": rl.masked_mean(cv, mk)})
        return out
