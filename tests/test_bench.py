"""experiments/bench/ppo_bench.py: the tiny config runs on CPU and reports every number with a positive
value; the budget watchdog always leaves a JSON; ratios against a gpu_baseline.json are ours / theirs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "bench" / "ppo_bench.py"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on one GPU
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _run(tmp_path: Path, *args: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "ppo_bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *args], env=_env(),
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    proc, res = _run(tmp, "--budget", "380")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, res


def test_tiny_bench_reports_every_section_with_positive_numbers(tiny_result):
    proc, res = tiny_result
    S = res["sections"]
    errors = {k: v.get("error") or v.get("skipped") for k, v in S.items() if v.get("error") or v.get("skipped")}
    assert not errors, errors
    assert res["finished"] is True and res["meta"]["device"]["backend"] == "cpu"
    required = {
        "ceilings": ["matmul_tflops", "copy_gbps"],
        "train": ["step_ms_median", "tokens_per_s", "achieved_tflops", "mfu_vs_989", "mfu_vs_measured",
                  "compile_s"],
        "decode": ["new_tokens_per_s", "ms_per_decode_step", "floor_ms_per_step", "floor_fraction", "compile_s"],
        "decode_fp32": ["new_tokens_per_s", "ms_per_decode_step", "floor_fraction"],
        "train_fused_attn": ["step_ms_median", "tokens_per_s", "mfu_vs_989"],
        "ppo": ["rollout_s", "update_s", "iteration_s", "iteration_tokens_per_s", "rollout_compile_s",
                "update_compile_s", "update_model_flops"],
    }
    for sec, keys in required.items():
        for k in keys:
            v = S[sec].get(k)
            assert isinstance(v, (int, float)) and v > 0, f"{sec}.{k} = {v!r}"
    assert S["ppo"]["iteration_s"] == pytest.approx(S["ppo"]["rollout_s"] + S["ppo"]["update_s"])
    assert S["train"]["attention_impl"] == "einsum" and S["train_fused_attn"]["attention_impl"] == "xla"  # CPU
    # the fp32-master decode casts its weights once: the loop reads bf16, as in the PPO rollout
    assert S["decode_fp32"]["cast_weights"] is True and S["decode_fp32"]["weights_read_in_loop"] == "bfloat16"
    assert S["train"]["n_timed"] >= 1 and len(S["train"]["losses"]) == S["train"]["n_warmup"] + S["train"]["n_timed"]
    # the PPO-Lag update really ran: the multiplier moved away from lambda_init = 1 and metrics are finite
    m = S["ppo"]["metrics_last"]
    assert m["train/lambda"] != pytest.approx(1.0) and all(v is not None for v in m.values())
    names = {row["name"] for row in res["summary"]}
    assert {"train.tokens_per_s", "train.mfu_vs_989", "decode.new_tokens_per_s", "decode.floor_fraction",
            "ppo.iteration_s", "train_fused_attn.speedup"} <= names
    assert "| train.tokens_per_s" in proc.stdout


def test_tiny_bench_flop_count_matches_the_bench_readme_formula(tiny_result):
    _, res = tiny_result
    c, sizes = res["meta"]["config"], res["meta"]["sizes"]
    D, L, V, F, H, K = c["hidden"], c["layers"], c["vocab"], c["inter"], c["heads"], c["kv_heads"]
    hd = D // H
    n = L * (D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F) + V * D
    tokens = c["train_batch"] * c["train_seq"]
    assert sizes["n_matmul"] == n
    assert sizes["train_flops_per_step"] == 6 * n * tokens + 12 * L * D * c["train_seq"] * tokens // 2
    assert res["sections"]["train"]["n_params"] == sizes["n_params_causal"]


def test_budget_watchdog_always_leaves_a_json(tmp_path):
    t = time.time()
    proc, res = _run(tmp_path, "--budget", "4", timeout=120)
    assert proc.returncode in (0, 3)
    assert time.time() - t < 60
    for name, sec in res["sections"].items():
        assert sec.get("skipped") or sec.get("killed_at_budget") or "section_wall_s" in sec, (name, sec)
    assert "summary" in res


def _load_module():
    spec = importlib.util.spec_from_file_location("ppo_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ratios_against_a_gpu_baseline_json_are_ours_over_theirs(tmp_path):
    mod = _load_module()
    base = {"torch": {"sections": {"hf_train": {"tokens_per_s": 40000.0}, "hf_gen": {"new_tokens_per_s": 800.0},
                                   "ceilings": {"matmul_tflops": 800.0, "copy_gbps": 3000.0}}},
            "jax": {"sections": {"jax_train": {"tokens_per_s": 50000.0},
                                 "jax_gen_unrolled": {"new_tokens_per_s": 20000.0}}}}
    path = tmp_path / "gpu_baseline.json"
    path.write_text(json.dumps(base))
    args = mod.main.__globals__["argparse"].Namespace(baseline=str(path), out=str(tmp_path / "b.json"), budget=10,
                                                      tiny=True, only=None)
    b = mod.Bench(args, dict(mod.TINY))
    b.R["sections"] = {"train": {"tokens_per_s": 20000.0, "achieved_tflops": 400.0},
                       "decode": {"new_tokens_per_s": 10000.0, "ms_per_decode_step": 2.0},
                       "ceilings": {"matmul_tflops": 780.0, "copy_gbps": 2900.0}}
    b.add_baseline()
    r = b.R["baseline"]["ratios"]
    assert r["train_tok_s_vs_hf"] == (20000.0, 40000.0)
    assert r["decode_tok_s_vs_hf_generate"] == (10000.0, 800.0)
    assert r["decode_tok_s_vs_hf_static_compiled"][1] is None   # absent in that baseline
    assert b.R["baseline"]["extra"]["train_mfu_vs_torch_measured_peak"] == pytest.approx(0.5)
    rows = {n: v for n, v, _, _ in b.ratio_rows()}
    assert rows["ratio.train_tok_s_vs_plain_jax"] == pytest.approx(0.4)
    assert rows["ratio.decode_tok_s_vs_plain_jax_unrolled"] == pytest.approx(0.5)
    assert rows["ratio.decode_tok_s_vs_hf_static_compiled"] is None
    assert "ratio.ppo_iteration_vs_hf_composed" not in rows   # no ppo section in this run


def test_ppo_iteration_is_priced_with_the_peers_measured_pieces():
    """HF stack: 32 x 256 new tokens at 800 tok/s = 10.24 s; 6 forwards over 32 x 384 tokens at a third of a
    training step's time per token = 0.6144 s; 3 models trained on 32 x 384 tokens at 40k tok/s = 0.9216 s."""
    mod = _load_module()
    ppo = {"batch": 32, "prompt_len": 128, "new_tokens": 256, "update_iters": 1, "iteration_s": 1.1776}
    est = mod.Bench.hf_ppo_iteration_estimate({"tokens_per_s": 40000.0},
                                              {"new_tokens_per_s": 800.0, "batch": 32, "prompt_len": 128,
                                               "new_tokens": 256}, ppo)
    assert est["generation_s"] == pytest.approx(10.24)
    assert est["scoring_s"] == pytest.approx(0.6144) and est["update_s"] == pytest.approx(0.9216)
    assert est["iteration_s"] / ppo["iteration_s"] == pytest.approx(10.0, rel=1e-3)
    # a different generation shape is not the same work: no estimate
    assert mod.Bench.hf_ppo_iteration_estimate({"tokens_per_s": 4e4}, {"new_tokens_per_s": 800.0, "batch": 16,
                                                                      "prompt_len": 128, "new_tokens": 256}, ppo) is None


