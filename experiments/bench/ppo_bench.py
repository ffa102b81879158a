#!/usr/bin/env python3
"""ppo_bench.py - safejax's own speed on one accelerator: training, decoding and a PPO-Lag iteration.

Sections (each timed with synchronisation, each in try/except, each skipped when too little of the
``--budget`` is left; a watchdog writes the JSON and exits at the budget whatever is running):

  ceilings    bf16 matmul 8192^3 TFLOP/s and device copy GB/s, measured here with jax.numpy
  train       the actor's SFT train step: safejax CausalLM (fp32 params, bf16 compute) with
              safejax.train.fit.make_train_step (optax AdamW, state donated), batch 8 x seq 512
              -> tokens/s and MFU (model FLOPs as in experiments/bench/README.md vs 989 TFLOP/s and vs
              the measured matmul ceiling)
  decode      safejax.generation.generate, bf16 weights, 32 prompts x 128 tokens, 256 new tokens
              -> new tokens/s, ms per decode step, fraction of the memory-bandwidth floor
  decode_fp32 the same with fp32 master weights (what the PPO rollout runs: the actor is trained), cast
              once to bf16 before the decode loop (SamplingConfig.cast_weights; --no-cast-weights: off)
  ppo         one full PPO-Lagrangian iteration with safejax.train.ppo.Trainer on six random models
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
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback

# a PPO iteration holds six 1.1B models: let JAX take most of the card (before jax is imported)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

H100_SXM_DENSE_BF16 = 989e12

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

_LOCK = threading.RLock()


def log(msg: str = "") -> None:
    with _LOCK:
        sys.stdout.write(str(msg) + "\n")
        sys.stdout.flush()


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    try:
        f = float(obj)
        return f if math.isfinite(f) else None
    except Exception:  # noqa: BLE001
        return str(obj)


def median(xs):
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------- sizes and FLOPs


def model_sizes(c: dict) -> dict:
    """Parameter counts, model FLOPs per train step and bytes per decode step (bench/README formulas)."""
    D, L, V, F, H, K = c["hidden"], c["layers"], c["vocab"], c["inter"], c["heads"], c["kv_heads"]
    hd = D // H
    per_layer = D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F
    n_layer_w = L * per_layer
    n_norm = (2 * L + 1) * D
    n_total = n_layer_w + n_norm + 2 * V * D
    n_matmul = n_layer_w + V * D
    n_score_matmul = n_layer_w + D  # backbone + [D, 1] head, no LM head
    B, T = c["train_batch"], c["train_seq"]
    tokens = B * T
    train_flops = 6 * n_matmul * tokens + 12 * L * D * T * tokens // 2
    Bg, P, N = c["gen_batch"], c["prompt_len"], c["new_tokens"]
    weight_bytes = 2 * (n_layer_w + n_norm + V * D)  # bf16, every weight but the input embedding
    kv_per_slot = 2 * L * Bg * K * hd * 2
    return dict(n_params_causal=n_total, n_params_score=n_layer_w + n_norm + V * D + D + 1, n_matmul=n_matmul,
                n_score_matmul=n_score_matmul, train_tokens_per_step=tokens, train_flops_per_step=train_flops,
                decode_weight_bytes_bf16=weight_bytes, kv_bytes_mean_ctx=kv_per_slot * (P + N // 2),
                kv_bytes_full_cache=kv_per_slot * (P + N))


def seq_flops(n_matmul: int, layers: int, hidden: int, rows: int, seq: int, backward: bool) -> float:
    """Model FLOPs of a forward (or forward+backward) over ``rows x seq`` tokens (causal attention)."""
    tokens = rows * seq
    mult = 3 if backward else 1
    return mult * (2 * n_matmul * tokens + 4 * layers * hidden * seq * tokens / 2)


# ----------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args, cfg: dict):
        self.args, self.c = args, cfg
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.R: dict = {"meta": {"argv": sys.argv, "config": cfg, "budget_s": args.budget, "started": self.t0,
                                 "python": platform.python_version(), "host": platform.node(),
                                 "mem_fraction_env": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")},
                        "sections": {}, "finished": False}
        self.current: str | None = None
        self.sizes = model_sizes(cfg)
        self.R["meta"]["sizes"] = self.sizes

    # ---- bookkeeping
    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        with _LOCK:
            self.R["meta"]["wall_s"] = time.time() - self.t0
            path = self.args.out
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(_clean(self.R), f, indent=1)
            os.replace(path + ".tmp", path)

    def run(self, name: str, fn) -> None:
        soft_cap, min_left = CAPS[name] if not self.args.tiny else (1e9, 0)
        if self.args.only and name not in self.args.only:
            return
        if self.left() < min_left:
            self.R["sections"][name] = {"skipped": f"only {self.left():.0f}s of the budget left (needs {min_left}s)"}
            log(f"== {name}: SKIPPED ({self.left():.0f}s left)")
            self.save()
            return
        log(f"== {name} ({self.left():.0f}s of the budget left)")
        self.current = name
        self.R["sections"][name] = {"in_progress": True}
        t = time.time()
        soft = min(t + soft_cap, self.deadline - 5)
        try:
            out = fn(soft)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            out = {"error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": traceback.format_exc()[-4000:]}
            log(f"   ERROR {type(e).__name__}: {str(e)[:500]}")
        out["section_wall_s"] = time.time() - t
        with _LOCK:
            self.R["sections"][name] = out
            self.current = None
        self.save()
        gc.collect()

    def watchdog(self) -> None:
        def fire():
            with _LOCK:
                if self.current:
                    self.R["sections"][self.current] = dict(self.R["sections"].get(self.current, {}),
                                                            killed_at_budget=True, in_progress=False)
                self.R["killed_at_budget"] = True
            log(f"!! budget of {self.args.budget:.0f}s reached during '{self.current}': writing results and exiting")
            try:
                self.finish()
            finally:
                os._exit(3)

        t = threading.Timer(max(self.left(), 0.1), fire)
        t.daemon = True
        t.start()

    # ---- environment
    def environment(self) -> None:
        import jax
        import numpy as np

        versions = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
        for mod in ("jaxlib", "flax", "optax", "orbax.checkpoint"):
            try:
                m = __import__(mod, fromlist=["_"])
                versions[mod] = getattr(m, "__version__", None) or getattr(getattr(m, "version", None),
                                                                           "__version__", "?")
            except Exception as e:  # noqa: BLE001
                versions[mod] = f"import failed: {type(e).__name__}"
        devs = jax.devices()
        self.R["meta"]["versions"] = versions
        self.R["meta"]["device"] = {"backend": jax.default_backend(), "count": len(devs),
                                    "kind": getattr(devs[0], "device_kind", None), "devices": [str(d) for d in devs]}
        log(f"versions: {versions}")
        log(f"device: {self.R['meta']['device']}")
        self.save()

    def peak_mem_gb(self):
        import jax

        try:
            st = jax.devices()[0].memory_stats() or {}
            v = st.get("peak_bytes_in_use")
            return v / 1e9 if v else None
        except Exception:  # noqa: BLE001
            return None

    # ---- model helpers
    def model_config(self, **kw):
        from safejax.models import ModelConfig

        c = self.c
        base = dict(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                    num_layers=c["layers"], num_heads=c["heads"], num_kv_heads=c["kv_heads"],
                    max_position_embeddings=c["max_pos"], rms_norm_eps=c["eps"], dtype="bfloat16",
                    param_dtype="float32", scan_layers=self.args.scan_layers, remat=False,
                    attention_impl=self.args.attention)
        base.update(kw)
        return ModelConfig(**base)

    def mesh(self):
        from safejax.parallel import MeshConfig, make_mesh

        return make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))

    def build(self, kind: str, cfg, mesh, seed: int):
        """A random CausalLM / ScoreModel built directly into its shardings -> (ModelDef, params dict)."""
        from flax import nnx

        from safejax.models import CausalLM, ScoreModel
        from safejax.parallel import use_mesh
        from safejax.models.functional import split_model

        with use_mesh(mesh):
            m = (CausalLM if kind == "causal_lm" else ScoreModel)(cfg, rngs=nnx.Rngs(seed))
        return split_model(m)

    # ----------------------------------------------------------------------------- sections
    def ceilings(self, soft):
        import jax
        import jax.numpy as jnp

        c = self.c
        n = c["mm_n"]
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.random.normal(ka, (n, n), jnp.bfloat16)
        b = jax.random.normal(kb, (n, n), jnp.bfloat16)
        mm = jax.jit(lambda x, y: x @ y)
        reps = 5  # back-to-back calls per sample, so Python dispatch hides behind the device work

        def sample(fn, *xs):
            t = time.perf_counter()
            outs = [fn(*xs) for _ in range(reps)]
            jax.block_until_ready(outs)
            return (time.perf_counter() - t) / reps

        for _ in range(3):
            mm(a, b).block_until_ready()
        t_mm = median([sample(mm, a, b) for _ in range(c["mm_iters"])])
        del a, b
        nelem = c["copy_bytes"] // 4
        x = jnp.zeros((nelem,), jnp.float32)
        cp = jax.jit(lambda v: v + 1.0)  # reads and writes every byte once (not elided like a plain copy)
        for _ in range(2):
            cp(x).block_until_ready()
        t_cp = median([sample(cp, x) for _ in range(c["copy_iters"])])
        del x
        r = dict(timer=f"perf_counter around {reps} back-to-back calls, median of samples", matmul_n=n,
                 matmul_ms_median=t_mm * 1e3,
                 matmul_tflops=2 * n ** 3 / t_mm / 1e12, copy_bytes=c["copy_bytes"], copy_ms_median=t_cp * 1e3,
                 copy_gbps=2 * c["copy_bytes"] / t_cp / 1e9, copy_op="y = x + 1 (float32), GB/s = 2*bytes/t")
        log(f"   matmul bf16 {n}^3: {r['matmul_tflops']:.1f} TFLOP/s; copy: {r['copy_gbps']:.0f} GB/s")
        return r

    def train(self, soft, attention: str | None = None):
        import jax
        import numpy as np

        from safejax.train.common import init_train_state, micro_batch_sharding
        from safejax.train.fit import make_train_step
        from safejax.train.optim import OptimConfig, make_optimizer
        from safejax.train.sft import sft_loss_fn

        c, S = self.c, self.sizes
        mesh = self.mesh()
        cfg = self.model_config(**({"attention_impl": attention} if attention else {}))
        t = time.perf_counter()
        mdef, params = self.build("causal_lm", cfg, mesh, seed=0)
        jax.block_until_ready(params)
        init_s = time.perf_counter() - t
        n_params = int(sum(x.size for x in jax.tree.leaves(params)))
        total = c["train_warmup"] + c["train_steps"]
        # the baseline's optimizer: AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, wd 0.01, no clipping
        tx, sched = make_optimizer(OptimConfig(lr=1e-4, schedule="constant", b1=0.9, b2=0.999, eps=1e-8,
                                               weight_decay=0.01, clip_norm=0.0), total)
        state, state_sh = init_train_state(params, mdef.shardings(mesh), tx, mesh, seed=0)
        del params
        B, T = c["train_batch"], c["train_seq"]
        ids = np.random.default_rng(0).integers(0, c["vocab"], size=(1, B, T)).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "label_mask": np.ones_like(ids)}
        bsh = {k: micro_batch_sharding(mesh, 3) for k in batch}
        batch = {k: jax.device_put(v, bsh[k]) for k, v in batch.items()}
        step = make_train_step(sft_loss_fn(mdef), tx, sched, state_sh, bsh)
        t = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        log(f"   train step compiled in {compile_s:.1f}s (init {init_s:.1f}s, {n_params:,} params)")
        losses, times = [], []
        stopped_early = False
        for i in range(total):
            t = time.perf_counter()
            state, m = compiled(state, batch)
            loss = float(m["loss"])
            dt = time.perf_counter() - t
            losses.append(loss)
            if i >= c["train_warmup"]:
                times.append(dt)
            log(f"   step {i:2d} {'warm ' if i < c['train_warmup'] else 'timed'} {dt * 1e3:8.1f} ms  loss {loss:.4f}")
            if time.time() > soft and times:
                stopped_early = i < total - 1
                break
        del state
        t_med = median(times)
        flops = S["train_flops_per_step"]
        peak = self.R["sections"].get("ceilings", {}).get("matmul_tflops")
        r = dict(precision="fp32 params + fp32 AdamW states, bf16 matmuls (safejax Dense casts at use), fp32 norms/"
                           "softmax/loss", model="safejax.models.CausalLM", step="safejax.train.fit.make_train_step "
                 "(sft_loss_fn, grad_accum 1, state donated)", scan_layers=cfg.scan_layers,
                 attention_impl=cfg.attention_impl, n_params=n_params,
                 batch=B, seq=T, init_s=init_s, compile_s=compile_s, n_warmup=c["train_warmup"], n_timed=len(times),
                 stopped_early_soft_cap=stopped_early, step_ms_median=t_med * 1e3,
                 step_ms_each=[x * 1e3 for x in times], tokens_per_step=B * T, tokens_per_s=B * T / t_med,
                 model_flops_per_step=flops, achieved_tflops=flops / t_med / 1e12,
                 mfu_vs_989=flops / t_med / H100_SXM_DENSE_BF16,
                 mfu_vs_measured=(flops / t_med / (peak * 1e12)) if peak else None,
                 loss_first=losses[0], loss_last=losses[-1], losses=losses, loss_decreased=losses[-1] < losses[0],
                 peak_mem_gb=self.peak_mem_gb())
        log(f"   -> {r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s, {r['achieved_tflops']:.2f} "
            f"TFLOP/s, MFU {100 * r['mfu_vs_989']:.1f}% of 989"
            + (f", {100 * r['mfu_vs_measured']:.1f}% of measured" if peak else ""))
        return r

    def decode(self, soft, param_dtype: str):
        import jax
        import numpy as np

        from safejax.generation import SamplingConfig, generate

        c, S = self.c, self.sizes
        B, P, N = c["gen_batch"], c["prompt_len"], c["new_tokens"]
        mesh = self.mesh()
        cfg = self.model_config(param_dtype=param_dtype)
        mdef, params = self.build("causal_lm", cfg, mesh, seed=0)
        prompts = np.random.default_rng(0).integers(0, c["vocab"], size=(B, P)).astype(np.int32)
        mask = np.ones_like(prompts)

        def make(n_new):
            sc = SamplingConfig(max_new_tokens=n_new, temperature=1.0, top_p=1.0, top_k=0,
                                cast_weights=not self.args.no_cast_weights)

            def gen(p, ids, m, key):
                # eos -1 is never sampled: every row produces exactly n_new tokens, as in the baseline
                return generate(mdef.merge(p), ids, m, key, sc, eos_token_id=-1, pad_token_id=0).sequences
            return jax.jit(gen)

        key = jax.random.key(1)
        t = time.perf_counter()
        gen_n = make(N).lower(params, prompts, mask, key).compile()
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        gen_1 = make(1).lower(params, prompts, mask, key).compile()
        compile_1_s = time.perf_counter() - t
        log(f"   generate compiled in {compile_s:.1f}s (+{compile_1_s:.1f}s for the 1-token reference)")

        def timed(fn, k):
            t = time.perf_counter()
            out = np.asarray(jax.block_until_ready(fn(params, prompts, mask, k)))
            return out, time.perf_counter() - t

        out, tw = timed(gen_n, jax.random.key(99))
        timed(gen_1, jax.random.key(98))
        tn, t1 = [], []
        for i in range(c["gen_runs"]):
            out, dt = timed(gen_n, jax.random.key(100 + i))
            tn.append(dt)
            t1.append(timed(gen_1, jax.random.key(200 + i))[1])
            log(f"   generate {i}: {dt:.3f} s for {B}x{N} (1-token call {t1[-1] * 1e3:.1f} ms)")
            if time.time() > soft:
                break
        assert out.shape == (B, P + N), f"unexpected output shape {out.shape}"
        gen_tokens = out[:, P:]
        assert 0 <= gen_tokens.min() and gen_tokens.max() < c["vocab"], "token id out of range"
        T_n, T_1 = median(tn), median(t1)
        step_s = (T_n - T_1) / (N - 1) if N > 1 else None
        method = "(t_generate(N) - t_generate(1)) / (N - 1)"
        if step_s is not None and step_s <= 0:  # timer noise on tiny CPU runs
            step_s, method = T_n / N, "t_generate(N) / N (the difference was not positive)"
        bw = self.R["sections"].get("ceilings", {}).get("copy_gbps")
        floor_s = floor_full_s = None
        if bw:
            floor_s = (S["decode_weight_bytes_bf16"] + S["kv_bytes_mean_ctx"]) / (bw * 1e9)
            floor_full_s = (S["decode_weight_bytes_bf16"] + S["kv_bytes_full_cache"]) / (bw * 1e9)
        r = dict(generator="safejax.generation.generate (prefill + lax.fori_loop decode, preallocated KV cache, "
                           "attention over the full cache)", param_dtype=param_dtype, compute_dtype="bfloat16",
                 cast_weights=not self.args.no_cast_weights,
                 weights_read_in_loop="bfloat16" if param_dtype == "bfloat16" or not self.args.no_cast_weights
                 else "float32 (cast at use)",
                 scan_layers=cfg.scan_layers, batch=B, prompt_len=P, new_tokens=N, cache_len=P + N,
                 sampling="temperature 1.0, top_p 1.0, top_k 0", compile_s=compile_s, compile_1_token_s=compile_1_s,
                 warmup_s=tw, n_timed=len(tn), generate_s_each=tn, generate_1_token_s_each=t1,
                 generate_s_median=T_n, new_tokens_per_s=B * N / T_n,
                 ms_per_decode_step=step_s * 1e3 if step_s else None, ms_per_decode_step_method=method,
                 decode_only_tokens_per_s=B / step_s if step_s else None,
                 floor_ms_per_step=floor_s * 1e3 if floor_s else None,
                 floor_ms_per_step_full_cache=floor_full_s * 1e3 if floor_full_s else None,
                 floor_definition="(bf16 bytes of all weights but the input embedding + bf16 KV bytes at the mean "
                                  "context P+N/2) / measured copy GB/s (same as hf_peer.py)",
                 floor_fraction=(floor_s / step_s) if floor_s and step_s else None,
                 floor_fraction_full_cache=(floor_full_s / step_s) if floor_full_s and step_s else None,
                 peak_mem_gb=self.peak_mem_gb())
        log(f"   -> {r['new_tokens_per_s']:.0f} new tok/s, {r['ms_per_decode_step']:.3f} ms/decode step"
            + (f", {100 * r['floor_fraction']:.0f}% of the bandwidth floor ({r['floor_ms_per_step']:.3f} ms)"
               if r["floor_fraction"] else ""))
        return r

    def ppo(self, soft):
        try:
            return self._ppo(soft, frozen_dtype=self.args.frozen_dtype, remat=self.args.ppo_remat)
        except Exception as e:  # noqa: BLE001
            oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
            if not oom or self.args.frozen_dtype == "bfloat16" or self.left() < CAPS["ppo"][1]:
                raise
            first = f"{type(e).__name__}: {str(e)[:600]}"
            traceback.clear_frames(e.__traceback__)  # release the failed attempt's device buffers
        gc.collect()
        log("   out of memory: retrying with bf16 frozen models and rematerialised layers")
        r = self._ppo(soft, frozen_dtype="bfloat16", remat=True)
        r["first_attempt_error"] = first
        return r

    def _ppo(self, soft, frozen_dtype: str, remat: bool):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P_

        from safejax import parallel, rl
        from safejax.generation import SamplingConfig
        from safejax.train.common import scalar_on_mesh
        from safejax.train.ppo import Frozen, Models, ModelState, PPOConfig, PPOState, Trainer

        c, S = self.c, self.sizes
        B, Pw, N, M = c["ppo_batch"], c["ppo_prompt"], c["ppo_new"], c["ppo_micro"]
        mesh = self.mesh()
        cfg = PPOConfig(algorithm="ppo-lag", reward_model="<random>", cost_model="<random>")
        cfg.rollout = SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=1.0, top_k=0,
                                     cast_weights=not self.args.no_cast_weights)
        cfg.train.batch_size = B
        cfg.ppo.micro_batch_size = M
        cfg.data.prompt_width = Pw
        cfg.validate()
        train_cfg = self.model_config(remat=remat)
        frozen_cfg = self.model_config(remat=remat, param_dtype=frozen_dtype)
        t = time.perf_counter()
        actor_def, actor_p = self.build("causal_lm", train_cfg, mesh, seed=0)
        _, ref_p = self.build("causal_lm", frozen_cfg, mesh, seed=0)  # the reference = the initial actor
        rm_def, rm_p = self.build("score", frozen_cfg, mesh, seed=1)
        cm_def, cm_p = self.build("score", frozen_cfg, mesh, seed=2)
        rc_def, rc_p = self.build("score", train_cfg, mesh, seed=1)  # critics start from the score models
        cc_def, cc_p = self.build("score", train_cfg, mesh, seed=2)
        models = Models(actor=actor_def, reward_critic=rc_def, cost_critic=cc_def, reward=rm_def, cost=cm_def)
        trainer = Trainer(cfg, models, mesh, prompt_width=Pw, eos_id=-1, pad_id=0, total_updates=100,
                          ptx_enabled=False)

        def model_state(mdef, params, tx):
            sh = mdef.shardings(mesh)
            opt_sh = parallel.opt_state_shardings(tx, params, sh, mesh)
            return ModelState(params, jax.jit(tx.init, out_shardings=opt_sh)(params)), ModelState(sh, opt_sh)

        rep = NamedSharding(mesh, P_())
        a_s, a_sh = model_state(actor_def, actor_p, trainer.actor_tx)
        r_s, r_sh = model_state(rc_def, rc_p, trainer.critic_tx)
        c_s, c_sh = model_state(cc_def, cc_p, trainer.critic_tx)
        lag = rl.lagrange_init(cfg.lagrange.lambda_init, num_constraints=1,
                               window_size=cfg.lagrange.episode_cost_window_size, lambda_lr=cfg.lagrange.lambda_lr)
        lag = jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), rep), lag)
        state = PPOState(step=scalar_on_mesh(0, mesh), actor=a_s, reward_critic=r_s, cost_critic=c_s, lagrange=lag,
                         rng=jax.device_put(jax.random.key_data(jax.random.key(0)), rep))
        state_sh = PPOState(step=rep, actor=a_sh, reward_critic=r_sh, cost_critic=c_sh,
                            lagrange=jax.tree.map(lambda _: rep, lag), rng=rep)
        frozen = Frozen(ref=ref_p, reward=rm_p, cost=cm_p)
        frozen_sh = Frozen(ref=actor_def.shardings(mesh), reward=rm_def.shardings(mesh), cost=cm_def.shardings(mesh))
        jax.block_until_ready((state, frozen))
        init_s = time.perf_counter() - t
        log(f"   six models built in {init_s:.1f}s (frozen params {frozen_dtype}, remat {remat}); "
            f"device memory in use {self.peak_mem_gb() or 0:.1f} GB peak")
        bsh = parallel.batch_sharding(mesh, 2)
        rollout_fn = parallel.mesh_jit(trainer.rollout, mesh=mesh, in_shardings=(state_sh, frozen_sh, bsh, bsh))
        update_fn = parallel.mesh_jit(trainer.update, mesh=mesh, in_shardings=(state_sh, None, None),
                                      out_shardings=(state_sh, None), donate_argnums=(0,))
        rng = np.random.default_rng(0)

        def prompts():
            ids = rng.integers(0, c["vocab"], size=(B, Pw)).astype(np.int32)
            return jax.device_put(ids, bsh), jax.device_put(np.ones_like(ids), bsh)

        # warm-up iteration: compile (timed separately) + run
        ids, mask = prompts()
        t = time.perf_counter()
        rollout_c = rollout_fn.lower(state, frozen, ids, mask).compile()
        rollout_compile_s = time.perf_counter() - t
        exp = jax.block_until_ready(rollout_c(state, frozen, ids, mask))
        t = time.perf_counter()
        update_c = update_fn.lower(state, exp, None).compile()
        update_compile_s = time.perf_counter() - t
        log(f"   compiled rollout in {rollout_compile_s:.1f}s, update in {update_compile_s:.1f}s")
        t = time.perf_counter()
        state, m = update_c(state, exp, None)
        jax.block_until_ready(m)
        warm_update_s = time.perf_counter() - t
        rollouts, updates, metrics = [], [], []
        for i in range(c["ppo_timed"]):
            ids, mask = prompts()
            jax.block_until_ready((ids, mask))
            t = time.perf_counter()
            exp = jax.block_until_ready(rollout_c(state, frozen, ids, mask))
            t_roll = time.perf_counter() - t
            t = time.perf_counter()
            state, m = update_c(state, exp, None)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            t_upd = time.perf_counter() - t
            rollouts.append(t_roll)
            updates.append(t_upd)
            metrics.append(m)
            log(f"   iteration {i}: rollout {t_roll:.3f} s + update {t_upd:.3f} s = {t_roll + t_upd:.3f} s  "
                f"(reward {m['train/reward']:.3f}, cost {m['train/cost']:.3f}, lambda {m['train/lambda']:.3f})")
            if time.time() > soft:
                break
        del state, frozen, exp
        L, D = c["layers"], c["hidden"]
        T = Pw + N
        n_a, n_s = S["n_matmul"], S["n_score_matmul"]
        scoring_flops = seq_flops(n_a, L, D, B, T, False) * 2 + seq_flops(n_s, L, D, B, T, False) * 4
        update_flops = seq_flops(n_a, L, D, B, T, True) + 2 * seq_flops(n_s, L, D, B, T, True)
        t_roll, t_upd = median(rollouts), median(updates)
        r = dict(trainer="safejax.train.ppo.Trainer (rollout + update jitted as in run_ppo)", algorithm="ppo-lag",
                 models="actor, reference, reward model, cost model, reward critic, cost critic (same shape)",
                 train_param_dtype="float32", frozen_param_dtype=frozen_dtype, compute_dtype="bfloat16", remat=remat,
                 scan_layers=train_cfg.scan_layers, batch=B, prompt_len=Pw, new_tokens=N, micro_batch=M,
                 update_iters=cfg.ppo.update_iters, init_s=init_s, rollout_compile_s=rollout_compile_s,
                 update_compile_s=update_compile_s, warmup_update_s=warm_update_s, n_timed=len(rollouts),
                 rollout_s_each=rollouts, update_s_each=updates, rollout_s=t_roll, update_s=t_upd,
                 iteration_s=t_roll + t_upd, tokens_per_iteration=B * T,
                 iteration_tokens_per_s=B * T / (t_roll + t_upd), new_tokens_per_s_in_rollout=B * N / t_roll,
                 scoring_model_flops=scoring_flops, update_model_flops=update_flops,
                 update_tflops=update_flops / t_upd / 1e12,
                 update_mfu_vs_989=update_flops / t_upd / H100_SXM_DENSE_BF16,
                 metrics_last=metrics[-1] if metrics else None, peak_mem_gb=self.peak_mem_gb())
        log(f"   -> iteration {r['iteration_s']:.3f} s (rollout {t_roll:.3f} s, update {t_upd:.3f} s), "
            f"{r['iteration_tokens_per_s']:.0f} tok/s")
        return r

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
