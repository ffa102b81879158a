"""``safejax dpo`` (dpo | safe_dpo | bfpo): the stage's wiring against NumPy, the label transform, resume, bad input.

The rl losses themselves are checked against NumPy in test_rl_dpo.py; here the stage's jitted train step (log-prob
sums over each pair's response window, masks, the precomputed reference sums, the SafeDPO label transform, the BFPO
safety labels) is compared with a NumPy implementation on a tiny Llama batch.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import optax
import pytest

import tiny_world
from safejax.cli import main
from safejax.data import build_reward_pairs
from safejax.data.dpo_pairs import BOTH_UNSAFE, build_dpo_pairs
from safejax.generation import positions_from_mask
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax import parallel
from safejax.parallel import MeshConfig, make_mesh
from safejax.sections import ModelSection
from safejax.train.common import TrainState, split_micro
from safejax.train.dpo import DPOSection, add_reference_logps, dpo_loss_fn, logp_sums_fn
from safejax.train.fit import MICRO_AXES, _batch_shardings, make_train_step
from safejax.train.state import build_state, spread, trainable


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_world")
    paths = tiny_world.make_world(root)
    paths["root"] = root
    return paths


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_window_sums(lm, ids_c, mask_c, ids_r, mask_r, bug):
    """NumPy: per-token log-probs of each side, summed from the first divergent token to the sequence's end."""
    out = []
    for ids, mask in ((ids_c, mask_c), (ids_r, mask_r)):
        logits = np.asarray(lm(ids, attention_mask=mask, positions=positions_from_mask(mask)), np.float64)
        lp = np.take_along_axis(_np_log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1)[..., 0]
        sums = []
        for i in range(len(ids)):
            d = int(np.argmax(ids_c[i] != ids_r[i]))
            end = int(np.nonzero(mask[i])[0].max())
            lo, hi = (d, end) if bug else (d - 1, end - 1)  # token t is scored by shifted position t - 1
            sums.append(lp[i, lo:hi + 1].sum())
        out.append(np.asarray(sums))
    return out


def _np_loss(sec: DPOSection, h, cs, rs):
    beta = sec.scale_coeff
    if sec.loss == "dpo":
        return np.mean(np.log1p(np.exp(-beta * h)))
    if sec.loss == "safe_dpo":
        return np.mean(np.log1p(np.exp(-(beta * h - sec.safety_margin * (cs != rs)))))
    b3 = 1.0 / (sec.bfpo_b1 - 1.0)
    target = (sec.bfpo_b1 * b3 * cs - b3 * rs - sec.bfpo_alpha) / beta
    return np.mean((h - target) ** 2)


@pytest.mark.parametrize("sec", [DPOSection("dpo", scale_coeff=0.5), DPOSection("dpo", reference_window_bug=True),
                                 DPOSection("safe_dpo", scale_coeff=0.3, safety_margin=0.7),
                                 DPOSection("bfpo", scale_coeff=0.2, bfpo_b1=2.5, bfpo_alpha=0.3)],
                         ids=["dpo", "dpo-window-bug", "safe_dpo-margin", "bfpo"])
