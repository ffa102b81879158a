#!/usr/bin/env python3
"""compiler_accounting.py - what XLA says the compiled PPO programs cost, against what the model needs.

For each model shape (TinyLlama-1.1B and LLaMA-7B) the script lowers and compiles, from abstract inputs
(``jax.ShapeDtypeStruct``; no weight or activation is allocated), the programs of one PPO-Lagrangian iteration
and reads ``compiled.cost_analysis()``:

  decode     one step of the rollout's decode loop (``safejax.generation.decode_step``): 32 rows, cache of
             128 + 256 slots, bf16 weights -> bytes accessed against the floor (every bf16 weight read once
             but the input embedding table, of which only 32 rows are gathered, plus the KV cache read: all
             384 slots, which the step's attention reads, and at the mean context 128 + 128).  Two CPU
             artefacts are reported separately: XLA's cost model counts a gather as reading its whole operand
             (the embedding table), and the CPU backend has no bf16 dot, so it converts every bf16 weight to
             fp32 before each matmul (about 5x the bf16 bytes; a GPU reads bf16 directly).  The same step in
             fp32 (no conversion) against the fp32 floor is the program's structural overhead.
  prefill    the rollout's prefill, 32 rows x 128 prompt tokens, against ``2 N 32 128`` (LM head: last position
             only): 32 prompts, and 8 prompts x ``num_return_sequences=4`` (one prefill per prompt)
  scoring    the six forwards of the rollout (actor and reference log-probs, reward and cost end scores,
             reward and cost critic values) over 32 x 384 tokens -> FLOPs against ``2 N tokens`` (N = matmul
             parameters of that model: blocks + LM head or score head)
  update     one actor micro-batch gradient of the PPO-Lag loss and one critic micro-batch gradient, 8 x 384
             tokens, without and with per-layer rematerialisation -> FLOPs against ``6 N tokens``

Compiling a 7B program on two CPU cores takes minutes, so every program is compiled with ``--layers-a`` and
``--layers-b`` decoder layers (default 2 and 4) and extended linearly to the full depth:
``cost(L) = cost(a) + (L - a) (cost(b) - cost(a)) / (b - a)`` (the unrolled blocks are identical, so the
per-layer cost is the difference).  ``--full`` compiles the full depth instead (TinyLlama: a few minutes).

Usage (CPU):
    python experiments/bench/compiler_accounting.py                 # both shapes, prints a markdown table
    python experiments/bench/compiler_accounting.py --shape tinyllama-1.1b --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from safejax import rl  # noqa: E402
from safejax.generation import SamplingConfig, decode_step, prefill  # noqa: E402
from safejax.models import CausalLM, ModelConfig, ScoreModel  # noqa: E402
from safejax.parallel import MeshConfig, make_mesh, use_mesh  # noqa: E402
from safejax.models.functional import split_model  # noqa: E402
from safejax.train.ppo import _end_scores, _token_log_probs, _values  # noqa: E402

SHAPES = {
    "tinyllama-1.1b": dict(vocab=32000, hidden=2048, layers=22, heads=32, kv_heads=4, inter=5632),
    "llama-7b": dict(vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=32, inter=11008),
}
ROLLOUT_ROWS, PROMPT, NEW, MICRO = 32, 128, 256, 8


def model_config(s: dict, layers: int, *, param_dtype: str, remat: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_layers=layers, num_heads=s["heads"], num_kv_heads=s["kv_heads"],
                       max_position_embeddings=2048, dtype="bfloat16", param_dtype=param_dtype, remat=remat)


def abstract_model(cls, cfg: ModelConfig):
    """``(ModelDef, abstract params)``: nothing allocated."""
    with use_mesh(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])):
        mdef, params = split_model(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    return mdef, jax.tree.map(lambda x: sds(x.shape, x.dtype), params)


def sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def cost(fn, *args, donate=()) -> dict:
    """``{"flops", "bytes"}`` of ``jax.jit(fn, donate_argnums=donate)`` compiled for abstract ``args``."""
    ca = jax.jit(fn, donate_argnums=donate).lower(*args).compile().cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
        ca = ca[0]
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}


# ----------------------------------------------------------------------------- the programs


def decode_cost(s: dict, layers: int, dtype: str = "bfloat16") -> dict:
    cfg = model_config(s, layers, param_dtype=dtype)
    if dtype == "float32":
        cfg = dataclasses.replace(cfg, dtype="float32")
    mdef, params = abstract_model(CausalLM, cfg)
    sc = SamplingConfig(max_new_tokens=NEW, temperature=1.0)
    ids, mask = sds((ROLLOUT_ROWS, PROMPT), jnp.int32), sds((ROLLOUT_ROWS, PROMPT), jnp.bool_)
    state = jax.eval_shape(lambda p, i, m: prefill(mdef.merge(p), i, m, sc, pad_token_id=0), params, ids, mask)
    key = jax.eval_shape(lambda: jax.random.key(0))

    def step(p, st, k):
        return decode_step(mdef.merge(p), st, jnp.int32(NEW // 2), k, sc, prompt_width=PROMPT, eos_token_id=-1,
                           pad_token_id=0)

    # the state is donated, as the decode loop carries it: the cache update may then be done in place
    return cost(step, params, state, key, donate=(1,))


def prefill_costs(s: dict, layers: int) -> dict:
    """The rollout's prefill of 32 rows x 128 prompt tokens (bf16 weights): 32 distinct prompts, and 8 prompts
    sampled 4 times each (``num_return_sequences=4``: each prompt prefilled once, its cache copied to 4 rows)."""
    cfg = model_config(s, layers, param_dtype="bfloat16")
    mdef, params = abstract_model(CausalLM, cfg)
    out = {}
    for name, g in (("rows_32", 1), ("prompts_8_x4", 4)):
        sc = SamplingConfig(max_new_tokens=NEW, num_return_sequences=g)
        ids = sds((ROLLOUT_ROWS // g, PROMPT), jnp.int32)
        mask = sds((ROLLOUT_ROWS // g, PROMPT), jnp.bool_)
        out[name] = cost(lambda p, i, m, sc=sc: prefill(mdef.merge(p), i, m, sc, pad_token_id=0), params, ids, mask)
    return out


def scoring_costs(s: dict, layers: int) -> dict:
    """The rollout's six forwards (actor fp32 master weights, frozen models and critics likewise fp32)."""
    T = PROMPT + NEW
    seq, mask = sds((ROLLOUT_ROWS, T), jnp.int32), sds((ROLLOUT_ROWS, T), jnp.bool_)
    cfg = model_config(s, layers, param_dtype="float32")
    adef, ap = abstract_model(CausalLM, cfg)
    sdef, sp = abstract_model(ScoreModel, cfg)
    start = PROMPT - 1
    lp = cost(lambda p, x, m: _token_log_probs(adef.merge(p), x, m, start), ap, seq, mask)
    end = cost(lambda p, x, m: _end_scores(sdef.merge(p), x, m), sp, seq, mask)
    val = cost(lambda p, x, m: _values(sdef.merge(p), x, m, start), sp, seq, mask)
    return {"actor_log_probs": lp, "ref_log_probs": lp, "reward_end_scores": end, "cost_end_scores": end,
            "reward_values": val, "cost_values": val}


