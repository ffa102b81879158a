"""LoRA (safejax.models.lora, safejax.train.ppo_lora): the adapter math against its merged weights, logical-axis
shardings and abstract construction; a LoRA PPO-Lag run on a tiny HF Llama that holds each frozen base once,
checkpoints only what it trains, resumes bit-exactly and exports a merged HF folder (transformers) plus a PEFT
adapter folder (peft)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import tiny_world
from safejax.checkpoint import Checkpointer
from safejax.config import ConfigError, load_config
from safejax.models.config import ModelConfig
from safejax.models.functional import split_model
from safejax.models.llama import CausalLM
from safejax.models.lora import LoRAConfig, LoRADef, add_lora
from safejax.models.lora_peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_tensors

LORA = ["lora.actor.rank=4", "lora.actor.alpha=8", "lora.reward_critic.rank=2", "lora.cost_critic.rank=2"]


def _tiny(scan: bool) -> ModelConfig:
    return ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, scan_layers=scan)


def _lora_pair(scan: bool, cfg: LoRAConfig):
    with nnx.use_eager_sharding(False):
        bdef, bp = split_model(CausalLM(_tiny(scan), rngs=nnx.Rngs(0)))
        fdef, fp = split_model(add_lora(CausalLM(_tiny(scan), rngs=nnx.Rngs(0)), cfg))
    ldef = LoRADef(fdef, bdef, cfg)
    trained = ldef.trained_params(fp)
    return ldef, bp, trained


@pytest.mark.parametrize("scan", [False, True])
def test_adapter_starts_as_a_no_op_and_equals_its_merged_weights(scan):
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "o_proj", "down_proj"])
    ldef, base, trained = _lora_pair(scan, cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 7)))
    plain = ldef.base.merge(base)(ids)
    np.testing.assert_array_equal(ldef.merge(trained, base)(ids), plain)  # B = 0
    moved = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), trained)
    adapted = ldef.merge(moved, base)(ids)
    merged = ldef.base.merge(ldef.merged_params(moved, base))(ids)
    assert float(jnp.max(jnp.abs(adapted - plain))) > 1e-2
    np.testing.assert_allclose(adapted, merged, atol=1e-5)
    lead = (2,) if scan else ()
    a = trained["model"]["layers"]
    a = a if scan else a[0]
    assert a["self_attn"]["o_proj"]["lora"]["lora_a"].shape == lead + (4, 8, 4)   # [*lead, H, hd, r]
    assert a["self_attn"]["q_proj"]["lora"]["lora_b"].shape == lead + (4, 4, 8)   # [*lead, r, H, hd]
    assert not np.any(np.asarray(a["self_attn"]["q_proj"]["lora"]["lora_b"]))


def test_dropout_is_keyed_and_off_without_a_key():
    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.5)
    ldef, base, trained = _lora_pair(True, cfg)
    moved = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), trained)
    ids = jnp.arange(14).reshape(2, 7) % 40
    off = ldef.merge(moved, base)(ids)
    np.testing.assert_allclose(off, ldef.base.merge(ldef.merged_params(moved, base))(ids), atol=1e-5)
    k1, k2 = ldef.merge(moved, base, jax.random.key(1))(ids), ldef.merge(moved, base, jax.random.key(2))(ids)
    np.testing.assert_array_equal(k1, ldef.merge(moved, base, jax.random.key(1))(ids))
    assert not np.allclose(k1, off) and not np.allclose(k1, k2)


def test_adapters_carry_logical_axes_and_build_abstractly():
    from safejax.parallel import MeshConfig, make_mesh
    cfg = LoRAConfig(rank=4)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    ldef, _, _ = _lora_pair(False, cfg)
    sh = ldef.shardings(mesh)["model"]["layers"][0]["self_attn"]
    assert tuple(sh["q_proj"]["lora"]["lora_a"].spec) == ("fsdp", None)           # [embed, lora_rank]
    assert tuple(sh["q_proj"]["lora"]["lora_b"].spec) == (None, "tensor", None)   # [lora_rank, heads, head_dim]
    with nnx.use_eager_sharding(False):  # as safejax.memory_table builds models abstractly
        abstract = nnx.eval_shape(lambda: add_lora(CausalLM(_tiny(True), rngs=nnx.Rngs(0)), cfg))
    _, st = nnx.split(abstract)
    leaves = jax.tree.leaves(st)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_rank_zero_leaves_the_model_unchanged_and_bad_targets_are_named():
    with nnx.use_eager_sharding(False):
        m = CausalLM(_tiny(False), rngs=nnx.Rngs(0))
        before = jax.tree.map(np.asarray, split_model(m)[1])
        after = split_model(add_lora(m, LoRAConfig(rank=0)))[1]
        jax.tree.map(np.testing.assert_array_equal, before, after)
        with pytest.raises(ConfigError, match="lora.actor.targets"):
            add_lora(m, LoRAConfig(rank=2, targets=["nope"]), what="lora.actor")


def test_config_refuses_a_lora_critic_on_another_backbone_and_unequal_critics(tmp_path):
    from safejax.train.ppo import PPOConfig
    base = ["reward_model=/rm", "cost_model=/cm"]
    with pytest.raises(ConfigError, match="lora.reward_critic.rank"):
        load_config(PPOConfig, None, base + ["reward_critic=/other", "lora.reward_critic.rank=2",
                                             "lora.cost_critic.rank=2"])
    with pytest.raises(ConfigError, match="lora.cost_critic"):
        load_config(PPOConfig, None, base + ["lora.reward_critic.rank=2"])
    with pytest.raises(ConfigError, match="lora.actor.dropout"):
        load_config(PPOConfig, None, base + ["lora.actor.rank=2", "lora.actor.dropout=1.5"])


def test_peft_names_are_the_same_for_scanned_and_unrolled_layers():
    cfg = LoRAConfig(rank=2)
    ldef_u, _, tr_u = _lora_pair(False, cfg)
    ldef_s, _, tr_s = _lora_pair(True, cfg)
    names_u, names_s = peft_tensors(ldef_u, tr_u), peft_tensors(ldef_s, tr_s)
    assert sorted(names_u) == sorted(names_s)
    assert names_u["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (2, 32)   # [r, H*hd]
    assert names_u["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 2)   # [KV*hd, r]


# ----------------------------------------------------------------------------- end to end (tiny HF Llama)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.make_world(tmp_path_factory.mktemp("lora_world"))


def _ppo_args(world, out: Path, *extra) -> list[str]:
    m = world["model"]
    return ["ppo-lag", f"out_dir={out}", f"actor.path={m}", f"reward_model={m}", f"cost_model={m}",
            f"data.prompts=[{world['prompts']}]", "data.prompt_width=16", "rollout.max_new_tokens=6",
            "train.batch_size=8", "ppo.micro_batch_size=4", "train.max_steps=2", "train.save_every=1",
            "train.keep_checkpoints=10", "train.progress=false", "actor_optim.lr=1e-2", "critic_optim.lr=1e-2",
            "actor_optim.warmup_ratio=0", *LORA, *extra]


@pytest.fixture(scope="module")
def lora_run(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora_ppo") / "run"
    tiny_world.run_cli(*_ppo_args(world, run, "lora.actor.dropout=0.1"))
    return run


def _state(run: Path, step: int):
    ck = Checkpointer(run / "checkpoints", read_only=True)
    try:
        state, _, _ = ck.restore_subtree((), step=step)
    finally:
        ck.close()
    return jax.tree.map(np.asarray, state)


def _top(path) -> str:
    k = path[0]
    return str(getattr(k, "key", getattr(k, "name", k)))


def _shapes(tree) -> list[tuple]:
    return [tuple(np.shape(x)) for x in jax.tree.leaves(tree)]


def test_lora_state_holds_each_frozen_base_once_and_only_adapters_and_heads_train(world):
    from safejax.models.loading import load_tokenizer_for
    from safejax.parallel import MeshConfig, make_mesh
    from safejax.train.ppo_loop import PPOPhases, frozen_models, load_models, ppo_state
    from safejax.train.ppo import PPOConfig

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    q_shape = (32, 4, 8)  # q_proj kernel [D, H, hd] of the tiny Llama: one per layer per weight set

    def sets(extra):
        cfg = load_config(PPOConfig, None, _ppo_args(world, Path("/unused"), *extra)[1:])
        models, params = load_models(cfg, mesh, load_tokenizer_for(cfg.actor))
        phases = PPOPhases(cfg, models, mesh, prompt_width=16, eos_id=2, pad_id=3, total_updates=4,
                           ptx_enabled=False)
        state, _ = ppo_state(cfg, models, params, phases, mesh)
        frozen, _ = frozen_models(models, params["ref"], params["reward"], params["cost"], mesh)
        return state, frozen, params

    full_state, full_frozen, _ = sets(["lora.actor.rank=0", "lora.reward_critic.rank=0", "lora.cost_critic.rank=0"])
    assert _shapes(full_state).count(q_shape) == 3 * 2 * 3  # actor + 2 critics, x2 layers, params + 2 Adam moments
    assert _shapes(full_frozen).count(q_shape) == 3 * 2
    state, frozen, params = sets([])
    assert q_shape not in _shapes(state)              # neither params nor optimizer state of any base
    assert _shapes(frozen).count(q_shape) == 3 * 2     # actor base (= reference), reward model, cost model
    for role in ("actor", "reward_critic", "cost_critic"):
        top = set(getattr(state, role).params)
        assert top <= {"model", "score_head", "lm_head"}
        flat = jax.tree_util.tree_flatten_with_path(getattr(state, role).params["model"])[0]
        assert flat and all("lora" in jax.tree_util.keystr(p) for p, _ in flat), role
    assert set(state.reward_critic.params) == {"model", "score_head"}
    assert "score_head" not in state.actor.params


def test_lora_checkpoint_holds_only_what_is_trained_and_resumes_bit_exactly(world, lora_run, tmp_path):
    step2 = _state(lora_run, 2)
    flat = jax.tree_util.tree_flatten_with_path(step2)[0]
    model_arrays = [jax.tree_util.keystr(p) for p, x in flat
                    if np.ndim(x) and _top(p) in ("actor", "reward_critic", "cost_critic")]
    assert model_arrays and all("lora" in n or "score_head" in n for n in model_arrays), \
        [n for n in model_arrays if "lora" not in n and "score_head" not in n][:5]
    assert {_top(p) for p, _ in flat} >= {"actor", "reward_critic", "cost_critic", "lagrange", "rng"}
    assert (32, 4, 8) not in _shapes(step2)
    run = tmp_path / "cut"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "checkpoints" / "2")
    shutil.rmtree(run / "hf")
    shutil.rmtree(run / "hf-lora")
    tiny_world.run_cli(*_ppo_args(world, run, "lora.actor.dropout=0.1"))
    got = _state(run, 2)
    fa, ta = jax.tree_util.tree_flatten_with_path(step2)
    fb, tb = jax.tree_util.tree_flatten_with_path(got)
    assert ta == tb
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))


def _hf_logits(path, ids) -> np.ndarray:
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
        return model(torch.tensor(ids)).logits.numpy()


def test_lora_export_is_merged_hf_and_a_peft_folder_with_safejax_logits(world, lora_run, tmp_path):
    from safejax.models import load_pretrained
    from safejax.models.lora import lora_model

    ids = np.array([[1, 4, 5, 6, 7, 12, 13, 14, 30, 31]], np.int32)
    base_def, base = split_model(load_pretrained(str(world["model"])))
    trained = _state(lora_run, 2)["actor"]["params"]
    ldef, _ = lora_model(base_def, base, LoRAConfig(rank=4, alpha=8.0), seed=0, what="lora.actor")
    ours = np.asarray(ldef.merge(jax.tree.map(jnp.asarray, trained), base)(jnp.asarray(ids)))
    assert np.max(np.abs(ours - np.asarray(base_def.merge(base)(jnp.asarray(ids))))) > 1e-3  # the actor moved
    np.testing.assert_allclose(_hf_logits(lora_run / "hf", ids), ours, atol=1e-4)

    peft_dir = lora_run / "hf-lora"
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= {p.name for p in peft_dir.iterdir()}
    conf = json.loads((peft_dir / ADAPTER_CONFIG).read_text())
    assert (conf["peft_type"], conf["r"], conf["lora_alpha"]) == ("LORA", 4, 8.0)
    assert sorted(conf["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(world["model"]), torch_dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(hf_base, str(peft_dir)).eval()
        np.testing.assert_allclose(pm(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)

    tiny_world.run_cli("export", "--run", str(lora_run), "--out", str(tmp_path / "hf"), "--step", "2")
    np.testing.assert_allclose(_hf_logits(tmp_path / "hf", ids), ours, atol=1e-4)


def test_demo_lora_flag_adds_the_lora_run_and_its_checks():
    from safejax.cli import _load, build_parser
    from safejax.demo import demo_checks

    assert _load(build_parser().parse_args(["demo", "--lora"]), load_config).lora is True
    assert _load(build_parser().parse_args(["demo"]), load_config).lora is False  # the default demo is unchanged
    pol = {"sft": {"unsafe_rate_harmful": 0.5, "helpfulness_benign": 1.8},
           "safe_rlhf": {"unsafe_rate_harmful": 0.05, "helpfulness_benign": 2.3},
           "ppo": {"unsafe_rate_harmful": 0.9, "helpfulness_benign": 2.4}}
    summary = {"policies": pol, "lambda_trace": [1.0, 2.0, 1.5], "episode_cost_trace": [1.0, 0.0, -1.0],
               "threshold": 0.0}
    assert not any("lora" in k for k in demo_checks(summary))
    pol["safe_rlhf_lora"] = {"unsafe_rate_harmful": 0.3, "helpfulness_benign": 2.0}
    checks = demo_checks(summary)
    assert checks["safe_rlhf_lora_helpfulness_at_least_sft"] and checks["safe_rlhf_lora_unsafe_below_ppo"]
    assert not checks["safe_rlhf_lora_unsafe_at_most_half_of_sft"]  # 0.3 > 0.5 * 0.5


def test_lora_targets_that_match_no_layer_exit_2_naming_the_key(world, tmp_path, capsys):
    from safejax.cli import main

    run = tmp_path / "bad"
    assert main(_ppo_args(world, run, "lora.actor.targets=[nope_proj]")) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(err) == 1 and "lora.actor.targets" in err[0] and "nope_proj" in err[0], err
    assert not (run / "checkpoints").exists()
