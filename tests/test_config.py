"""YAML configs with key=value overrides: defaults kept, unknown keys and bad values named."""

import pytest

from safejax.config import ConfigError, load_config
from safejax.train.ppo import PPOConfig
from safejax.train.score_model import ScoreModelConfig
from safejax.train.sft import SFTConfig

PPO_REQUIRED = ["reward_model=/rm", "cost_model=/cm"]


def test_partial_section_override_keeps_the_sections_other_defaults():
    cfg = load_config(PPOConfig, None, ["critic_optim.lr=1e-3", "actor_optim.lr=2e-5", *PPO_REQUIRED])
    assert cfg.critic_optim.lr == 1e-3 and cfg.critic_optim.schedule == "constant"
    assert cfg.critic_optim.warmup_ratio == 0.03
    assert cfg.actor_optim.weight_decay == 0.01 and cfg.actor_optim.schedule == "cosine"
    rm = load_config(ScoreModelConfig, None, ["train.batch_size=8"])
    assert rm.train.epochs == 2 and rm.train.batch_size == 8


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model:\n  path: /models/init\ntrain:\n  epochs: 3\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(SFTConfig, path, ["train.epochs=5", "data.train=[a.jsonl,b.jsonl:0.5]"])
    assert cfg.model.path == "/models/init" and cfg.train.epochs == 5 and cfg.optim.lr == 1e-4
    assert cfg.data.train == ["a.jsonl", "b.jsonl:0.5"]
    assert cfg.optim.warmup_ratio == 0.03  # SFTConfig's own default for its optimizer section survives


@pytest.mark.parametrize("override, words", [
    (["optim.learning_rate=1e-3"], ["optim.learning_rate", "optim.lr"]),
    (["optim.lr=0"], ["optim.lr", "> 0.0"]),
    (["optim.schedule=exp"], ["optim.schedule", "cosine"]),
    (["train.epochs=two"], ["train.epochs", "integer"]),
    (["train.progress=maybe"], ["train.progress", "true/false"]),
    (["modle.path=x"], ["modle", "did you mean 'model'"]),
    (["noequals"], ["noequals", "key=value"]),
    (["model.attention=flash"], ["model.attention", "cudnn"]),
    (["model.attention=cudnn"], ["model.attention", "bfloat16"]),
])
def test_bad_keys_and_values_are_named(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, override)
    for w in words:
        assert w in str(e.value)


def test_ppo_config_cross_checks():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(PPOConfig, None, ["train.batch_size=12", "ppo.micro_batch_size=8", *PPO_REQUIRED])
    with pytest.raises(ConfigError, match="cost_model"):
        load_config(PPOConfig, None, ["reward_model=/rm", "cost_model="])
    with pytest.raises(ConfigError, match="lambda_init"):
        load_config(PPOConfig, None, ["lagrange.lambda_init=0", *PPO_REQUIRED])
    assert load_config(PPOConfig, None, ["algorithm=ppo", "reward_model=/rm"]).cost_model == ""


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(SFTConfig, bad)


def test_attention_key_is_read_from_model_sections():
    cfg = load_config(PPOConfig, None, ["actor.attention=cudnn", "actor.dtype=bfloat16", *PPO_REQUIRED])
    assert cfg.actor.attention == "cudnn"
    assert load_config(SFTConfig, None, ["model.attention=xla"]).model.attention == "xla"


def test_resume_ignores_exact_speed_switches_but_not_semantic_ones():
    from safejax.train.common import config_differences

    old = {"rollout": {"cast_weights": True, "temperature": 1.0}, "ppo": {"mask_sampled_special": True},
           "actor": {"remat": False, "attention": "einsum"}}
    new = {"rollout": {"cast_weights": False, "temperature": 1.0}, "ppo": {"mask_sampled_special": False},
           "actor": {"remat": True, "attention": "xla"}}
    assert config_differences(old, new) == ["actor.attention: 'einsum' -> 'xla'",
                                            "ppo.mask_sampled_special: True -> False"]


def test_resume_treats_a_key_the_old_snapshot_lacks_as_its_default():
    from safejax.config import to_dict
    from safejax.train.common import config_differences
    from safejax.train.ppo import PPOConfig

    new = to_dict(PPOConfig(reward_model="rm", cost_model="cm"))
    old = {k: v for k, v in new.items() if k != "lora"}  # a snapshot written before the lora section existed
    old["lagrange"] = {k: v for k, v in new["lagrange"].items() if k not in ("rule", "pid", "names")}
    defaults = to_dict(PPOConfig())
    assert config_differences(old, new, defaults=defaults) == []
    changed = dict(new, lora=dict(new["lora"], actor=dict(new["lora"]["actor"], rank=8)))
    assert config_differences(old, changed, defaults=defaults) == ["lora.actor.rank: None -> 8"]
    assert config_differences(old, new) != []  # without the defaults every new key is a difference


@pytest.mark.parametrize("override, key", [("data.max_length=10", "data.max_length"),
                                           ("data.prompt_buckets=[8, 64]", "data.prompt_buckets")])
def test_rl_stages_share_one_check_of_the_prompt_geometry(override, key):
    from safejax.train.grpo import GRPOConfig
    from safejax.train.ppo import PPOConfig

    for cls in (PPOConfig, GRPOConfig):  # the check lives on their shared data section
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            load_config(cls, None, ["reward_model=rm", "cost_model=cm", "data.prompt_width=16", override])
        load_config(cls, None, ["reward_model=rm", "cost_model=cm", "data.prompt_width=16"])
