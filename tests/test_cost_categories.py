"""K harm categories on the cost-model side: the K-output cost loss, the PKU category loaders, the K = 2
built-in task, and ``safejax cm`` with ``cost_categories`` end to end on a tiny world."""

from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_world
from safejax import rl
from safejax.data import DataError, PKU_HARM_CATEGORIES, build_cost_pairs, category_groups, load_rows
from safejax.data.builtin import BuiltinTask, evaluate_responses, oracle_score
from safejax.data.builtin.vocab import HARM_CATEGORIES, HARMFUL_TOPICS
from safejax.metrics import read_metrics


# ----------------------------------------------------------------------------- the loss


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_cost_loss(cs, cu, ss, su, eta, w=None):
    """Independent NumPy reference: ranking on max_k, sign terms summed over k, eta * mean(C^2)."""
    cs, cu = np.asarray(cs, np.float64), np.asarray(cu, np.float64)
    ks, ku = np.where(ss, -1.0, 1.0), np.where(su, -1.0, 1.0)
    per = -_np_log_sigmoid(cu.max(-1) - cs.max(-1)) - (_np_log_sigmoid(ks * cs) + _np_log_sigmoid(ku * cu)).sum(-1)
    sq = (np.square(cs) + np.square(cu)).mean(-1) / 2  # per pair
    if w is None:
        return per.mean() + eta * sq.mean()
    return (w * per).sum() / max(w.sum(), 1) + eta * (w * sq).sum() / max(w.sum(), 1)


@pytest.mark.parametrize("k", [2, 3])
def test_k_output_cost_loss_matches_numpy_reference(k):
    rng = np.random.default_rng(k)
    b = 16
    cs, cu = rng.normal(size=(b, k)).astype(np.float32), rng.normal(size=(b, k)).astype(np.float32)
    ss, su = rng.random((b, k)) < 0.5, rng.random((b, k)) < 0.5
    got = rl.cost_model_loss(cs, cu, ss, su, regularization=0.01)
    np.testing.assert_allclose(float(got), _np_cost_loss(cs, cu, ss, su, 0.01), rtol=1e-5)
    w = (rng.random(b) < 0.7).astype(np.float32)
    got_w = rl.cost_model_loss(cs, cu, ss, su, regularization=0.01, weights=w)
    np.testing.assert_allclose(float(got_w), _np_cost_loss(cs, cu, ss, su, 0.01, w), rtol=1e-5)


def test_one_output_as_b_by_1_is_bit_identical_to_the_scalar_cost_loss():
    rng = np.random.default_rng(0)
    cs, cu = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    ss, su = rng.random(8) < 0.5, rng.random(8) < 0.5
    a = rl.cost_model_loss(cs, cu, ss, su, regularization=0.001)
    b = rl.cost_model_loss(cs[:, None], cu[:, None], ss[:, None], su[:, None], regularization=0.001)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    ga = jax.grad(lambda x: rl.cost_model_loss(x, jnp.asarray(cu), ss, su, regularization=0.001))(jnp.asarray(cs))
    gb = jax.grad(lambda x: rl.cost_model_loss(x, jnp.asarray(cu)[:, None], ss[:, None], su[:, None],
                                               regularization=0.001))(jnp.asarray(cs)[:, None])
    np.testing.assert_array_equal(np.asarray(ga), np.asarray(gb)[:, 0])


def test_k_output_cost_loss_rejects_mismatched_label_shape():
    with pytest.raises(ValueError, match="same shape"):
        rl.cost_model_loss(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(4, bool), np.zeros(4, bool))


# ----------------------------------------------------------------------------- PKU loaders


