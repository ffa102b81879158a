#!/usr/bin/env python3
"""xla_memory.py - per-device memory of PPO-Lag's rollout and update as XLA compiles them, against the model.

The script lowers and compiles, from abstract inputs only (``jax.ShapeDtypeStruct``: no weight, optimizer
moment or activation is allocated), the two jitted programs of the RL stage -- ``ppo_loop.make_rollout`` and
``ppo_loop.make_update`` (state donated) over ``PPOPhases`` -- on a mesh of fake CPU devices
(``--xla_force_host_platform_device_count``, set before jax is imported), and reads
``compiled.memory_analysis()``: per device, the bytes of the arguments, the outputs, the temporaries (XLA's
buffer assignment: activations, gradients, KV cache, logits ...), the output bytes aliased to donated
arguments, and the generated code.  The state comes from the stage's own builder (``ppo_loop.ppo_state`` and
``frozen_models`` run under ``jax.eval_shape``), the six models from ``nnx.eval_shape`` (the abstract models of
``safejax.memory_table``), the config from ``load_config(PPOConfig, ...)`` with the same keys a user sets.
With ``--lora-rank R`` the models go through the stage's LoRA path too (``ppo_lora.lora_models`` under
``jax.eval_shape``): the state holds the adapters (+ the critics' score heads) and their optimizer states, the
frozen tree the three shared bases (the actor's, also the reference; the reward and cost models, also the
critics' backbones), and the update reads the frozen bases as a fourth argument, as ``run_ppo`` does.

For each slice the mesh is ``data=1, fsdp=<chips>, tensor=1`` (``safejax.memory_table``'s default), the update
micro-batch is ``--rows-per-device`` rows per device and the rollout batch ``--rollout-rows-per-device`` rows per
device, each ``--seq-len`` tokens (``--prompt-width`` prompt + the rest sampled) -- the settings of the memory
table -- and the result is set beside ``safejax.memory_table.safe_rlhf_memory`` entry by entry.

Peak per device (what must fit in HBM):

  rollout  resident state (trained models with their optimizer states + frozen models) + prompts
           + outputs (experience) + temporaries
  update   arguments (state + experience [+ frozen bases with LoRA]) + outputs - aliased (donated state)
           + temporaries + frozen models when they are not an argument (full fine-tuning: resident through
           the whole run, not read by the update)

The full 32-layer LLaMA-7B programs compile in 1-4 minutes per slice on 2 CPU cores with ``scan_layers`` (the
default here, with per-layer remat as the memory table assumes).  ``--layers 2 --layers 4 --extrapolate-to 32``
compiles shallower models and extends every byte count linearly: this holds for the update (within 0.1% on
v4-32) but not for the rollout, whose buffer reuse changes with depth -- measure the full depth for numbers.
``--backend tpu`` compiles for the slice's TPU topology without a TPU (libtpu's ahead-of-time compiler).

Usage (CPU; nothing is allocated, so any machine with ~4 GB of RAM):

    python experiments/bench/xla_memory.py                             # LLaMA-7B on the README's slices
    python experiments/bench/xla_memory.py --slice v4-32 --slice v5p-16 --json xla_memory.json
    python experiments/bench/xla_memory.py --tiny --slice v4-8         # seconds: the test's shape
    python experiments/bench/xla_memory.py --lora-rank 16              # LoRA actor and critics (config keys
                                                                        # lora.actor.rank, lora.reward_critic.rank,
                                                                        # lora.cost_critic.rank; alpha 2R)

Bad options or config keys exit 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

DEFAULT_SLICES = ("v4-8", "v5p-16", "v4-32", "v4-64", "v5e-64")
GiB = 1024 ** 3


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="xla_memory.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slice", action="append", default=None,
                    help=f"TPU slice (repeatable), mesh data=1,fsdp=<chips>; default: {' '.join(DEFAULT_SLICES)}")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model (seconds; the test's shape)")
    ap.add_argument("--layers", type=int, action="append", default=None,
                    help="decoder layers to compile (repeatable; default: the model's 32)")
    ap.add_argument("--extrapolate-to", type=int, default=0,
                    help="extend the first two --layers linearly to this depth (e.g. 32)")
    ap.add_argument("--rows-per-device", type=int, default=1, help="update micro-batch rows per device")
    ap.add_argument("--rollout-rows-per-device", type=int, default=8, help="rollout rows per device")
    ap.add_argument("--seq-len", type=int, default=512, help="prompt + response tokens")
    ap.add_argument("--prompt-width", type=int, default=128, help="prompt tokens (the rest is sampled)")
    ap.add_argument("--frozen-param-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="storage dtype of reference / reward / cost models (run_ppo loads them float32)")
    ap.add_argument("--no-remat", action="store_true", help="compile without per-layer rematerialisation")
    ap.add_argument("--no-scan", action="store_true", help="unrolled layers (slow compiles)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="LoRA rank R of the actor and both critics (config keys lora.actor.rank, "
                         "lora.reward_critic.rank, lora.cost_critic.rank; alpha 2R, default targets q/k/v/o; "
                         "--set lora.actor.targets=... etc. to change them)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any further PPO config override (repeatable), e.g. rollout.num_return_sequences=4")
    ap.add_argument("--backend", default="cpu", choices=("cpu", "tpu"),
                    help="cpu: fake CPU devices; tpu: compile for the slice's TPU topology without a TPU "
                         "(needs libtpu: pip install 'libtpu==0.0.42.*', the version jax[tpu] pins)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    return ap


def _slice_chips(name: str) -> int:
    from safejax.slices import slice_spec  # no jax import: safe before the device count is set
    return slice_spec(name).chips


if __name__ == "__main__":  # fake CPU devices for the largest slice: must precede the first jax import
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    _early, _ = _parser().parse_known_args()
    try:
        _n = max(_slice_chips(s) for s in (_early.slice or DEFAULT_SLICES))
    except Exception as _e:  # noqa: BLE001 -- reported as a one-line error by main()
        _n = 1
        _EARLY_ERROR = str(_e)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from safejax import memory_table as mt, parallel  # noqa: E402
from safejax.config import load_config  # noqa: E402
from safejax.errors import SafejaxError  # noqa: E402
from safejax.parallel import MeshConfig, make_mesh  # noqa: E402
from safejax.slices import slice_spec  # noqa: E402
from safejax.train.ppo import Models, PPOConfig, PPOPhases  # noqa: E402
from safejax.train.ppo_loop import frozen_models, make_rollout, make_update, ppo_state  # noqa: E402
from safejax.train.ppo_lora import lora_models  # noqa: E402

TINY = mt.LLAMA2_7B.replace(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=4, max_position_embeddings=128)
LORA_ROLES = ("actor", "reward_critic", "cost_critic")
STATS = ("argument", "output", "alias", "temp", "generated_code")


# ----------------------------------------------------------------------------- config


def stage_config(chips: int, *, rows_per_device: int, rollout_rows_per_device: int, seq_len: int,
                 prompt_width: int, remat: bool, scan_layers: bool, lora_rank: int = 0,
                 overrides: tuple[str, ...] = ()) -> PPOConfig:
    """The PPO-Lag config of the measurement, through ``load_config`` (so every key is checked as for a run):
    rollout batch ``rollout_rows_per_device * chips`` prompts of ``prompt_width`` tokens, ``seq_len -
    prompt_width`` sampled tokens, update micro-batch ``rows_per_device * chips`` rows, bf16 compute."""
    if not 0 < prompt_width < seq_len:
        raise SystemExit(f"xla_memory.py: error: --prompt-width {prompt_width} must be in (0, --seq-len {seq_len})")
    keys = ["reward_model=<abstract>", "cost_model=<abstract>", "seed=0",
            f"train.batch_size={rollout_rows_per_device * chips}", f"ppo.micro_batch_size={rows_per_device * chips}",
            f"data.prompt_width={prompt_width}", f"rollout.max_new_tokens={seq_len - prompt_width}",
            "actor.dtype=bfloat16", f"actor.remat={str(remat).lower()}",
            f"actor.scan_layers={str(scan_layers).lower()}"]
    if lora_rank:
        keys += [f"lora.{role}.{k}={v}" for role in LORA_ROLES for k, v in (("rank", lora_rank),
                                                                           ("alpha", 2.0 * lora_rank))]
    return load_config(PPOConfig, None, keys + list(overrides))


def model_config(cfg: PPOConfig, base, num_layers: int):
    """The ModelConfig of the six models: ``base``'s shape at ``num_layers``, compute dtype / remat / scan of
    ``cfg.actor`` (the measurement gives the score models the actor's remat and scan, see the README)."""
    return base.replace(num_layers=num_layers, dtype=cfg.actor.dtype, remat=cfg.actor.remat,
                        scan_layers=cfg.actor.scan_layers)


# ----------------------------------------------------------------------------- abstract state


def abstract_stage(cfg: PPOConfig, mcfg, mesh, frozen_param_dtype: str = "float32"):
    """``(phases, state, state_shardings, frozen, frozen_shardings)`` of the RL stage with abstract
    (``ShapeDtypeStruct``) leaves: the six models from ``nnx.eval_shape``, the state from the stage's own
    ``ppo_state`` / ``frozen_models`` under ``jax.eval_shape`` (nothing is allocated).  The params by role are
    those of ``ppo_loop.load_models``: a LoRA role loads no reference copy / critic backbone, and
    ``ppo_lora.lora_models`` (under ``jax.eval_shape``) turns them into adapters + heads over shared bases."""
    frozen_cfg = mcfg.replace(param_dtype=frozen_param_dtype)
    lc = cfg.lora
    actor_def, actor = mt.abstract_model(mcfg, "causal_lm")
    _, ref = mt.abstract_model(frozen_cfg, "causal_lm")
    critic_def, critic = mt.abstract_model(mcfg, "score")
    score_def, score = mt.abstract_model(frozen_cfg, "score")
    models = Models(actor=actor_def, reward_critic=score_def if lc.reward_critic.rank else critic_def,
                    cost_critic=score_def if lc.cost_critic.rank else critic_def, reward=score_def, cost=score_def)
    params = {"actor": actor, "ref": None if lc.actor.rank else ref, "reward": score, "cost": score,
              "reward_critic": None if lc.reward_critic.rank else critic,
              "cost_critic": None if lc.cost_critic.rank else critic}
    if lc.any:
        lora_box = {}

        def build_lora(params):
            lora_box["models"], out = lora_models(cfg, models, params)
            return out

        params = jax.eval_shape(build_lora, params)
        models = lora_box["models"]
    phases = PPOPhases(cfg, models, mesh, prompt_width=cfg.data.prompt_width, eos_id=2, pad_id=0,
                       total_updates=1000, ptx_enabled=False, unk_id=None)
    box = {}

    def build_state(params):
        state, box["state"] = ppo_state(cfg, models, params, phases, mesh)
        return state

    def build_frozen(ref, reward, cost):
        frozen, box["frozen"] = frozen_models(models, ref, reward, cost, mesh)
        return frozen

    state = jax.eval_shape(build_state, {k: params[k] for k in LORA_ROLES})
    frozen = jax.eval_shape(build_frozen, params["ref"], params["reward"], params["cost"])
    return phases, state, box["state"], frozen, box["frozen"]


def _with_sharding(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def memory_stats(compiled) -> dict:
    """``compiled.memory_analysis()`` as a dict of per-device bytes (``STATS``)."""
    m = compiled.memory_analysis()
    return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in STATS}


def state_bytes(state, shardings) -> dict:
    """Per-device bytes of each trained model's params and optimizer state (and the rest) from the shardings."""
    out = {}
    for role in ("actor", "reward_critic", "cost_critic"):
        ms, sh = getattr(state, role), getattr(shardings, role)
        out[role] = {"params": mt.per_device_bytes(ms.params, sh.params),
                     "optimizer": mt.per_device_bytes(ms.opt_state, sh.opt_state)}
    out["other"] = (mt.per_device_bytes(state.lagrange, shardings.lagrange)
                    + mt.per_device_bytes((state.step, state.rng), (shardings.step, shardings.rng)))
    return out


def measure(cfg: PPOConfig, mcfg, mesh, *, frozen_param_dtype: str = "float32") -> dict:
    """Lower and compile the stage's rollout and update on ``mesh`` from abstract inputs; per-device bytes of
    XLA's memory analysis, of the state by model (from the shardings), compile seconds and peak host RSS."""
    t0 = time.perf_counter()
    phases, state, state_sh, frozen, frozen_sh = abstract_stage(cfg, mcfg, mesh, frozen_param_dtype)
    n_prompts = cfg.train.batch_size // cfg.rollout.num_return_sequences
    prompts = jax.ShapeDtypeStruct((n_prompts, cfg.data.prompt_width), jnp.int32)
    t1 = time.perf_counter()
    rollout = make_rollout(phases, mesh, state_sh, frozen_sh).lower(state, frozen, prompts, prompts).compile()
    t2 = time.perf_counter()
    exp = jax.eval_shape(phases.rollout, state, frozen, prompts, prompts)
    exp = _with_sharding(exp, rollout.output_shardings)  # the experience as the rollout hands it over
    lora = cfg.lora.any  # LoRA models read their frozen bases in the update (run_ppo's fourth argument)
    update = make_update(phases, mesh, state_sh, frozen_shardings=frozen_sh if lora else None).lower(
        state, exp, None, *((frozen,) if lora else ())).compile()
    t3 = time.perf_counter()
    frozen_bytes = {k: mt.per_device_bytes(getattr(frozen, k), getattr(frozen_sh, k))
                    for k in ("ref", "reward", "cost")}
    return {
        "rollout": memory_stats(rollout), "update": memory_stats(update), "lora": lora,
        "state": state_bytes(state, state_sh), "frozen": frozen_bytes,
        "prompts": 2 * mt.per_device_bytes(prompts, parallel.input_sharding(mesh, 2)),
        "experience": sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                          for x, s in zip(jax.tree.leaves(exp), jax.tree.leaves(rollout.output_shardings))),
        "seconds": {"build": t1 - t0, "rollout_compile": t2 - t1, "update_compile": t3 - t2},
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
    }


