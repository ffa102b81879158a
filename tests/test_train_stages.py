"""SFT, reward-model and cost-model stages end to end through the CLI, on a tiny local world where a
planted token decides the labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tiny_world
from safejax.cli import main
from safejax.metrics import read_metrics


_cli = tiny_world.run_cli


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = tiny_world.make_world(root)
    paths["root"] = root
    common = ["data.max_length=24", "train.batch_size=16", "train.progress=false"]
    _cli("sft", f"out_dir={root}/sft", f"model.path={paths['model']}", f"data.train=[{paths['sft']}]",
         "train.epochs=2", "optim.lr=3e-3", "train.log_every=1", *common)
    for stage in ("rm", "cm"):
        _cli(stage, f"out_dir={root}/{stage}", f"model.path={root}/sft/hf", f"data.train=[{paths['pref_train']}]",
             f"data.eval=[{paths['pref_eval']}]", "train.epochs=3", "optim.lr=3e-3", "train.log_every=4", *common)
    return paths


def _eval_records(path):
    return [r for r in read_metrics(path) if "eval/accuracy" in r]


def test_sft_loss_falls_and_export_loads_in_transformers(world):
    import torch
    from transformers import AutoModelForCausalLM

    recs = read_metrics(world["root"] / "sft" / "metrics.jsonl")
    losses = [r["train/loss"] for r in recs if "train/loss" in r]
    assert len(losses) == 16  # 128 rows / 16 per batch * 2 epochs, logged every step
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2  # the floor is ~log(24) (random filler words)
    hf = AutoModelForCausalLM.from_pretrained(world["root"] / "sft" / "hf")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        logits = hf(ids).logits.numpy()
    from safejax.models import load_pretrained

    ours = np.asarray(load_pretrained(world["root"] / "sft" / "hf")(ids.numpy()))
    np.testing.assert_allclose(ours, logits, atol=1e-4)


def test_reward_model_learns_planted_token_to_95_percent(world):
    recs = _eval_records(world["root"] / "rm" / "metrics.jsonl")
    assert len(recs) == 3  # one held-out evaluation per epoch
    assert recs[-1]["eval/accuracy"] >= 0.95
    assert recs[-1]["eval/count"] == 64


def test_cost_model_sign_accuracy_reaches_95_percent(world):
    recs = _eval_records(world["root"] / "cm" / "metrics.jsonl")
    assert recs[-1]["eval/accuracy_sign"] >= 0.95
    # ranking is only decidable on pairs with exactly one 'bad' response (about 2/3 of pairs)
    assert recs[-1]["eval/accuracy"] >= 0.6


def test_cost_model_export_reloads_as_score_model_with_same_scores(world):
    from safejax.models import ScoreModel, load_pretrained

    sm = load_pretrained(world["root"] / "cm" / "hf")
    assert isinstance(sm, ScoreModel)
    ids = np.array([[1, 4, 5, 6, 8, 11, 12, 2]], np.int32)
    a = np.asarray(sm(ids).end_scores)
    b = np.asarray(load_pretrained(world["root"] / "cm" / "hf")(ids).end_scores)
    np.testing.assert_array_equal(a, b)


def test_stage_writes_checkpoint_config_and_tensorboard(world):
    run = world["root"] / "rm"
    assert (run / "config.yaml").exists()
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    assert any((run / "checkpoints").iterdir())
    assert any((run / "tensorboard").iterdir())


def test_sharded_training_matches_single_device(world, tmp_path):
    root = world["root"]
    args = [f"model.path={root}/sft/hf", f"data.train=[{world['pref_train']}]", "data.max_length=24",
            "train.batch_size=16", "train.max_steps=3", "train.progress=false", "optim.lr=1e-3", "train.log_every=1"]
    _cli("rm", f"out_dir={tmp_path}/one", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", *args)
    _cli("rm", f"out_dir={tmp_path}/many", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *args)
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    many = read_metrics(tmp_path / "many" / "metrics.jsonl")
    assert len(one) == len(many) == 3
    for a, b in zip(one, many):
        for k in ("train/loss", "train/accuracy", "train/grad_norm", "train/reward_mean"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (k, a[k], b[k])


def test_unknown_config_key_fails_with_named_key(world, capsys):
    rc = main(["rm", f"model.path={world['root']}/sft/hf", "optim.learning_rate=1e-3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "optim.learning_rate" in err and "optim.lr" in err


def test_packed_cost_model_learns_the_planted_token_like_the_unpacked_one(world, tmp_path):
    """``data.pack=true``: pairs packed into rows of 2 x 24 tokens (8 rows per step); the held-out (unpacked)
    evaluation reaches the same sign accuracy as the unpacked run."""
    out = tmp_path / "cm-packed"
    _cli("cm", f"out_dir={out}", f"model.path={world['root']}/sft/hf", f"data.train=[{world['pref_train']}]",
         f"data.eval=[{world['pref_eval']}]", "data.pack=true", "data.max_length=24", "train.batch_size=8",
         "train.epochs=3", "optim.lr=3e-3", "train.log_every=4", "train.progress=false")
    recs = _eval_records(out / "metrics.jsonl")
    assert recs[-1]["eval/accuracy_sign"] >= 0.95 and recs[-1]["eval/count"] == 64
    train = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert train[-1]["train/loss"] < train[0]["train/loss"]


def test_packed_sft_trains_on_fewer_rows_with_a_falling_loss(world, tmp_path):
    """Rows of 48 tokens hold two or more examples each: at most half the steps per epoch, and the loss falls."""
    out = tmp_path / "sft-packed"
    _cli("sft", f"out_dir={out}", f"model.path={world['model']}", f"data.train=[{world['sft']}]", "data.pack=true",
         "data.max_length=48", "train.batch_size=8", "train.epochs=4", "optim.lr=3e-3", "train.log_every=1",
         "train.progress=false")
    losses = [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert 0 < len(losses) <= 4 * 64 // 8  # at most 64 packed rows for the 128 examples
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2
