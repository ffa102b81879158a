"""Per-device memory of Safe RLHF's six models on a TPU slice, computed from the sharding rules.

PPO-Lagrangian holds six models at once: the **actor** (trained), the frozen **reference** policy,
the frozen **reward** and **cost** models, and the trained **reward critic** and **cost critic**.
This module computes, for a model shape (default Llama-2-7B) and a slice (``v4-32``, ``v5p-16``,
...), how many bytes of each model's parameters, gradients and optimizer state land on *one*
device.  Nothing is guessed and nothing is allocated:

* the models are built with :func:`flax.nnx.eval_shape` (abstract ``ShapeDtypeStruct`` leaves that
  keep their logical-axis annotations);
* their shardings come from :func:`safejax.parallel.state_shardings` (the one rules table,
  :data:`safejax.parallel.LOGICAL_AXIS_RULES`) on a :class:`jax.sharding.AbstractMesh` of the
  slice's chips, so no real devices are needed;
* the optimizer state is ``jax.eval_shape(tx.init, params)`` of the optimizer that the RL stage
  really uses (:func:`safejax.train.optim.make_optimizer` with :class:`PPOConfig`'s defaults), with
  the shardings of :func:`safejax.parallel.opt_state_shardings` (moments follow their parameter);
* bytes on a device = ``prod(sharding.shard_shape(shape)) * itemsize``, summed over leaves.

With LoRA (``lora_rank``, CLI ``--lora-rank``) the trained rows hold only the adapters (+ the critics' score
heads) and the three frozen rows are the shared bases (the reference is the actor's own base).

Gradients are counted like parameters (same shapes, dtypes and shardings; a trained model holds one
full gradient at the update; the rollout holds none).  Activations are an *estimate* (the formula of Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models", for bf16 activations), shown
in a separate column and labelled as such.

CLI::

    python -m safejax.memory_table                                # the default slices
    python -m safejax.memory_table --accelerator-type v4-32 --accelerator-type v5p-16 --detail
    python -m safejax.memory_table --frozen-param-dtype bfloat16 --mesh data=1,fsdp=-1,tensor=2

Python::

    from safejax.memory_table import safe_rlhf_memory, to_markdown
    table = safe_rlhf_memory("v4-32")          # SafeRLHFMemory (bytes per device)
    print(to_markdown([table]))
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from safejax.models import CausalLM, ScoreModel
from safejax.models.config import ModelConfig
from safejax.models.functional import split_model
from safejax.models.lora import DEFAULT_TARGETS, LoRAConfig, LoRADef, add_lora
from safejax.parallel import MESH_AXES, MeshConfig, opt_state_shardings, resolve_mesh_shape, state_shardings
from safejax.slices import GiB, SliceSpec, slice_spec
from safejax.train.optim import make_optimizer
from safejax.train.ppo import PPOConfig


#: Llama-2-7B (``meta-llama/Llama-2-7b-hf`` config.json): 6,738,415,616 parameters.
LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, dtype="bfloat16",
                        param_dtype="float32")

#: slices printed when no ``--accelerator-type`` is given
DEFAULT_SLICES = ("v4-8", "v4-32", "v4-64", "v5p-8", "v5p-16", "v5p-64", "v5e-16", "v5e-64", "v6e-16")

ROLES = ("actor", "reference", "reward_model", "cost_model", "reward_critic", "cost_critic")
TRAINABLE = {"actor": True, "reference": False, "reward_model": False, "cost_model": False,
             "reward_critic": True, "cost_critic": True}
CAUSAL_ROLES = ("actor", "reference")  # the others are score models (backbone + [D, 1] head, no LM head)
#: the models each training setup holds at once: PPO-Lagrangian (six), critic-free RL (GRPO-Lagrangian: no critics,
#: no value state) and offline preference optimisation (DPO family: policy + frozen reference, no rollout; `safejax
#: dpo` precomputes the reference's log-probs, so its step holds the actor row alone)
SETUPS = {"ppo_lag": ROLES, "critic_free": ("actor", "reference", "reward_model", "cost_model"),
          "offline": ("actor", "reference")}


# ----------------------------------------------------------------------------- slices


def abstract_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES):
    """A :class:`jax.sharding.AbstractMesh` (no devices) with Auto axis types."""
    return AbstractMesh(tuple(int(s) for s in shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))


# ----------------------------------------------------------------------------- bytes of one model


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes that one device holds of ``tree`` (``ShapeDtypeStruct``/array leaves) under ``shardings``.

    All shardings used here split evenly (:func:`safejax.parallel.sharding_for` drops axes that do not
    divide), so every device holds the same amount."""
    sizes = jax.tree.map(lambda x, s: int(np.prod(s.shard_shape(tuple(x.shape)), dtype=np.int64))
                         * np.dtype(x.dtype).itemsize, tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


@functools.lru_cache(maxsize=16)
def abstract_model(config: ModelConfig, kind: str):
    """``(ModelDef, abstract params dict)`` of a ``CausalLM`` (``kind='causal_lm'``) or ``ScoreModel``
    (``'score'``), built with ``nnx.eval_shape`` (no memory is allocated; cached per config)."""
    if kind not in ("causal_lm", "score"):
        raise ValueError(f"abstract_model: kind must be 'causal_lm' or 'score', got {kind!r}")
    ctor = (lambda: CausalLM(config, rngs=nnx.Rngs(0))) if kind == "causal_lm" else (
        lambda: ScoreModel(config, rngs=nnx.Rngs(0)))
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(ctor)
    return split_model(model)


@dataclasses.dataclass
class ModelMemory:
    """Per-device bytes of one model of the six (``grads``/``optimizer`` are 0 for frozen models)."""

    role: str
    trainable: bool
    num_params: int
    param_dtype: str
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_memory(role: str, config: ModelConfig, mesh, *, trainable: bool, tx=None) -> ModelMemory:
    """Per-device bytes of params (+ grads + ``tx`` state when ``trainable``) of one model on ``mesh``."""
    kind = "causal_lm" if role in CAUSAL_ROLES else "score"
    mdef, params = abstract_model(config, kind)
    shardings = nnx.to_pure_dict(state_shardings(mdef.template, mesh))
    p = per_device_bytes(params, shardings)
    g = o = 0
    if trainable:
        if tx is None:
            raise ValueError(f"model_memory: role '{role}' is trainable but no optimizer was given")
        g = p
        opt_abstract = jax.eval_shape(tx.init, params)
        o = per_device_bytes(opt_abstract, opt_state_shardings(tx, params, shardings, mesh))
    n = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
    return ModelMemory(role, trainable, n, config.param_dtype, p, g, o)


@functools.lru_cache(maxsize=16)
def abstract_lora_trained(config: ModelConfig, kind: str, rank: int, targets: tuple[str, ...]):
    """``(abstract trained params, their LoRADef)`` of a LoRA model on the abstract ``kind`` model: the rank-``rank``
    adapters on ``targets`` (+ a score model's ``score_head``, trained in full), as ``ppo_lora.lora_models``
    trains them."""
    ctor = CausalLM if kind == "causal_lm" else ScoreModel
    lcfg = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=list(targets))
    with nnx.use_eager_sharding(False):
        module = nnx.eval_shape(lambda: add_lora(ctor(config, rngs=nnx.Rngs(0)), lcfg))
    fdef, fparams = split_model(module)
    ldef = LoRADef(fdef, abstract_model(config, kind)[0], lcfg, ("score_head",) if kind == "score" else ())
    return ldef.trained_params(fparams), ldef


