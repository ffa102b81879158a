"""``safejax eval score | prefs | arena | elo`` end to end from the CLI.

Part 1 runs on tiny random HF checkpoint folders (tests/tiny_world.py: random tiny Llamas as policies, the same
backbone with random score heads as reward / cost models) on the 8-device CPU mesh, and checks every number of
``summary.json`` against the per-answer JSONL (recomputed with numpy) and the scores against an independent
``transformers`` forward pass.

Part 2 (slow) trains three tiny policies on the built-in task with different behaviour on harmful prompts, plus a
reward model and a cost model, and checks the evaluation against the task's oracle: the cost model's harmless
ratio and the Elo ratings order the policies as the oracle does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import tiny_world
from safejax.cli import main


_cli = tiny_world.run_cli


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _is_png(path) -> bool:
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- tiny world fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three random tiny policies (a, b, c) and random-head reward / cost models, all on one tokenizer."""
    from safejax.data import load_tokenizer
    from safejax.models import load_pretrained, save_pretrained

    root = tmp_path_factory.mktemp("evalworld")
    paths = tiny_world.make_world(root)
    paths["a"] = paths["model"]
    for name, seed in (("b", 1), ("c", 2)):
        paths[name] = tiny_world.build_tiny_llama(root / name, seed=seed)
    tok = load_tokenizer(paths["a"])
    for name, seed in (("rm", 11), ("cm", 12)):
        save_pretrained(load_pretrained(paths["a"], model_type="score", seed=seed), root / name, tokenizer=tok)
        paths[name] = root / name
    paths["root"] = root
    return paths


def _gen_args(world, **extra) -> list[str]:
    args = {"reward_model": world["rm"], "cost_model": world["cm"], "prompts": f"[{world['prompts']}]",
            "prompt_width": 16, "sampling.max_new_tokens": 8, "batch_size": 16, "progress": "false",
            "max_prompts": 40}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def score_run(world):
    out = world["root"] / "score"
    _cli("eval", "score", f"out_dir={out}", f"policy=a={world['a']}", f"policies=[b={world['b']}]", *_gen_args(world))
    return out


# ----------------------------------------------------------------------------- score


def test_score_writes_outputs_and_summary_matches_answers_jsonl(score_run):
    summary = json.loads((score_run / "summary.json").read_text())
    rows = _read_jsonl(score_run / "answers.jsonl")
    for f in ("config.yaml", "report.md", "hist_a.png", "hist_b.png", "scatter.png"):
        assert (score_run / f).exists(), f
    assert all(_is_png(score_run / f) for f in ("hist_a.png", "hist_b.png", "scatter.png"))
    assert summary["n_prompts"] == 40
    assert len(rows) == 80 and {r["policy"] for r in rows} == {"a", "b"}
    for name in ("a", "b"):
        mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["prompt_id"])
        assert [r["prompt_id"] for r in mine] == list(range(40))
        r = np.array([x["reward"] for x in mine], np.float64)
        c = np.array([x["cost"] for x in mine], np.float64)
        s = summary["policies"][name]
        assert s["n"] == 40
        np.testing.assert_allclose([s["reward_mean"], s["reward_std"], s["cost_mean"], s["cost_std"]],
                                   [r.mean(), r.std(), c.mean(), c.std()], rtol=1e-12)
        assert s["n_harmless"] == int(np.sum(c <= 0)) and s["harmless_ratio"] == np.mean(c <= 0)
        assert all(x["safe"] == (x["cost"] <= 0) for x in mine)
        assert s["eos_rate"] == np.mean([x["ended"] for x in mine])
        assert 1 <= min(x["response_tokens"] for x in mine) and max(x["response_tokens"] for x in mine) <= 8
        assert s["score_input"] == {"reward": "ids", "cost": "ids"}
    # both policies answered the same prompts; two random models (sampled with the same key) answer differently
    a = {r["prompt_id"]: r for r in rows if r["policy"] == "a"}
    b = {r["prompt_id"]: r for r in rows if r["policy"] == "b"}
    assert all(a[i]["prompt"] == b[i]["prompt"] for i in range(40))
    assert sum(a[i]["answer"] != b[i]["answer"] for i in range(40)) >= 5
    report = (score_run / "report.md").read_text()
    assert "| a | 40 |" in report and "![scatter](scatter.png)" in report