def tpu_devices(spec) -> list:
    """The devices of ``spec``'s TPU topology for deviceless ahead-of-time compilation (libtpu compiles on a
    CPU host; v4 / v5p chips as one megacore device each)."""
    from jax.experimental import topologies  # only with --backend tpu

    n = spec.chips
    if spec.generation not in ("v4", "v5p", "v5e", "v6e"):
        raise ValueError(f"--backend tpu: {spec.name} is not a TPU slice")
    if spec.generation in ("v4", "v5p"):
        dims = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
        kw = {"chip_config_name": "megacore"}
    else:
        dims = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
        kw = {}
    if n not in dims:
        raise ValueError(f"--backend tpu: no topology known for {spec.name} ({n} chips)")
    gen = spec.generation
    try:
        return list(topologies.get_topology_desc(topology_name=f"{gen}:{dims[n]}", platform="tpu", **kw).devices)
    except RuntimeError as e:
        raise ValueError(f"--backend tpu: libtpu cannot describe {gen}:{dims[n]} ({str(e).splitlines()[0]}); "
                         "install it with pip install 'libtpu==0.0.42.*'") from None


# ----------------------------------------------------------------------------- derived numbers


def resident(r: dict) -> int:
    """Per-device bytes that live through the whole run: the trained state (params, optimizer states, step, rng,
    Lagrange state) and the frozen models."""
    s = r["state"]
    return (sum(v["params"] + v["optimizer"] for k, v in s.items() if k != "other") + s["other"]
            + sum(r["frozen"].values()))


