"""What a new user meets first: --version, --help, a stage without --config, missing local paths (never
sent to the Hub), a stage's out_dir used as a model path, typos on the command line, the one-line result
of every stage, and no empty out_dir left by a failed run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets  # imported at collection: its log handler then binds to a stream that stays open
import huggingface_hub.constants
import pytest
import transformers
import yaml

import tiny_world
from safejax.cli import main
from safejax.config import ConfigError, load_config
from safejax.paths import looks_local, resolve_model_dir, resolve_tokenizer_path
from safejax.summary import remove_if_empty, result_line
from safejax.train.sft import SFTConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.make_world(tmp_path_factory.mktemp("newcomer_world"))


@pytest.fixture()
def no_hub(monkeypatch):
    """Fail the test if anything asks the Hub (tokenizer, dataset) for a path."""
    def guard(fn, local):
        def call(*a, **k):
            if not local(a, k):
                raise AssertionError(f"the Hub was asked for {a[:1]}")
            return fn(*a, **k)
        return call

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        guard(transformers.AutoTokenizer.from_pretrained, lambda a, k: os.path.isdir(a[0])))
    monkeypatch.setattr(datasets, "load_dataset", guard(datasets.load_dataset, lambda a, k: "data_files" in k))


def _stage_run(tmp: Path, model: Path, *, with_hf: bool = True) -> Path:
    """A folder laid out like a finished stage's out_dir (config.yaml, checkpoints/, hf/)."""
    run = tmp / "runs" / "tiny" / "sft"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "config.yaml").write_text("out_dir: runs/tiny/sft\n")
    (run / "config.json").write_text("{}")  # the stage's config snapshot, not an HF config
    if with_hf:
        shutil.copytree(model, run / "hf")
    return run


def _one_error_line(capsys, cmd: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"safejax {cmd}: error: "), err
    return err[0]


def test_version_flag_prints_the_package_version(capsys):
    from safejax import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"safejax {__version__}"


def test_help_points_at_where_config_keys_are_documented_and_describes_evals(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--print-config" in out and "experiments/configs/tiny/" in out and "SFTConfig" in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for what in ("score", "prefs", "arena", "elo"):
        assert f"  {what} " in out


def test_print_config_lists_every_key_with_the_overrides_applied(capsys):
    assert main(["sft", "--print-config", "optim.lr=0.5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 0.5 and {"model", "data", "train", "mesh", "out_dir"} <= set(cfg)


def test_stage_without_config_fails_in_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sft"]) == 2
    line = _one_error_line(capsys, "sft")
    assert "--config" in line and "experiments/configs/tiny/sft.yaml" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override,what", [
    ("model.path=./no/such/model", "model './no/such/model'"),
    ("model.path=runs/tiny/missing/hf", "model 'runs/tiny/missing/hf'"),
    ("model.tokenizer=~/no/such/tokenizer", "tokenizer '~/no/such/tokenizer'"),
    ("data.train=[./no/such/train.jsonl]", "dataset './no/such/train.jsonl'"),
    ("data.train=[PKU-SafeRLHF/train:1:../no/such/train.jsonl]", "../no/such/train.jsonl"),
])
def test_missing_local_path_fails_at_once_naming_it_and_the_working_directory(world, tmp_path, monkeypatch, capsys,
                                                                              no_hub, override, what):
    monkeypatch.chdir(tmp_path)
    args = [f"model.path={world['model']}", f"data.train=[{world['sft']}]", "data.max_length=24", "out_dir=out",
            "train.progress=false", override]
    assert main(["sft", *args]) == 2
    line = _one_error_line(capsys, "sft")
    assert what in line and str(tmp_path) in line
    assert not (tmp_path / "out").exists()  # the failed run left no empty out_dir behind


def test_paths_that_look_local_are_told_apart_from_hub_ids():
    for p in ("/abs/x", "./x", "../x", "~/x", "runs/tiny/sft", ".", "a/b/c"):
        assert looks_local(p), p
    for p in ("gpt2", "PKU-Alignment/PKU-SafeRLHF", "org/model.v2"):
        assert not looks_local(p), p


def test_stage_out_dir_is_accepted_as_model_and_tokenizer_path(world, tmp_path):
    from safejax.models import load_pretrained

    run = _stage_run(tmp_path, world["model"])
    assert resolve_model_dir(run) == str(run / "hf")
    assert resolve_tokenizer_path(run) == str(run / "hf")
    assert resolve_model_dir(run / "hf") == str(run / "hf")  # the hf/ folder itself still works
    assert resolve_model_dir(world["model"]) == str(world["model"])  # a plain HF folder is left alone
    a, b = load_pretrained(run), load_pretrained(run / "hf")
    assert a.config == b.config


def test_run_folder_without_hf_fails_in_one_line_naming_hf(world, tmp_path, monkeypatch, capsys):
    run = _stage_run(tmp_path, world["model"], with_hf=False)
    assert main(["sft", f"model.path={run}", f"data.train=[{world['sft']}]", f"out_dir={tmp_path / 'o'}"]) == 2
    line = _one_error_line(capsys, "sft")
    assert f"{run / 'hf'}" in line and "safejax export --run" in line


def test_command_line_typo_is_attributed_to_the_command_line_not_the_yaml(tmp_path):
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  epochs: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, cfg_file, ["optim.lrr=3"])
    assert "'optim.lrr'" in str(e.value) and "on the command line: optim.lrr=3" in str(e.value)
    assert str(cfg_file) not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, cfg_file, ["train.epochs=0"])
    assert "on the command line: train.epochs=0" in str(e.value)
    cfg_file.write_text("optim:\n  lrr: 1.0e-3\n")  # a typo in the file is still the file's
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, cfg_file, ["optim.lr=3"])
    assert f"(in {cfg_file})" in str(e.value) and "command line" not in str(e.value)