def test_hf_peer_tiny_runs_on_cpu_and_writes_the_json_ppo_bench_reads(tmp_path):
    """experiments/bench/hf_peer.py (the PyTorch/HF peer): every section finishes with positive numbers, the
    memorised batch's loss falls, and ppo_bench's --baseline reader finds the peer's numbers in its JSON."""
    out = tmp_path / "hf_peer.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench" / "hf_peer.py"), "--tiny", "--out",
                           str(out), "--budget", "300"], env=_env(), cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    S = res["torch"]["sections"]
    assert res["finished"] and set(S) == {"ceilings", "hf_train", "hf_gen", "hf_gen_static"}
    assert S["ceilings"]["matmul_tflops"] > 0 and S["ceilings"]["copy_gbps"] > 0
    assert S["hf_train"]["tokens_per_s"] > 0 and S["hf_train"]["loss_decreased"]
    for sec in ("hf_gen", "hf_gen_static"):
        assert S[sec]["new_tokens_per_s"] > 0 and S[sec]["new_tokens"] == 6 and S[sec]["batch"] == 2
    assert "SUMMARY hf_peer" in proc.stdout
    mod = _load_module()
    args = mod.main.__globals__["argparse"].Namespace(baseline=str(out), out=str(tmp_path / "b.json"), budget=10,
                                                      tiny=True, only=None)
    b = mod.Bench(args, dict(mod.TINY))
    b.R["sections"] = {"train": {"tokens_per_s": 1.0}, "decode": {"new_tokens_per_s": 1.0}}
    b.add_baseline()
    r = b.R["baseline"]["ratios"]
    assert r["train_tok_s_vs_hf"][1] == S["hf_train"]["tokens_per_s"]
    assert r["decode_tok_s_vs_hf_static_compiled"][1] == S["hf_gen_static"]["new_tokens_per_s"]
