"""The RL stage (safejax.train.ppo / ppo_loop): experience index conventions against an independent
re-scoring, one PPO-Lag iteration sharded (2,2,2) vs one device, a toy constrained problem where the
reward model rewards ``good`` and the cost model charges ``bad`` (SAFE_RLHF.md §5), and the metric names
of plain PPO and reward shaping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny_world
from safejax.metrics import read_metrics

PROMPT_WIDTH = 13          # every tiny_world prompt fits (BOS + template + <= 4 words)
NEW_TOKENS = 8             # SFT responses are 2-6 words + EOS
ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


_cli = tiny_world.run_cli


# ----------------------------------------------------------------------------- experience conventions


@pytest.fixture(scope="module")
def rollout_world(tmp_path_factory):
    """A random transformers Llama (actor = reference) and four score models from the same folder, with
    left-padded prompts and the rows HF greedy decoding produces when no EOS is ever emitted."""
    from safejax import rl
    from safejax.models import load_pretrained
    from safejax.models.functional import split_model
    from safejax.train.ppo import Frozen, Models, ModelState, PPOState

    vocab, pad, p, n = 40, 0, 6, 7
    tmp_dir = tmp_path_factory.mktemp("rollout_world")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.5, max_position_embeddings=64, pad_token_id=pad)).eval()
    hf.save_pretrained(tmp_dir)
    adef, ap = split_model(load_pretrained(tmp_dir))
    score = {name: split_model(load_pretrained(tmp_dir, model_type="score", seed=s))
             for s, name in enumerate(("reward", "cost", "reward_critic", "cost_critic"), start=1)}
    models = Models(actor=adef, reward_critic=score["reward_critic"][0], cost_critic=score["cost_critic"][0],
                    reward=score["reward"][0], cost=score["cost"][0])
    frozen = Frozen(ref=ap, reward=score["reward"][1], cost=score["cost"][1])
    state = PPOState(step=jnp.int32(3), actor=ModelState(ap, None),
                     reward_critic=ModelState(score["reward_critic"][1], None),
                     cost_critic=ModelState(score["cost_critic"][1], None), lagrange=rl.lagrange_init(1.0),
                     rng=jax.random.key_data(jax.random.key(0)))
    lengths = [6, 2, 4, 1, 5, 3, 6, 2]
    rng = np.random.default_rng(1)
    ids = np.full((len(lengths), p), pad, np.int32)
    pmask = np.zeros_like(ids, bool)
    for i, k in enumerate(lengths):
        ids[i, p - k:] = rng.integers(3, vocab, k)
        pmask[i, p - k:] = True
    # greedy rollouts (= transformers greedy, tests/test_generation.py); EOS := a token that HF's greedy decoding
    # emits mid-response in as many rows as possible but not in all, so some rows stop early and some do not
    with torch.no_grad():
        free = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(pmask, dtype=torch.long),
                           do_sample=False, max_new_tokens=n, pad_token_id=pad, eos_token_id=vocab + 3
                           ).numpy()[:, p:-1]
    return dict(vocab=vocab, pad=pad, p=p, n=n, hf=hf, models=models, frozen=frozen, state=state, ids=ids,
                pmask=pmask, lengths=lengths, score=score, free=free)


def test_rollout_experience_matches_independent_rescoring(rollout_world):
    """old/ref log-probs sit at the shifted positions [P-1, L-2]; values V[t] are the critic score at token t;
    the RM/CM end score is read at the last real token (the EOS when one was generated).  The reference values
    come from each row re-scored *without* padding: log-probs by the transformers model, scores by our
    ScoreModel on the bare row (no mask, positions 0..n-1)."""
    from safejax.generation import SamplingConfig
    from safejax.train.ppo import PPOConfig, PPOPhases as Trainer

    w = rollout_world
    vocab, pad, p, n, hf, models = w["vocab"], w["pad"], w["p"], w["n"], w["hf"], w["models"]
    frozen, state, ids, pmask, lengths, score, free = (w[k] for k in ("frozen", "state", "ids", "pmask", "lengths",
                                                                        "score", "free"))
    hits = [(free == tok).any(axis=1).sum() for tok in range(vocab)]
    eos = max((tok for tok in range(1, vocab) if hits[tok] < len(lengths)), key=lambda tok: hits[tok])
    cfg = PPOConfig(reward_model="r", cost_model="c", rollout=SamplingConfig(max_new_tokens=n, greedy=True))
    trainer = Trainer(cfg, models, None, prompt_width=p, eos_id=eos, pad_id=pad, total_updates=1, ptx_enabled=False)
    exp = jax.tree.map(np.asarray, jax.jit(trainer.rollout)(state, frozen, jnp.asarray(ids), jnp.asarray(pmask)))
    seq, attn = exp.sequences, exp.attention_mask.astype(bool)
    stopped = (seq[:, p:] == eos).any(axis=1)
    assert stopped.any() and not stopped.all(), "the constructed case needs rows with and without EOS"
    assert exp.old_log_probs.shape == exp.ref_log_probs.shape == exp.mask.shape == exp.reward_values.shape == \
        (len(lengths), n)
    np.testing.assert_array_equal(seq[:, :p], ids)
    np.testing.assert_array_equal(exp.mask, attn[:, p:].astype(np.float32))

    # the bare rows, right-padded: with causal attention the trailing pads cannot change earlier positions
    real_len = attn.sum(axis=1)
    bare_ids = np.full_like(seq, pad)
    for b in range(len(lengths)):
        bare_ids[b, :real_len[b]] = seq[b][attn[b]]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor(bare_ids, dtype=torch.long)).logits.double(), -1).numpy()
    sdef = score["reward"][0]                     # all four share one architecture: one compiled scorer
    scorer = jax.jit(lambda prm, x: sdef.merge(prm)(x).scores)
    bare = {k: np.asarray(scorer(score[k][1], bare_ids)) for k in score}
    for b in range(len(lengths)):
        real = bare_ids[b, :real_len[b]]          # prompt + response up to EOS
        left = p - lengths[b]                     # unpadded index u = t - left
        assert real[-1] == eos if stopped[b] else len(real) == lengths[b] + n
        for j in range(n):
            t = p - 1 + j                         # shifted position of action j (emits token t+1)
            if not exp.mask[b, j]:
                assert seq[b, t + 1] == pad
                continue
            u = t - left
            assert abs(exp.old_log_probs[b, j] - logp[b, u, real[u + 1]]) < 2e-4, (b, j)
            assert abs(exp.ref_log_probs[b, j] - logp[b, u, real[u + 1]]) < 2e-4, (b, j)
            assert abs(exp.reward_values[b, j] - bare["reward_critic"][b, u]) < 2e-4, (b, j)
            assert abs(exp.cost_values[b, j] - bare["cost_critic"][b, u]) < 2e-4, (b, j)
        assert abs(exp.reward[b] - bare["reward"][b, real_len[b] - 1]) < 2e-4, b
        assert abs(exp.cost[b] - bare["cost"][b, real_len[b] - 1]) < 2e-4, b



def test_rollout_masks_sampled_pad_and_unk_tokens_like_the_reference(rollout_world):
    """[code] mask_t = (x_t != pad) and (x_t != unk): a pad or unk token the actor samples mid-response leaves a
    hole in the experience mask (tokens after it stay real), and the RM/CM end score is read at the last token
    that is still real.  ``ppo.mask_sampled_special=false`` keeps every generated token."""
    from safejax.generation import SamplingConfig
    from safejax.train.ppo import PPOConfig, PPOSection, PPOPhases as Trainer

    w = rollout_world
    p, n, models, frozen, state = w["p"], w["n"], w["models"], w["frozen"], w["state"]
    ids, pmask = jnp.asarray(w["ids"]), jnp.asarray(w["pmask"])

    def rollout(pad_id, unk_id, mask_special):
        cfg = PPOConfig(reward_model="r", cost_model="c", rollout=SamplingConfig(max_new_tokens=n, greedy=True),
                        ppo=PPOSection(mask_sampled_special=mask_special))
        tr = Trainer(cfg, models, None, prompt_width=p, eos_id=-1, pad_id=pad_id, unk_id=unk_id, total_updates=1,
                     ptx_enabled=False)
        return jax.tree.map(np.asarray, jax.jit(tr.rollout)(state, frozen, ids, pmask))

    plain = rollout(w["pad"], None, False)          # EOS never sampled: every row has n real response tokens
    seq = plain.sequences
    assert plain.mask.all()
    sampled_pad = int(seq[0, -1])                   # row 0 *ends* with it: its end score must move back
    unk = next(int(t) for t in seq[1, p:-1] if t != sampled_pad)
    masked = rollout(sampled_pad, unk, True)
    np.testing.assert_array_equal(masked.sequences, seq)   # masking changes the experience, not the samples
    expect = np.concatenate([w["pmask"], np.ones((len(seq), n), bool)], axis=1) & (seq != sampled_pad) & (seq != unk)
    np.testing.assert_array_equal(masked.attention_mask.astype(bool), expect)
    np.testing.assert_array_equal(masked.mask, expect[:, p:].astype(np.float32))
    holes = (~expect[:, p:]).any(axis=1)
    assert holes[0] and holes[1]
    kept = rollout(sampled_pad, unk, False)
    np.testing.assert_array_equal(kept.mask, plain.mask)

    # end scores as the reference reads them: the reward model with the holes out of attention, positions following
    # the layout (column minus the row's left padding, unshifted after a hole), at the last real token
    sdef, rm = w["score"]["reward"]
    scorer = jax.jit(lambda prm, x, m, pos: sdef.merge(prm)(x, attention_mask=m, positions=pos).scores)
    left = np.argmax(expect, axis=1)
    layout = np.maximum(np.arange(seq.shape[1])[None, :] - left[:, None], 0)
    s = np.asarray(scorer(rm, seq, expect, layout))
    last = seq.shape[1] - 1 - np.argmax(expect[:, ::-1], axis=1)
    ends = s[np.arange(len(seq)), last]
    np.testing.assert_allclose(masked.reward, ends, atol=2e-4)
    assert abs(masked.reward[0] - plain.reward[0]) > 1e-4, "row 0's end score must move off the sampled pad"

def test_rollout_cuts_responses_at_the_reference_budget_of_max_length_minus_the_longest_prompt(rollout_world):
    """data.max_length counts prompt and response: a batch whose longest prompt has k tokens keeps at most
    max_length - k response tokens (the rest is pad with mask 0), whatever bucket width it ran in."""
    from safejax.generation import SamplingConfig
    from safejax.train.ppo import PPOConfig, PPODataSection, PPOPhases as Trainer

    w = rollout_world
    p, n, models, frozen, state = w["p"], w["n"], w["models"], w["frozen"], w["state"]
    ids, pmask = jnp.asarray(w["ids"]), jnp.asarray(w["pmask"])
    longest = int(np.asarray(w["pmask"]).sum(axis=1).max())
    cfg = PPOConfig(reward_model="r", cost_model="c", rollout=SamplingConfig(max_new_tokens=n, greedy=True),
                    data=PPODataSection(prompt_width=p, max_length=longest + n - 2))
    tr = Trainer(cfg, models, None, prompt_width=p, eos_id=-1, pad_id=w["pad"], total_updates=1, ptx_enabled=False,
                 max_new_tokens=n)
    exp = jax.tree.map(np.asarray, jax.jit(tr.rollout)(state, frozen, ids, pmask))
    np.testing.assert_array_equal(exp.mask.sum(axis=1), n - 2)
    assert (exp.sequences[:, p + n - 2:] == w["pad"]).all() and not exp.attention_mask[:, p + n - 2:].any()


# ----------------------------------------------------------------------------- the tiny world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """SFT (50% of responses carry ``bad``), RM (``good`` is better), CM (``bad`` is unsafe); the CM's mean cost
    of safe / unsafe training responses; and a sampler that judges a policy (see :func:`_policy_stats`)."""
    from safejax.data import build_cost_pairs, build_prompts, load_rows
    from safejax.generation import SamplingConfig, generate, positions_from_mask
    from safejax.models import load_pretrained
    from safejax.train.common import ModelSection
    from safejax.models.functional import split_model
    from safejax.models.loading import load_tokenizer_for

    root = tmp_path_factory.mktemp("ppo-world")
    paths = tiny_world.make_world(root)
    common = ["data.max_length=24", "train.batch_size=16", "train.progress=false", *ONE_DEVICE]
    _cli("sft", f"out_dir={root}/sft", f"model.path={paths['model']}", f"data.train=[{paths['sft']}]",
         "train.epochs=4", "optim.lr=3e-3", *common)
    for stage in ("rm", "cm"):
        _cli(stage, f"out_dir={root}/{stage}", f"model.path={root}/sft/hf", f"data.train=[{paths['pref_train']}]",
             "train.epochs=3", "optim.lr=3e-3", *common)
    tok = load_tokenizer_for(ModelSection(path=f"{root}/sft/hf"))
    pairs, _ = build_cost_pairs(load_rows([str(paths["pref_train"])]), tok, max_length=24)
    cm = load_pretrained(f"{root}/cm/hf")
    costs = np.concatenate([np.asarray(cm(pairs.safer_ids, pairs.safer_mask).end_scores),
                            np.asarray(cm(pairs.unsafer_ids, pairs.unsafer_mask).end_scores)])
    safe = np.concatenate([pairs.safer_is_safe, pairs.unsafer_is_safe])
    paths.update(root=root, cost_safe=float(costs[safe].mean()), cost_unsafe=float(costs[~safe].mean()))
    assert paths["cost_unsafe"] > paths["cost_safe"] + 1.0, "the cost model did not learn the planted token"

    # one compiled sampler + CM scorer, the policy's params an argument
    adef, sft_params = split_model(load_pretrained(f"{root}/sft/hf"))
    cdef, cm_params = split_model(cm)
    prompts, _ = build_prompts(load_rows([str(paths["prompts"])]), tok, prompt_width=PROMPT_WIDTH)
    assert len(prompts) == 64

    @jax.jit
    def sample(params, key):
        g = generate(adef.merge(params), prompts.prompt_ids, prompts.prompt_mask, key,
                     SamplingConfig(max_new_tokens=NEW_TOKENS), eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
        m = g.attention_mask
        return g.sequences[:, PROMPT_WIDTH:], cdef.merge(cm_params)(g.sequences, m, positions_from_mask(m)).end_scores

    paths.update(sample=sample, bad_id=tok.convert_tokens_to_ids("bad"))
    paths["sft_stats"] = _policy_stats(paths, sft_params)
    return paths


def _policy_stats(world, params, seeds=range(4)) -> dict:
    """Responses sampled for all 64 prompts with several keys: fraction containing ``bad``, mean CM cost, and the
    mean CM cost of the responses without ``bad``."""
    resp, cost = zip(*(jax.tree.map(np.asarray, world["sample"](params, jax.random.key(s))) for s in seeds))
    has_bad = (np.concatenate(resp) == world["bad_id"]).any(axis=1)
    cost = np.concatenate(cost)
    return {"bad": float(has_bad.mean()), "cost": float(cost.mean()), "cost_safe": float(cost[~has_bad].mean())}


def _ppo_args(world, algorithm: str, out, *extra: str, cost_model: bool = True) -> list[str]:
    root = world["root"]
    args = [algorithm, f"out_dir={out}", f"actor.path={root}/sft/hf", f"reward_model={root}/rm/hf",
            f"data.prompts=[{world['prompts']}]", f"data.prompt_width={PROMPT_WIDTH}",
            f"rollout.max_new_tokens={NEW_TOKENS}", "train.batch_size=16", "ppo.micro_batch_size=8",
            "train.progress=false", "train.log_every=1"]
    if cost_model:
        args.append(f"cost_model={root}/cm/hf")
    return args + list(extra)


def _records(out) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "train/reward" in r]


def _lambda_follows_constraint(recs, threshold, lambda_init):
    """Within an iteration the window is fixed, so every lambda step has the sign of episode_cost - threshold."""
    prev = lambda_init
    for r in recs:
        gap = r["train/episode_cost"] - threshold
        if abs(gap) > 1e-4:
            assert np.sign(r["train/lambda"] - prev) == np.sign(gap), (r["step"], prev, r["train/lambda"], gap)
        prev = r["train/lambda"]


# constant learning rates: the schedule then does not depend on the run length, so the first iterations of
# the long toy run are also the reference for the short sharded run (every optimizer key is spelled out)
TOY = ["actor_optim.lr=1e-3", "actor_optim.schedule=constant", "actor_optim.weight_decay=0.0",
       "critic_optim.lr=1e-3", "critic_optim.schedule=constant", "critic_optim.weight_decay=0.0", "train.epochs=8"]


@pytest.fixture(scope="module")
def toy_run(world, tmp_path_factory):
    """32 PPO-Lag iterations on one device with a threshold between the SFT policy's cost and the cost of its
    responses without ``bad`` (the all-safe cost).  Returns (run dir, threshold)."""
    sft = world["sft_stats"]
    threshold = sft["cost_safe"] + 0.6 * (sft["cost"] - sft["cost_safe"])
    out = tmp_path_factory.mktemp("toy") / "run"
    _cli(*_ppo_args(world, "ppo-lag", out, *TOY, f"lagrange.threshold={threshold}", *ONE_DEVICE))
    return out, threshold


def test_ppo_lag_meets_cost_threshold_on_toy_problem(world, toy_run):
    from safejax.models import load_pretrained
    from safejax.models.functional import split_model

    out, threshold = toy_run
    sft = world["sft_stats"]
    recs = _records(out)
    assert len(recs) == 32
    cost = np.array([r["train/cost"] for r in recs])
    reward = np.array([r["train/reward"] for r in recs])
    lam = np.array([r["train/lambda"] for r in recs])
    # the SFT policy starts out violating the constraint (first epoch = every prompt once)
    assert cost[:4].mean() > threshold
    # ... and ends inside it: the final episode-cost window (128 samples = 8 iterations) is below the threshold
    assert recs[-1]["train/episode_cost"] <= threshold
    assert cost[-8:].mean() <= threshold
    # lambda rose while the cost was too high, then fell once it was met
    assert lam.max() > 1.0 and lam[-1] < lam.max() - 0.05
    _lambda_follows_constraint(recs, threshold, 1.0)
    # the reward did not get worse
    assert reward[-8:].mean() >= reward[:4].mean() - 0.1
    # and the exported policy itself says 'bad' less often than the SFT policy, within the cost budget
    final = _policy_stats(world, split_model(load_pretrained(out / "hf"))[1])
    assert final["bad"] < sft["bad"] - 0.08, (sft, final)
    assert final["cost"] <= threshold, (sft, final, threshold)


def test_ppo_lag_iterations_sharded_match_single_device(world, toy_run, tmp_path):
    """The first two iterations of the toy run again on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 devices:
    same samples, same losses, same lambda -- with the sharded run on jax.nn.dot_product_attention
    (``actor.attention=xla``, which all six models use) and the single-device run on the einsum attention."""
    one_dir, threshold = toy_run
    _cli(*_ppo_args(world, "ppo-lag", tmp_path / "many", *TOY, f"lagrange.threshold={threshold}",
                    "train.max_steps=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "actor.attention=xla"))
    one, many = _records(one_dir)[:2], _records(tmp_path / "many")
    assert len(many) == 2
    for a, b in zip(one, many):
        assert a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
    assert one[1]["train/kl_divergence"] != 0.0  # the first update really moved the actor


@pytest.mark.parametrize("side", ["unreachable", "slack"])
def test_lambda_moves_monotonically_with_constraint_violation(world, tmp_path, side):
    c_safe, c_unsafe = world["cost_safe"], world["cost_unsafe"]
    threshold = c_safe - 2.0 if side == "unreachable" else c_unsafe + 2.0
    out = tmp_path / side
    _cli(*_ppo_args(world, "ppo-lag", out, "train.max_steps=4", "lagrange.lambda_lr=0.02",
                    f"lagrange.threshold={threshold}", *ONE_DEVICE))
    lam = np.array([1.0] + [r["train/lambda"] for r in _records(out)])
    assert len(lam) == 5
    steps = np.diff(lam)
    assert (steps > 0).all() if side == "unreachable" else (steps < 0).all(), lam


# ----------------------------------------------------------------------------- baselines' metric names


REWARD_CRITIC = {"train/reward_with_kl_penalty", "train/reward_advantage", "train/reward_return",
                 "train/reward_value"}
COST_CRITIC = {"train/lambda", "train/cost_critic_loss", "train/cost_critic_lr", "train/cost_with_kl_penalty",
               "train/cost_advantage", "train/cost_return", "train/cost_value"}
SHAPED = {"train/shaped_reward", "train/shaped_reward_with_kl_penalty", "train/shaped_reward_advantage",
          "train/shaped_reward_return", "train/shaped_reward_value"}
COMMON = {"train/reward", "train/cost", "train/kl_divergence", "train/actor_loss", "train/reward_critic_loss",
          "train/actor_lr", "train/reward_critic_lr", "train/episode_cost", "train/mean_generated_length",
          "train/max_generated_length"}


@pytest.mark.parametrize("algorithm", ["ppo", "ppo-reward-shaping"])
def test_baselines_run_one_iteration_with_reference_metric_names(world, tmp_path, algorithm, capsys):
    extra = ["train.max_steps=1", *ONE_DEVICE]
    if algorithm == "ppo":  # also exercise ptx mixing and the reward-only metrics with a cost model for logging
        extra += [f"data.ptx=[{world['sft']}]", "data.ptx_max_length=24"]
    else:
        extra += ["lagrange.lambda_init=5"]  # nu
    _cli(*_ppo_args(world, algorithm, tmp_path / algorithm, *extra))
    (rec,) = _records(tmp_path / algorithm)
    keys = set(rec) - {"step"}
    assert COMMON <= keys
    assert not keys & COST_CRITIC
    if algorithm == "ppo":
        assert REWARD_CRITIC <= keys and not keys & SHAPED
        assert "train/ptx_loss" in keys and np.isfinite(rec["train/ptx_loss"])
        assert "train/nu" not in keys
    else:
        assert SHAPED <= keys and not keys & REWARD_CRITIC
        assert "train/ptx_loss" not in keys
        assert rec["train/nu"] == 5.0  # the fixed multiplier is logged (and shown in the bar), never a lambda
    assert all(np.isfinite(v) for v in rec.values())
    assert abs(rec["train/cost"]) > 0  # the cost model was loaded and scored the responses
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"{algorithm}: done: 1 iterations") and f"exported {tmp_path / algorithm / 'hf'}" in last
    assert ("nu 5" in last) == (algorithm == "ppo-reward-shaping") and "lambda" not in last


def test_plain_ppo_without_a_cost_model_logs_no_cost_metrics(world, tmp_path, capsys):
    out = tmp_path / "ppo-no-cm"
    _cli(*_ppo_args(world, "ppo", out, "train.max_steps=1", *ONE_DEVICE, cost_model=False))
    (rec,) = _records(out)
    assert "train/reward" in rec
    assert not [k for k in rec if "cost" in k or "lambda" in k or k == "train/nu"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("ppo: done: 1 iterations, reward ") and "cost" not in last.split(";")[0]


def test_periodic_eval_on_held_out_prompts_logs_reward_cost_and_harmless_ratio(world, tmp_path, capsys):
    out = tmp_path / "lag-eval"
    _cli(*_ppo_args(world, "ppo-lag", out, f"data.eval_prompts=[{world['prompts']}]", "train.eval_every=1",
                    "train.max_steps=2", *TOY, *ONE_DEVICE))
    # the stage ends with one line: final lambda, episode cost vs threshold, reward, held-out numbers, export
    last = capsys.readouterr().out.strip().splitlines()[-1]
    final = _records(out)[-1]
    assert last.startswith("ppo-lag: done: 2 iterations, final lambda ")
    assert f"final lambda {final['train/lambda']:.4g}," in last and f"reward {final['train/reward']:.4g}" in last
    assert f"episode cost {final['train/episode_cost']:.4g} (threshold " in last
    assert "held-out reward" in last and f"exported {out / 'hf'}" in last
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/reward" in r]
    assert [r["step"] for r in evals] == [1, 2]  # every iteration, the last one once
    for r in evals:
        assert r["eval/count"] == 64
        assert np.isfinite(r["eval/reward"]) and np.isfinite(r["eval/cost"])
        assert 0.0 <= r["eval/harmless_ratio"] <= 1.0
    # the held-out costs come from the same cost model as training: same scale as the train/cost of the run
    train = _records(out)
    assert abs(evals[0]["eval/cost"] - train[0]["train/cost"]) < 2.0


def test_grouped_rollout_samples_each_prompt_g_times_from_one_prefill(world, tmp_path):
    """``rollout.num_return_sequences=4``: a batch of 16 rows comes from 4 prompts (each prefilled once), the
    iteration trains on it, and the periodic eval scores 4 samples of each of the 64 held-out prompts."""
    out = tmp_path / "grouped"
    _cli(*_ppo_args(world, "ppo-lag", out, "rollout.num_return_sequences=4", f"data.eval_prompts=[{world['prompts']}]",
                    "train.eval_every=1", "train.max_steps=1", *TOY, *ONE_DEVICE))
    (rec,) = _records(out)
    assert all(np.isfinite(v) for v in rec.values())
    (ev,) = [r for r in read_metrics(out / "metrics.jsonl") if "eval/reward" in r]
    assert ev["eval/count"] == 64 and np.isfinite(ev["eval/cost"])
    from safejax.cli import main

    bad = _ppo_args(world, "ppo-lag", tmp_path / "bad", "rollout.num_return_sequences=3", *ONE_DEVICE)
    assert main([str(a) for a in bad]) == 2  # 16 rows are not groups of 3


def test_packed_ptx_rows_train_with_a_finite_ptx_loss(world, tmp_path):
    """``data.ptx_pack=true``: the ptx examples are packed several per row (segment ids); the iteration runs and
    logs a finite ptx loss of the same order as the unpacked run's."""
    losses = {}
    for pack in ("false", "true"):
        out = tmp_path / f"ptx-{pack}"
        _cli(*_ppo_args(world, "ppo", out, f"data.ptx=[{world['sft']}]", "data.ptx_max_length=24",
                        f"data.ptx_pack={pack}", "train.max_steps=1", *ONE_DEVICE))
        (rec,) = _records(out)
        losses[pack] = rec["train/ptx_loss"]
    assert np.isfinite(losses["true"]) and abs(losses["true"] - losses["false"]) < 0.5 * losses["false"]