def lora_memory(role: str, config: ModelConfig, mesh, *, rank: int, targets: Sequence[str], tx) -> ModelMemory:
    """Per-device bytes of a LoRA role's trained params (adapters + a critic's head), their gradients and
    ``tx`` state on ``mesh`` (its frozen base is counted once, as the reference / reward / cost model)."""
    kind = "causal_lm" if role in CAUSAL_ROLES else "score"
    params, ldef = abstract_lora_trained(config, kind, rank, tuple(targets))
    shardings = ldef.trained_params(nnx.to_pure_dict(state_shardings(ldef.full.template, mesh)))
    p = per_device_bytes(params, shardings)
    o = per_device_bytes(jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, shardings, mesh))
    n = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
    return ModelMemory(role, True, n, config.param_dtype, p, p, o)


# ----------------------------------------------------------------------------- activations (estimate)


def activation_bytes_estimate(config: ModelConfig, rows_per_device: int, seq_len: int, *, tensor: int = 1,
                              remat: bool = True, with_logits: bool = True) -> int:
    """Estimated bf16 activation bytes of one forward+backward on one device (the actor, the largest).

    Korthikanti et al. (2022), eq. 2 / table 2, per layer: ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` bytes
    (``s`` sequence, ``b`` rows, ``h`` hidden, ``a`` heads, ``t`` tensor-parallel size).  With full
    per-layer rematerialisation only each layer's input ``2*s*b*h`` bytes is kept, plus one layer's
    activations during its recomputation.  ``with_logits`` adds float32 logits and their gradient
    ``2 * 4*s*b*V/t``.  This is an estimate, not a measurement."""
    s, b, h, a = seq_len, rows_per_device, config.hidden_size, config.num_heads
    per_layer = s * b * h * (10 + 24 / tensor + 5 * a * s / (h * tensor))
    if remat:
        total = config.num_layers * 2 * s * b * h + per_layer
    else:
        total = config.num_layers * per_layer
    if with_logits:
        total += 2 * 4 * s * b * config.vocab_size / tensor
    return int(total)


