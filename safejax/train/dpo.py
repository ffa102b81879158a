"""Offline preference optimisation: ``safejax dpo --config ...`` with ``dpo.loss: dpo | safe_dpo | bfpo``.

One command, three losses on the same pairs (:mod:`safejax.data.dpo_pairs` picks the chosen response):

* ``dpo``: the reference's DPO on helpfulness pairs, ``mean -log sigmoid(beta * h)`` (:func:`safejax.rl.dpo_loss`);
* ``safe_dpo``: DPO after the SafeDPO-style label transform, with the optional safety margin Delta inside the
  sigmoid for pairs whose safety labels differ (:func:`safejax.rl.safe_dpo_loss`);
* ``bfpo``: the BFPO squared loss with the safety labels of both responses (:func:`safejax.rl.bfpo_loss`).

``h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))``, each log-prob a sum over the
pair's response window (:func:`safejax.rl.dpo_log_ratios`: from the first token where the two sequences differ to
each one's end; ``dpo.reference_window_bug`` reproduces the reference's off-by-one window).

Reference log-probs are computed **once**, before training, by the initial model (which is the reference) and
travel with the data as ``ref_chosen_logp / ref_rejected_logp [N]``.  The train step then holds one model (policy
+ optimizer state) instead of two: a frozen reference in the step would cost one more copy of the weights in
device memory and one more forward per step and epoch, for numbers that never change.  Precomputing costs one
forward pass over the data (about half of one epoch's compute) and 8 bytes per pair.

The step is :func:`safejax.train.fit.make_train_step` through :func:`safejax.train.fit.fit` (state from
``build_state``, run by ``HostLoop``, checkpoints and bit-exact resume as SFT); the policy is exported to
``out_dir/hf`` like SFT's.  Logged: the loss and the implicit-reward metrics the reference logs
(``better_sample_reward``, ``worse_sample_reward``, ``reward_accuracy``, ``reward_margin``; "better" = chosen).
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np

from safejax import parallel, rl
from safejax.config import ConfigError, check_range
from safejax.data import load_rows
from safejax.data.dpo_pairs import DPO_LOSSES, build_dpo_pairs
from safejax.generation import positions_from_mask
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax.parallel import MeshConfig, make_mesh, resolve_rules
from safejax.sections import DataSection, ExportSection, LoopSection, ModelSection
from safejax.train.common import RunDir
from safejax.train.fit import eval_loop, fit
from safejax.train.optim import OptimConfig
from safejax.train.sft import export_model

log = logging.getLogger("safejax")

REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")


@dataclasses.dataclass
class DPOSection:
    """The offline preference loss.

    Attributes:
      loss: ``dpo`` (helpfulness pairs), ``safe_dpo`` (SafeDPO-style label transform, then DPO) or ``bfpo``.
      scale_coeff: beta, the temperature of all three losses (the reference's DPO script: 0.1).
      safety_margin: ``safe_dpo`` only: Delta >= 0 subtracted inside the sigmoid for pairs whose safety labels
        differ (Kim et al. 2025); 0 turns it off.
      bfpo_b1: ``bfpo`` only: B1 (not 1; B3 = 1 / (B1 - 1)); the paper's default 3.
      bfpo_alpha: ``bfpo`` only: alpha; the paper's default 0.5.
      reference_window_bug: true sums the shifted log-probs over the reference's unshifted window (skips the first
        divergent token, adds one position past the end); false (default) uses the correct shifted window.
    """

    loss: str = "dpo"
    scale_coeff: float = 0.1
    safety_margin: float = 0.0
    bfpo_b1: float = 3.0
    bfpo_alpha: float = 0.5
    reference_window_bug: bool = False

    def validate(self) -> None:
        check_range("dpo.loss", self.loss, choices=DPO_LOSSES)
        check_range("dpo.scale_coeff", self.scale_coeff, low=0.0, low_open=True)
        check_range("dpo.safety_margin", self.safety_margin, low=0.0)
        if self.bfpo_b1 == 1.0:
            raise ConfigError("config key 'dpo.bfpo_b1' = 1 is not allowed (B3 = 1 / (B1 - 1))")


@dataclasses.dataclass
class DPOConfig:
    """``safejax dpo``: offline preference optimisation from an SFT policy (which is also the frozen reference).

    Attributes:
      out_dir: run folder (checkpoints, metrics, ``hf/``). seed: data order and RNG.
      model: the initial policy (and reference). data: PKU-SafeRLHF-schema preference rows (``train``, optional
        held-out ``eval``), ``max_length``, ``skip_bad_rows`` (``pack`` is not supported).
      dpo: the loss (:class:`DPOSection`). optim: the reference's DPO script: lr 1e-6, cosine, warmup 0.03, wd 0.05.
      train: epochs 2, batch 16 (the reference's script). mesh: device mesh. eval_batch_size: held-out batch.
      allow_config_change: resume a run whose config changed. export: dtype of ``out_dir/hf``.
    """

    out_dir: str = "runs/dpo"
    seed: int = 42
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=1e-6, schedule="cosine", warmup_ratio=0.03, weight_decay=0.05))
    train: LoopSection = dataclasses.field(default_factory=lambda: LoopSection(epochs=2, batch_size=16))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    eval_batch_size: int = 16
    allow_config_change: bool = False
    export: ExportSection = dataclasses.field(default_factory=ExportSection)

    def validate(self) -> None:
        if self.data.pack:
            raise ConfigError("config key 'data.pack' = true is not supported by safejax dpo")


def response_logp_sums(lm, batch: dict, *, reference_window_bug: bool = False):
    """Summed response log-probs of both sides of a pair batch, in one forward pass.

    Args:
      lm: a causal LM. batch: ``chosen_ids, rejected_ids [B, L]`` int, ``chosen_mask, rejected_mask [B, L]`` bool.
      reference_window_bug: see :func:`safejax.rl.dpo_log_ratios`.
    Returns:
      ``(chosen [B], rejected [B])``: sums of ``log p(x_t | x_<t)`` over the pair's response window.
    """
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    logits = lm(ids, attention_mask=mask, positions=positions_from_mask(mask))
    lp = rl.log_probs_from_logits(logits[:, :-1], ids[:, 1:])
    n = batch["chosen_ids"].shape[0]
    zeros = jnp.zeros_like(lp[:n])  # dpo_log_ratios' window sums of the log-probs minus those of a zero reference
    return rl.dpo_log_ratios(lp[:n], lp[n:], zeros, zeros, batch["chosen_ids"], batch["rejected_ids"],
                             batch["chosen_mask"], batch["rejected_mask"],
                             reference_window_bug=reference_window_bug)


def pair_loss(sec: DPOSection, pc, pr, batch: dict):
    """The configured loss and the implicit-reward metrics on summed log-probs ``pc, pr [B]`` (policy) and the
    batch's precomputed ``ref_chosen_logp, ref_rejected_logp [B]`` (and safety labels)."""
    rc, rr = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
    beta = sec.scale_coeff
    if sec.loss == "dpo":
        loss = rl.dpo_loss(pc, pr, rc, rr, beta=beta)
    elif sec.loss == "safe_dpo":
        differ = batch["chosen_is_safe"] != batch["rejected_is_safe"]
        loss = rl.safe_dpo_loss(pc, pr, rc, rr, jnp.ones_like(differ), differ, beta=beta,
                                safety_margin=sec.safety_margin)
    else:
        loss = rl.bfpo_loss(pc, pr, rc, rr, batch["chosen_is_safe"], batch["rejected_is_safe"], beta=beta,
                            b1=sec.bfpo_b1, alpha=sec.bfpo_alpha)
    return loss, rl.dpo_metrics(pc, pr, rc, rr, beta=beta)


def dpo_loss_fn(mdef, sec: DPOSection):
    """Pure ``loss(params, batch, rng) -> (loss, metrics)`` on a pair batch with precomputed reference sums."""

    def loss_fn(params, batch, rng):  # noqa: ARG001
        pc, pr = response_logp_sums(mdef.merge(params), batch, reference_window_bug=sec.reference_window_bug)
        return pair_loss(sec, pc, pr, batch)

    return loss_fn


def logp_sums_fn(mdef, sec: DPOSection, mesh, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES):
    """Jitted ``(params, batch) -> {"chosen": [B], "rejected": [B]}`` (for :func:`eval_loop`)."""

    @parallel.mesh_jit(mesh=mesh, rules=rules)
    def sums(params, b):
        c, r = response_logp_sums(mdef.merge(params), b, reference_window_bug=sec.reference_window_bug)
        return {"chosen": c, "rejected": r}

    return sums


def add_reference_logps(sums, ref_params, arrays: dict, batch_size: int, mesh,
                        rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> dict:
    """``arrays`` plus ``ref_chosen_logp, ref_rejected_logp [N]`` float32 from the reference parameters."""
    keys = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
    out = eval_loop(lambda b: sums(ref_params, b), {k: arrays[k] for k in keys}, batch_size, mesh, rules)
    return dict(arrays, ref_chosen_logp=np.asarray(out["chosen"], np.float32),
                ref_rejected_logp=np.asarray(out["rejected"], np.float32))


def make_dpo_eval_fn(sums, sec: DPOSection, arrays: dict, batch_size: int, mesh,
                     rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES):
    """Held-out loss and implicit-reward metrics (``eval/...``)."""

    def eval_fn(params):
        out = eval_loop(lambda b: sums(params, b), {k: arrays[k] for k in arrays if k not in REF_KEYS},
                        batch_size, mesh, rules)
        loss, metrics = pair_loss(sec, jnp.asarray(out["chosen"]), jnp.asarray(out["rejected"]),
                                  {k: jnp.asarray(v) for k, v in arrays.items()})
        return {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in metrics.items()},
                "eval/count": int(len(out["chosen"]))}

    return eval_fn


def load_dpo_pairs(specs, tokenizer, data: DataSection, loss: str, what: str) -> dict:
    arrays, report = build_dpo_pairs(load_rows(specs), tokenizer, loss=loss, max_length=data.max_length,
                                     skip_bad_rows=data.skip_bad_rows)
    (log.warning if report.dropped else log.info)("%s data: %s", what, report)
    return arrays


def run_dpo(cfg: DPOConfig):
    """Train the policy with ``cfg.dpo.loss``; returns ``(FitResult, export folder)``."""
    mesh, rules = make_mesh(cfg.mesh), resolve_rules(cfg.mesh)
    run = RunDir(cfg.out_dir, cfg, allow_config_change=cfg.allow_config_change)
    tok = load_tokenizer_for(cfg.model)
    lm = load_model_for(cfg.model, mesh, model_type="causal_lm", tokenizer=tok, rules=rules)
    mdef, params = split_model(lm)
    sec = cfg.dpo
    sums = logp_sums_fn(mdef, sec, mesh, rules)
    train = load_dpo_pairs(cfg.data.train, tok, cfg.data, sec.loss, f"{sec.loss} train")
    train = add_reference_logps(sums, params, train, cfg.eval_batch_size, mesh, rules)
    eval_fn = None
    if cfg.data.eval:
        held = load_dpo_pairs(cfg.data.eval, tok, cfg.data, sec.loss, f"{sec.loss} eval")
        held = add_reference_logps(sums, params, held, cfg.eval_batch_size, mesh, rules)
        eval_fn = make_dpo_eval_fn(sums, sec, held, cfg.eval_batch_size, mesh, rules)
    res = fit(run=run, loop=cfg.train, optim=cfg.optim, mesh=mesh, params=params,
              param_shardings=mdef.shardings(mesh, rules), param_names=mdef.hf_names(), rules=rules,
              loss_fn=dpo_loss_fn(mdef, sec),
              train_arrays=train, eval_fn=eval_fn, seed=cfg.seed, desc=sec.loss.replace("_", "-"),
              export=lambda p: export_model(mdef, p, run.path / "hf", tok, dtype=cfg.export.dtype))
    log.info("%s: exported %s", sec.loss, res.export_dir)
    return res, res.export_dir