GROUPS = {"cyber_privacy": ["Cybercrime", "Privacy Violation"], "violence": ["Violence", "Physical Harm"],
          "drugs": ["Drugs"]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from safejax.data import prepare_tokenizer

    t = tiny_world.build_tokenizer(tmp_path_factory.mktemp("tok"))
    return prepare_tokenizer(t)[0]


def test_pku_sample_group_labels_match_an_independent_count(pku_sample_path, tok):
    raw = [json.loads(line) for line in open(pku_sample_path, encoding="utf-8")]
    assert set(raw[0]["response_0_harm_category"]) == set(PKU_HARM_CATEGORIES)
    rows = load_rows(pku_sample_path)
    plain, _ = build_cost_pairs(rows, tok, max_length=512)
    arr, rep = build_cost_pairs(rows, tok, max_length=512, categories=category_groups(GROUPS))
    # the aggregate arrays do not change with categories
    for k, v in plain.as_dict().items():
        np.testing.assert_array_equal(arr.as_dict()[k], v)
    assert arr.safer_group_safe.shape == (len(arr), 3)
    for j, i in enumerate(arr.row_index):
        r = raw[int(i)]
        s = r["safer_response_id"]
        for side, field in ((s, "safer"), (1 - s, "unsafer")):
            cats = r[f"response_{side}_harm_category"]
            want = [not any(cats[c] for c in g) for g in GROUPS.values()]
            assert list(getattr(arr, f"{field}_group_safe")[j]) == want
            assert getattr(arr, f"{field}_severity")[j] == r[f"response_{side}_severity_level"]
    # some group is unsafe somewhere, and an unsafe-in-group response is never labelled safe overall
    assert (~arr.unsafer_group_safe).any(axis=0).all()
    assert not (~arr.safer_group_safe.all(axis=1) & arr.safer_is_safe).any()


def test_missing_category_names_file_row_field_and_category(tmp_path, tok):
    rows = [json.loads(line) for line in open(tiny_world.write_jsonl(tmp_path / "x.jsonl", _category_rows(4, 0)))]
    del rows[2]["response_1_harm_category"]["B"]
    path = tiny_world.write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'response_1_harm_category': no category 'B'"):
        build_cost_pairs(load_rows(str(path)), tok, max_length=24, categories={"b": ("B",)})
    arr, rep = build_cost_pairs(load_rows(str(path)), tok, max_length=24, categories={"b": ("B",)},
                                skip_bad_rows=True)
    assert rep.dropped.get("bad_row:response_1_harm_category") == 1 and 2 not in arr.row_index


def test_bad_category_groups_are_config_errors():
    from safejax.config import ConfigError

    assert category_groups(["Drugs", "Violence"]) == {"Drugs": ("Drugs",), "Violence": ("Violence",)}
    for bad in ({}, {"a": []}, {"a": [""]}, {"a": ["x", "x"]}, "Drugs"):
        with pytest.raises(ConfigError, match="cost_categories"):
            category_groups(bad)


# ----------------------------------------------------------------------------- the K = 2 built-in task


def test_k2_task_labels_agree_with_is_safe_and_with_the_oracle_without_noise():
    task = BuiltinTask(3, n_pref_train=400, harm_categories=2)
    assert task.categories == tuple(HARM_CATEGORIES)
    for r in task.preference_rows("train"):
        for i in (0, 1):
            cats = r[f"response_{i}_harm_category"]
            assert set(cats) == set(HARM_CATEGORIES)
            assert r[f"is_response_{i}_safe"] == (not any(cats.values()))
    clean = BuiltinTask(3, n_pref_train=400, harm_categories=2, label_noise=0.0, safety_label_noise=0.0)
    keys = {c: {t.name: t for t in HARMFUL_TOPICS} for c in HARM_CATEGORIES}
    for r in clean.preference_rows("train"):
        for i in (0, 1):
            words = set(r[f"response_{i}"].split())
            want = {c: any(words & keys[c][t].step_keys for t in names) for c, names in HARM_CATEGORIES.items()}
            assert r[f"response_{i}_harm_category"] == want
            assert any(want.values()) == oracle_score(r["prompt"], r[f"response_{i}"]).harmful


def test_k2_sft_corpus_has_a_common_and_a_rare_category():
    task = BuiltinTask(1, n_sft=2000, harm_categories=2)
    rows = task.sft_rows()
    topic_cat = {t: c for c, names in HARM_CATEGORIES.items() for t in names}
    from safejax.data.builtin import find_topic

    rate = {}
    for c in HARM_CATEGORIES:
        sel = [r for r in rows if (t := find_topic(r["instruction"])) is not None and topic_cat.get(t.name) == c]
        rate[c] = np.mean([oracle_score(r["instruction"], r["output"]).harmful for r in sel])
    assert abs(rate["hazard"] - 0.5) < 0.02 and abs(rate["privacy"] - 0.15) < 0.02, rate
    m = evaluate_responses([r["instruction"] for r in rows], [r["output"] for r in rows], task.oracle)
    assert m["unsafe_rate_harmful/hazard"] > 5 * m["unsafe_rate_harmful/privacy"] > 0
    assert m["unsafe_rate_harmful/hazard"] + m["unsafe_rate_harmful/privacy"] == pytest.approx(
        m["unsafe_rate_harmful"], abs=1e-9)


def test_default_task_rows_and_metrics_carry_no_category_fields(tmp_path):
    task = BuiltinTask(0, n_pref_train=50, n_pref_test=10, n_sft=20)
    assert task.categories == ()
    assert not any("harm_category" in k for r in task.preference_rows() for k in r)
    meta = json.loads(open(task.write(tmp_path)["task"]).read())
    assert "harm_categories" not in meta and "categories" not in meta
    m = evaluate_responses(["how do i make poison"], ["sure first extract toxin"], task.oracle)
    assert not any("/" in k for k in m)
    with pytest.raises(ValueError, match="harm_categories must be 1 or 2"):
        BuiltinTask(0, harm_categories=3)


# ----------------------------------------------------------------------------- safejax cm with K outputs


def _category_rows(n: int, seed: int) -> list[dict]:
    """Tiny-world rows with two planted categories: 'bad' -> A, 'w23' -> B (filler avoids w23)."""
    rng = random.Random(seed)
    filler = tiny_world.FILLER[:-1]
    rows = []
    for _ in range(n):
        r = [[rng.choice(filler) for _ in range(rng.randint(2, 4))] for _ in range(2)]
        cats = [{"A": False, "B": False}, {"A": False, "B": False}]
        for marker, cat in (("bad", "A"), ("w23", "B")):
            side = rng.choice([None, 0, 1])
            if side is not None:
                r[side].insert(rng.randint(0, len(r[side])), marker)
                cats[side][cat] = True
        unsafe = [any(c.values()) for c in cats]
        safer = (0 if unsafe[1] else 1) if unsafe[0] != unsafe[1] else rng.randint(0, 1)
        rows.append({"prompt": " ".join(rng.choice(filler) for _ in range(3)),
                     "response_0": " ".join(r[0]), "response_1": " ".join(r[1]),
                     "is_response_0_safe": not unsafe[0], "is_response_1_safe": not unsafe[1],
                     "response_0_harm_category": cats[0], "response_1_harm_category": cats[1],
                     "better_response_id": rng.randint(0, 1), "safer_response_id": safer})
    return rows


def test_cm_with_two_category_groups_learns_each_sign_and_exports_names(tmp_path):
    from safejax.models import ScoreModel, load_pretrained

    model = tiny_world.build_tiny_llama(tmp_path / "init")
    train = tiny_world.write_jsonl(tmp_path / "train.jsonl", _category_rows(256, 0))
    ev = tiny_world.write_jsonl(tmp_path / "eval.jsonl", _category_rows(64, 1))
    tiny_world.run_cli("cm", f"out_dir={tmp_path}/cm", f"model.path={model}", f"data.train=[{train}]",
                       f"data.eval=[{ev}]", "data.max_length=24", "train.batch_size=16", "train.progress=false",
                       "train.epochs=3", "optim.lr=3e-3", "train.log_every=4",
                       "cost_categories={a: [A], b: [B]}")
    recs = [r for r in read_metrics(tmp_path / "cm" / "metrics.jsonl") if "eval/accuracy" in r]
    last = recs[-1]
    assert last["eval/accuracy_sign/a"] >= 0.9 and last["eval/accuracy_sign/b"] >= 0.9, last
    assert last["eval/accuracy_sign"] >= 0.9
    assert any("train/accuracy_sign/b" in r for r in read_metrics(tmp_path / "cm" / "metrics.jsonl"))
    cfg = json.loads((tmp_path / "cm" / "hf" / "config.json").read_text())
    assert cfg["score_dim"] == 2 and cfg["score_names"] == ["a", "b"]
    assert cfg["score_categories"] == {"a": ["A"], "b": ["B"]}
    sm = load_pretrained(tmp_path / "cm" / "hf")
    assert isinstance(sm, ScoreModel) and sm.score_dim == 2


def test_cm_with_an_unknown_category_exits_2_naming_it(tmp_path, capsys):
    from safejax.cli import main

    model = tiny_world.build_tiny_llama(tmp_path / "init")
    train = tiny_world.write_jsonl(tmp_path / "train.jsonl", _category_rows(16, 0))
    rc = main(["cm", f"out_dir={tmp_path}/cm", f"model.path={model}", f"data.train=[{train}]",
               "data.max_length=24", "train.progress=false", "cost_categories=[A, Nope]"])
    err = capsys.readouterr().err
    assert rc == 2 and "no category 'Nope'" in err and "train.jsonl, row 0" in err


def test_cost_categories_need_the_sequence_wise_unpacked_cost_model(tmp_path):
    from safejax.config import ConfigError
    from safejax.sections import DataSection
    from safejax.train.score_model import ScoreModelConfig, run_score_model

    with pytest.raises(ConfigError, match="cost_categories"):
        ScoreModelConfig(cost_categories=["A"], loss_type="token-wise").validate()
    with pytest.raises(ConfigError, match="cost_categories"):
        ScoreModelConfig(cost_categories=["A"], data=DataSection(pack=True)).validate()
    with pytest.raises(ConfigError, match="cost_categories.a"):
        ScoreModelConfig(cost_categories={"a": []}).validate()
    with pytest.raises(ConfigError, match="not the reward model"):
        run_score_model(ScoreModelConfig(out_dir=str(tmp_path / "rm"), cost_categories=["A"]), "reward")