def peaks(r: dict) -> dict:
    """Per-device peak of each program (see the module docstring) and the larger of the two.  The rollout's
    XLA arguments leave out what it does not read (the optimizer states: ``jit`` prunes unused arguments), but
    those buffers stay in HBM, so the rollout counts the whole resident state."""
    ro, up = r["rollout"], r["update"]
    frozen = 0 if r.get("lora") else sum(r["frozen"].values())  # LoRA: the bases are update arguments
    rollout = resident(r) + r["prompts"] + ro["output"] + ro["temp"]
    update = up["argument"] + up["output"] - up["alias"] + up["temp"] + frozen
    return {"rollout": rollout, "update": update, "peak": max(rollout, update)}


def extrapolate(a: dict, la: int, b: dict, lb: int, target: int) -> dict:
    """Every number of ``a`` (measured at ``la`` layers) and ``b`` (``lb``) extended linearly to ``target``."""
    if isinstance(a, dict):
        return {k: extrapolate(a[k], la, b[k], lb, target) for k in a}
    return a + (target - la) * (b - a) / (lb - la)


def compare(r: dict, model: "mt.SafeRLHFMemory") -> list[tuple[str, float, float]]:
    """``(entry, measured bytes, modelled bytes)`` per device, entry by entry."""
    by = {m.role: m for m in model.models}
    s, up, ro = r["state"], r["update"], r["rollout"]
    rows = []
    for role in ("actor", "reward_critic", "cost_critic"):
        rows.append((f"{role} params", s[role]["params"], by[role].params))
        rows.append((f"{role} Adam state", s[role]["optimizer"], by[role].optimizer))
    rows.append(("reference params", r["frozen"]["ref"], by["reference"].params))
    rows.append(("reward model params", r["frozen"]["reward"], by["reward_model"].params))
    rows.append(("cost model params", r["frozen"]["cost"], by["cost_model"].params))
    grads = sum(m.grads for m in model.models)
    p = peaks(r)
    what = "bf16 copy of the 3 bases" if r.get("lora") else "3 gradients"
    rows.append((f"update: {what} + activations + gathered weights (XLA temp)", up["temp"],
                 grads + model.update_activations))
    rows.append(("rollout: KV cache + logits + scores + gathered weights (XLA temp)", ro["temp"],
                 model.rollout_working_set))
    rows.append(("update peak", p["update"], model.states + model.update_activations))
    rows.append(("rollout peak", p["rollout"], model.states - grads + model.rollout_working_set))
    rows.append(("peak per device", p["peak"], model.total))
    return rows