def test_result_lines_name_accuracy_lambda_cost_reward_and_export():
    fit = SimpleNamespace(steps=40, last_metrics={"train/loss": 0.5}, eval_metrics={
        "eval/accuracy": 0.8125, "eval/accuracy_sign": 0.9})
    line = result_line("cm", None, (fit, "runs/cm/hf"))
    assert line == "cm: done: 40 steps, held-out accuracy 0.812, sign accuracy 0.900; model in runs/cm/hf"
    cfg = SimpleNamespace(lagrange=SimpleNamespace(threshold=-2.5, lambda_init=5.0))
    hist = [{"step": 80, "train/reward": 1.5, "train/cost": -3.0, "train/episode_cost": -2.75, "train/lambda": 0.25}]
    ppo = SimpleNamespace(history=hist, export_dir="runs/ppo-lag/hf")
    assert result_line("ppo-lag", cfg, ppo) == ("ppo-lag: done: 80 iterations, final lambda 0.25, episode cost -2.75 "
                                                "(threshold -2.5), reward 1.5; exported runs/ppo-lag/hf")
    assert result_line("ppo-reward-shaping", cfg, ppo).startswith("ppo-reward-shaping: done: 80 iterations, nu 5, ")
    prefs = {"command": "prefs", "table": {"rm_ranking": {"accuracy": 0.75, "correct": 3, "total": 4}}}
    assert result_line("eval prefs", SimpleNamespace(out_dir="ev"), prefs) == \
        f"eval prefs: rm ranking 0.750 (3/4); report {Path('ev') / 'report.md'}"


