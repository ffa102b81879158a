"""Safe RLHF's RL stage: PPO-Lagrangian, with plain PPO and fixed-nu reward shaping as baselines.

One trainer serves the three algorithms; they differ only in small functions
(:func:`scalar_signals`, and which actor loss and critics are used).  Follow one iteration:

1. ``rollout_fn(state, frozen, prompts)`` (jitted): sample responses with the actor
   (:mod:`safejax.generation`), then score the sequences: actor and reference log-probs, reward
   and cost end scores, values of the reward and cost critics.  Output: an ``Experience`` batch.
2. ``update_fn(state, experience, ptx)`` (jitted, state donated): record episode costs in the
   Lagrange state, KL-shape the per-token rewards/costs, GAE for both, then ``update_iters`` epochs
   over mini-batches as nested ``lax.scan``; each mini-batch does the lambda step, the actor step
   (clipped surrogate on ``(A_r - lambda*A_c)/(1+lambda)``, plus ptx) and the two critic steps.

Index conventions (SAFE_RLHF.md §5.1): prompts are left-padded to a fixed width ``P``; shifted
arrays have length ``L-1``; response actions are the shifted positions ``[P-1, L-2]``, i.e. a
static slice of width ``N = max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from safejax import rl
from safejax.config import ConfigError, check_range
from safejax.generation import SamplingConfig, generate, positions_from_mask
from safejax.parallel import MeshConfig
from safejax.train.common import LoopSection, ModelSection
from safejax.train.functional import ModelDef
from safejax.train.optim import OptimConfig, make_optimizer

log = logging.getLogger("safejax")

ALGORITHMS = ("ppo-lag", "ppo", "ppo-reward-shaping")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class PPODataSection:
    prompts: list[str] = dataclasses.field(default_factory=list)      # dataset specs of prompt rows
    ptx: list[str] = dataclasses.field(default_factory=list)          # supervised specs (empty = no ptx)
    eval_prompts: list[str] = dataclasses.field(default_factory=list)  # held-out prompts: eval/reward, eval/cost
                                                                       # every train.eval_every iterations + at the end
    prompt_width: int = 64
    ptx_max_length: int = 128
    skip_bad_rows: bool = False
    ptx_pack: bool = False             # pack several ptx examples per row (safejax.data.packing); same token loss


@dataclasses.dataclass
class PPOSection:
    kl_coeff: float = 0.01
    clip_range_ratio: float = 0.2
    clip_range_score: float = 50.0
    clip_range_value: float = 5.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    update_iters: int = 1
    micro_batch_size: int = 16        # rows per mini-batch update (M)
    ptx_coeff: float = 16.0
    # [code] mask_t = (x_t != pad) and (x_t != unk): a pad or unk token the actor *samples* inside a response
    # is masked out of the experience (log-probs, values, end-score index), as in the reference.  False keeps
    # every generated token up to EOS.
    mask_sampled_special: bool = True

    def validate(self) -> None:
        check_range("ppo.kl_coeff", self.kl_coeff, low=0.0)
        check_range("ppo.clip_range_ratio", self.clip_range_ratio, low=0.0, low_open=True)
        check_range("ppo.gamma", self.gamma, low=0.0, high=1.0)
        check_range("ppo.gae_lambda", self.gae_lambda, low=0.0, high=1.0)
        check_range("ppo.update_iters", self.update_iters, low=1)
        check_range("ppo.micro_batch_size", self.micro_batch_size, low=1)
        check_range("ppo.ptx_coeff", self.ptx_coeff, low=0.0)


@dataclasses.dataclass
class LagrangeSection:
    lambda_init: float = 1.0          # also nu, the fixed multiplier of reward shaping
    lambda_lr: float = 0.1
    lambda_max: float | None = 5.0
    threshold: float = 0.0
    episode_cost_window_size: int = 128
    lambda_update_delay_steps: int = 0

    def validate(self) -> None:
        check_range("lagrange.lambda_init", self.lambda_init, low=0.0, low_open=True)
        check_range("lagrange.lambda_lr", self.lambda_lr, low=0.0)
        if self.lambda_max is not None:
            check_range("lagrange.lambda_max", self.lambda_max, low=0.0, low_open=True)
        check_range("lagrange.episode_cost_window_size", self.episode_cost_window_size, low=1)


@dataclasses.dataclass
class PPOConfig:
    algorithm: str = "ppo-lag"
    out_dir: str = "runs/ppo-lag"
    seed: int = 42
    actor: ModelSection = dataclasses.field(default_factory=ModelSection)   # the SFT policy (also the reference)
    reward_model: str = ""
    cost_model: str = ""
    reward_critic: str = ""           # default: reward_model (critic starts from the RM head)
    cost_critic: str = ""             # default: cost_model
    data: PPODataSection = dataclasses.field(default_factory=PPODataSection)
    rollout: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    ppo: PPOSection = dataclasses.field(default_factory=PPOSection)
    lagrange: LagrangeSection = dataclasses.field(default_factory=LagrangeSection)
    actor_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=1e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.01))
    critic_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=5e-6, schedule="constant", warmup_ratio=0.03, weight_decay=0.0))
    train: LoopSection = dataclasses.field(default_factory=LoopSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    allow_config_change: bool = False

    def validate(self) -> None:
        check_range("algorithm", self.algorithm, choices=ALGORITHMS)
        if self.train.batch_size % self.ppo.micro_batch_size:
            raise ConfigError(f"config key 'train.batch_size' = {self.train.batch_size} must be a multiple of "
                              f"'ppo.micro_batch_size' = {self.ppo.micro_batch_size}")
        if self.train.batch_size % self.rollout.num_return_sequences:
            raise ConfigError(f"config key 'train.batch_size' = {self.train.batch_size} must be a multiple of "
                              f"'rollout.num_return_sequences' = {self.rollout.num_return_sequences}")
        for key in ("reward_model",) + (("cost_model",) if self.algorithm != "ppo" else ()):
            if not getattr(self, key):
                raise ConfigError(f"config key '{key}' is required for algorithm '{self.algorithm}'")


# ----------------------------------------------------------------------------- state


@struct.dataclass
class ModelState:
    params: Any
    opt_state: Any


@struct.dataclass
class PPOState:
    """Everything that must survive a restart (frozen models are separate)."""

    step: jax.Array                 # [] int32: completed iterations (prompt batches)
    actor: ModelState
    reward_critic: ModelState
    cost_critic: ModelState | None  # None for ppo / reward shaping
    lagrange: rl.LagrangeState
    rng: jax.Array                  # raw key data


@struct.dataclass
class Frozen:
    """Read-only models: reference policy, reward model, cost model."""

    ref: Any
    reward: Any
    cost: Any


@struct.dataclass
class Experience:
    """One rollout batch.  Shifted-response arrays are ``[B, N]`` (actions ``P-1 .. L-2``)."""

    sequences: jax.Array      # [B, L]
    attention_mask: jax.Array  # [B, L]
    old_log_probs: jax.Array  # [B, N]
    ref_log_probs: jax.Array  # [B, N]
    reward: jax.Array         # [B] RM end score
    cost: jax.Array           # [B] CM end score
    reward_values: jax.Array  # [B, N]
    cost_values: jax.Array    # [B, N]
    mask: jax.Array           # [B, N] float32 action mask


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
    actor: ModelDef               # also the reference policy's def
    reward_critic: ModelDef
    cost_critic: ModelDef | None  # None unless ppo-lag
    reward: ModelDef
    cost: ModelDef | None         # None when no cost model is given (plain PPO may omit it)


# ----------------------------------------------------------------------------- the small per-algorithm functions


def scalar_signals(algorithm: str, reward, cost, nu: float):
    """End-of-episode signals fed to the critics: (reward signal, cost signal or None)."""
    if algorithm == "ppo-lag":
        return reward, cost
    if algorithm == "ppo-reward-shaping":
        return rl.reward_shaping(reward, cost, nu=nu), None
    return reward, None


# ----------------------------------------------------------------------------- pure pieces


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


class Trainer:
    """Builds the jitted phases for one config; holds no mutable training state itself."""

    def __init__(self, cfg: PPOConfig, models: Models, mesh, prompt_width: int, eos_id: int, pad_id: int,
                 total_updates: int, ptx_enabled: bool, unk_id: int | None = None):
        self.cfg = cfg
        self.models = models
        self.mesh = mesh
        self.P = prompt_width
        self.eos_id, self.pad_id = eos_id, pad_id
        self.unk_id = None if unk_id is None or unk_id == eos_id else unk_id
        self.algorithm = cfg.algorithm
        self.lag = cfg.algorithm == "ppo-lag"
        self.ptx_enabled = ptx_enabled
        self.actor_tx, self.actor_sched = make_optimizer(cfg.actor_optim, total_updates * (2 if ptx_enabled else 1))
        self.critic_tx, self.critic_sched = make_optimizer(cfg.critic_optim, total_updates)

    # ---- rollout + experience (no gradients)
    def rollout(self, state: PPOState, frozen: Frozen, prompt_ids, prompt_mask):
        cfg, m = self.cfg, self.models
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        actor = m.actor.merge(state.actor.params)
        gen = generate(actor, prompt_ids, prompt_mask, key, cfg.rollout, eos_token_id=self.eos_id,
                       pad_token_id=self.pad_id)
        seq, mask = gen.sequences, gen.attention_mask
        if cfg.ppo.mask_sampled_special:
            mask = mask & special_token_mask(seq, self.pad_id, self.unk_id)
        start = self.P - 1
        old_lp = _token_log_probs(actor, seq, mask, start)
        ref_lp = _token_log_probs(m.actor.merge(frozen.ref), seq, mask, start)
        reward = _end_scores(m.reward.merge(frozen.reward), seq, mask)
        if m.cost is not None:
            cost = _end_scores(m.cost.merge(frozen.cost), seq, mask)
        else:
            cost = jnp.zeros_like(reward)
        rv = _values(m.reward_critic.merge(state.reward_critic.params), seq, mask, start)
        cv = (_values(m.cost_critic.merge(state.cost_critic.params), seq, mask, start) if self.lag
              else jnp.zeros_like(rv))
        act_mask = mask[:, start + 1:].astype(jnp.float32)
        return Experience(seq, mask, old_lp, ref_lp, reward, cost, rv, cv, act_mask)

    # ---- update phase
    def update(self, state: PPOState, exp: Experience, ptx: dict | None):
        cfg, m = self.cfg, self.models
        pc, lc = cfg.ppo, cfg.lagrange
        lag_state = rl.lagrange_record(state.lagrange, exp.cost[None, :])
        r_sig, c_sig = scalar_signals(self.algorithm, exp.reward, exp.cost, lc.lambda_init)
        rewards, costs = rl.kl_shaped_rewards(r_sig, c_sig, exp.old_log_probs, exp.ref_log_probs, exp.mask,
                                              kl_coeff=pc.kl_coeff, clip_range_score=pc.clip_range_score)
        adv_r, ret_r = rl.gae(exp.reward_values, rewards, exp.mask, gamma=pc.gamma, lam=pc.gae_lambda)
        if self.lag:
            adv_c, ret_c = rl.gae(exp.cost_values, costs, exp.mask, gamma=pc.gamma, lam=pc.gae_lambda)
        else:
            adv_c, ret_c = jnp.zeros_like(adv_r), jnp.zeros_like(ret_r)
        data = dict(seq=exp.sequences, attn=exp.attention_mask, old_lp=exp.old_log_probs, mask=exp.mask,
                    adv_r=adv_r, ret_r=ret_r, v_r=exp.reward_values, adv_c=adv_c, ret_c=ret_c, v_c=exp.cost_values)
        b = exp.sequences.shape[0]
        mbs = pc.micro_batch_size
        nmb = b // mbs
        data = jax.tree.map(lambda x: x.reshape(nmb, mbs, *x.shape[1:]), data)
        if ptx is not None:
            ptx = jax.tree.map(lambda x: x.reshape(nmb, x.shape[0] // nmb, *x.shape[1:]), ptx)
        start = self.P - 1

        def actor_loss(params, mb, lam):
            lm = m.actor.merge(params)
            lp = _token_log_probs(lm, mb["seq"], mb["attn"], start)
            if self.lag:
                return rl.ppo_lag_actor_loss(lp, mb["old_lp"], mb["adv_r"], mb["adv_c"], mb["mask"],
                                             multiplier=lam, clip_range_ratio=pc.clip_range_ratio)
            return rl.ppo_actor_loss(lp, mb["old_lp"], mb["adv_r"], mb["mask"], clip_range_ratio=pc.clip_range_ratio)

        def ptx_loss(params, pb):
            lm = m.actor.merge(params)
            seg = pb.get("segment_ids")  # packed ptx rows (data.ptx_pack)
            logits = lm(pb["input_ids"], attention_mask=pb["attention_mask"], segment_ids=seg,
                        positions=positions_from_mask(pb["attention_mask"]) if seg is None else pb["positions"])
            return rl.sft_loss(logits[:, :-1], pb["input_ids"][:, 1:], pb["loss_mask"][:, 1:])

        def critic_loss(params, mb, which):
            sm = (m.reward_critic if which == "r" else m.cost_critic).merge(params)
            v = _values(sm, mb["seq"], mb["attn"], start)
            return rl.value_loss(v, mb[f"v_{which}"], mb[f"ret_{which}"], mb["mask"],
                                 clip_range_value=pc.clip_range_value)

        def micro_step(carry, xs):
            actor_s, rc_s, cc_s, lag = carry
            mb, pb = xs
            if self.lag:
                lag = rl.lagrange_step(lag, threshold=lc.threshold, lambda_lr=lc.lambda_lr,
                                       lambda_max=lc.lambda_max, update_delay_steps=lc.lambda_update_delay_steps)
            lam = rl.multiplier(lag)[0] if self.lag else jnp.float32(0.0)
            a_loss, a_grads = jax.value_and_grad(actor_loss)(actor_s.params, mb, jax.lax.stop_gradient(lam))
            metrics = {"actor_loss": a_loss}
            if pb is not None:
                p_loss, p_grads = jax.value_and_grad(ptx_loss)(actor_s.params, pb)
                a_grads = jax.tree.map(lambda g, h: 0.5 * (g + pc.ptx_coeff * h), a_grads, p_grads)
                metrics["ptx_loss"] = p_loss
            upd, a_opt = self.actor_tx.update(a_grads, actor_s.opt_state, actor_s.params)
            actor_s = ModelState(optax.apply_updates(actor_s.params, upd), a_opt)
            r_loss, r_grads = jax.value_and_grad(critic_loss)(rc_s.params, mb, "r")
            upd, r_opt = self.critic_tx.update(r_grads, rc_s.opt_state, rc_s.params)
            rc_s = ModelState(optax.apply_updates(rc_s.params, upd), r_opt)
            metrics["reward_critic_loss"] = r_loss
            if self.lag:
                c_loss, c_grads = jax.value_and_grad(critic_loss)(cc_s.params, mb, "c")
                upd, c_opt = self.critic_tx.update(c_grads, cc_s.opt_state, cc_s.params)
                cc_s = ModelState(optax.apply_updates(cc_s.params, upd), c_opt)
                metrics["cost_critic_loss"] = c_loss
            return (actor_s, rc_s, cc_s, lag), metrics

        def epoch(carry, _):
            return jax.lax.scan(micro_step, carry, (data, ptx))

        carry = (state.actor, state.reward_critic, state.cost_critic, lag_state)
        (actor_s, rc_s, cc_s, lag_state), metrics = jax.lax.scan(epoch, carry, None, length=pc.update_iters)
        metrics = jax.tree.map(jnp.mean, metrics)
        new_state = state.replace(step=state.step + 1, actor=actor_s, reward_critic=rc_s, cost_critic=cc_s,
                                  lagrange=lag_state)
        metrics.update(self._experience_metrics(exp, rewards, costs, adv_r, ret_r, adv_c, ret_c, lag_state,
                                                r_sig))
        n_updates = state.step * pc.update_iters * nmb
        metrics["actor_lr"] = self.actor_sched(n_updates * (2 if self.ptx_enabled else 1))
        metrics["reward_critic_lr"] = self.critic_sched(n_updates)
        if self.lag:
            metrics["cost_critic_lr"] = self.critic_sched(n_updates)
        return new_state, {"train/" + k: v for k, v in metrics.items()}

    def _experience_metrics(self, exp, rewards, costs, adv_r, ret_r, adv_c, ret_c, lag, r_sig):
        mk = exp.mask
        seq_sum = lambda x: jnp.mean(jnp.sum(x * mk, axis=-1))  # noqa: E731
        lengths = jnp.sum(mk, axis=-1)
        out = {
            "reward": jnp.mean(exp.reward),
            "cost": jnp.mean(exp.cost),
            "episode_cost": rl.episode_cost_mean(lag)[0],
            "kl_divergence": seq_sum(exp.old_log_probs - exp.ref_log_probs),
            "mean_generated_length": jnp.mean(lengths),
            "max_generated_length": jnp.max(lengths),
        }
        if self.algorithm == "ppo-reward-shaping":
            out.update({"shaped_reward": jnp.mean(r_sig), "shaped_reward_with_kl_penalty": seq_sum(rewards),
                        "shaped_reward_advantage": rl.masked_mean(adv_r, mk),
                        "shaped_reward_return": rl.masked_mean(ret_r, mk),
                        "shaped_reward_value": rl.masked_mean(exp.reward_values, mk)})
        else:
            out.update({"reward_with_kl_penalty": seq_sum(rewards),
                        "reward_advantage": rl.masked_mean(adv_r, mk), "reward_return": rl.masked_mean(ret_r, mk),
                        "reward_value": rl.masked_mean(exp.reward_values, mk)})
        if self.lag:
            out.update({"lambda": rl.multiplier(lag)[0], "cost_with_kl_penalty": seq_sum(costs),
                        "cost_advantage": rl.masked_mean(adv_c, mk), "cost_return": rl.masked_mean(ret_c, mk),
                        "cost_value": rl.masked_mean(exp.cost_values, mk)})
        return out
