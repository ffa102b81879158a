"""A corpus of bad inputs, each driven through the CLI in-process (``safejax.cli.main``).

Every case must exit non-zero, print exactly one ``safejax <cmd>: error: ...`` line (no traceback)
that names the culprit (file, row, field, key, tensor or step), and leave the checkpoints of the run
it points at untouched.  Most cases point ``out_dir`` at a copy of a real checkpointed SFT run (stopped
at step 2 of 4), so a failure after the run directory is opened is also shown not to damage it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import tiny_world
from safejax.cli import main
from safejax.metrics import read_metrics
from safejax.train.common import config_differences


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_world")
    paths = tiny_world.make_world(root)
    paths["root"] = root
    return paths


def sft_args(world) -> list[str]:
    return [f"model.path={world['model']}", f"data.train=[{world['sft']}]", "data.max_length=24",
            "train.batch_size=16", "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=100",
            "optim.lr=3e-3", "train.progress=false"]


def ppo_args(world, **over) -> list[str]:
    m = world["model"]
    args = {"actor.path": m, "reward_model": m, "cost_model": m, "data.prompts": f"[{world['prompts']}]",
            "data.prompt_width": 16, "rollout.max_new_tokens": 4, "train.batch_size": 8,
            "ppo.micro_batch_size": 4, "train.max_steps": 2, "train.progress": "false"}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items() if v is not None]


@pytest.fixture(scope="module")
def base_run(world, tmp_path_factory):
    """A 4-step SFT run checkpointed every step, then cut back to step 2 (as if killed there):
    ``(run dir, metrics.jsonl bytes of the full uninterrupted run)``."""
    return tiny_world.sft_run_cut_back(tmp_path_factory.mktemp("base") / "sft", sft_args(world))


# ----------------------------------------------------------------------------- bad files


def write_rows(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _raw(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def sft_file(tmp: Path, world, mutate: Callable[[list], None], name="bad_sft.jsonl") -> str:
    rows = tiny_world.sft_rows(32, 5)
    mutate(rows)
    return write_rows(tmp / name, rows)


def pku_file(tmp: Path, mutate: Callable[[list], None]) -> str:
    rows = tiny_world.planted_rows(32, 5)
    mutate(rows)
    return write_rows(tmp / "bad_pku.jsonl", rows)


def model_copy(tmp: Path, world, edit: Callable[[Path], None]) -> str:
    dst = tmp / "bad_model"
    shutil.copytree(world["model"], dst)
    edit(dst)
    return str(dst)


def _bin_only(d: Path) -> None:
    import torch
    from safetensors.numpy import load_file

    sd = {k: torch.from_numpy(v) for k, v in load_file(str(d / "model.safetensors")).items()}
    torch.save(sd, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _wrong_shape(d: Path) -> None:
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def big_tokenizer(tmp: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(tiny_world.VOCAB + [f"x{i}" for i in range(100)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(tmp / "big_tok"))
    return str(tmp / "big_tok")


def corrupt_steps(run: Path, steps) -> None:
    for s in steps:
        for f in (run / "checkpoints" / str(s) / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"\0\0\0")


# ----------------------------------------------------------------------------- the corpus


@dataclasses.dataclass
class Case:
    id: str
    argv: Callable  # (world, tmp, out) -> argv for main()
    expect: tuple   # substrings of the single error line
    base: bool = True   # out_dir is a copy of the checkpointed base run
    setup: Callable | None = None  # (out) -> None, before the command
    marks: tuple = ()


def sft(*extra, cfg=None):
    def argv(world, tmp, out):
        head = ["sft"] + (["--config", cfg(tmp)] if cfg else [])
        return head + [f"out_dir={out}", *sft_args(world), *[e(world, tmp) if callable(e) else e for e in extra]]

    return argv


def stage(cmd, args_fn):
    def argv(world, tmp, out):
        return [cmd, f"out_dir={out}", *args_fn(world, tmp)]

    return argv


def pku_rm(mutate, cmd="rm"):
    return stage(cmd, lambda w, t: [f"model.path={w['model']}", f"data.train=[{pku_file(t, mutate)}]",
                                     "data.max_length=24", "train.batch_size=16", "train.progress=false"])


def _set(i, **kv):
    def mutate(rows):
        rows[i].update(kv)

    return mutate


def _drop(i, key):
    def mutate(rows):
        rows[i].pop(key)

    return mutate


def _yaml(text):
    def make(tmp):
        p = tmp / "bad.yaml"
        p.write_text(text)
        return str(p)

    return make


ALLOW = "allow_config_change=true"

CASES = [
    # ---- config values and files
    Case("unknown_config_key", sft("optim.learning_rate=1e-3"), ("unknown config key 'optim.learning_rate'",
                                                                  "optim.lr")),
    Case("lr_not_positive", sft("optim.lr=0"), ("optim.lr", "must be > 0")),
    Case("batch_size_not_an_integer", sft("train.batch_size=sixteen"), ("train.batch_size", "expected an integer")),
    Case("save_every_negative", sft("train.save_every=-1"), ("train.save_every", ">= 0")),
    Case("override_without_value", sft("train.batch_size"), ("train.batch_size", "key=value")),
    Case("malformed_yaml", sft(cfg=_yaml("train: {batch_size: [16\n")), ("bad.yaml", "not valid YAML")),
    Case("yaml_not_a_mapping", sft(cfg=_yaml("- 1\n- 2\n")), ("bad.yaml", "mapping")),
    Case("config_file_missing", sft(cfg=lambda tmp: str(tmp / "missing.yaml")), ("config file not found",
                                                                                  "missing.yaml")),
    Case("yaml_duplicate_key", sft(cfg=_yaml("optim:\n  lr: 0.003\n  lr: 30\n")),
         ("bad.yaml", "line 3", "duplicate key 'lr'", "line 2")),
    Case("yaml_duplicate_section", sft(cfg=_yaml("train:\n  batch_size: 32\n  epochs: 5\n"
                                                 "train:\n  batch_size: 16\n")),
         ("bad.yaml", "line 4", "duplicate key 'train'")),
    Case("lr_nan", sft("optim.lr=.nan"), ("optim.lr", "finite")),
    Case("lr_inf", sft("optim.lr=.inf"), ("optim.lr", "finite")),
    Case("warmup_ratio_nan", sft("optim.warmup_ratio=.nan"), ("optim.warmup_ratio", "finite")),
    Case("eps_negative", sft("optim.eps=-1e-8"), ("optim.eps", ">= 0")),
    Case("max_consecutive_skips_zero", sft("train.max_consecutive_skips=0"), ("train.max_consecutive_skips", ">= 1")),
    Case("mesh_does_not_divide_devices", sft("mesh.data=3"), ("mesh", "8 devices")),
    Case("mesh_rule_unknown_mesh_axis", sft(cfg=_yaml("mesh:\n  rules: {mlp: [tensor, model]}\n")),
         ("mesh.rules.mlp", "unknown mesh axis 'model'", "bad.yaml")),
    Case("grad_accum_does_not_divide_batch", sft("optim.grad_accum=3", ALLOW), ("optim.grad_accum=3",
                                                                                 "train.batch_size=16")),
    Case("ppo_batch_not_multiple_of_micro_batch", stage("ppo-lag", lambda w, t: ppo_args(
        w, **{"train.batch_size": 6})), ("train.batch_size", "ppo.micro_batch_size"), base=False),
    Case("ppo_lambda_init_not_positive", stage("ppo-lag", lambda w, t: ppo_args(w, **{"lagrange.lambda_init": 0})),
         ("lagrange.lambda_init", "must be > 0"), base=False),
    Case("ppo_top_p_above_one", stage("ppo-lag", lambda w, t: ppo_args(w, **{"rollout.top_p": 1.5})),
         ("rollout.top_p", "<= 1"), base=False),
    Case("ppo_missing_cost_model", stage("ppo-lag", lambda w, t: ppo_args(w, cost_model=None)),
         ("cost_model", "required"), base=False),
    # ---- models, tokenizers, checkpoints
    Case("model_folder_missing", sft("model.path=/nonexistent/safejax-model", ALLOW), ("/nonexistent/safejax-model",)),
    Case("model_without_config_json", sft(lambda w, t: "model.path=" + model_copy(
        t, w, lambda d: (d / "config.json").unlink()), ALLOW), ("config.json", "missing")),
    Case("model_with_pytorch_bin_only", sft(lambda w, t: "model.path=" + model_copy(t, w, _bin_only), ALLOW),
         ("pytorch_model.bin", "safetensors")),
    Case("safetensors_tensor_with_wrong_shape", sft(lambda w, t: "model.path=" + model_copy(t, w, _wrong_shape),
                                                    ALLOW),
         ("model.layers.1.mlp.up_proj.weight", "[48, 32]", "[64, 32]")),
    Case("tokenizer_folder_is_not_a_tokenizer", sft(lambda w, t: (t / "empty").mkdir() or f"model.tokenizer={t}/empty",
                                                    ALLOW), ("tokenizer", "empty")),
    Case("checkpoint_of_a_different_model", sft(lambda w, t: "model.path=" + str(
        tiny_world.build_tiny_llama(t / "small", hidden=16)), ALLOW),
         ("checkpoints/2 does not match the model", "array 'params.", "in the checkpoint but")),
    Case("tokenizer_larger_than_model_vocab", sft(lambda w, t: f"model.tokenizer={big_tokenizer(t)}"),
         ("tokenizer", "136"), base=False),
    # ---- data
    Case("data_file_missing", sft("data.train=[/nonexistent/rows.jsonl]", ALLOW), ("/nonexistent/rows.jsonl",)),
    Case("malformed_json_row", sft(lambda w, t: "data.train=[" + write_rows(
        t / "broken.jsonl", [{"instruction": "a", "output": "b"}, '{"instruction": "c", "outp']) + "]", ALLOW),
         ("broken.jsonl",)),
    Case("non_utf8_byte", sft(lambda w, t: "data.train=[" + _raw(t / "latin1.jsonl", b'{"instruction": "a", '
                                                            b'"output": "b"}\n{"instruction": "caf\xe9", "output": "c"}\n')
                              + "]", ALLOW), ("latin1.jsonl", "row 1", "UTF-8", "0xe9")),
    Case("empty_jsonl", sft(lambda w, t: "data.train=[" + _raw(t / "empty.jsonl", b"") + "]", ALLOW),
         ("empty.jsonl", "empty", "no rows")),
    Case("json_array_row", sft(lambda w, t: "data.train=[" + write_rows(
        t / "arr.jsonl", [{"instruction": "a", "output": "b"}] * 3 + ['["a", "b"]']) + "]", ALLOW),
         ("arr.jsonl", "row 3", "JSON object", "array")),
    Case("sft_row_missing_output", sft(lambda w, t: f"data.train=[{sft_file(t, w, _drop(7, 'output'))}]", ALLOW),
         ("bad_sft.jsonl", "row 7", "'output'", "missing")),
    Case("sft_output_wrong_type", sft(lambda w, t: f"data.train=[{sft_file(t, w, _set(3, output=5))}]", ALLOW),
         ("row 3", "'output'", "expected a string")),
    Case("sft_empty_instruction", sft(lambda w, t: f"data.train=[{sft_file(t, w, _set(0, instruction='  '))}]",
                                      ALLOW), ("row 0", "'instruction'", "empty")),
    Case("too_few_rows_for_batch", sft(lambda w, t: "data.train=[" + write_rows(
        t / "few.jsonl", tiny_world.sft_rows(4, 1)) + "]", ALLOW), ("only 4 training rows", "train.batch_size=16")),
    Case("pku_better_response_id_2", pku_rm(_set(5, better_response_id=2)),
         ("bad_pku.jsonl", "row 5", "better_response_id", "0 or 1"), base=False),
    Case("pku_missing_response_1", pku_rm(_drop(2, "response_1")), ("row 2", "response_1", "missing"), base=False),
    Case("pku_safety_flag_not_boolean", pku_rm(_set(9, is_response_0_safe="maybe"), cmd="cm"),
         ("row 9", "is_response_0_safe", "true/false"), base=False),
    Case("ppo_empty_prompt", stage("ppo-lag", lambda w, t: ppo_args(w, **{"data.prompts": "[" + write_rows(
        t / "prompts.jsonl", [{"prompt": "w1 w2"}] * 3 + [{"prompt": ""}]) + "]"})), ("row 3", "'prompt'", "empty"),
         base=False),
    Case("ppo_prompts_longer_than_prompt_width", stage("ppo-lag", lambda w, t: ppo_args(
        w, **{"data.prompt_width": 6})), ("prompt_too_long", "data.prompt_width=6"), base=False),
    # ---- resuming, numerics, export
    Case("config_change_on_resume", sft("optim.lr=1e-2"), ("different config", "optim.lr: 0.003 -> 0.01",
                                                            "allow_config_change")),
    Case("nan_injected_into_loss", sft("train.inject_nan_step=3"), ("step 3", "'train/loss' is nan")),
    Case("all_checkpoints_corrupt", sft(), ("no readable checkpoint", "step(s) 2", "1 ("),
         setup=lambda out: corrupt_steps(out, (1, 2))),
    Case("export_from_a_folder_without_run", lambda w, t, o: ["export", "--run", str(t), "--out", str(t / "hf")],
         ("config.json", "not found")),
    Case("export_of_a_missing_step", lambda w, t, o: ["export", "--run", str(o), "--out", str(t / "hf"),
                                                      "--step", "99"], ("step 99", "[1, 2]")),
]


def _snapshot(run: Path) -> dict:
    d = run / "checkpoints"
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


def _error_line(err: str, cmd: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("safejax ") and ": error: " in ln]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith(f"safejax {cmd}: error: ")
    return lines[0]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_exits_nonzero_with_one_clear_message_and_intact_checkpoints(case, world, base_run, tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    if case.base:
        shutil.copytree(base_run[0], out)
    if case.setup is not None:
        case.setup(out)
    before, cfg_before = _snapshot(out), (out / "config.json").read_text() if case.base else None
    argv = case.argv(world, tmp_path, out)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"rc {rc}:\n{err}"
    line = _error_line(err, argv[0])
    for text in case.expect:
        assert text in line, f"{text!r} not in: {line}"
    assert _snapshot(out) == before, "the checkpoints changed"
    if case.base:
        assert config_differences(json.loads(cfg_before), json.loads((out / "config.json").read_text())) == []
        assert not (out / "checkpoints.corrupt").exists()


def test_corpus_has_at_least_twenty_cases():
    assert len(CASES) >= 20


# orbax/tensorstore may leave a callback for its closed event loop after reading the damaged step
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back_with_a_warning_and_continues_exactly(world, base_run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    corrupt_steps(out, (2,))
    with caplog.at_level("WARNING", logger="safejax"):
        assert main(["sft", f"out_dir={out}", *sft_args(world)]) == 0
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "checkpoint step 2" in warned and "unreadable" in warned and "step 1" in warned
    assert (out / "metrics.jsonl").read_bytes() == base_run[1]  # resumed from step 1: same floats
    assert [p.name.split("-")[0] for p in (out / "checkpoints.corrupt").iterdir()] == ["2"]


def test_skip_nonfinite_skips_the_poisoned_step_counts_it_and_finishes(world, base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    assert main(["sft", f"out_dir={out}", *sft_args(world), "train.inject_nan_step=3",
                 "train.skip_nonfinite=true"]) == 0
    recs = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r}
    assert recs[3]["train/nonfinite_skipped"] == 1.0 and recs[3]["train/loss"] == "nan"
    assert recs[4]["train/nonfinite_skipped"] == 0.0 and recs[4]["train/nonfinite_skipped_total"] == 1
    assert np.isfinite(recs[4]["train/loss"])
    full = {r["step"]: r for r in map(json.loads, base_run[1].decode().splitlines())}
    assert recs[2]["train/loss"] == full[2]["train/loss"]  # the resumed part before the poison is unchanged


def test_nan_in_ppo_lag_costs_stops_naming_the_step_and_quantity(world, tmp_path, capsys):
    out = tmp_path / "ppo"
    rc = main(["ppo-lag", f"out_dir={out}", *ppo_args(world, **{"train.save_every": 1, "train.inject_nan_step": 2})])
    err = capsys.readouterr().err
    assert rc == 2
    line = _error_line(err, "ppo-lag")
    assert "step 2: 'train/actor_loss' is nan" in line and "train/lambda" in line
    from safejax.checkpoint import Checkpointer

    with Checkpointer(out / "checkpoints", read_only=True) as ck:
        assert ck.all_steps() == [1]  # the good step 1 only