# ----------------------------------------------------------------------------- CLI


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def run(args) -> list[dict]:
    base = TINY if args.tiny else mt.LLAMA2_7B
    layers = args.layers or [base.num_layers]
    if args.extrapolate_to and len(layers) < 2:
        raise SystemExit("xla_memory.py: error: --extrapolate-to needs two --layers (e.g. --layers 2 --layers 4)")
    out = []
    for name in args.slice or DEFAULT_SLICES:
        spec = slice_spec(name)
        devices = tpu_devices(spec) if args.backend == "tpu" else None
        mesh = make_mesh(MeshConfig(data=1, fsdp=spec.chips, tensor=1), devices=devices)
        per_layers = {}
        for n in layers:
            cfg = stage_config(spec.chips, rows_per_device=args.rows_per_device,
                               rollout_rows_per_device=args.rollout_rows_per_device, seq_len=args.seq_len,
                               prompt_width=args.prompt_width, remat=not args.no_remat, scan_layers=not args.no_scan,
                               lora_rank=args.lora_rank, overrides=tuple(args.set))
            mcfg = model_config(cfg, base, n)
            r = measure(cfg, mcfg, mesh, frozen_param_dtype=args.frozen_param_dtype)
            per_layers[n] = r
            print(f"[{name} {n} layers] compile rollout {r['seconds']['rollout_compile']:.1f}s update "
                  f"{r['seconds']['update_compile']:.1f}s, host peak RSS {r['host_peak_rss_gib']:.2f} GiB, "
                  f"peak {_gib(peaks(r)['peak'])} GiB/device", file=sys.stderr, flush=True)
        target = args.extrapolate_to or layers[0]
        if args.extrapolate_to:
            (la, a), (lb, b) = list(per_layers.items())[:2]
            keys = ("rollout", "update", "state", "frozen", "experience", "prompts")
            result = extrapolate({k: a[k] for k in keys}, la, {k: b[k] for k in keys}, lb, target)
            result["lora"] = a["lora"]
        else:
            result = per_layers[target]
        model = mt.safe_rlhf_memory(spec, base.replace(num_layers=target), frozen_param_dtype=args.frozen_param_dtype,
                                    rows_per_device=args.rows_per_device,
                                    rollout_rows_per_device=args.rollout_rows_per_device, seq_len=args.seq_len,
                                    remat=not args.no_remat, lora_rank=args.lora_rank,
                                    lora_targets=tuple(cfg.lora.actor.targets))
        out.append({"slice": name, "backend": args.backend, "chips": spec.chips, "hbm_bytes": spec.hbm_bytes,
                    "layers": target, "lora_rank": args.lora_rank,
                    "extrapolated_from": layers[:2] if args.extrapolate_to else None,
                    "measured": result, "peaks": peaks(result), "per_layers": per_layers,
                    "compare": compare(result, model), "model_total": model.total})
        if args.json:  # after every slice: a long run keeps what it measured
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=1, default=float)
    return out


