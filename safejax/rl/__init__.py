"""Pure, jittable math of Safe RLHF (ALGORITHM.md §4, §5): masked means, GAE, KL-shaped per-token rewards and
costs, PPO / PPO-Lagrangian actor and critic losses, preference-model losses and metrics, SFT/ptx loss, DPO and the
Lagrange multiplier state.

Conventions: arrays are ``[B, T]`` (batch, response time) unless noted; ``mask`` is 1 on positions that count;
computations run in float32 (float64 when the inputs are float64); quantities the reference treats as constants
(old log-probs, advantages, returns, lambda inside the actor loss) are wrapped in ``stop_gradient``.

The constrained-alignment family adds: K constraints in the PPO-Lagrangian advantage, the PID multiplier rule
(:mod:`safejax.rl.pid`; :func:`multiplier` serves both rules), group-relative advantages, the k3 KL and the
sequence-level GRPO(-Lagrangian) loss (:mod:`safejax.rl.group`), and offline losses on summed log-probs: DPO,
the SafeDPO-style label transform and loss, BFPO (:mod:`safejax.rl.dpo`).
"""

from safejax.rl._util import end_index
from safejax.rl.dpo import bfpo_loss, dpo_loss, dpo_metrics, safe_dpo_labels, safe_dpo_loss
from safejax.rl.gae import gae
from safejax.rl.group import GROUP_ADVANTAGE_METHODS, group_advantages, grpo_actor_loss, k3_kl, kl_shaped_scores
from safejax.rl.lagrange import (
    LagrangeState,
    episode_cost_mean,
    lagrange_init,
    lagrange_record,
    lagrange_step,
    lagrange_update,
    multiplier,
)
from safejax.rl.lm import log_probs_from_logits, sft_loss
from safejax.rl.masked import masked_mean, masked_sum
from safejax.rl.pid import (
    SUGGESTED_PID_GAINS,
    PIDLagrangeState,
    pid_lagrange_init,
    pid_lagrange_step,
    pid_lagrange_update,
)
from safejax.rl.ppo import (
    combined_advantages,
    kl_shaped_rewards,
    ppo_actor_loss,
    ppo_lag_actor_loss,
    reward_shaping,
    value_loss,
)
from safejax.rl.preference import (
    cost_accuracy,
    cost_model_loss,
    cost_model_metrics,
    cost_sign_accuracy,
    dpo_log_ratios,
    dpo_window_loss,
    reward_accuracy,
    reward_model_loss,
    reward_model_metrics,
    token_wise_cost_model_loss,
    token_wise_reward_model_loss,
)

__all__ = [
    "GROUP_ADVANTAGE_METHODS",
    "LagrangeState",
    "PIDLagrangeState",
    "SUGGESTED_PID_GAINS",
    "bfpo_loss",
    "combined_advantages",
    "cost_accuracy",
    "cost_model_loss",
    "cost_model_metrics",
    "cost_sign_accuracy",
    "dpo_log_ratios",
    "dpo_loss",
    "dpo_metrics",
    "dpo_window_loss",
    "end_index",
    "episode_cost_mean",
    "gae",
    "group_advantages",
    "grpo_actor_loss",
    "k3_kl",
    "kl_shaped_rewards",
    "kl_shaped_scores",
    "lagrange_init",
    "lagrange_record",
    "lagrange_step",
    "lagrange_update",
    "log_probs_from_logits",
    "masked_mean",
    "masked_sum",
    "multiplier",
    "pid_lagrange_init",
    "pid_lagrange_step",
    "pid_lagrange_update",
    "ppo_actor_loss",
    "ppo_lag_actor_loss",
    "reward_accuracy",
    "reward_model_loss",
    "reward_model_metrics",
    "reward_shaping",
    "safe_dpo_labels",
    "safe_dpo_loss",
    "sft_loss",
    "token_wise_cost_model_loss",
    "token_wise_reward_model_loss",
    "value_loss",
]
