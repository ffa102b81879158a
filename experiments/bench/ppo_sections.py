"""ppo_sections.py - the timed sections of ppo_bench.py: ceilings, train, decode and one PPO-Lag iteration.

:class:`Sections` is mixed into ``ppo_bench.Bench`` (which brings the harness: ``self.c`` the config,
``self.args``, ``self.sizes``, :meth:`peak_mem_gb`); each section takes the soft deadline and returns its
numbers as a dict.  :func:`model_sizes` / :func:`seq_flops` are the FLOP and byte formulas of
experiments/bench/README.md.
"""

from __future__ import annotations

import gc
import time
import traceback

from bench_harness import log, median

H100_SXM_DENSE_BF16 = 989e12


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


class Sections:
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

        from safejax.parallel import host_local_to_global, input_sharding
        from safejax.train.common import TrainState
        from safejax.train.fit import MICRO_AXES, make_train_step
        from safejax.train.optim import OptimConfig, make_optimizer
        from safejax.train.sft import sft_loss_fn
        from safejax.train.state import build_state, spread, trainable

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
        state, state_sh = build_state(TrainState, mesh, 0, **spread(trainable(params, mdef.shardings(mesh), tx, mesh)))
        del params
        B, T = c["train_batch"], c["train_seq"]
        ids = np.random.default_rng(0).integers(0, c["vocab"], size=(1, B, T)).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "label_mask": np.ones_like(ids)}
        bsh = {k: input_sharding(mesh, 3, MICRO_AXES) for k in batch}
        batch = host_local_to_global(batch, mesh, axes=MICRO_AXES)
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
            if not oom or self.args.frozen_dtype == "bfloat16" or self.left() < self.caps["ppo"][1]:
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
        from safejax import parallel
        from safejax.generation import SamplingConfig
        from safejax.train.ppo import Models, PPOConfig, PPOPhases
        from safejax.train.ppo_loop import frozen_models, make_rollout, make_update, ppo_state

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
        phases = PPOPhases(cfg, models, mesh, prompt_width=Pw, eos_id=-1, pad_id=0, total_updates=100,
                           ptx_enabled=False)
        cfg.seed = 0
        state, state_sh = ppo_state(cfg, models, {"actor": actor_p, "reward_critic": rc_p, "cost_critic": cc_p},
                                    phases, mesh)
        frozen, frozen_sh = frozen_models(models, ref_p, rm_p, cm_p, mesh)
        jax.block_until_ready((state, frozen))
        init_s = time.perf_counter() - t
        log(f"   six models built in {init_s:.1f}s (frozen params {frozen_dtype}, remat {remat}); "
            f"device memory in use {self.peak_mem_gb() or 0:.1f} GB peak")
        rollout_fn = make_rollout(phases, mesh, state_sh, frozen_sh)
        update_fn = make_update(phases, mesh, state_sh)
        rng = np.random.default_rng(0)

        def prompts():
            ids = rng.integers(0, c["vocab"], size=(B, Pw)).astype(np.int32)
            return parallel.host_local_to_global((ids, np.ones_like(ids)), mesh)

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
        r = dict(trainer="safejax.train.ppo.PPOPhases (rollout + update jitted by ppo_loop.make_rollout / make_update)",
                 algorithm="ppo-lag",
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