def rollout_bytes_estimate(config: ModelConfig, rows_per_device: int, seq_len: int, *, tensor: int = 1) -> int:
    """Bytes of one device's rollout working set: the bf16 KV cache ``[L, 2, B, KV, S, hd]`` of the
    sampler (exact for :func:`safejax.models.init_cache` with the batch split over the device's rows and
    kv heads over ``tensor``) plus the float32 logits ``[B, S, V]`` and their log-softmax when the
    actor and the reference score the sequences."""
    kv_heads = config.num_kv_heads // tensor if config.num_kv_heads % tensor == 0 else config.num_kv_heads
    kv = 2 * config.num_layers * rows_per_device * seq_len * kv_heads * config.head_dim * 2
    logits = 2 * 4 * rows_per_device * seq_len * config.vocab_size // tensor
    # the scoring forwards' float32 attention scores and probabilities [B, H, S, S] of one layer (the einsum
    # attention materialises them; XLA's compiled rollout holds them next to the KV cache)
    heads = config.num_heads // tensor if config.num_heads % tensor == 0 else config.num_heads
    scores = 2 * 4 * rows_per_device * heads * seq_len * seq_len if config.attention_impl == "einsum" else 0
    return int(kv + logits + scores)


def fsdp_gather_bytes(config: ModelConfig, fsdp: int) -> int:
    """Bytes of the whole (unsharded) weights that FSDP gathers on every device at once: the embedding table, the
    LM head and one decoder layer, in the compute dtype (XLA's compiled programs gather a matrix whole before its
    matmul, and the TPU compiler converts it to the compute dtype first; measured by
    ``experiments/bench/xla_memory.py``).  0 without FSDP (``fsdp == 1``)."""
    if fsdp <= 1:
        return 0
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    layer = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * f + 2 * d
    heads = 1 if config.tie_word_embeddings else 2
    return int((heads * config.vocab_size * d + layer) * np.dtype(config.dtype).itemsize)


# ----------------------------------------------------------------------------- the six models