def test_each_loss_through_the_jitted_train_step_equals_numpy(world, sec):
    tok = load_tokenizer_for(ModelSection(path=str(world["model"])))
    mesh = make_mesh(MeshConfig())
    mdef, ref_params = split_model(load_model_for(str(world["model"]), mesh, model_type="causal_lm", tokenizer=tok))
    leaves, tree = jax.tree.flatten(ref_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    policy = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    arrays, _ = build_dpo_pairs(tiny_world.planted_rows(40, 7), tok, loss=sec.loss, max_length=24)
    arrays = {k: v[:8] for k, v in arrays.items()}
    arrays = add_reference_logps(logp_sums_fn(mdef, sec, mesh), ref_params, arrays, 8, mesh)

    ids_c, ids_r = arrays["chosen_ids"], arrays["rejected_ids"]
    pc, pr = _np_window_sums(mdef.merge(policy), ids_c, arrays["chosen_mask"], ids_r, arrays["rejected_mask"],
                             sec.reference_window_bug)
    rc, rr = _np_window_sums(mdef.merge(ref_params), ids_c, arrays["chosen_mask"], ids_r, arrays["rejected_mask"],
                             sec.reference_window_bug)

    tx = optax.sgd(1e-3)  # the step donates the state (and with it the policy's buffers)
    state, state_sh = build_state(TrainState, mesh, 0, **spread(trainable(policy, mdef.shardings(mesh), tx, mesh)))
    example = split_micro(arrays, 1)
    step = make_train_step(dpo_loss_fn(mdef, sec), tx, lambda s: 1e-3, state_sh, _batch_shardings(example, mesh, parallel.LOGICAL_AXIS_RULES))
    _, metrics = step(state, parallel.host_local_to_global(example, mesh, axes=MICRO_AXES))
    np.testing.assert_allclose(arrays["ref_chosen_logp"], rc, rtol=1e-5, atol=1e-4)
    h = (pc - rc) - (pr - rr)
    assert np.abs(h).max() > 1e-3  # the perturbed policy differs from the reference
    cs = arrays.get("chosen_is_safe", np.zeros(8, bool)).astype(np.float64)
    rs = arrays.get("rejected_is_safe", np.zeros(8, bool)).astype(np.float64)
    np.testing.assert_allclose(float(metrics["loss"]), _np_loss(sec, h, cs, rs), rtol=2e-4, atol=1e-5)
    rb, rw = sec.scale_coeff * (pc - rc), sec.scale_coeff * (pr - rr)
    np.testing.assert_allclose(float(metrics["reward_margin"]), np.mean(rb - rw), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), np.mean(rb > rw), atol=1e-6)


def _row(better, s0, s1, r0="w1 w2", r1="w3 w4"):
    return {"prompt": "w5 w6", "response_0": r0, "response_1": r1, "is_response_0_safe": s0,
            "is_response_1_safe": s1, "better_response_id": better, "safer_response_id": 0 if s0 else 1}


def test_safe_dpo_keeps_swaps_and_drops_pairs_like_the_numpy_transform(world):
    tok = load_tokenizer_for(ModelSection(path=str(world["model"])))
    rows = [_row(0, True, False), _row(0, False, True), _row(1, False, False), _row(1, True, True)]
    rows += tiny_world.planted_rows(60, 3)
    better = np.asarray([r["better_response_id"] for r in rows])
    s = np.asarray([[r["is_response_0_safe"], r["is_response_1_safe"]] for r in rows])
    w_safe, l_safe = s[np.arange(len(rows)), better], s[np.arange(len(rows)), 1 - better]
    keep = w_safe | l_safe
    chosen = np.where(w_safe, better, 1 - better)
    assert list(chosen[:4]) == [0, 1, 0, 1] and list(keep[:4]) == [True, True, False, True]
    arrays, report = build_dpo_pairs(rows, tok, loss="safe_dpo", max_length=24, source_name="rows")
    assert report.dropped[BOTH_UNSAFE] == int((~keep).sum()) and report.kept == int(keep.sum())
    # the same pairs as reward pairs whose better response is the transform's chosen one
    moved = [dict(r, better_response_id=int(c)) for r, c, k in zip(rows, chosen, keep) if k]
    ref, _ = build_reward_pairs(moved, tok, max_length=24)
    np.testing.assert_array_equal(arrays["chosen_ids"], ref.better_ids)
    np.testing.assert_array_equal(arrays["rejected_ids"], ref.worse_ids)
    np.testing.assert_array_equal(arrays["chosen_is_safe"], s[np.arange(len(rows)), chosen][keep])
    np.testing.assert_array_equal(arrays["rejected_is_safe"], s[np.arange(len(rows)), 1 - chosen][keep])
    plain, rep = build_dpo_pairs(rows, tok, loss="bfpo", max_length=24)  # bfpo: chosen = better, nothing dropped
    assert rep.kept == len(rows) and list(plain["chosen_is_safe"][:4]) == [True, False, False, True]


