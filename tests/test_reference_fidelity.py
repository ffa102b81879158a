"""Options that follow the reference trainer (safe-rlhf) where a full-size run would otherwise diverge: positions
under a mask hole, weight-decay groups by HF name, HF schedules, the accumulating RL optimizer, the ptx / SFT loss
unit, the global episode-cost window and the token-wise preference loss with the reference's pad window."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from safejax import rl
from safejax.config import ConfigError, load_config
from safejax.generation import positions_from_mask
from safejax.models import CausalLM, ModelConfig
from safejax.parallel import MeshConfig, make_mesh, use_mesh
from safejax.models.functional import split_model
from safejax.train.optim import OptimConfig, decay_mask, make_accumulating_optimizer, make_schedule, step_log
from safejax.train.ppo import PPOConfig
from safejax.train.reference_args import ppo_config_from_reference_args


def test_positions_follow_the_layout_through_a_mask_hole():
    mask = jnp.array([[0, 0, 1, 1, 0, 1, 1],     # left-padded, hole at column 4
                      [1, 1, 1, 1, 1, 0, 0]])    # right-padded
    pos = np.asarray(positions_from_mask(mask))
    np.testing.assert_array_equal(pos[0, 2:], [0, 1, 2, 3, 4])   # after the hole: not shifted by one
    np.testing.assert_array_equal(pos[1, :5], np.cumsum(np.asarray(mask[1, :5])) - 1)


def _def(architecture: str):
    cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=4, max_position_embeddings=16, architecture=architecture,
                      hidden_act="gelu_new" if architecture == "gpt2" else "silu")
    with use_mesh(make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])):
        return split_model(CausalLM(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_reference_decay_groups_follow_hf_names(architecture):
    mdef, params = _def(architecture)
    names = mdef.hf_names()
    mask = decay_mask(params, names, "reference")
    flat = {n: d for n, d in zip(jax.tree.leaves(names), jax.tree.leaves(mask))}
    for name, decays in flat.items():
        low = name.lower()
        assert decays == (not ("bias" in low or "layernorm.weight" in low)), name
    if architecture == "llama":
        assert flat["model.norm.weight"] and not flat["model.layers.0.input_layernorm.weight"]
    else:  # GPT-2's ln_* weights decay under the reference's rule; biases never do
        assert flat["transformer.ln_f.weight"] and flat["transformer.h.0.ln_1.weight"]
        assert not flat["transformer.ln_f.bias"]
    matrices = decay_mask(params, names, "matrices")
    assert all(d == (x.ndim >= 2) for d, x in zip(jax.tree.leaves(matrices), jax.tree.leaves(params)))


@pytest.mark.parametrize("schedule,warmup,want", [
    ("cosine", 0.25, [0.0, 1.0, 0.75, 0.25]),           # HF get_scheduler values over 4 updates, 1 warm-up
    ("linear", 0.25, [0.0, 1.0, 2 / 3, 1 / 3]),
    ("constant", 0.25, [1.0, 1.0, 1.0, 1.0]),
    ("constant_with_warmup", 0.5, [0.0, 0.5, 1.0, 1.0]),
])
def test_schedules_match_transformers_lambda_values(schedule, warmup, want):
    sched = make_schedule(OptimConfig(lr=1.0, schedule=schedule, warmup_ratio=warmup), 4)
    np.testing.assert_allclose([float(sched(k)) for k in range(4)], want, rtol=1e-6, atol=1e-7)


def test_accumulating_optimizer_updates_every_grad_accum_micro_steps_over_t_updates():
    cfg = OptimConfig(lr=1.0, schedule="linear", warmup_ratio=0.0, grad_accum=2, clip_norm=0.0)
    tx, sched = make_accumulating_optimizer(cfg, micro_steps=8, param_names={"w": "w"})
    params = {"w": jnp.zeros((3,))}
    state = tx.init(params)
    lrs, counts = [], []
    for k in range(8):
        upd, state = tx.update({"w": jnp.full((3,), float(k + 1))}, state, params)
        params = optax.apply_updates(params, upd)
        counts.append(int(step_log(state).count))
        lrs.append(float(step_log(state).lr))
    assert counts == [0, 1, 1, 2, 2, 3, 3, 4]                      # 8 micro-steps -> 4 updates
    np.testing.assert_allclose(lrs[1::2], [1.0, 0.75, 0.5, 0.25])  # the schedule spans exactly those 4
    assert float(step_log(state).grad_norm) == pytest.approx(np.sqrt(3) * 7.5)  # mean of 7 and 8, pre-clip


def _numpy_token_means(lp, m, rows):
    groups = [(lp[i:i + rows] * m[i:i + rows]).sum() / m[i:i + rows].sum() for i in range(0, len(lp), rows)]
    return -np.mean(groups), -(lp * m).sum() / m.sum()


def test_sft_loss_unit_is_per_group_token_mean_or_global():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(4, 5))
    m = np.zeros((4, 5), bool)
    m[0, :1] = m[1, :5] = m[2, :3] = m[3, :4] = True             # groups of unequal token counts
    lp = np.asarray(rl.log_probs_from_logits(logits, labels))
    grouped, global_ = _numpy_token_means(lp, m, 2)
    np.testing.assert_allclose(rl.sft_loss(logits, labels, m, group_rows=2), grouped, rtol=1e-6)
    np.testing.assert_allclose(rl.sft_loss(logits, labels, m), global_, rtol=1e-6)
    assert abs(grouped - global_) > 1e-3
    with pytest.raises(ValueError, match="group_rows=3"):
        rl.sft_loss(logits, labels, m, group_rows=3)


def test_reference_args_map_every_option_and_reject_unknown_ones():
    hp = {"kl_coeff": 0.1, "actor_lr": 1e-3, "actor_lr_scheduler_type": "linear", "critic_lr_warmup_ratio": 0.5,
          "gradient_accumulation_steps": 2, "per_device_prompt_batch_size": 16, "per_device_train_batch_size": 8,
          "episode_cost_window_size": 128, "lambda_max": None, "update_iters": 2, "ptx_coeff": 4.0}
    cfg = ppo_config_from_reference_args(hp, use_ptx=True, world_size=8)
    assert (cfg.ppo.kl_coeff, cfg.actor_optim.lr, cfg.actor_optim.schedule, cfg.critic_optim.warmup_ratio) == \
        (0.1, 1e-3, "linear", 0.5)
    assert (cfg.actor_optim.grad_accum, cfg.critic_optim.grad_accum, cfg.ppo.update_iters, cfg.ppo.ptx_coeff) == \
        (2, 2, 2, 4.0)
    assert (cfg.train.batch_size, cfg.ppo.micro_batch_size, cfg.lagrange.window, cfg.lagrange.lambda_max) == \
        (128, 64, 1024, None)
    assert cfg.rollout.top_k == 50
    assert ppo_config_from_reference_args(hp, use_ptx=False).ppo.ptx_coeff == 0.0
    with pytest.raises(ConfigError, match="not_an_option"):
        ppo_config_from_reference_args({"not_an_option": 1}, use_ptx=False)


def test_ptx_token_mean_rows_must_divide_the_micro_batch(tmp_path):
    with pytest.raises(ConfigError, match="ptx_token_mean_rows"):
        load_config(PPOConfig, None, ["reward_model=x", "cost_model=y", "ppo.micro_batch_size=16",
                                      "train.batch_size=16", "ppo.ptx_token_mean_rows=5"])


def test_token_wise_loss_with_the_reference_pad_window_is_reachable_from_the_config():
    from safejax.train.score_model import ScoreModelConfig, score_loss_fn

    cfg = load_config(ScoreModelConfig, None, ["loss_type=token-wise", "include_pad_bug=true"])
    assert cfg.include_pad_bug
    mdef, params = _score_def()
    ids_a = jnp.array([[1, 4, 5, 6, 2, 3], [1, 4, 7, 2, 3, 3]])
    ids_b = jnp.array([[1, 4, 8, 2, 3, 3], [1, 4, 7, 9, 10, 2]])
    batch = {"better_ids": ids_a, "worse_ids": ids_b, "better_mask": ids_a != 3, "worse_mask": ids_b != 3}
    losses = [float(score_loss_fn(mdef, "reward", "token-wise", 0.0, bug)(params, batch, None)[0])
              for bug in (False, True)]
    assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) > 1e-6


def _score_def():
    from safejax.models import ScoreModel

    cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=4, max_position_embeddings=16)
    with use_mesh(make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])):
        return split_model(ScoreModel(cfg, rngs=nnx.Rngs(0)))


def test_prompt_buckets_hold_every_budget_of_their_batches():
    from safejax.train.ppo import PPODataSection
    from safejax.train.ppo_shapes import bucket_width, prompt_buckets

    cfg = PPOConfig(data=PPODataSection(prompt_width=256, max_length=512, prompt_buckets=[64, 128]))
    buckets = prompt_buckets(cfg)
    assert buckets == [(64, 511), (128, 447), (256, 383)]
    for longest in (1, 64, 65, 128, 200, 256):
        mask = np.zeros((3, 256), bool)
        mask[1, 256 - longest:] = True
        width = bucket_width(mask, buckets)
        steps = dict(buckets)[width]
        assert longest <= width and (width == 64 or longest > width // 2)  # the narrowest bucket that holds it
        assert steps >= 512 - longest
    assert prompt_buckets(PPOConfig()) == [(PPOConfig().data.prompt_width, PPOConfig().rollout.max_new_tokens)]
    with pytest.raises(ConfigError, match="data.max_length"):
        load_config(PPOConfig, None, ["reward_model=x", "cost_model=y", "data.prompt_width=64", "data.max_length=64"])