def to_markdown(results: list[dict]) -> str:
    lines = ["| slice | XLA backend | chips | HBM/chip | modelled total | XLA rollout peak "
             "| XLA update peak (+frozen) | measured / modelled | fits (measured) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        p, hbm = r["peaks"], r["hbm_bytes"]
        frac = p["peak"] / hbm
        fits = "yes" if frac <= 0.85 else "tight" if frac <= 1.0 else "**no**"
        lines.append(f"| {r['slice']} | {r.get('backend', 'cpu')} | {r['chips']} | {_gib(hbm)} "
                     f"| {_gib(r['model_total'])} | {_gib(p['rollout'])} "
                     f"| {_gib(p['update'])} | {p['peak'] / r['model_total']:.2f} | {fits} ({100 * frac:.0f}%) |")
    for r in results:
        lines += ["", f"**{r['slice']}** (fsdp={r['chips']}, {r['layers']} layers"
                  + (f", extrapolated from {r['extrapolated_from']}" if r["extrapolated_from"] else "")
                  + "), GiB per device", "", "| entry | XLA / shardings | memory_table | ratio |",
                  "| --- | ---: | ---: | ---: |"]
        for name, meas, mod in r["compare"]:
            lines.append(f"| {name} | {_gib(meas)} | {_gib(mod)} | {meas / mod if mod else float('nan'):.2f} |")
        for prog in ("rollout", "update"):
            m = r["measured"][prog]
            lines.append(f"| {prog}: XLA argument / output / alias / temp | " + " / ".join(
                _gib(m[k]) for k in ("argument", "output", "alias", "temp")) + " | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if "_EARLY_ERROR" in globals():
        print(f"xla_memory.py: error: {_EARLY_ERROR}", file=sys.stderr)
        return 2
    try:
        for name in args.slice or DEFAULT_SLICES:
            if args.backend == "tpu":
                tpu_devices(slice_spec(name))
            elif slice_spec(name).chips > jax.device_count():
                raise ValueError(f"--slice {name}: {slice_spec(name).chips} chips but {jax.device_count()} devices "
                                 "(run the script itself: it sets --xla_force_host_platform_device_count)")
    except ValueError as e:  # slice_spec's one-line message of an unknown slice
        print(f"xla_memory.py: error: {e}", file=sys.stderr)
        return 2
    try:
        results = run(args)
    except SafejaxError as e:
        print(f"xla_memory.py: error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