def _dpo_args(world, out, *extra):
    return ["dpo", f"out_dir={out}", f"model.path={world['model']}", f"data.train=[{world['pref_train']}]",
            "data.max_length=24", "train.batch_size=16", "train.progress=false", "optim.lr=1e-3", *extra]


def test_zero_pairs_left_is_a_named_error_and_both_unsafe_pairs_are_counted(world, tmp_path, capsys):
    path = tiny_world.write_jsonl(tmp_path / "unsafe.jsonl", [_row(i % 2, False, False) for i in range(20)])
    rc = main(_dpo_args(world, tmp_path / "run", "dpo.loss=safe_dpo") + [f"data.train=[{path}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "unsafe.jsonl" in err[0] and "no preference pair left" in err[0] and f"{BOTH_UNSAFE}=20" in err[0]
    assert not (tmp_path / "run").exists()


def test_bad_dpo_loss_and_missing_safety_field_are_named(world, tmp_path, capsys):
    assert main(_dpo_args(world, tmp_path / "a", "dpo.loss=ipo")) == 2
    assert "dpo.loss" in capsys.readouterr().err
    path = tiny_world.write_jsonl(tmp_path / "nosafe.jsonl", [{k: v for k, v in _row(0, True, False).items()
                                                               if k != "is_response_1_safe"}] * 4)
    assert main(_dpo_args(world, tmp_path / "b", "dpo.loss=bfpo") + [f"data.train=[{path}]"]) == 2
    err = capsys.readouterr().err
    assert "nosafe.jsonl" in err and "is_response_1_safe" in err


@pytest.mark.parametrize("loss", ["safe_dpo"])
def test_dpo_resumes_bit_exactly_and_exports_an_hf_folder(world, tmp_path, loss):
    run = tmp_path / "run"
    args = _dpo_args(world, run, f"dpo.loss={loss}", "dpo.safety_margin=0.5", "train.max_steps=4",
                     "train.save_every=1", "train.keep_checkpoints=10", "train.log_every=1")
    assert main(args) == 0
    full = (run / "metrics.jsonl").read_bytes()
    weights = (run / "hf" / "model.safetensors").read_bytes()
    assert b"train/reward_accuracy" in full and (run / "step_memory.json").exists()
    for s in (3, 4):
        shutil.rmtree(run / "checkpoints" / str(s))
    shutil.rmtree(run / "hf")
    assert main(args) == 0
    assert (run / "metrics.jsonl").read_bytes() == full
    assert (run / "hf" / "model.safetensors").read_bytes() == weights


def test_demo_algorithms_unknown_name_fails_before_anything_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--algorithms", "dpo,nope", "progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "safe_dpo" in err[0]
    assert not (tmp_path / "demo").exists()


def test_demo_algorithm_runner_trains_from_the_demo_sft_policy_on_its_preference_rows(world, tmp_path):
    from types import SimpleNamespace

    from safejax.demo_algorithms import ALGORITHMS, DemoBase
    from safejax.demo import DemoConfig
    from safejax.sections import LoopSection

    cfg = DemoConfig(max_length=24, batch_size=16, progress=False)
    ws = SimpleNamespace(out=tmp_path, seed=0, cfg=cfg, paths={"preference_train": world["pref_train"]},
                         loop=lambda epochs, bs: LoopSection(epochs=epochs, batch_size=bs, max_steps=2, progress=False))
    hf = ALGORITHMS["bfpo"](ws, DemoBase(world["model"], {}, 0.0))
    assert hf == tmp_path / "bfpo" / "hf" and (hf / "model.safetensors").exists()
    snap = (tmp_path / "bfpo" / "config.json").read_text()
    assert '"loss": "bfpo"' in snap and str(world["pref_train"]) in snap