def _torch_end_score(folder, ids: list[int]) -> float:
    """Independent end score: transformers LlamaModel backbone + the saved score head, on one unpadded sequence."""
    import torch
    from safetensors.numpy import load_file
    from transformers import LlamaModel

    model = LlamaModel.from_pretrained(folder).eval()
    head = load_file(str(Path(folder) / "model.safetensors"))
    with torch.no_grad():
        h = model(torch.tensor([ids])).last_hidden_state[0, -1].double().numpy()
    return float(h @ head["score_head.weight"][0].astype(np.float64) + head["score_head.bias"][0])


def test_scores_match_transformers_and_text_rescoring(world, score_run):
    """ids-path scores (left-padded generated sequences) == text-path scores (re-tokenized, right-padded) ==
    a transformers forward pass on the unpadded sequence, for answers that survive decode -> encode."""
    from safejax.data import format_prompt, load_tokenizer

    out = world["root"] / "score_text"
    _cli("eval", "score", f"out_dir={out}", f"policy=a={world['a']}", *_gen_args(world, score_input="text"))
    ids_rows = [r for r in _read_jsonl(score_run / "answers.jsonl") if r["policy"] == "a"]
    text_rows = _read_jsonl(out / "answers.jsonl")
    assert json.loads((out / "summary.json").read_text())["policies"]["a"]["score_input"]["reward"] == "text"
    assert [r["answer"] for r in ids_rows] == [r["answer"] for r in text_rows]  # same seed, same samples
    tok = load_tokenizer(world["a"])
    checked = 0
    for ri, rt in zip(ids_rows, text_rows):
        n_answer = len(tok(ri["answer"], add_special_tokens=False)["input_ids"]) if ri["answer"] else 0
        if n_answer + int(ri["ended"]) != ri["response_tokens"]:
            continue  # the answer held special tokens that decoding skipped: the two paths see different tokens
        np.testing.assert_allclose(rt["reward"], ri["reward"], atol=2e-5)
        np.testing.assert_allclose(rt["cost"], ri["cost"], atol=2e-5)
        if checked < 3:
            text = format_prompt(ri["prompt"], tok.eos_token) + ri["answer"] + (tok.eos_token if ri["ended"] else "")
            ids = tok(text)["input_ids"]
            np.testing.assert_allclose(_torch_end_score(world["rm"], ids), ri["reward"], atol=1e-4)
            np.testing.assert_allclose(_torch_end_score(world["cm"], ids), ri["cost"], atol=1e-4)
        checked += 1
    assert checked >= 10


def test_sharded_mesh_gives_the_same_answers_and_scores_as_one_device(world, tmp_path):
    common = _gen_args(world, **{"sampling.greedy": "true", "max_prompts": 16})
    _cli("eval", "score", f"out_dir={tmp_path}/one", f"policy=a={world['a']}", "mesh.data=1", "mesh.fsdp=1",
         "mesh.tensor=1", *common)
    _cli("eval", "score", f"out_dir={tmp_path}/many", f"policy=a={world['a']}", "mesh.data=2", "mesh.fsdp=2",
         "mesh.tensor=2", *common)
    one, many = _read_jsonl(tmp_path / "one" / "answers.jsonl"), _read_jsonl(tmp_path / "many" / "answers.jsonl")
    assert [r["answer"] for r in one] == [r["answer"] for r in many]
    np.testing.assert_allclose([r["reward"] for r in one], [r["reward"] for r in many], atol=1e-5)
    np.testing.assert_allclose([r["cost"] for r in one], [r["cost"] for r in many], atol=1e-5)


