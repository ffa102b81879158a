"""Stage 1: supervised fine-tuning (token-mean cross-entropy on response tokens).

``safejax sft --config experiments/configs/sft.yaml key=value ...`` -> :func:`run_sft`.
Writes ``<out_dir>/checkpoints`` (orbax train state), ``metrics.jsonl``, TensorBoard events and
``<out_dir>/hf`` (a causal-LM folder that transformers and the next stages load).
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np

from safejax import parallel, rl
from safejax.config import ConfigError
from safejax.data import build_supervised, load_rows
from safejax.data.packing import pack_supervised, useful_token_fraction
from safejax.generation import positions_from_mask
from safejax.parallel import MeshConfig, make_mesh, resolve_rules
from safejax.sections import DataSection, ExportSection, LoopSection, ModelSection
from safejax.train.common import RunDir
from safejax.train.export import write_hf_folder
from safejax.train.fit import eval_loop, fit
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax.train.optim import OptimConfig

log = logging.getLogger("safejax")


SupervisedDataSection = DataSection


@dataclasses.dataclass
class SFTConfig:
    out_dir: str = "runs/sft"
    seed: int = 42
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: SupervisedDataSection = dataclasses.field(default_factory=SupervisedDataSection)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=2e-5, schedule="cosine",
                                                                               warmup_ratio=0.03))
    train: LoopSection = dataclasses.field(default_factory=LoopSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    eval_batch_size: int = 16
    # unit of the training loss's token mean: 0 = one mean over each (micro-)batch; n = the reference's (a token
    # mean per n rows -- its per-device micro-batch -- then the mean over those groups); eval keeps one mean
    token_mean_rows: int = 0
    allow_config_change: bool = False
    export: ExportSection = dataclasses.field(default_factory=ExportSection)  # export.dtype of out_dir/hf

    def validate(self) -> None:
        micro = self.train.batch_size // max(self.optim.grad_accum, 1)
        if self.token_mean_rows < 0 or (self.token_mean_rows and micro % self.token_mean_rows):
            raise ConfigError(f"config key 'token_mean_rows' = {self.token_mean_rows} must be >= 0 and divide the "
                              f"micro-batch of {micro} rows (train.batch_size / optim.grad_accum)")


def sft_loss_fn(mdef, token_mean_rows: int = 0):
    """Pure ``loss(params, batch, rng) -> (loss, metrics)`` on ``input_ids/attention_mask/label_mask [B, L]``
    (packed rows add ``segment_ids/positions [B, L]``, see :mod:`safejax.data.packing`);
    ``token_mean_rows``: the unit of the token mean (:func:`safejax.rl.sft_loss`'s ``group_rows``)."""

    def loss_fn(params, batch, rng):  # noqa: ARG001
        lm = mdef.merge(params)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        seg = batch.get("segment_ids")  # packed rows (data.pack): positions restart in every segment
        pos = positions_from_mask(mask) if seg is None else batch["positions"]
        logits = lm(ids, attention_mask=mask, positions=pos, segment_ids=seg)
        loss = rl.sft_loss(logits[:, :-1], ids[:, 1:], batch["label_mask"][:, 1:], group_rows=token_mean_rows)
        return loss, {}

    return loss_fn


def make_sft_eval_fn(loss_fn, arrays: dict, batch_size: int, mesh,
                     rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES):
    """Held-out token-mean loss (averaged over fixed-size batches)."""

    @parallel.mesh_jit(mesh=mesh, rules=rules)
    def eval_batch(params, b):
        return {"loss": loss_fn(params, b, None)[0] * jnp.ones((b["input_ids"].shape[0],))}

    def eval_fn(params):
        out = eval_loop(lambda b: eval_batch(params, b), arrays, batch_size, mesh, rules)
        return {"eval/loss": float(np.mean(out["loss"]))}

    return eval_fn


def load_supervised(specs, tokenizer, data: SupervisedDataSection, what: str, pack: bool = False):
    rows = load_rows(specs)
    arrays, report = build_supervised(rows, tokenizer, max_length=data.max_length,
                                      skip_bad_rows=data.skip_bad_rows)
    if report.dropped:
        log.warning("%s data: %s", what, report)
    else:
        log.info("%s data: %s", what, report)
    if not pack:
        return arrays.as_dict(), report
    packed = pack_supervised(arrays)
    log.info("%s data: %d examples packed into %d rows; useful tokens %.1f%% padded, %.1f%% packed", what,
             len(arrays), len(packed["input_ids"]), 100 * useful_token_fraction(arrays.attention_mask),
             100 * useful_token_fraction(packed["attention_mask"]))
    return packed, report


def run_sft(cfg: SFTConfig):
    mesh, rules = make_mesh(cfg.mesh), resolve_rules(cfg.mesh)
    run = RunDir(cfg.out_dir, cfg, allow_config_change=cfg.allow_config_change)
    tok = load_tokenizer_for(cfg.model)
    lm = load_model_for(cfg.model, mesh, model_type="causal_lm", tokenizer=tok, rules=rules)
    mdef, params = split_model(lm)
    train_arrays, report = load_supervised(cfg.data.train, tok, cfg.data, "sft train", pack=cfg.data.pack)
    eval_arrays = load_supervised(cfg.data.eval, tok, cfg.data, "sft eval")[0] if cfg.data.eval else None
    loss_fn = sft_loss_fn(mdef, cfg.token_mean_rows)

    eval_fn = (make_sft_eval_fn(sft_loss_fn(mdef), eval_arrays, cfg.eval_batch_size, mesh, rules)
               if eval_arrays is not None else None)

    res = fit(run=run, loop=cfg.train, optim=cfg.optim, mesh=mesh, params=params,
              param_shardings=mdef.shardings(mesh, rules), param_names=mdef.hf_names(), loss_fn=loss_fn,
              train_arrays=train_arrays, eval_fn=eval_fn, rules=rules,
              seed=cfg.seed, desc="sft",
              export=lambda p: export_model(mdef, p, run.path / "hf", tok, dtype=cfg.export.dtype))
    export_dir = res.export_dir
    log.info("sft: exported %s", export_dir)
    return res, export_dir


def export_model(mdef, params, path, tokenizer=None, dtype: str = "float32"):
    """Write ``params`` as an HF folder at ``path`` (weights in ``dtype``); returns the folder."""
    return write_hf_folder(mdef.merge(params), path, tokenizer=tokenizer, dtype=dtype)