@dataclasses.dataclass
class SafeRLHFMemory:
    """Per-device memory of the six models on one slice (all sizes in bytes)."""

    slice: SliceSpec
    mesh_shape: dict
    models: list[ModelMemory]
    update_activations: int      # estimate: the actor's forward+backward on one micro-batch + FSDP-gathered
                                 # weights and their whole gradients + the optimizer's new-carry buffers
    rollout_working_set: int     # KV cache + scoring logits + attention scores + FSDP-gathered weights + the
                                 # sampler's bf16 copy of the actor
    rows_per_device: int
    rollout_rows_per_device: int
    seq_len: int
    remat: bool
    lora_rank: int = 0           # 0: full fine-tuning; R: LoRA actor and critics on three shared frozen bases

    @property
    def states(self) -> int:
        """Params + grads + optimizer state of all six models on one device (computed, exact)."""
        return sum(m.total for m in self.models)

    @property
    def working_set(self) -> int:
        """Estimated transient bytes: the larger of the update's activations and the rollout's cache."""
        return max(self.update_activations, self.rollout_working_set)

    @property
    def total(self) -> int:
        """The larger phase: the update (states with the gradients + its activations) or the rollout (states
        without gradients, which exist only in the update, + its working set)."""
        grads = sum(m.grads for m in self.models)
        return max(self.states + self.update_activations, self.states - grads + self.rollout_working_set)

    @property
    def fits(self) -> bool:
        return self.total <= self.slice.hbm_bytes

    @property
    def verdict(self) -> str:
        """``yes`` (<= 85% of HBM), ``tight`` (85-100%: XLA workspace and fragmentation may not fit), ``no``."""
        frac = self.total / self.slice.hbm_bytes
        return "yes" if frac <= 0.85 else "tight" if frac <= 1.0 else "no"

    def as_dict(self) -> dict:
        return {
            "slice": dataclasses.asdict(self.slice), "mesh": dict(self.mesh_shape),
            "models": [dict(dataclasses.asdict(m), total=m.total) for m in self.models],
            "states_bytes": self.states, "update_activations_estimate_bytes": self.update_activations,
            "rollout_working_set_estimate_bytes": self.rollout_working_set, "rows_per_device": self.rows_per_device,
            "rollout_rows_per_device": self.rollout_rows_per_device, "seq_len": self.seq_len, "remat": self.remat,
            "lora_rank": self.lora_rank,
            "total_bytes": self.total, "hbm_bytes": self.slice.hbm_bytes, "fits": self.fits,
            "verdict": self.verdict,
        }


