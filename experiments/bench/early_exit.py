#!/usr/bin/env python3
"""early_exit.py - rollout time with the early-exit decode loop against the full N-step loop (CPU or GPU).

Trains the built-in task's tiny SFT policy (``safejax.demo``: the same data, model and SFT settings as the demo,
about a minute on two CPU cores), then samples the held-out prompts with ``safejax.generation.generate`` twice per
budget ``N``: ``early_exit=True`` (the loop stops once every row has emitted EOS) and ``early_exit=False`` (always
N steps).  Both runs use the same key; the script checks that the outputs are identical and prints, per N, the
mean and max response length, the decode steps the early loop ran, and the two wall times (median of
``--repeats`` runs after one compile+warm-up run each) with their ratio.

Usage:
    python experiments/bench/early_exit.py [--budgets 16 64 128] [--rows 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from safejax import demo  # noqa: E402
from safejax.generation import SamplingConfig, generate  # noqa: E402
from safejax.models import load_pretrained  # noqa: E402
from safejax.models.functional import split_model  # noqa: E402


def time_generate(mdef, params, ids, mask, sc, eos, pad, repeats):
    fn = jax.jit(lambda p, i, m, k: generate(mdef.merge(p), i, m, k, sc, eos_token_id=eos, pad_token_id=pad))
    key = jax.random.key(0)
    out = jax.block_until_ready(fn(params, ids, mask, key))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(params, ids, mask, key))
        times.append(time.perf_counter() - t)
    return jax.tree.map(np.asarray, out), statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--rows", type=int, default=64, help="held-out prompts per rollout batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = args.out or tempfile.mkdtemp(prefix="safejax-early-exit-")
    cfg = demo.DemoConfig(progress=False)
    t = time.perf_counter()
    ws = demo.prepare(cfg, out, seed=0)
    sft_dir = demo.train_sft(ws)
    print(f"built-in task SFT policy trained in {time.perf_counter() - t:.1f} s ({sft_dir})")
    mdef, params = split_model(load_pretrained(sft_dir))
    ids = jnp.asarray(ws.eval_arrays["prompt_ids"][:args.rows])
    mask = jnp.asarray(ws.eval_arrays["prompt_mask"][:args.rows])
    eos, pad = ws.tok.eos_token_id, ws.tok.pad_token_id
    print(f"{ids.shape[0]} prompts x width {ids.shape[1]}, temperature 1, {jax.devices()[0].platform}")
    print("| N | mean / max response | early-exit steps | full loop (s) | early exit (s) | full / early |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in args.budgets:
        early, t_early = time_generate(mdef, params, ids, mask, SamplingConfig(max_new_tokens=n), eos, pad,
                                       args.repeats)
        full, t_full = time_generate(mdef, params, ids, mask, SamplingConfig(max_new_tokens=n, early_exit=False),
                                     eos, pad, args.repeats)
        for name in ("sequences", "attention_mask", "response_lengths"):
            if not np.array_equal(getattr(early, name), getattr(full, name)):
                raise SystemExit(f"early exit changed {name} at N={n}")
        lens = early.response_lengths
        print(f"| {n} | {lens.mean():.1f} / {lens.max()} | {int(early.decode_steps)} | {t_full:.4f} | "
              f"{t_early:.4f} | {t_full / t_early:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