def test_score_model_with_another_vocabulary_is_scored_from_text(world, tmp_path):
    """A cost model whose tokenizer orders the vocabulary differently cannot read the policy's ids: auto mode
    re-tokenizes the answers with the cost model's own tokenizer."""
    import shutil

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    cm2 = tmp_path / "cm_other_vocab"
    shutil.copytree(world["cm"], cm2)
    words = tiny_world.SPECIALS + tiny_world.TEMPLATE_WORDS + ["good", "bad"] + tiny_world.FILLER[::-1]
    t = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                               pre_tokenizers.Punctuation(behavior="isolated")])
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tiny_world.SPECIALS])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(str(cm2))
    out = tmp_path / "out"
    _cli("eval", "score", f"out_dir={out}", f"policy=a={world['a']}", *_gen_args(world, cost_model=cm2))
    s = json.loads((out / "summary.json").read_text())["policies"]["a"]
    assert s["score_input"] == {"reward": "ids", "cost": "text"}
    # forcing ids with a mismatching vocabulary is refused with a clear message
    rc = main(["eval", "score", f"out_dir={out}2", f"policy={world['a']}", *_gen_args(world, cost_model=cm2,
                                                                                     score_input="ids")])
    assert rc == 2


# ----------------------------------------------------------------------------- arena


def test_arena_counts_and_win_table_match_answers_jsonl(world):
    out = world["root"] / "arena"
    config = world["root"] / "arena.yaml"  # a config file plus key=value overrides, as a user would run it
    config.write_text(f"red: a={world['a']}\nblue: b={world['b']}\nsampling:\n  max_new_tokens: 4\n")
    # (overrides before --config: safejax/cli.py's argparse does not yet accept them after it for `eval <what>`)
    _cli("eval", "arena", f"out_dir={out}", *_gen_args(world), "--config", config)
    s = json.loads((out / "summary.json").read_text())
    rows = _read_jsonl(out / "answers.jsonl")
    red = {r["prompt_id"]: r for r in rows if r["policy"] == "a"}
    blue = {r["prompt_id"]: r for r in rows if r["policy"] == "b"}
    ar = s["arena"]
    n = ar["n"]
    assert n == 40 and s["red"] == "a" and s["blue"] == "b"
    better = np.array([blue[i]["reward"] > red[i]["reward"] for i in range(n)])
    b_safe = np.array([blue[i]["cost"] <= 0 for i in range(n)])
    r_safe = np.array([red[i]["cost"] <= 0 for i in range(n)])
    assert ar["better_safe"] == int(np.sum(better & b_safe))
    assert ar["better_unsafe"] == int(np.sum(better & ~b_safe))
    assert ar["worse_safe"] == int(np.sum(~better & b_safe))
    assert ar["worse_unsafe"] == int(np.sum(~better & ~b_safe))
    assert ar["better_safe"] + ar["better_unsafe"] + ar["worse_safe"] + ar["worse_unsafe"] == n
    np.testing.assert_allclose(ar["red_reward_mean"], np.mean([red[i]["reward"] for i in range(n)]), rtol=1e-12)
    np.testing.assert_allclose(ar["blue_cost_mean"], np.mean([blue[i]["cost"] for i in range(n)]), rtol=1e-12)
    for rl, rm in (("safe", r_safe), ("unsafe", ~r_safe)):
        for bl, bm in (("safe", b_safe), ("unsafe", ~b_safe)):
            cell = ar["cells"][f"red_{rl}/blue_{bl}"]
            m = rm & bm
            assert cell["count"] == int(m.sum()) and cell["blue_wins"] == int((better & m).sum())
            if m.sum():
                assert cell["win_rate"] == pytest.approx((better & m).sum() / m.sum())
            else:
                assert cell["win_rate"] is None  # NaN is written as null (strict JSON)
    report = (out / "report.md").read_text()
    assert "a (red)" in report and "b (blue)" in report and "b win rate" in report


# ----------------------------------------------------------------------------- elo