def safe_rlhf_memory(accelerator_type: str | SliceSpec, config: ModelConfig = LLAMA2_7B, *,
                     mesh: MeshConfig | None = None, frozen_param_dtype: str = "float32",
                     rows_per_device: int = 1, rollout_rows_per_device: int = 8, seq_len: int = 512,
                     remat: bool = True, setup: str = "ppo_lag", lora_rank: int = 0,
                     lora_targets: Sequence[str] = DEFAULT_TARGETS) -> SafeRLHFMemory:
    """Per-device bytes of actor + reference + reward model + cost model + two critics (``setup="ppo_lag"``), or of
    the models of another :data:`SETUPS` entry (``critic_free``: no critics; ``offline``: policy + reference, no
    rollout working set).

    Args:
      accelerator_type: e.g. ``"v4-32"`` (or a :class:`SliceSpec`); the mesh spans all its chips.
      config: the model shape of all six models (default Llama-2-7B; params fp32 master weights).
      mesh: axis sizes (default ``data=1, fsdp=-1, tensor=1``: FSDP over every chip).
      frozen_param_dtype: storage dtype of the three frozen models (``run_ppo`` loads them float32).
      rows_per_device, seq_len, remat: the update micro-batch (activation estimate).
      rollout_rows_per_device: rollout rows per device (KV-cache estimate), prompt + response = seq_len.
      lora_rank, lora_targets: LoRA of the actor and both critics (``lora.<role>.rank`` / ``targets``; 0 = full
        fine-tuning).  Then the trained rows hold only the adapters (+ the critics' score heads) with their
        gradients and Adam state; ``reference`` is the actor's frozen base (actor param dtype: the same weights,
        not a copy), ``reward_model`` / ``cost_model`` are also the critics' backbones: three frozen weight sets.
    """
    spec = accelerator_type if isinstance(accelerator_type, SliceSpec) else slice_spec(accelerator_type)
    shape = resolve_mesh_shape(mesh or MeshConfig(), spec.chips)
    amesh = abstract_mesh(shape)
    ppo = PPOConfig()
    actor_tx = make_optimizer(ppo.actor_optim, 1000)[0]
    critic_tx = make_optimizer(ppo.critic_optim, 1000)[0]
    frozen_cfg = config.replace(param_dtype=frozen_param_dtype)
    rows = []
    cache: dict[tuple, ModelMemory] = {}
    for role in SETUPS[setup]:
        trainable = TRAINABLE[role]
        cfg = config if trainable or (lora_rank and role == "reference") else frozen_cfg
        tx = actor_tx if role == "actor" else critic_tx
        key = (role in CAUSAL_ROLES, trainable, cfg.param_dtype)
        if lora_rank and trainable:  # adapters (+ head) on the actor's / the reward and cost models' base
            key = ("lora",) + key
            if key not in cache:
                cache[key] = lora_memory(role, config if role == "actor" else frozen_cfg, amesh, rank=lora_rank,
                                         targets=lora_targets, tx=tx)
        elif key not in cache:
            cache[key] = model_memory(role, cfg, amesh, trainable=trainable, tx=tx if trainable else None)
        rows.append(dataclasses.replace(cache[key], role=role))
    # FSDP gathers whole weights on every device: the update also holds their whole gradients before the
    # reduce-scatter; the sampler decodes with a bf16 copy of the fp32 actor (SamplingConfig.cast_weights)
    gather = fsdp_gather_bytes(config, shape[1])
    # LoRA: no gradient of a base weight exists (the adapters' and heads' are sharded like them: counted in grads)
    whole_grads = 0 if lora_rank else fsdp_gather_bytes(config.replace(dtype=config.param_dtype), shape[1])
    actor_base = rows[1].params if lora_rank else rows[0].params
    cast = actor_base // 2 if (config.param_dtype, config.dtype) == ("float32", "bfloat16") else 0
    # the TPU-compiled update also holds about one more trained-params-sized buffer per trained model (the
    # optimizer's new values of the scanned micro-step's carry next to the gradients; xla_memory.py --backend tpu)
    carry = sum(m.params for m in rows if m.trainable)
    # LoRA: the update reads the three frozen bases in every micro-step, and the TPU compiler hoists their
    # conversion to the compute dtype out of the micro-step loop: one compute-dtype copy of each base, sharded
    # like it (measured: xla_memory.py --backend tpu --lora-rank 16; the CPU compiler does not hoist it)
    size = lambda dt: np.dtype(dt).itemsize  # noqa: E731
    base_cast = sum(m.params * size(config.dtype) // size(m.param_dtype) for m in rows
                    if lora_rank and not m.trainable and size(m.param_dtype) > size(config.dtype))
    act = (activation_bytes_estimate(config, rows_per_device, seq_len, tensor=shape[2], remat=remat)
           + gather + whole_grads + carry + base_cast)
    roll = (0 if setup == "offline" else  # offline: no sampling
            rollout_bytes_estimate(config, rollout_rows_per_device, seq_len, tensor=shape[2]) + gather + cast)
    return SafeRLHFMemory(spec, dict(zip(MESH_AXES, shape)), rows, act, roll, rows_per_device,
                          rollout_rows_per_device, seq_len, remat, lora_rank)


# ----------------------------------------------------------------------------- formatting


def _gib(x: int) -> str:
    return f"{x / GiB:.2f}"


