"""The whole Safe RLHF pipeline on a GPT-2 checkpoint through the CLI: SFT, reward and cost models, one
PPO-Lagrangian iteration, and exported folders that transformers loads as GPT-2 with the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tiny_world
from safejax.metrics import read_metrics

_cli = tiny_world.run_cli
ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
COMMON = ["data.max_length=24", "train.batch_size=16", "train.progress=false", "train.log_every=1", *ONE_DEVICE]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2-world")
    world = tiny_world.make_world(root)
    init = tiny_world.build_tiny_gpt2(root / "gpt2-init")
    _cli("sft", f"out_dir={root}/sft", f"model.path={init}", f"data.train=[{world['sft']}]", "train.max_steps=4",
         "optim.lr=3e-3", *COMMON)
    for stage in ("rm", "cm"):
        _cli(stage, f"out_dir={root}/{stage}", f"model.path={root}/sft/hf", f"data.train=[{world['pref_train']}]",
             "train.max_steps=2", *COMMON)
    _cli("ppo-lag", f"out_dir={root}/ppo", f"actor.path={root}/sft/hf", f"reward_model={root}/rm/hf",
         f"cost_model={root}/cm/hf", f"data.prompts=[{world['prompts']}]", "data.prompt_width=13",
         "rollout.max_new_tokens=6", "train.batch_size=16", "ppo.micro_batch_size=8", "train.max_steps=1",
         "train.progress=false", "train.log_every=1", *ONE_DEVICE)
    return root


def test_every_stage_runs_on_gpt2_and_logs_finite_metrics(gpt2_run):
    sft = [r["train/loss"] for r in read_metrics(gpt2_run / "sft" / "metrics.jsonl") if "train/loss" in r]
    assert len(sft) == 4 and all(np.isfinite(sft)) and sft[-1] < sft[0]
    for stage in ("rm", "cm"):
        losses = [r["train/loss"] for r in read_metrics(gpt2_run / stage / "metrics.jsonl") if "train/loss" in r]
        assert len(losses) == 2 and all(np.isfinite(losses))
    (ppo,) = [r for r in read_metrics(gpt2_run / "ppo" / "metrics.jsonl") if "train/reward" in r]
    assert all(np.isfinite(v) for v in ppo.values())
    assert ppo["train/lambda"] != 1.0  # the dual step ran


def test_exported_gpt2_folders_load_in_transformers_with_the_same_logits(gpt2_run):
    import torch
    import transformers

    from safejax.models import load_pretrained

    ids = np.array([[1, 5, 6, 7, 8, 9, 30, 31]], np.int32)
    for folder in (gpt2_run / "sft" / "hf", gpt2_run / "ppo" / "hf"):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert isinstance(hf, transformers.GPT2LMHeadModel)
        with torch.no_grad():
            ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        ours = np.asarray(load_pretrained(folder)(ids))
        np.testing.assert_allclose(ours, ref, atol=1e-4)
    rm_cfg = json.loads((gpt2_run / "rm" / "hf" / "config.json").read_text())
    assert rm_cfg["architectures"] == ["GPT2ForScore"]