def update_costs(s: dict, layers: int, remat: bool) -> dict:
    """One micro-batch gradient (value_and_grad) of the actor's PPO-Lag loss and of a critic's value loss."""
    T = PROMPT + NEW
    seq, attn = sds((MICRO, T), jnp.int32), sds((MICRO, T), jnp.bool_)
    resp = sds((MICRO, NEW), jnp.float32)
    cfg = model_config(s, layers, param_dtype="float32", remat=remat)
    adef, ap = abstract_model(CausalLM, cfg)
    sdef, sp = abstract_model(ScoreModel, cfg)
    start = PROMPT - 1

    def actor(p, x, m, old, adv_r, adv_c, mk):
        def loss(p):
            lp = _token_log_probs(adef.merge(p), x, m, start)
            return rl.ppo_lag_actor_loss(lp, old, adv_r, adv_c, mk, multiplier=jnp.float32(0.5), clip_range_ratio=0.2)
        return jax.value_and_grad(loss)(p)

    def critic(p, x, m, old, ret, mk):
        def loss(p):
            v = _values(sdef.merge(p), x, m, start)
            return rl.value_loss(v, old, ret, mk, clip_range_value=5.0)
        return jax.value_and_grad(loss)(p)

    return {"actor": cost(actor, ap, seq, attn, resp, resp, resp, resp),
            "critic": cost(critic, sp, seq, attn, resp, resp, resp)}