def test_elo_from_models_and_from_cached_verdicts_agree(world):
    out = world["root"] / "elo"
    pol = f"policies=[a={world['a']},b={world['b']},c={world['c']}]"
    _cli("eval", "elo", f"out_dir={out}", pol, "anchor=b", "n_boot=40", *_gen_args(world))
    s = json.loads((out / "summary.json").read_text())
    rows = _read_jsonl(out / "answers.jsonl")
    verdicts = _read_jsonl(out / "verdicts.jsonl")
    assert _is_png(out / "elo.png") and s["anchor"] == "b" and s["models"] == ["a", "b", "c"]
    assert s["n_judgements"] == {"helpfulness": 120, "harmlessness": 120}  # 40 prompts x 3 pairs
    score = {(r["policy"], r["prompt_id"]): r for r in rows}
    for v in verdicts:
        key = "reward" if v["axis"] == "helpfulness" else "cost"
        sa, sb = score[(v["model_a"], v["prompt_id"])][key], score[(v["model_b"], v["prompt_id"])][key]
        if key == "cost":
            sa, sb = -sa, -sb
        assert v["winner"] == ("tie" if sa == sb else "a" if sa > sb else "b")
    for axis in ("helpfulness", "harmlessness"):
        r = s["ratings"][axis]
        assert r["b"] == {"rating": 1000.0, "low": 1000.0, "high": 1000.0, "vs_anchor": 0.0}
        for m in ("a", "c"):
            assert r[m]["low"] <= r[m]["rating"] <= r[m]["high"]
    # the same verdicts read back as a cached judge file give the same ratings and intervals
    out2 = world["root"] / "elo_file"
    _cli("eval", "elo", f"out_dir={out2}", f"judge=file:{out / 'verdicts.jsonl'}", "anchor=b", "n_boot=40",
         "progress=false")
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["ratings"] == s["ratings"]
    assert not (out2 / "answers.jsonl").exists() and (out2 / "elo.png").exists()


def test_elo_python_judge_function_replaces_one_axis(world, tmp_path):
    """A pluggable judge (here: the longer answer is more helpful) drives the helpfulness axis; the cost model
    still judges harmlessness."""
    from safejax.config import load_config
    from safejax.evaluate.cli import EloEvalConfig, evaluate_elo

    seen = []

    def longer_wins(prompt_id, model_a, answer_a, model_b, answer_b):
        seen.append(prompt_id)
        la, lb = len(answer_a["answer"]), len(answer_b["answer"])
        return "tie" if la == lb else ("a" if la > lb else "b")

    cfg = load_config(EloEvalConfig, None, [f"out_dir={tmp_path}", f"policies=[a={world['a']},b={world['b']}]",
                                            "n_boot=20", *_gen_args(world, max_prompts=16)])
    s = evaluate_elo(cfg, judges={"helpfulness": longer_wins})
    assert sorted(seen) == list(range(16))
    rows = {(r["policy"], r["prompt_id"]): r for r in _read_jsonl(tmp_path / "answers.jsonl")}
    for v in _read_jsonl(tmp_path / "verdicts.jsonl"):
        la = len(rows[(v["model_a"], v["prompt_id"])]["answer"])
        lb = len(rows[(v["model_b"], v["prompt_id"])]["answer"])
        ca = rows[(v["model_a"], v["prompt_id"])]["cost"]
        cb = rows[(v["model_b"], v["prompt_id"])]["cost"]
        if v["axis"] == "helpfulness":
            assert v["winner"] == ("tie" if la == lb else "a" if la > lb else "b")
        else:
            assert v["winner"] == ("tie" if ca == cb else "a" if ca < cb else "b")
    assert s["n_judgements"] == {"helpfulness": 16, "harmlessness": 16}


def test_elo_cached_verdicts_folder_with_one_axis(tmp_path):
    from safejax.evaluate import Judgement, write_judgements

    rng = np.random.default_rng(0)
    js = []
    for p in range(60):  # x beats y 80% of the time
        js.append(Judgement("x", "y", "a" if rng.random() < 0.8 else "b", prompt_id=p))
    folder = tmp_path / "verdicts"
    folder.mkdir()
    write_judgements(folder / "harmlessness.jsonl", js)
    _cli("eval", "elo", f"out_dir={tmp_path}/out", f"judge=file:{folder}", "anchor=y", "n_boot=50", "progress=false")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(s["ratings"]) == ["harmlessness"]
    wins = sum(j.winner == "a" for j in js)
    expected = 1000 + 400 * np.log10(wins / (60 - wins))  # the two-model MLE, up to the tiny ridge
    assert s["ratings"]["harmlessness"]["x"]["rating"] == pytest.approx(expected, abs=2.0)
    assert "harmlessness Elo" in (tmp_path / "out" / "report.md").read_text()


def test_bad_verdict_line_is_named(tmp_path, capsys):
    f = tmp_path / "v.jsonl"
    f.write_text('{"axis": "helpfulness", "model_a": "x", "model_b": "y", "winner": "a"}\n'
                 '{"axis": "honesty", "model_a": "x", "model_b": "y", "winner": "a"}\n')
    rc = main(["eval", "elo", f"out_dir={tmp_path}/o", f"judge=file:{f}", "progress=false"])
    assert rc == 2
    assert f"{f}:2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- prefs


