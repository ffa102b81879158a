"""Packed training rows (safejax.data.packing): several examples per row with segment ids.  Packing moves an
example inside a row and nothing else: per-example SFT losses, the batch loss, and the RM/CM end scores and pair
losses equal the unpacked batch's (fp32), and the rows hold more real tokens."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safejax import rl
from safejax.config import ConfigError
from safejax.data.packing import first_fit_decreasing, pack_pairs, pack_supervised, useful_token_fraction
from safejax.generation import positions_from_mask
from safejax.models import CausalLM, ModelConfig, ScoreModel
from safejax.parallel import MeshConfig, make_mesh, use_mesh
from safejax.models.functional import split_model
from safejax.train.score_model import ScoreModelConfig, pair_scores, packed_pair_ends, score_loss_fn
from safejax.train.sft import sft_loss_fn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "bench"))
from packing_fraction import fractions, train_tokenizer  # noqa: E402

VOCAB, L = 37, 24


def _model(cls):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, initializer_range=0.3)
    with use_mesh(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])):
        return split_model(cls(cfg, rngs=nnx.Rngs(0)))


def _right_padded(lengths, seed):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), L), np.int32)
    mask = np.zeros((len(lengths), L), bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, VOCAB, n)
        ids[i, 0] = 1  # BOS
        mask[i, :n] = True
    return ids, mask


def _supervised(n=11, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, L + 1, n)
    ids, mask = _right_padded(lengths, seed)
    prompt = rng.integers(2, 4, n)
    label = mask & (np.arange(L)[None, :] >= prompt[:, None])
    return {"input_ids": ids, "attention_mask": mask, "label_mask": label}


def test_first_fit_decreasing_fills_rows_without_overflow_and_keeps_every_item():
    lengths = np.array([9, 3, 7, 5, 5, 1, 8, 2])
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 10 for b in bins)
    assert len(bins) == int(np.ceil(lengths.sum() / 10))  # 40 tokens in 4 rows of 10: a perfect fit here
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing(np.array([11]), 10)


def test_packed_supervised_rows_reproduce_every_example_with_restarting_positions():
    d = _supervised()
    p = pack_supervised(d)
    assert len(p["input_ids"]) < len(d["input_ids"])
    assert useful_token_fraction(p["attention_mask"]) > useful_token_fraction(d["attention_mask"])
    assert p["attention_mask"].sum() == d["attention_mask"].sum()
    got = []
    for r in range(len(p["input_ids"])):
        for s in range(1, p["segment_ids"][r].max() + 1):
            cols = p["segment_ids"][r] == s
            np.testing.assert_array_equal(p["positions"][r, cols], np.arange(cols.sum()))
            got.append((tuple(p["input_ids"][r, cols]), tuple(p["label_mask"][r, cols])))
    n = d["attention_mask"].sum(1)
    want = [(tuple(d["input_ids"][i, :n[i]]), tuple(d["label_mask"][i, :n[i]])) for i in range(len(n))]
    assert sorted(got) == sorted(want)


def test_packed_sft_batch_gives_the_same_per_example_losses_and_batch_loss():
    mdef, params = _model(CausalLM)
    d = _supervised()
    p = pack_supervised(d)
    lm = mdef.merge(params)

    def token_lp(b, packed):
        pos = b["positions"] if packed else positions_from_mask(b["attention_mask"])
        logits = lm(b["input_ids"], attention_mask=b["attention_mask"], positions=pos,
                    segment_ids=b["segment_ids"] if packed else None)
        return np.asarray(rl.log_probs_from_logits(logits[:, :-1], b["input_ids"][:, 1:]))

    ref, got = token_lp(d, False), token_lp(p, True)
    n = d["attention_mask"].sum(1)
    want = {tuple(d["input_ids"][i, :n[i]]): ref[i, :n[i] - 1][d["label_mask"][i, 1:n[i]]].sum()
            for i in range(len(n))}
    for r in range(len(p["input_ids"])):
        for s in range(1, p["segment_ids"][r].max() + 1):
            cols = np.flatnonzero(p["segment_ids"][r] == s)
            key = tuple(p["input_ids"][r, cols])
            lab = p["label_mask"][r, cols[1:]]
            np.testing.assert_allclose(got[r, cols[:-1]][lab].sum(), want[key], rtol=1e-5, atol=1e-5)
    loss = sft_loss_fn(mdef)
    np.testing.assert_allclose(float(loss(params, p, None)[0]), float(loss(params, d, None)[0]), rtol=1e-6)


def _pairs(kind, n=9, seed=1):
    rng = np.random.default_rng(seed)
    a, b = ("better", "worse") if kind == "reward" else ("safer", "unsafer")
    ia, ma = _right_padded(rng.integers(3, L + 1, n), seed)
    ib, mb = _right_padded(rng.integers(3, L + 1, n), seed + 7)
    d = {f"{a}_ids": ia, f"{a}_mask": ma, f"{b}_ids": ib, f"{b}_mask": mb}
    if kind == "cost":
        d["safer_is_safe"] = rng.random(n) < 0.6
        d["unsafer_is_safe"] = rng.random(n) < 0.3
    return d, a, b


@pytest.mark.parametrize("kind", ["reward", "cost"])
def test_packed_pairs_give_the_same_end_scores_and_pair_loss(kind):
    mdef, params = _model(ScoreModel)
    d, a, b = _pairs(kind)
    p = pack_pairs(d, a, b, ("safer_is_safe", "unsafer_is_safe") if kind == "cost" else ())
    assert p["input_ids"].shape[1] == 2 * L and len(p["input_ids"]) < len(d[f"{a}_ids"])
    assert p["pair_valid"].sum() == len(d[f"{a}_ids"]) and not p["pair_valid"].all()  # some empty slots
    sm = mdef.merge(params)
    _, _, ea, eb = (np.asarray(x) for x in pair_scores(sm, d, kind))
    pa, pb, valid = (np.asarray(x) for x in packed_pair_ends(sm, p, kind))
    # match packed slots to pairs by their token content
    n = d[f"{a}_mask"].sum(1)
    index = {tuple(d[f"{a}_ids"][i, :n[i]]): i for i in range(len(n))}
    ends = p[f"{a}_end"].reshape(-1)
    rows = np.repeat(np.arange(len(p["input_ids"])), p[f"{a}_end"].shape[1])
    seen = []
    for j in np.flatnonzero(valid):
        r, e = rows[j], ends[j]
        seg = p["segment_ids"][r] == p["segment_ids"][r, e]
        i = index[tuple(p["input_ids"][r, seg])]
        seen.append(i)
        np.testing.assert_allclose([pa[j], pb[j]], [ea[i], eb[i]], rtol=1e-5, atol=1e-5)
        if kind == "cost":
            assert p["safer_is_safe"].reshape(-1)[j] == d["safer_is_safe"][i]
    assert sorted(seen) == list(range(len(n)))
    fn = score_loss_fn(mdef, kind, "sequence-wise", 0.01)
    (lp, mp), (lu, mu) = fn(params, p, None), fn(params, d, None)
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
    for k in mu:
        np.testing.assert_allclose(float(mp[k]), float(mu[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_packing_needs_the_sequence_wise_score_loss():
    cfg = ScoreModelConfig(loss_type="token-wise")
    cfg.data.pack = True
    with pytest.raises(ConfigError, match="data.pack"):
        cfg.validate()


def test_segment_ids_are_refused_with_a_kv_cache():
    from safejax.models import init_cache

    mdef, params = _model(CausalLM)
    lm = mdef.merge(params)
    ids = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        lm(ids, attention_mask=jnp.ones((1, 5), bool), cache=init_cache(lm.config, 1, 5), cache_index=0,
           segment_ids=jnp.ones((1, 3), jnp.int32))


def test_pair_losses_with_zero_weights_ignore_those_pairs():
    hi, lo = jnp.array([1.0, -0.5, 3.0]), jnp.array([0.2, 0.4, -7.0])
    safe_a, safe_b = jnp.array([True, False, True]), jnp.array([False, False, True])
    w = jnp.array([1.0, 1.0, 0.0])
    np.testing.assert_allclose(rl.reward_model_loss(hi, lo, regularization=0.1, weights=w),
                               rl.reward_model_loss(hi[:2], lo[:2], regularization=0.1), rtol=1e-6)
    np.testing.assert_allclose(rl.cost_model_loss(hi, lo, safe_a, safe_b, regularization=0.1, weights=w),
                               rl.cost_model_loss(hi[:2], lo[:2], safe_a[:2], safe_b[:2], regularization=0.1),
                               rtol=1e-6)


def test_packing_the_pku_sample_keeps_every_token_and_removes_most_padding(pku_sample_path):
    """The real PKU-SafeRLHF sample at max_length 512 (tokenizer: experiments/bench/packing_fraction.py's BPE):
    packed rows hold every real token of the padded ones, and nearly no padding."""
    with open(pku_sample_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tok, chars_per_token = train_tokenizer(rows, 2500)
    assert 3.0 < chars_per_token < 5.0
    out = fractions(rows, tok, 512)
    for kind, (n, padded, packed_rows, packed) in out.items():
        width = 512 if kind == "sft" else 1024
        padded_rows = n if kind == "sft" else 2 * n
        assert packed > 0.9 > padded, kind
        # same number of real tokens in both layouts
        assert round(packed * packed_rows * width) == round(padded * padded_rows * 512), kind