# ----------------------------------------------------------------------------- model numbers


def sizes(s: dict) -> dict:
    D, L, V, F, H, K = s["hidden"], s["layers"], s["vocab"], s["inter"], s["heads"], s["kv_heads"]
    hd = D // H
    per_layer = 2 * D * H * hd + 2 * D * K * hd + 3 * D * F
    blocks = L * per_layer
    norms = (2 * L + 1) * D
    return dict(per_layer=per_layer, blocks=blocks, norms=norms, n_causal=blocks + V * D, n_score=blocks + D,
                kv_slot_bytes=2 * L * ROLLOUT_ROWS * K * hd * 2)


def extend(a: dict, b: dict, la: int, lb: int, L: int) -> dict:
    """Linear extension in the layer count of nested ``{"flops", "bytes"}`` dicts."""
    if "flops" in a:
        return {k: a[k] + (L - la) * (b[k] - a[k]) / (lb - la) for k in a}
    return {k: extend(a[k], b[k], la, lb, L) for k in a}


def analyse(name: str, la: int, lb: int, full: bool) -> dict:
    s = SHAPES[name]
    L = s["layers"]
    z = sizes(s)
    t0 = time.perf_counter()

    def at(fn, *extra):
        if full:
            return fn(s, L, *extra)
        return extend(fn(s, la, *extra), fn(s, lb, *extra), la, lb, L)

    dec = at(decode_cost)
    dec32 = at(decode_cost, "float32")
    score = at(scoring_costs)
    pre = at(prefill_costs)
    upd = at(update_costs, False)
    upd_remat = at(update_costs, True)
    T = PROMPT + NEW
    weights_bf16 = 2 * (z["blocks"] + z["norms"] + s["vocab"] * s["hidden"])
    kv_full, kv_mean = z["kv_slot_bytes"] * T, z["kv_slot_bytes"] * (PROMPT + NEW // 2)
    # HloCostAnalysis counts a gather as reading its whole operand: the input embedding table, of which a decode
    # step reads 32 rows, is counted in full; the "structural" ratio takes it out again
    table = s["vocab"] * s["hidden"]
    out = {"shape": name, "layers": L, "method": "full depth" if full else f"{la} and {lb} layers, extended",
           "n_causal": z["n_causal"], "n_score": z["n_score"],
           "decode": {**dec, "floor_full_cache": weights_bf16 + kv_full, "floor_mean_ctx": weights_bf16 + kv_mean,
                      "weights_bf16": weights_bf16, "kv_full": kv_full,
                      "ratio_full_cache": dec["bytes"] / (weights_bf16 + kv_full),
                      "ratio_mean_ctx": dec["bytes"] / (weights_bf16 + kv_mean),
                      "ratio_full_cache_no_gather": (dec["bytes"] - 2 * table) / (weights_bf16 + kv_full)},
           "decode_f32": {**dec32, "floor_full_cache": 2 * (weights_bf16 + kv_full),
                          "ratio_full_cache": dec32["bytes"] / (2 * (weights_bf16 + kv_full)),
                          "ratio_full_cache_no_gather": (dec32["bytes"] - 4 * table) / (2 * (weights_bf16 + kv_full))},
           "scoring": {}, "update": {}, "compile_s": None, "table": table}
    blocks_flops = 2 * z["blocks"] * ROLLOUT_ROWS * PROMPT + 2 * s["vocab"] * s["hidden"] * ROLLOUT_ROWS
    out["prefill"] = {k: {**v, "model_flops": blocks_flops, "ratio": v["flops"] / blocks_flops} for k, v in pre.items()}
    out["prefill"]["shared_over_rows"] = pre["rows_32"]["flops"] / pre["prompts_8_x4"]["flops"]
    tok = ROLLOUT_ROWS * T
    for k, v in score.items():
        n = z["n_causal"] if "log_probs" in k else z["n_score"]
        out["scoring"][k] = {**v, "model_flops": 2 * n * tok, "ratio": v["flops"] / (2 * n * tok)}
    mtok = MICRO * T
    for tag, u in (("no_remat", upd), ("remat", upd_remat)):
        for k, v in u.items():
            n = z["n_causal"] if k == "actor" else z["n_score"]
            out["update"][f"{k}_{tag}"] = {**v, "model_flops": 6 * n * mtok, "ratio": v["flops"] / (6 * n * mtok)}
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    return out


def table(results: list[dict]) -> str:
    rows = ["| program | shape | XLA | model | ratio |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        d = r["decode"]
        rows.append(f"| decode step, bytes (vs bf16 weights + full 384-slot KV read) | {r['shape']} | "
                    f"{d['bytes'] / 1e9:.3f} GB | {d['floor_full_cache'] / 1e9:.3f} GB | {d['ratio_full_cache']:.3f} |")
        rows.append(f"| decode step, bytes (vs weights + KV at mean context 256) | {r['shape']} | "
                    f"{d['bytes'] / 1e9:.3f} GB | {d['floor_mean_ctx'] / 1e9:.3f} GB | {d['ratio_mean_ctx']:.3f} |")
        rows.append(f"| decode step, bytes less the counted embedding table (bf16) | {r['shape']} | "
                    f"{(d['bytes'] - 2 * r['table']) / 1e9:.3f} GB | {d['floor_full_cache'] / 1e9:.3f} GB | "
                    f"{d['ratio_full_cache_no_gather']:.3f} |")
        f = r["decode_f32"]
        rows.append(f"| decode step in fp32, bytes less the counted embedding table (vs fp32 weights + KV) | "
                    f"{r['shape']} | {(f['bytes'] - 4 * r['table']) / 1e9:.3f} GB | "
                    f"{f['floor_full_cache'] / 1e9:.3f} GB | {f['ratio_full_cache_no_gather']:.3f} |")
        for k in ("rows_32", "prompts_8_x4"):
            v = r["prefill"][k]
            rows.append(f"| prefill {k.replace('_', ' ')}, FLOPs vs 2·N·(32 x 128 tokens) | {r['shape']} | "
                        f"{v['flops'] / 1e12:.2f} T | {v['model_flops'] / 1e12:.2f} T | {v['ratio']:.3f} |")
        for k, v in r["scoring"].items():
            rows.append(f"| scoring: {k}, FLOPs vs 2·N·tokens | {r['shape']} | {v['flops'] / 1e12:.2f} T | "
                        f"{v['model_flops'] / 1e12:.2f} T | {v['ratio']:.3f} |")
        for k, v in r["update"].items():
            rows.append(f"| update: {k.replace('_', ' ')}, FLOPs vs 6·N·tokens | {r['shape']} | "
                        f"{v['flops'] / 1e12:.2f} T | {v['model_flops'] / 1e12:.2f} T | {v['ratio']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: all shapes")
    ap.add_argument("--layers-a", type=int, default=2)
    ap.add_argument("--layers-b", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="compile the full depth (slow at 7B)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    results = []
    for name in args.shape or list(SHAPES):
        r = analyse(name, args.layers_a, args.layers_b, args.full)
        print(f"{name}: {r['method']}, analysed in {r['compile_s']} s", flush=True)
        results.append(r)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