def test_remove_if_empty_keeps_any_folder_that_holds_a_file(tmp_path):
    (tmp_path / "empty" / "tensorboard").mkdir(parents=True)
    remove_if_empty(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    (tmp_path / "full" / "a").mkdir(parents=True)
    (tmp_path / "full" / "b").mkdir()
    (tmp_path / "full" / "a" / "x").write_text("1")
    remove_if_empty(tmp_path / "full")
    assert (tmp_path / "full" / "a" / "x").exists() and (tmp_path / "full" / "b").is_dir()
    assert os.listdir(tmp_path) == ["full"] or sorted(os.listdir(tmp_path)) == ["full"]


def test_reference_flags_with_the_same_meaning_become_overrides(capsys):
    argv = ["ppo-lag", "--print-config", "--actor_model_name_or_path", "runs/sft", "--reward_model_name_or_path",
            "runs/rm", "--train_datasets", "PKU-SafeRLHF/train:0.5", "x.jsonl", "--lambda_init=2",
            "--zero_stage", "3", "--actor_gradient_checkpointing", "--output_dir", "out/lag", "ppo.kl_coeff=0.02"]
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["actor"]["path"] == "runs/sft" and cfg["reward_model"] == "runs/rm" and cfg["out_dir"] == "out/lag"
    assert cfg["data"]["prompts"] == ["PKU-SafeRLHF/train:0.5", "x.jsonl"]
    assert cfg["lagrange"]["lambda_init"] == 2.0 and cfg["actor"]["remat"] is True and cfg["ppo"]["kl_coeff"] == 0.02


@pytest.mark.parametrize("cmd,flag,names", [("ppo", "--max_length", "rollout.max_new_tokens"),
                                            ("sft", "--per_device_train_batch_size", "train.batch_size")])
def test_reference_flags_that_mean_something_else_stop_naming_the_safejax_key(capsys, cmd, flag, names):
    assert main([cmd, "--print-config", flag, "16"]) == 2
    line = _one_error_line(capsys, cmd)
    assert flag in line and names in line


def test_a_tokenizer_that_maps_most_of_the_data_to_unk_is_warned_about(world, caplog):
    from safejax.data import load_tokenizer, prepare_tokenizer
    from safejax.data.tokenizer import encode_texts

    tok, _ = prepare_tokenizer(load_tokenizer(world["model"]))
    known = [r["instruction"] + " " + r["output"] for r in tiny_world.sft_rows(8, 0)]  # the tokenizer's own words
    with caplog.at_level("WARNING", logger="safejax"):
        ids = encode_texts(tok, known, max_length=16)
    assert not [r for r in caplog.records if "<unk>" in r.getMessage()]
    unk = tok.unk_token_id
    assert unk is not None and sum(s.count(unk) for s in ids) / sum(map(len, ids)) <= 0.05
    with caplog.at_level("WARNING", logger="safejax"):
        ids = encode_texts(tok, ["ЖЖЖ ЩЩЩ ЮЮЮ ЯЯЯ"] * 4, max_length=16)  # letters the tiny vocabulary lacks
    share = sum(s.count(unk) for s in ids) / sum(map(len, ids))
    msgs = [r.getMessage() for r in caplog.records if "<unk>" in r.getMessage() or "unk" in r.getMessage()]
    assert share > 0.05 and len(msgs) == 1 and f"{100 * share:.0f}%" in msgs[0]


def test_loading_a_local_dataset_prints_no_progress_bars(tmp_path, capfd):
    from safejax.data.sources import load_source

    f = tmp_path / "rows.jsonl"
    f.write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(7)))
    assert len(load_source(str(f))) == 7
    err = capfd.readouterr().err
    assert "Generating" not in err and "split" not in err


@pytest.fixture()
def hub_out_of_reach(monkeypatch):
    """No network: connecting to the Hub fails; and nothing may call the Hub anyway."""
    import socket

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    def never(*a, **k):
        raise AssertionError(f"tried the Hub for {a[:1]}")

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)


def test_without_network_a_hub_dataset_or_tokenizer_fails_at_once_with_the_local_copy_hint(hub_out_of_reach):
    from safejax.data.sources import load_source
    from safejax.data.tokenizer import load_tokenizer

    with pytest.raises(ValueError) as e:
        load_source("alpaca")
    msg = str(e.value)
    assert "cannot reach the Hugging Face Hub (huggingface.co)" in msg and "tatsu-lab/alpaca" in msg
    assert "alpaca:1:/path/to/train.jsonl" in msg
    with pytest.raises(ValueError) as e:
        load_tokenizer("runs/sft")  # one '/' may be a Hub id: tried there only when the Hub can be reached
    assert "runs/sft" in str(e.value) and os.getcwd() in str(e.value) and "cannot be reached" in str(e.value)
