"""``safejax export --run DIR --out HF``: HF folders from any checkpoint of a stage.

SFT and PPO exports are causal LMs that transformers loads (logits equal the stage's own ``hf/``
export); RM/CM exports are score models that safejax loads (scores equal the stage's own export).
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny_world
from safejax.cli import main


_cli = tiny_world.run_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_world")
    paths = tiny_world.make_world(root)
    paths["root"] = root
    return paths


def _sft_argv(world, run):
    return ["sft", f"out_dir={run}", f"model.path={world['model']}", f"data.train=[{world['sft']}]",
            "data.max_length=24", "train.batch_size=16", "train.max_steps=3", "train.save_every=1",
            "train.keep_checkpoints=5", "optim.lr=3e-3", "train.progress=false"]


@pytest.fixture(scope="module")
def sft_run(world):
    run = world["root"] / "sft"
    _cli(*_sft_argv(world, run))
    return run


def _tensors(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _torch_logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


IDS = np.array([[1, 4, 5, 6, 7, 8, 12, 13, 2]], np.int64)


def test_sft_export_of_last_checkpoint_equals_the_stage_export_in_transformers(sft_run, tmp_path):
    _cli("export", "--run", str(sft_run), "--out", str(tmp_path / "hf"))
    got, want = _tensors(tmp_path / "hf"), _tensors(sft_run / "hf")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(_torch_logits(tmp_path / "hf", IDS), _torch_logits(sft_run / "hf", IDS))
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_bf16_export_halves_the_weights_and_loads_in_transformers_as_bf16(sft_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    _cli("export", "--run", str(sft_run), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"export: wrote {tmp_path / 'bf16'}"
    got, want = _tensors(tmp_path / "bf16"), _tensors(sft_run / "hf")
    assert got.keys() == want.keys()
    for k in want:
        assert str(got[k].dtype) == "bfloat16", k
        np.testing.assert_array_equal(got[k], want[k].astype(got[k].dtype), err_msg=k)  # round-to-nearest cast
    size = lambda f: (f / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "bf16") < 0.55 * size(sft_run / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16


def test_stage_export_dtype_bfloat16_writes_its_hf_folder_in_bf16(world, tmp_path):
    from safejax.models import load_pretrained

    run = tmp_path / "sft-bf16"
    argv = [a for a in _sft_argv(world, run) if not a.startswith(("train.max_steps", "train.save_every"))]
    _cli(*argv, "train.max_steps=1", "export.dtype=bfloat16")
    got = _tensors(run / "hf")
    assert got and all(str(v.dtype) == "bfloat16" for v in got.values())
    assert load_pretrained(run).config.vocab_size > 0  # loads back (params upcast to float32)


def test_export_of_an_earlier_step_gives_that_steps_weights(sft_run, tmp_path):
    from safejax.checkpoint import Checkpointer

    _cli("export", "--run", str(sft_run), "--out", str(tmp_path / "hf1"), "--step", "1")
    with Checkpointer(sft_run / "checkpoints", read_only=True) as ck:
        params, _, _ = ck.restore_subtree(("params",), step=1)
    emb = np.asarray(params["model"]["embed_tokens"]["embedding"])
    got = _tensors(tmp_path / "hf1")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(got, emb)
    assert not np.array_equal(got, _tensors(sft_run / "hf")["model.embed_tokens.weight"])
    logits = _torch_logits(tmp_path / "hf1", IDS)  # transformers loads it
    assert np.isfinite(logits).all()


def test_cost_model_export_loads_as_a_safejax_score_model_with_the_stage_scores(world, sft_run, tmp_path):
    from safejax.models import ScoreModel, load_pretrained

    run = tmp_path / "cm"
    _cli("cm", f"out_dir={run}", f"model.path={sft_run / 'hf'}", f"data.train=[{world['pref_train']}]",
         "data.max_length=24", "train.batch_size=16", "train.max_steps=2", "optim.lr=3e-3", "train.progress=false")
    _cli("export", "--run", str(run), "--out", str(tmp_path / "hf"))
    sm = load_pretrained(tmp_path / "hf")
    assert isinstance(sm, ScoreModel)
    ids = IDS.astype(np.int32)
    np.testing.assert_array_equal(np.asarray(sm(ids).end_scores), np.asarray(load_pretrained(run / "hf")(ids).end_scores))


def test_ppo_export_is_the_actor_and_loads_in_transformers(world, sft_run, tmp_path):
    run = tmp_path / "ppo"
    m = sft_run / "hf"
    _cli("ppo", f"out_dir={run}", f"actor.path={m}", f"reward_model={m}", f"data.prompts=[{world['prompts']}]",
         "data.prompt_width=16", "rollout.max_new_tokens=3", "train.batch_size=8", "ppo.micro_batch_size=8",
         "train.max_steps=1", "actor_optim.lr=1e-2", "actor_optim.warmup_ratio=0", "train.progress=false")
    _cli("export", "--run", str(run), "--out", str(tmp_path / "hf"))
    got, want = _tensors(tmp_path / "hf"), _tensors(run / "hf")
    assert "lm_head.weight" in got and got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert not np.array_equal(got["lm_head.weight"], _tensors(m)["lm_head.weight"])  # the actor moved
    np.testing.assert_array_equal(_torch_logits(tmp_path / "hf", IDS), _torch_logits(run / "hf", IDS))


def test_export_refuses_a_checkpoint_that_does_not_fit_the_configured_model(sft_run, tmp_path, capsys):
    import json
    import shutil

    run = tmp_path / "sft"
    shutil.copytree(sft_run, run)
    small = tiny_world.build_tiny_llama(tmp_path / "small", hidden=16)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["path"] = str(small)
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("safejax export: error: checkpoint") and "does not match the model at" in err
    assert "in the checkpoint but" in err and not (tmp_path / "hf").exists()


def test_rerunning_a_finished_stage_changes_neither_metrics_nor_export(world, sft_run, tmp_path):
    import shutil

    run = tmp_path / "sft"
    shutil.copytree(sft_run, run)
    _cli(*_sft_argv(world, run))
    assert (run / "metrics.jsonl").read_bytes() == (sft_run / "metrics.jsonl").read_bytes()
    got, want = _tensors(run / "hf"), _tensors(sft_run / "hf")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", "3"]