def to_markdown(tables: Sequence[SafeRLHFMemory], *, detail: bool = False) -> str:
    """One summary row per slice (GiB per device); with ``detail`` a per-model table for each slice."""
    lines = ["| slice | chips | hosts | mesh (data,fsdp,tensor) | HBM/chip | actor p+g+opt | ref | RM | CM "
             "| reward critic | cost critic | all models | update act.+gathers (est.) | rollout working set (est.) "
             "| total "
             "| % HBM | fits |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | --- |"]
    for t in tables:
        by = {m.role: m for m in t.models}
        mesh = ",".join(str(t.mesh_shape[a]) for a in MESH_AXES)
        cells = [t.slice.name, str(t.slice.chips), str(t.slice.hosts), mesh, _gib(t.slice.hbm_bytes)]
        cells += [_gib(by[r].total) if r in by else "-" for r in ROLES]
        cells += [_gib(t.states), _gib(t.update_activations), _gib(t.rollout_working_set), _gib(t.total),
                  f"{100 * t.total / t.slice.hbm_bytes:.0f}%", "**no**" if t.verdict == "no" else t.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    if detail:
        for t in tables:
            out += (f"\n\n**{t.slice.name}** (mesh {t.mesh_shape}), GiB per device\n\n"
                    "| model | trained | params (count) | param dtype | params | grads | Adam state | total |\n"
                    "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |\n")
            out += "\n".join(f"| {m.role} | {'yes' if m.trainable else 'no'} | {m.num_params:,} | {m.param_dtype} "
                             f"| {_gib(m.params)} | {_gib(m.grads)} | {_gib(m.optimizer)} | {_gib(m.total)} |"
                             for m in t.models)
    return out


def _parse_mesh(text: str | None) -> MeshConfig | None:
    if not text:
        return None
    kw = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in MESH_AXES or not v.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh: expected data=D,fsdp=F,tensor=T (one may be -1), got {part!r}")
        kw[k] = int(v)
    return MeshConfig(**kw)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safejax.memory_table", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accelerator-type", action="append", default=None,
                    help=f"slice (repeatable); default: {' '.join(DEFAULT_SLICES)}")
    ap.add_argument("--mesh", default=None, help="axis sizes, e.g. data=1,fsdp=-1,tensor=2 (default fsdp over all)")
    ap.add_argument("--frozen-param-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="storage dtype of reference / reward / cost models (run_ppo uses float32)")
    ap.add_argument("--rows-per-device", type=int, default=1, help="update micro-batch rows per device (activations)")
    ap.add_argument("--rollout-rows-per-device", type=int, default=8, help="rollout rows per device (KV cache)")
    ap.add_argument("--seq-len", type=int, default=512, help="prompt + response tokens")
    ap.add_argument("--no-remat", action="store_true", help="activation estimate without rematerialisation")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="LoRA rank of the actor and both critics (q/k/v/o adapters; 0 = full fine-tuning)")
    ap.add_argument("--detail", action="store_true", help="also print a per-model table for each slice")
    ap.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    ap.add_argument("--setup", default="ppo_lag", choices=tuple(SETUPS),
                    help="models held: ppo_lag (six), critic_free (actor, ref, RM, CM), offline (policy + ref)")
    args = ap.parse_args(argv)
    try:
        mesh = _parse_mesh(args.mesh)
        tables = [safe_rlhf_memory(a, mesh=mesh, frozen_param_dtype=args.frozen_param_dtype,
                                   rows_per_device=args.rows_per_device, seq_len=args.seq_len,
                                   rollout_rows_per_device=args.rollout_rows_per_device,
                                   remat=not args.no_remat, setup=args.setup, lora_rank=args.lora_rank)
                  for a in (args.accelerator_type or DEFAULT_SLICES)]
    except ValueError as e:
        print(f"memory_table: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([t.as_dict() for t in tables], indent=1))
        return 0
    print(f"Setup {args.setup} ({', '.join(SETUPS[args.setup])}) at Llama-2-7B "
          f"shape ({tables[0].models[0].num_params:,} params), "
          f"GiB per device. Trained models: fp32 params + fp32 grads + AdamW (fp32 mu, nu); frozen models: "
          f"{args.frozen_param_dtype} params (all computed from the sharding rules). Estimates: update "
          f"activations (Korthikanti et al. 2022) for {args.rows_per_device} row(s) x {args.seq_len} tokens per "
          f"device, {'no remat' if args.no_remat else 'per-layer remat'}; rollout bf16 KV cache + fp32 logits for "
          f"{args.rollout_rows_per_device} rows x {args.seq_len} tokens per device, + fp32 attention scores + the "
          f"sampler's bf16 actor copy; both + the FSDP-gathered embedding, LM head and one layer (the update also "
          f"their whole fp32 gradients and one more copy of the trained params). total = the larger phase: "
          f"all models + update activations, or all models without gradients + rollout working set; 'tight' = "
          f"85-100% of HBM.\n")
    print(to_markdown(tables, detail=args.detail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