def test_prefs_table_counts_match_scores_jsonl(world):
    out = world["root"] / "prefs"
    _cli("eval", "prefs", f"out_dir={out}", f"reward_model={world['rm']}", f"cost_model={world['cm']}",
         f"data=[{world['pref_eval']}]", "max_length=24", "batch_size=16", "progress=false", "column=v1")
    s = json.loads((out / "summary.json").read_text())
    rows = _read_jsonl(out / "scores.jsonl")
    assert len(rows) == 64 and [r["row"] for r in rows] == list(range(64))
    better = np.array([r["reward_better"] for r in rows])
    worse = np.array([r["reward_worse"] for r in rows])
    safer = np.array([r["cost_safer"] for r in rows])
    unsafer = np.array([r["cost_unsafer"] for r in rows])
    labels = np.array([r["safer_is_safe"] for r in rows] + [r["unsafer_is_safe"] for r in rows])
    costs = np.concatenate([safer, unsafer])
    t = s["table"]
    assert t["rm_ranking"] == {"accuracy": np.mean(better > worse), "correct": int(np.sum(better > worse)),
                               "total": 64}
    assert t["cm_ranking"]["correct"] == int(np.sum(unsafer > safer)) and t["cm_ranking"]["total"] == 64
    sign_ok = np.where(labels, costs < 0, costs > 0)
    assert t["cm_sign"]["correct"] == int(sign_ok.sum()) and t["cm_sign"]["total"] == 128
    assert t["cm_sign"]["unsafe_total"] == int((~labels).sum())
    # rows carry the dataset's prompt, and the labels agree with the planted 'bad' token
    src = _read_jsonl(world["pref_eval"])
    assert [r["prompt"] for r in rows] == [x["prompt"] for x in src]
    # an independent forward pass on one response
    from safejax.data import format_prompt, load_tokenizer

    tok = load_tokenizer(world["rm"])
    x = src[0]
    resp = x[f"response_{x['better_response_id']}"]
    ids = tok(format_prompt(x["prompt"], tok.eos_token) + resp + tok.eos_token)["input_ids"]
    np.testing.assert_allclose(_torch_end_score(world["rm"], ids), rows[0]["reward_better"], atol=1e-4)
    report = (out / "report.md").read_text()
    assert "| model | metric | v1 |" in report and f"({t['cm_sign']['correct']}/128)" in report
    assert _is_png(out / "reward_hist.png") and _is_png(out / "cost_hist.png")


def test_real_pku_sample_prompts_and_preference_rows(world, tmp_path, pku_sample_path):
    """The real PKU-SafeRLHF schema through a registered name with a local path (tiny models: plumbing only)."""
    spec = f"PKU-SafeRLHF/test:1:{pku_sample_path}"
    _cli("eval", "score", f"out_dir={tmp_path}/score", f"policy={world['a']}",
         *_gen_args(world, prompts=f"[{spec}]", prompt_width=48, max_prompts=16, keep_fields="[prompt_source]"))
    rows = _read_jsonl(tmp_path / "score" / "answers.jsonl")
    src = _read_jsonl(pku_sample_path)
    assert len(rows) == 16 and all(r["prompt_source"] for r in rows)
    assert {r["prompt"] for r in rows} <= {x["prompt"] for x in src}
    _cli("eval", "prefs", f"out_dir={tmp_path}/prefs", f"cost_model={world['cm']}", f"data=[{spec}]",
         "max_length=64", "batch_size=16", "progress=false")
    s = json.loads((tmp_path / "prefs" / "summary.json").read_text())
    t = s["table"]
    assert "rm_ranking" not in t and t["cm_sign"]["total"] == 2 * t["cm_ranking"]["total"]
    n_conflict = sum(1 for x in src if x[f"is_response_{x['safer_response_id']}_safe"] is False
                     and x[f"is_response_{1 - x['safer_response_id']}_safe"] is True)
    assert t["cm_ranking"]["total"] <= len(src) - n_conflict
    unsafe = sum(1 for x in src for k in (0, 1) if not x[f"is_response_{k}_safe"])
    assert t["cm_sign"]["unsafe_total"] <= unsafe


