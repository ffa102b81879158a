#!/usr/bin/env python3
"""ppo_bench.py - safejax's own speed on one accelerator: training, decoding and a PPO-Lag iteration.

Sections (ppo_sections.py; each timed with synchronisation, each in try/except, each skipped when too little of the
``--budget`` is left; a watchdog writes the JSON and exits at the budget whatever is running: bench_harness.py):

  ceilings    bf16 matmul 8192^3 TFLOP/s and device copy GB/s, measured here with jax.numpy
  train       the actor's SFT train step: safejax CausalLM (fp32 params, bf16 compute) with
              safejax.train.fit.make_train_step (optax AdamW, state donated), batch 8 x seq 512
              -> tokens/s and MFU (model FLOPs as in experiments/bench/README.md vs 989 TFLOP/s and vs
              the measured matmul ceiling)
  decode      safejax.generation.generate, bf16 weights, 32 prompts x 128 tokens, 256 new tokens
              -> new tokens/s, ms per decode step, fraction of the memory-bandwidth floor
  decode_fp32 the same with fp32 master weights (what the PPO rollout runs: the actor is trained), cast
              once to bf16 before the decode loop (SamplingConfig.cast_weights; --no-cast-weights: off)
  ppo         one full PPO-Lagrangian iteration with safejax.train.ppo.PPOPhases on six random models
              (actor, reference, reward, cost, reward critic, cost critic, all of the same shape):
              rollout (generation + 6 scoring forwards) and update (lambda step, actor, two
              critics), one warm-up iteration (compile) then timed iterations
  train_fused_attn  the train section again with fused attention (ModelConfig.attention_impl="cudnn" on a
              GPU, "xla" elsewhere): what cuDNN flash attention buys over the einsum attention

The model is the TinyLlama-1.1B shape of hf_peer.py (hidden 2048, 22 layers, 32 heads, 4 KV
heads, intermediate 5632, vocab 32000, untied), random weights, random token ids (numpy seed 0).

Usage:
    python experiments/bench/ppo_bench.py                 # GPU, full config, --budget 240
    python experiments/bench/ppo_bench.py --tiny          # CPU smoke test (2 layers, hidden 64)
    python experiments/bench/ppo_bench.py --baseline $OUT/hf_peer.json   # add ratios vs the peer

Writes ``$OUT/ppo_bench.json`` (or ``./ppo_bench.json``; ``--out`` overrides) after every section,
and prints a summary table.  ``experiments/bench/run_gpu.sh`` runs this next to
``experiments/bench/hf_peer.py`` (the PyTorch/HF peer) in one device call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# a PPO iteration holds six 1.1B models: let JAX take most of the card (before jax is imported)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_harness, ppo_sections

from bench_harness import _LOCK, Harness, log  # noqa: E402
from ppo_sections import H100_SXM_DENSE_BF16, Sections, model_sizes  # noqa: E402


FULL = dict(
    name="tinyllama-1.1b-shape",
    vocab=32000, hidden=2048, layers=22, heads=32, kv_heads=4, inter=5632, eps=1e-5, max_pos=2048,
    train_batch=8, train_seq=512, train_warmup=3, train_steps=10,
    gen_batch=32, prompt_len=128, new_tokens=256, gen_runs=2,
    ppo_batch=32, ppo_prompt=128, ppo_new=256, ppo_micro=8, ppo_timed=3,
    mm_n=8192, mm_iters=10, copy_bytes=2 << 30, copy_iters=10,
)
TINY = dict(
    FULL, name="tiny",
    vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, max_pos=128,
    train_batch=2, train_seq=32, train_warmup=1, train_steps=2,
    gen_batch=2, prompt_len=8, new_tokens=16, gen_runs=3,
    ppo_batch=4, ppo_prompt=8, ppo_new=8, ppo_micro=2, ppo_timed=1,
    mm_n=256, mm_iters=3, copy_bytes=8 << 20, copy_iters=3,
)
# per section: (soft cap seconds, minimum seconds left to start it) for the full config
CAPS = {"ceilings": (30, 10), "train": (90, 40), "decode": (60, 25), "ppo": (200, 70), "decode_fp32": (45, 20),
        "train_fused_attn": (60, 35)}
SECTIONS = ["ceilings", "train", "decode", "ppo", "decode_fp32", "train_fused_attn"]

class Bench(Harness, Sections):
    """ppo_bench's run: the :class:`Harness` (budget, watchdog, JSON) over the :class:`Sections`."""

    caps = CAPS

    def __init__(self, args, cfg: dict):
        super().__init__(args, cfg)
        self.sizes = model_sizes(cfg)
        self.R["meta"]["sizes"] = self.sizes

    # ----------------------------------------------------------------------------- summary
    def derive(self) -> list[tuple]:
        Sx = self.R["sections"]
        rows = []

        def row(name, value, unit, note=""):
            rows.append((name, value, unit, note))

        def status(name):
            s = Sx.get(name)
            if s is None:
                return None if self.args.only and name not in self.args.only else "not run"
            for k, word in (("killed_at_budget", "KILLED"), ("error", "ERROR"), ("skipped", "SKIPPED")):
                if s.get(k):
                    return f"{word}: {str(s[k])[:120]}" if k != "killed_at_budget" else word
            return None

        ce, tr, de, d32, pp = (Sx.get(k, {}) for k in ("ceilings", "train", "decode", "decode_fp32", "ppo"))
        for name in SECTIONS:
            st = status(name)
            if st:
                row(name, None, "", st)
        if "matmul_tflops" in ce:
            row("ceiling.matmul_bf16", ce["matmul_tflops"], "TFLOP/s", f"jnp {ce.get('matmul_n')}^3")
            row("ceiling.copy", ce["copy_gbps"], "GB/s", "2*bytes/t")
        if "tokens_per_s" in tr:
            row("train.step_time", tr["step_ms_median"], "ms", f"{tr['batch']}x{tr['seq']}, median of {tr['n_timed']}")
            row("train.tokens_per_s", tr["tokens_per_s"], "tok/s")
            row("train.mfu_vs_989", 100 * tr["mfu_vs_989"], "%", f"{tr['achieved_tflops']:.1f} TFLOP/s model")
            if tr.get("mfu_vs_measured"):
                row("train.mfu_vs_measured", 100 * tr["mfu_vs_measured"], "%")
            row("train.loss_first_last", tr["loss_first"], "", f"-> {tr['loss_last']:.4f}")
        tf = Sx.get("train_fused_attn", {})
        if "tokens_per_s" in tf:
            row("train_fused_attn.step_time", tf["step_ms_median"], "ms", f"attention {tf['attention_impl']}")
            row("train_fused_attn.mfu_vs_989", 100 * tf["mfu_vs_989"], "%")
            if tf.get("mfu_vs_measured"):
                row("train_fused_attn.mfu_vs_measured", 100 * tf["mfu_vs_measured"], "%")
            if "tokens_per_s" in tr:
                row("train_fused_attn.speedup", tf["tokens_per_s"] / tr["tokens_per_s"], "x",
                    f"vs train (attention {tr.get('attention_impl')})")
        for key, sec in (("decode", de), ("decode_fp32", d32)):
            if "new_tokens_per_s" in sec:
                row(f"{key}.new_tokens_per_s", sec["new_tokens_per_s"], "tok/s",
                    f"{sec['batch']}x{sec['new_tokens']} new, {sec['param_dtype']} weights")
                row(f"{key}.ms_per_decode_step", sec["ms_per_decode_step"], "ms")
                if sec.get("floor_fraction"):
                    row(f"{key}.floor_fraction", 100 * sec["floor_fraction"], "%",
                        f"floor {sec['floor_ms_per_step']:.3f} ms/step")
        if "iteration_s" in pp:
            row("ppo.iteration_s", pp["iteration_s"], "s",
                f"{pp['batch']} prompts x ({pp['prompt_len']}+{pp['new_tokens']}), frozen {pp['frozen_param_dtype']}")
            row("ppo.rollout_s", pp["rollout_s"], "s", "generate + 6 scoring forwards")
            row("ppo.update_s", pp["update_s"], "s", f"{pp['batch'] // pp['micro_batch']} mini-batches x 3 models")
            same = all(d32.get(a) == pp[b] for a, b in (("batch", "batch"), ("new_tokens", "new_tokens"),
                                                         ("prompt_len", "prompt_len")))
            if "new_tokens_per_s" in d32 and same:
                gen = d32["generate_s_median"]
                row("ppo.rollout_generation_share_est", 100 * gen / pp["rollout_s"], "%",
                    "decode_fp32 time / rollout time")
            row("ppo.update_mfu_vs_989", 100 * pp["update_mfu_vs_989"], "%")
        rows += self.ratio_rows()
        return rows

    def ratio_rows(self) -> list[tuple]:
        """``(name, ours / theirs or None, 'x', note)`` rows from :meth:`add_baseline`'s pairs."""
        base = self.R.get("baseline") or {}
        out = [(f"ratio.{name}", num / den if num and den else None, "x", "")
               for name, (num, den) in base.get("ratios", {}).items()]
        out += [(f"ratio.{name}", v, "x", "") for name, v in base.get("extra", {}).items()]
        return out

    @staticmethod
    def hf_ppo_iteration_estimate(hf_train: dict, hf_gen: dict, ppo: dict) -> dict | None:
        """The same PPO-Lag iteration priced with the peer's measured pieces (the HF/PyTorch stack of the
        reference: default ``generate``, eager forwards, fp32-master AdamW steps), from one card and one call.

        the peer (``hf_peer.py``) has no PPO loop of its own, so the iteration is composed:
        generation = B*N new tokens at ``hf_gen`` new tok/s (the same 32 x (128 + 256) shape);
        scoring = 6 forwards over B*(P+N) tokens, a forward taken as 1/3 of a training step per token;
        update = ``update_iters`` x 3 trained models x B*(P+N) tokens at ``hf_train`` tok/s.
        Returns None when a piece is missing or the generation shapes differ."""
        tr, gen = hf_train.get("tokens_per_s"), hf_gen.get("new_tokens_per_s")
        if not (tr and gen and ppo.get("iteration_s")):
            return None
        B, P, N = ppo["batch"], ppo["prompt_len"], ppo["new_tokens"]
        if (hf_gen.get("batch"), hf_gen.get("prompt_len"), hf_gen.get("new_tokens")) not in ((B, P, N), (None,) * 3):
            return None
        tokens = B * (P + N)
        gen_s = B * N / gen
        score_s = 6 * tokens / (3 * tr)
        update_s = ppo.get("update_iters", 1) * 3 * tokens / tr
        return dict(generation_s=gen_s, scoring_s=score_s, update_s=update_s,
                    iteration_s=gen_s + score_s + update_s,
                    method="composed from hf_peer.py's hf_gen and hf_train of the same call (see docstring)")

    def add_baseline(self) -> None:
        """Ratios vs the peer's JSON of the same card and call (hf_peer.py; plain-JAX rows need a JSON with a "jax" part)."""
        path = self.args.baseline
        if not path or not os.path.exists(path):
            if path:
                self.R["baseline"] = {"error": f"{path} not found"}
            return
        try:
            b = json.load(open(path))
            T = b.get("torch", {}).get("sections", {})
            J = b.get("jax", {}).get("sections", {})
            Sx = self.R["sections"]
            g = lambda sec, k: (sec or {}).get(k)  # noqa: E731
            ratios = {
                "train_tok_s_vs_hf": (g(Sx.get("train"), "tokens_per_s"), g(T.get("hf_train"), "tokens_per_s")),
                "train_tok_s_vs_plain_jax": (g(Sx.get("train"), "tokens_per_s"), g(J.get("jax_train"), "tokens_per_s")),
                "decode_tok_s_vs_hf_generate": (g(Sx.get("decode"), "new_tokens_per_s"),
                                                g(T.get("hf_gen"), "new_tokens_per_s")),
                "decode_tok_s_vs_hf_static_compiled": (g(Sx.get("decode"), "new_tokens_per_s"),
                                                       g(T.get("hf_gen_static"), "new_tokens_per_s")),
                "decode_tok_s_vs_plain_jax_scan": (g(Sx.get("decode"), "new_tokens_per_s"),
                                                   g(J.get("jax_gen"), "new_tokens_per_s")),
                "decode_tok_s_vs_plain_jax_unrolled": (g(Sx.get("decode"), "new_tokens_per_s"),
                                                       g(J.get("jax_gen_unrolled"), "new_tokens_per_s")),
                "matmul_ceiling_jax_vs_torch": (g(Sx.get("ceilings"), "matmul_tflops"),
                                                g(T.get("ceilings"), "matmul_tflops")),
                "copy_ceiling_jax_vs_torch": (g(Sx.get("ceilings"), "copy_gbps"), g(T.get("ceilings"), "copy_gbps")),
            }
            peak_t = g(T.get("ceilings"), "matmul_tflops")
            tr = Sx.get("train", {})
            extra = {}
            if peak_t and "achieved_tflops" in tr:
                extra["train_mfu_vs_torch_measured_peak"] = tr["achieved_tflops"] / peak_t
            bw_t = g(T.get("ceilings"), "copy_gbps")
            de = Sx.get("decode", {})
            if bw_t and de.get("ms_per_decode_step"):
                floor = (self.sizes["decode_weight_bytes_bf16"] + self.sizes["kv_bytes_mean_ctx"]) / (bw_t * 1e9)
                extra["decode_floor_fraction_vs_torch_copy"] = floor / (de["ms_per_decode_step"] / 1e3)
            composed = self.hf_ppo_iteration_estimate(T.get("hf_train") or {}, T.get("hf_gen") or {},
                                                      Sx.get("ppo") or {})
            if composed:
                extra["ppo_iteration_vs_hf_composed"] = composed["iteration_s"] / Sx["ppo"]["iteration_s"]
            self.R["baseline"] = {"path": path, "ratios": ratios, "extra": extra, "hf_ppo_iteration_composed": composed,
                                  "device": {"torch": b.get("torch", {}).get("device"),
                                             "jax": b.get("jax", {}).get("device")}}
        except Exception as e:  # noqa: BLE001
            self.R["baseline"] = {"error": f"{type(e).__name__}: {e}"}

    def finish(self) -> None:
        with _LOCK:
            self.add_baseline()
            rows = self.derive()
            self.R["summary"] = [dict(name=n, value=v, unit=u, note=no) for n, v, u, no in rows]
            self.R["meta"]["total_wall_s"] = time.time() - self.t0
            self.save()
            dev = self.R["meta"].get("device", {})
            log("")
            log(f"safejax ppo_bench ({self.c['name']}) on {dev.get('kind')} [{dev.get('backend')}], "
                f"jax {self.R['meta'].get('versions', {}).get('jax')}, {self.R['meta']['total_wall_s']:.0f}s")
            log(f"| {'measurement':<44} | {'value':>12} | {'unit':<8} | note")
            log(f"| {'-' * 44} | {'-' * 12} | {'-' * 8} | ----")
            for n, v, u, no in rows:
                vs = "" if v is None else (f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}")
                log(f"| {n:<44} | {vs:>12} | {u:<8} | {no}")
            log(f"JSON: {self.args.out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config (2 layers, hidden 64): CPU smoke test")
    ap.add_argument("--budget", type=float, default=240.0, help="hard limit in seconds (default 240)")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/ppo_bench.json or ./ppo_bench.json)")
    ap.add_argument("--only", default=None, help=f"comma-separated sections of: {','.join(SECTIONS)}")
    ap.add_argument("--baseline", default=None, help="the peer's JSON of the same run (hf_peer.json): adds ratio rows")
    ap.add_argument("--scan-layers", action="store_true", help="stack layers under lax.scan (default: unrolled)")
    ap.add_argument("--frozen-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="param dtype of reference / reward / cost models in the PPO section (run_ppo: float32)")
    ap.add_argument("--ppo-remat", action="store_true", help="rematerialise layers in the PPO section")
    ap.add_argument("--attention", default="einsum", choices=("einsum", "xla", "cudnn"),
                    help="full-sequence attention of every section (ModelConfig.attention_impl; default einsum); "
                         "the train_fused_attn section always runs the fused one (cudnn on GPU, xla elsewhere)")
    ap.add_argument("--no-cast-weights", action="store_true",
                    help="decode without SamplingConfig.cast_weights (fp32 weights cast at every use)")
    ap.add_argument("--set", default=None, help="config overrides, e.g. --set ppo_batch=16,new_tokens=128")
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(os.environ.get("OUT") or ".", "ppo_bench.json")
    args.only = set(args.only.split(",")) if args.only else None
    cfg = dict(TINY if args.tiny else FULL)
    if args.set:
        for kv in args.set.split(","):
            k, _, v = kv.partition("=")
            if k not in cfg:
                ap.error(f"--set: unknown key {k!r} (keys: {', '.join(cfg)})")
            cfg[k] = type(cfg[k])(v)
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except Exception:  # noqa: BLE001
        pass
    bench = Bench(args, cfg)
    bench.watchdog()
    log(f"ppo_bench: config={cfg['name']} budget={args.budget:.0f}s out={args.out}")
    bench.environment()
    import jax

    if jax.default_backend() == "cpu" and not args.tiny:
        log("WARNING: running the full 1.1B config on CPU (use --tiny for a smoke test)")
    bench.run("ceilings", bench.ceilings)
    bench.run("train", bench.train)
    bench.run("decode", lambda soft: bench.decode(soft, "bfloat16"))
    bench.run("ppo", bench.ppo)
    bench.run("decode_fp32", lambda soft: bench.decode(soft, "float32"))
    fused = "cudnn" if jax.default_backend() == "gpu" else "xla"
    bench.run("train_fused_attn", lambda soft: bench.train(soft, attention=fused))
    bench.R["finished"] = True
    bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
