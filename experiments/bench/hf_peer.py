#!/usr/bin/env python3
"""hf_peer.py - the PyTorch / HF transformers peer of ``ppo_bench.py``, on the same card in the same call.

What a user of the PyTorch stack gets for the same two workloads that ``ppo_bench.py`` times in
safejax, with the same model shape, batch, sequence lengths, optimizer and sampling settings:

  ceilings       torch.mm bf16 8192^3 -> TFLOP/s = 2 n^3 / t; dst.copy_(src) of 4 GiB -> GB/s = 2 bytes / t
                 (median of 10 CUDA-event timings after warm-up)
  hf_train       transformers.LlamaForCausalLM (attn_implementation="sdpa"), fp32 master weights under
                 torch.autocast(bfloat16), torch.optim.AdamW(fused on CUDA) lr 1e-4, betas (0.9, 0.999),
                 eps 1e-8, wd 0.01; one fixed random batch 8 x 512 (the loss must fall: memorisation);
                 3 warm-up + 10 timed steps, median -> tokens/s and MFU (6 N tokens + causal attention FLOPs)
  hf_gen         model.generate in bf16 with the default (dynamic) cache: 32 random prompts x 128 tokens,
                 exactly 256 new tokens (min_new_tokens = max_new_tokens), sampling at temperature 1,
                 top_p 1, top_k 0; 1 warm-up + 2 timed calls -> new tokens/s (prefill included) and
                 ms per decode step = (t(256 new) - t(1 new)) / 255
  hf_gen_static  the same with cache_implementation="static" (transformers compiles the decode step on
                 CUDA; the warm-up call includes that compile).  Last, because its compile time varies most.

The model is the TinyLlama-1.1B shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632,
vocabulary 32000, untied, RoPE theta 1e4, RMSNorm eps 1e-5), random weights (init std 0.02), random token
ids from numpy's seed-0 generator: the shapes and the FLOP formula of ppo_bench.py.  Nothing is downloaded.

The JSON (``$OUT/hf_peer.json`` or ``--out``) is rewritten after every section and has the layout
``ppo_bench.py --baseline`` reads: ``{"torch": {"sections": {...}, "device": ..., "versions": ...}, "meta": ...}``.
A section that does not fit in what is left of ``--budget`` is recorded as skipped; a watchdog writes the
JSON and exits when the budget is over, whatever is running.

Usage:
    python experiments/bench/hf_peer.py              # GPU, full config, --budget 210
    python experiments/bench/hf_peer.py --tiny       # CPU smoke test (2 layers, hidden 64, a few steps)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback

FULL = dict(name="tinyllama-1.1b-shape", vocab=32000, hidden=2048, layers=22, heads=32, kv_heads=4, inter=5632,
            eps=1e-5, rope_theta=10000.0, init_std=0.02, max_pos=2048,
            train_batch=8, train_seq=512, train_warmup=3, train_steps=10,
            gen_batch=32, prompt_len=128, new_tokens=256, gen_runs=2,
            mm_n=8192, copy_bytes=4 << 30, ceiling_warmup=3, ceiling_iters=10)
TINY = dict(FULL, name="tiny", vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, inter=176, max_pos=256,
            train_batch=2, train_seq=32, train_warmup=1, train_steps=3,
            gen_batch=2, prompt_len=8, new_tokens=6, gen_runs=2,
            mm_n=256, copy_bytes=16 << 20, ceiling_warmup=1, ceiling_iters=3)
# seconds a section needs at least (full config) before it is started
MIN_SECONDS = {"ceilings": 10, "hf_train": 30, "hf_gen": 25, "hf_gen_static": 45}
OPTIM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
H100_SXM_DENSE_BF16 = 989e12


def train_flops(c: dict) -> float:
    """Model FLOPs of one training step: 6 N tokens (N = every matmul weight incl. the LM head) plus the
    causal attention scores and values, 12 L D S tokens / 2 (ppo_bench.py's formula)."""
    d, hd = c["hidden"], c["hidden"] // c["heads"]
    per_layer = d * c["heads"] * hd * 2 + 2 * d * c["kv_heads"] * hd + 3 * d * c["inter"]
    n = c["layers"] * per_layer + c["vocab"] * d
    tokens = c["train_batch"] * c["train_seq"]
    return 6 * n * tokens + 12 * c["layers"] * d * c["train_seq"] * tokens / 2


class Peer:
    """Runs the sections in order and keeps the JSON on disk up to date."""

    def __init__(self, args):
        self.args, self.c = args, dict(TINY if args.tiny else FULL)
        self.t0 = time.time()
        self.lock = threading.Lock()
        self.R = {"meta": {"script": "experiments/bench/hf_peer.py", "config": self.c, "budget_s": args.budget,
                           "argv": sys.argv, "optimizer": OPTIM},
                  "torch": {"sections": {}}, "finished": False}

    # ---- bookkeeping
    def save(self) -> None:
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.R, f, indent=1, default=str)
        os.replace(tmp, self.args.out)

    def left(self) -> float:
        return self.args.budget - (time.time() - self.t0)

    def section(self, name: str, fn) -> None:
        need = 0 if self.args.tiny else MIN_SECONDS[name]
        S = self.R["torch"]["sections"]
        if self.args.only and name not in self.args.only:
            return
        if self.left() < need:
            S[name] = {"skipped": f"{self.left():.0f} s of the budget left, {need} s needed"}
        else:
            S[name] = {"in_progress": True}
            self.save()
            t = time.time()
            try:
                S[name] = dict(fn(), section_s=time.time() - t)
            except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
                S[name] = {"error": f"{type(e).__name__}: {e}"[:1500], "traceback": traceback.format_exc()[-3000:]}
            self.cleanup()
        print(f"hf_peer: {name}: " + json.dumps({k: v for k, v in S[name].items() if not isinstance(v, (list, dict))},
                                                default=str)[:400], flush=True)
        with self.lock:
            self.save()

    def cleanup(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- helpers
    def timer(self):
        """``timed(fn) -> seconds``: CUDA events on a GPU, perf_counter on the CPU."""
        import torch

        if self.dev == "cuda":
            def timed(fn):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e3
        else:
            def timed(fn):
                t = time.perf_counter()
                fn()
                return time.perf_counter() - t
        return timed

    def sync(self) -> None:
        import torch

        if self.dev == "cuda":
            torch.cuda.synchronize()

    def model(self, dtype):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        c = self.c
        cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                          num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                          num_key_value_heads=c["kv_heads"], rms_norm_eps=c["eps"], rope_theta=c["rope_theta"],
                          max_position_embeddings=c["max_pos"], initializer_range=c["init_std"],
                          tie_word_embeddings=False, attn_implementation="sdpa", use_cache=True)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(device=self.dev, dtype=dtype)

    def ids(self):
        import numpy as np
        import torch

        rng = np.random.default_rng(0)
        c = self.c
        train = rng.integers(0, c["vocab"], (c["train_batch"], c["train_seq"]))
        prompts = rng.integers(0, c["vocab"], (c["gen_batch"], c["prompt_len"]))
        return torch.as_tensor(train, device=self.dev), torch.as_tensor(prompts, device=self.dev)

    # ---- sections
    def ceilings(self) -> dict:
        import torch

        c, timed = self.c, self.timer()
        g = torch.Generator(device=self.dev).manual_seed(0)
        n = c["mm_n"]
        a = torch.randn(n, n, device=self.dev, dtype=torch.bfloat16, generator=g)
        b = torch.randn(n, n, device=self.dev, dtype=torch.bfloat16, generator=g)
        out = torch.empty_like(a)
        for _ in range(c["ceiling_warmup"]):
            torch.mm(a, b, out=out)
        self.sync()
        mm = statistics.median(timed(lambda: torch.mm(a, b, out=out)) for _ in range(c["ceiling_iters"]))
        del a, b, out
        src = torch.full((c["copy_bytes"],), 3, dtype=torch.uint8, device=self.dev)
        dst = torch.empty_like(src)
        for _ in range(c["ceiling_warmup"]):
            dst.copy_(src)
        self.sync()
        cp = statistics.median(timed(lambda: dst.copy_(src)) for _ in range(c["ceiling_iters"]))
        return {"matmul_n": n, "matmul_tflops": 2 * n ** 3 / mm / 1e12, "copy_bytes": c["copy_bytes"],
                "copy_gbps": 2 * c["copy_bytes"] / cp / 1e9}

    def hf_train(self) -> dict:
        import torch

        c = self.c
        model = self.model(torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), **OPTIM, fused=self.dev == "cuda")
        ids, _ = self.ids()

        def step():
            with torch.autocast(self.dev, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        losses, times = [], []
        for i in range(c["train_warmup"] + c["train_steps"]):
            self.sync()
            t = time.perf_counter()
            loss = step()
            losses.append(float(loss.detach()))  # synchronises
            if i >= c["train_warmup"]:
                times.append(time.perf_counter() - t)
        st = statistics.median(times)
        flops = train_flops(c)
        out = {"batch": c["train_batch"], "seq": c["train_seq"], "n_params": sum(p.numel() for p in model.parameters()),
               "step_ms_median": st * 1e3, "tokens_per_s": c["train_batch"] * c["train_seq"] / st,
               "model_flops_per_step": flops, "achieved_tflops": flops / st / 1e12,
               "mfu_vs_989": flops / st / H100_SXM_DENSE_BF16, "loss_first": losses[0], "loss_last": losses[-1],
               "loss_decreased": losses[-1] < losses[0], "n_warmup": c["train_warmup"], "n_timed": len(times)}
        if self.dev == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return out

    def hf_gen(self, static: bool) -> dict:
        import torch

        c = self.c
        model = self.model(torch.bfloat16)
        model.eval()
        _, prompts = self.ids()
        mask = torch.ones_like(prompts)
        extra = {"cache_implementation": "static"} if static else {}

        def generate(n_new: int) -> float:
            self.sync()
            t = time.perf_counter()
            with torch.no_grad():
                seq = model.generate(input_ids=prompts, attention_mask=mask, do_sample=True, temperature=1.0,
                                     top_p=1.0, top_k=0, max_new_tokens=n_new, min_new_tokens=n_new,
                                     pad_token_id=0, **extra)
            self.sync()
            assert seq.shape[1] == c["prompt_len"] + n_new, seq.shape
            return time.perf_counter() - t

        warm = generate(c["new_tokens"])
        full = statistics.median(generate(c["new_tokens"]) for _ in range(c["gen_runs"]))
        one = statistics.median(generate(1) for _ in range(c["gen_runs"]))
        new = c["gen_batch"] * c["new_tokens"]
        return {"batch": c["gen_batch"], "prompt_len": c["prompt_len"], "new_tokens": c["new_tokens"],
                "warmup_s": warm, "generate_s_median": full, "new_tokens_per_s": new / full,
                "ms_per_decode_step": max(full - one, 0.0) / (c["new_tokens"] - 1) * 1e3,
                "cache": "static" if static else "dynamic"}

    def run(self) -> int:
        import numpy as np
        import torch
        import transformers

        self.dev = "cuda" if torch.cuda.is_available() else "cpu"
        dev = {"device": self.dev}
        if self.dev == "cuda":
            props = torch.cuda.get_device_properties(0)
            dev.update(name=torch.cuda.get_device_name(0), total_mem_gb=props.total_memory / 1e9)
        self.R["torch"]["device"] = dev
        self.R["torch"]["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                                       "cuda": torch.version.cuda, "transformers": transformers.__version__,
                                       "numpy": np.__version__}
        if self.dev == "cpu" and not self.args.tiny:
            self.R["error"] = "no CUDA device: use --tiny for a CPU smoke test"
            self.save()
            print("hf_peer: " + self.R["error"], file=sys.stderr)
            return 2
        self.section("ceilings", self.ceilings)
        self.section("hf_train", self.hf_train)
        self.section("hf_gen", lambda: self.hf_gen(static=False))
        self.section("hf_gen_static", lambda: self.hf_gen(static=True))
        self.R["finished"] = True
        self.R["meta"]["total_s"] = time.time() - self.t0
        with self.lock:
            self.save()
        self.summary()
        return 0

    def summary(self) -> None:
        S = self.R["torch"]["sections"]
        print(f"SUMMARY hf_peer ({self.c['name']}) on {self.R['torch']['device']}")
        rows = [("ceiling.matmul_bf16", S.get("ceilings", {}).get("matmul_tflops"), "TFLOP/s"),
                ("ceiling.copy_d2d", S.get("ceilings", {}).get("copy_gbps"), "GB/s"),
                ("hf_train.tokens_per_s", S.get("hf_train", {}).get("tokens_per_s"), "tok/s"),
                ("hf_train.mfu_vs_989", S.get("hf_train", {}).get("mfu_vs_989"), ""),
                ("hf_gen.new_tokens_per_s", S.get("hf_gen", {}).get("new_tokens_per_s"), "tok/s"),
                ("hf_gen.ms_per_decode_step", S.get("hf_gen", {}).get("ms_per_decode_step"), "ms"),
                ("hf_gen_static.new_tokens_per_s", S.get("hf_gen_static", {}).get("new_tokens_per_s"), "tok/s")]
        for name, v, unit in rows:
            shown = "-" if v is None or not math.isfinite(v) else f"{v:,.4g}"
            print(f"  {name:<34} {shown:>12} {unit}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    ap.add_argument("--budget", type=float, default=210.0, help="seconds before the watchdog writes the JSON and exits")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/hf_peer.json or ./hf_peer.json)")
    ap.add_argument("--only", default=None, help="comma-separated sections: ceilings,hf_train,hf_gen,hf_gen_static")
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(os.environ.get("OUT") or ".", "hf_peer.json")
    args.only = set(args.only.split(",")) if args.only else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    peer = Peer(args)

    def watchdog():
        time.sleep(max(args.budget, 1.0))
        with peer.lock:
            peer.R["meta"]["watchdog"] = f"budget of {args.budget:.0f} s over"
            peer.save()
        print(f"hf_peer: budget of {args.budget:.0f} s over; JSON {args.out}", flush=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    return peer.run()


if __name__ == "__main__":
    sys.exit(main())
