"""``mesh.rules``: a config overrides entries of the logical-axis rules table, and the resolved table travels
with the mesh to the parameters, the optimizer state, the input batches and the models' activation pins."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import tiny_world
from safejax import parallel
from safejax.config import ConfigError, load_config
from safejax.models import CausalLM, ModelConfig
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for
from safejax.train.sft import SFTConfig
from safejax.train.state import trainable

CFG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2)
OVERRIDE = "mesh:\n  data: 2\n  fsdp: 2\n  tensor: 2\n  rules: {mlp: null, embed: [fsdp], batch: [data]}\n"
# the tiny model's shardings on a (2, 2, 2) mesh under the default table (unchanged by mesh.rules support)
DEFAULT_SPECS = {
    "['lm_head']['kernel']": P("fsdp", "tensor"),
    "['model']['embed_tokens']['embedding']": P("tensor", "fsdp"),
    "['model']['layers'][0]['input_layernorm']['weight']": P(None),
    "['model']['layers'][0]['mlp']['down_proj']['kernel']": P("tensor", "fsdp"),
    "['model']['layers'][0]['mlp']['gate_proj']['kernel']": P("fsdp", "tensor"),
    "['model']['layers'][0]['mlp']['up_proj']['kernel']": P("fsdp", "tensor"),
    "['model']['layers'][0]['post_attention_layernorm']['weight']": P(None),
    "['model']['layers'][0]['self_attn']['k_proj']['kernel']": P("fsdp", "tensor", None),
    "['model']['layers'][0]['self_attn']['o_proj']['kernel']": P("tensor", None, "fsdp"),
    "['model']['layers'][0]['self_attn']['q_proj']['kernel']": P("fsdp", "tensor", None),
    "['model']['layers'][0]['self_attn']['v_proj']['kernel']": P("fsdp", "tensor", None),
    "['model']['norm']['weight']": P(None),
}
MLP_UP = "['model']['layers'][0]['mlp']['up_proj']['kernel']"
MLP_DOWN = "['model']['layers'][0]['mlp']['down_proj']['kernel']"


def _specs(tree) -> dict:
    return {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _yaml(tmp_path, text: str) -> SFTConfig:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return load_config(SFTConfig, path)


def _tiny(mesh, rules):
    with parallel.use_mesh(mesh, rules):
        return split_model(CausalLM(CFG, rngs=nnx.Rngs(0)))


def test_default_rules_give_todays_shardings(tmp_path):
    cfg = _yaml(tmp_path, "mesh: {data: 2, fsdp: 2, tensor: 2}\n")
    assert parallel.resolve_rules(cfg.mesh) is parallel.LOGICAL_AXIS_RULES
    mesh = parallel.make_mesh(cfg.mesh)
    mdef, params = _tiny(mesh, parallel.resolve_rules(cfg.mesh))
    assert _specs(mdef.shardings(mesh, parallel.resolve_rules(cfg.mesh))) == DEFAULT_SPECS
    assert {k: v.sharding.spec for k, v in _specs_arrays(params).items()} == DEFAULT_SPECS
    same = parallel.resolve_rules(parallel.MeshConfig(rules={"batch": ["data", "fsdp"], "mlp": "tensor"}))
    assert _specs(mdef.shardings(mesh, same)) == DEFAULT_SPECS
    assert parallel.input_sharding(mesh, 2, rules=same) == parallel.input_sharding(mesh, 2)


def _specs_arrays(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_yaml_override_reshards_params_optimizer_state_and_inputs(tmp_path):
    cfg = _yaml(tmp_path, OVERRIDE)
    rules = parallel.resolve_rules(cfg.mesh)
    assert dict(rules)["mlp"] is None and dict(rules)["embed"] == "fsdp" and dict(rules)["batch"] == "data"
    mesh = parallel.make_mesh(cfg.mesh)
    mdef, params = _tiny(mesh, rules)
    specs = _specs(mdef.shardings(mesh, rules))
    want = dict(DEFAULT_SPECS, **{MLP_UP: P("fsdp", None), MLP_DOWN: P(None, "fsdp"),
                                  "['model']['layers'][0]['mlp']['gate_proj']['kernel']": P("fsdp", None)})
    assert specs == want
    assert _specs_arrays(params)[MLP_UP].sharding.spec == P("fsdp", None)  # created already sharded so
    (value, sh) = trainable(params, mdef.shardings(mesh, rules), optax.adam(1e-3), mesh)
    mu = value.opt_state[0].mu
    assert _specs_arrays(mu)[MLP_UP].sharding.spec == P("fsdp", None)
    assert _specs(sh.params)[MLP_UP] == P("fsdp", None)
    batch = parallel.host_local_to_global({"input_ids": np.zeros((4, 8), np.int32)}, mesh, rules)
    assert batch["input_ids"].sharding.spec == P("data", None)


def test_yaml_override_reaches_the_activation_pins_inside_mesh_jit(tmp_path):
    cfg = _yaml(tmp_path, OVERRIDE)
    mesh, rules = parallel.make_mesh(cfg.mesh), parallel.resolve_rules(cfg.mesh)
    x = parallel.host_local_to_global(np.ones((8, 16), np.float32), mesh)  # arrives split over data x fsdp

    def pin(x):
        return parallel.constrain(x * 2, ("batch", "mlp"))

    def spec(y):  # XLA drops trailing replicated axes from an output's spec
        return tuple(y.sharding.spec) + (None,) * (y.ndim - len(y.sharding.spec))

    assert spec(parallel.mesh_jit(pin, mesh=mesh)(x)) == (("data", "fsdp"), "tensor")
    assert spec(parallel.mesh_jit(pin, mesh=mesh, rules=rules)(x)) == ("data", None)


def test_a_loaded_checkpoint_is_placed_by_the_overridden_rules(tmp_path):
    model = tiny_world.build_tiny_llama(tmp_path / "m", hidden=16, layers=1)
    mesh = parallel.make_mesh(parallel.MeshConfig(2, 2, 2))
    rules = parallel.resolve_rules(parallel.MeshConfig(2, 2, 2, rules={"mlp": None}))
    _, params = split_model(load_model_for(str(model), mesh, model_type="causal_lm", rules=rules))
    assert _specs_arrays(params)[MLP_UP].sharding.spec == P("fsdp", None)
    _, params = split_model(load_model_for(str(model), mesh, model_type="causal_lm"))
    assert _specs_arrays(params)[MLP_UP].sharding.spec == P("fsdp", "tensor")


class _Stop(Exception):
    pass


def test_the_sft_stage_builds_its_state_and_step_from_the_configs_rules(tmp_path, monkeypatch):
    from safejax.train import fit as fit_mod

    world = tiny_world.make_world(tmp_path / "w")
    seen = {}

    def capture(loss_fn, tx, schedule, state_sh, batch_sh, **kw):
        seen.update(state=state_sh, batch=batch_sh, rules=kw["rules"])
        raise _Stop

    monkeypatch.setattr(fit_mod, "make_train_step", capture)
    cfg = load_config(SFTConfig, None, [f"out_dir={tmp_path / 'run'}", f"model.path={world['model']}",
                                        f"data.train=[{world['sft']}]", "data.max_length=24", "train.batch_size=16",
                                        "train.progress=false", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                        "mesh.rules.mlp=null", "mesh.rules.batch=[data]"])
    from safejax.train.sft import run_sft

    with pytest.raises(_Stop):
        run_sft(cfg)
    assert seen["rules"] == parallel.resolve_rules(cfg.mesh)
    assert _specs(seen["state"].params)[MLP_UP] == P("fsdp", None)
    assert _specs(seen["state"].opt_state)  # the optimizer state's shardings come with it
    assert {k: s.spec for k, s in seen["batch"].items()} == {k: P(None, "data", None) for k in seen["batch"]}


@pytest.mark.parametrize("override,named,why", [
    ("mesh.rules.mlpp=null", "mesh.rules.mlpp", "unknown logical axis 'mlpp'"),
    ("mesh.rules.mlp=model", "mesh.rules.mlp", "unknown mesh axis 'model'"),
    ("mesh.rules.batch=[fsdp, data, fsdp]", "mesh.rules.batch", "'fsdp' is named twice"),
    ("mesh.rules.embed=3", "mesh.rules.embed", "expected null, a mesh axis or a list"),
])
def test_a_bad_rule_is_a_config_error_naming_its_key(override, named, why):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, [override])
    assert f"config key '{named}'" in str(e.value) and why in str(e.value)
    assert f"(on the command line: {override})" in str(e.value)
    assert parallel.LOGICAL_AXIS_RULES == parallel.resolve_rules(parallel.MeshConfig())  # the table is untouched


def test_a_bad_rule_exits_2_naming_the_key_before_anything_is_written(tmp_path, capsys):
    from safejax.cli import main

    (tmp_path / "bad.yaml").write_text("mesh:\n  rules: {embed: [fsdp, tensor, fsdp]}\n")
    rc = main(["sft", "--config", str(tmp_path / "bad.yaml"), f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "mesh.rules.embed" in err and "Traceback" not in err and str(tmp_path / "bad.yaml") in err
    assert not (tmp_path / "run").exists()



def test_the_ppo_stage_places_state_frozen_models_and_prompts_by_the_configs_rules(tmp_path, monkeypatch):
    from safejax.train import ppo_loop
    from safejax.train.ppo import PPOConfig

    world = tiny_world.make_world(tmp_path / "w")
    m = world["model"]
    seen = {}

    def capture(phases, mesh, state_sh, frozen_sh, rules):
        seen.update(state=state_sh, frozen=frozen_sh, rules=rules)
        raise _Stop

    monkeypatch.setattr(ppo_loop, "make_rollout", capture)
    cfg = load_config(PPOConfig, None, [
        f"out_dir={tmp_path / 'run'}", f"actor.path={m}", f"reward_model={m}", f"cost_model={m}",
        f"data.prompts=[{world['prompts']}]", "data.prompt_width=16", "rollout.max_new_tokens=4", "train.batch_size=8",
        "ppo.micro_batch_size=4", "train.max_steps=1", "train.progress=false", "algorithm=ppo-lag",
        "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules.mlp=null"])
    with pytest.raises(_Stop):
        ppo_loop.run_ppo(cfg)
    assert seen["rules"] == parallel.resolve_rules(cfg.mesh)
    for tree in (seen["state"].actor.params, seen["state"].cost_critic.params, seen["frozen"].ref, seen["frozen"].cost):
        assert _specs(tree)[MLP_UP] == P("fsdp", None)
    assert _specs(seen["state"].actor.opt_state)