@pytest.mark.parametrize("what", ["score", "prefs", "arena", "elo"])
def test_example_configs_load_and_validate(what):
    from safejax.config import load_config
    from safejax.evaluate.cli import CONFIGS

    configs = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    for folder, out_root, dtype in ((configs, "/mnt/runs/eval", "bfloat16"), (configs / "tiny", "runs/tiny/eval",
                                                                             "float32")):
        cfg = load_config(CONFIGS[what], folder / f"eval_{what}.yaml")
        assert cfg.out_dir == f"{out_root}/{what}" and cfg.dtype == dtype
        # every model it reads is the out_dir of a stage config of the same folder (the layout they write)
        stage_dirs = {yaml.safe_load(p.read_text())["out_dir"] for p in folder.glob("*.yaml")
                      if not p.stem.startswith("eval_")}
        models = [cfg.reward_model, cfg.cost_model]
        if what != "prefs":
            models += [path for _, path in cfg.named_policies()]
            assert len(cfg.named_policies()) >= 1
        assert models and set(models) <= stage_dirs, (folder, set(models) - stage_dirs)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, drop, needle", [
    (["batch_size=12"], None, "batch_size"),           # not a multiple of the 8-device data x fsdp axes
    ([], "cost_model", "cost_model"),                   # required
    (["score_input=tokens"], None, "score_input"),
    (["prompt_widht=16"], None, "prompt_width"),        # typo: the closest key is suggested
])
def test_bad_config_fails_with_named_key(world, tmp_path, capsys, args, drop, needle):
    common = [a for a in _gen_args(world) if not (drop and a.startswith(drop + "="))]
    rc = main(["eval", "score", f"out_dir={tmp_path}/o", f"policy={world['a']}", *common, *args])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_offline_default_prompt_set_explains_local_use(world, tmp_path, capsys):
    args = [a for a in _gen_args(world) if not a.startswith("prompts=")]
    rc = main(["eval", "score", f"out_dir={tmp_path}/o", f"policy={world['a']}", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert "PKU-SafeRLHF/test" in err and "local path" in err


def test_missing_policy_folder_is_named(world, tmp_path, capsys):
    rc = main(["eval", "arena", f"out_dir={tmp_path}/o", f"red={world['a']}", f"blue=b={tmp_path}/nope",
               *_gen_args(world)])
    assert rc == 2
    assert f"{tmp_path}/nope" in capsys.readouterr().err


# ----------------------------------------------------------------------------- built-in task vs oracle (slow)


# Behaviour on harmful prompts (benign prompts: always the helpful answer). The oracle ranks them
# reckless > mixed > cautious on helpfulness and the reverse on harmlessness.
POLICY_MIX = {
    "reckless": {"harmful": {"hazard": 1.0}, "benign": {"help": 1.0}},
    "mixed": {"harmful": {"hazard": 0.5, "help": 0.5}, "benign": {"help": 1.0}},
    "cautious": {"harmful": {"help": 0.3, "refuse": 0.7}, "benign": {"help": 1.0}},
}


def _order(values: dict[str, float], reverse: bool = True) -> list[str]:
    return sorted(values, key=values.get, reverse=reverse)


@pytest.mark.slow
def test_builtin_task_cost_model_and_elo_order_policies_like_the_oracle(tmp_path):
    from flax import nnx

    from safejax.data import load_tokenizer, prepare_tokenizer
    from safejax.data.builtin import BuiltinTask, evaluate_responses, generate_sft_rows, tiny_llama_config
    from safejax.models import CausalLM, ModelConfig, save_pretrained

    task = BuiltinTask(0, n_pref_train=3000, n_pref_test=256, n_sft=10)
    paths = task.write(tmp_path / "data")
    tok, _ = prepare_tokenizer(load_tokenizer(paths["tokenizer"]))
    hf = dict(tiny_llama_config(len(tok)), architectures=["LlamaForCausalLM"], model_type="llama")
    with nnx.use_eager_sharding(False):
        save_pretrained(CausalLM(ModelConfig.from_hf_dict(hf), rngs=nnx.Rngs(0)), tmp_path / "init", tokenizer=tok)
    one = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
    train = [*one, "train.progress=false", "train.batch_size=32", "data.max_length=34", "train.log_every=50"]
    for name, mix in POLICY_MIX.items():  # ~280 SFT steps each
        rows = tiny_world.write_jsonl(tmp_path / "sft" / f"{name}.jsonl", generate_sft_rows(3000, seed=0,
                                                                                          mode_mix=mix))
        _cli("sft", f"out_dir={tmp_path}/{name}", f"model.path={tmp_path}/init", f"data.train=[{rows}]",
             "train.epochs=3", "optim.lr=3e-3", *train)
    for stage in ("rm", "cm"):  # ~90 steps each
        _cli(stage, f"out_dir={tmp_path}/{stage}", f"model.path={tmp_path}/init",
             f"data.train=[{paths['preference_train']}]", "train.epochs=1", "optim.lr=1e-3", *train)

    gen = [f"reward_model={tmp_path}/rm/hf", f"cost_model={tmp_path}/cm/hf", f"prompts=[{paths['prompts_eval']}]",
           "prompt_width=18", "sampling.max_new_tokens=16", "batch_size=32", "progress=false", *one]
    policies = ",".join(f"{n}={tmp_path}/{n}/hf" for n in POLICY_MIX)
    _cli("eval", "elo", f"out_dir={tmp_path}/elo", f"policies=[{policies}]", "anchor=reckless", "n_boot=100", *gen)
    s = json.loads((tmp_path / "elo" / "summary.json").read_text())
    rows = _read_jsonl(tmp_path / "elo" / "answers.jsonl")
    assert s["policies"]["reckless"]["n"] > 250  # the whole held-out prompt pool

    oracle = {}
    for name in POLICY_MIX:
        mine = [r for r in rows if r["policy"] == name]
        oracle[name] = evaluate_responses([{"prompt": r["prompt"], "kind": r["kind"]} for r in mine],
                                          [r["answer"] for r in mine])
    help_o = {n: o["helpfulness"] for n, o in oracle.items()}
    harmless_o = {n: 1.0 - o["unsafe_rate"] for n, o in oracle.items()}
    harmfulness_o = {n: o["harmfulness"] for n, o in oracle.items()}
    # the policies really differ (the setup works): clear gaps on both oracle axes
    order_help = _order(help_o)
    order_safe = _order(harmless_o)
    assert all(help_o[a] - help_o[b] > 0.15 for a, b in zip(order_help, order_help[1:])), help_o
    assert all(harmless_o[a] - harmless_o[b] > 0.1 for a, b in zip(order_safe, order_safe[1:])), harmless_o
    assert _order(harmfulness_o, reverse=False) == order_safe

    # 1. harmless ratio (cost <= 0) by the trained cost model agrees in direction with the oracle's
    harmless_cm = {n: s["policies"][n]["harmless_ratio"] for n in POLICY_MIX}
    assert _order(harmless_cm) == order_safe, (harmless_cm, harmless_o)
    # 2. Elo (helpfulness judged by the RM, harmlessness by the CM) orders the policies like the oracle's means
    elo_help = {n: v["rating"] for n, v in s["ratings"]["helpfulness"].items()}
    elo_harm = {n: v["rating"] for n, v in s["ratings"]["harmlessness"].items()}
    assert _order(elo_help) == order_help, (elo_help, help_o)
    assert _order(elo_harm) == order_safe, (elo_harm, harmless_o)
    # the extremes are separated beyond their bootstrap intervals
    best, worst = order_safe[0], order_safe[-1]
    assert s["ratings"]["harmlessness"][best]["low"] > s["ratings"]["harmlessness"][worst]["high"]

    # 3. Table 1 on the held-out preference split: sign accuracy above ranking accuracy (SAFE_RLHF.md §7.2)
    _cli("eval", "prefs", f"out_dir={tmp_path}/prefs", f"cost_model={tmp_path}/cm/hf",
         f"reward_model={tmp_path}/rm/hf", f"data=[{paths['preference_test']}]", "max_length=34", "batch_size=32",
         "progress=false", *one)
    t = json.loads((tmp_path / "prefs" / "summary.json").read_text())["table"]
    assert t["cm_sign"]["accuracy"] > t["cm_ranking"]["accuracy"] > 0.6
    assert t["rm_ranking"]["accuracy"] > 0.6
