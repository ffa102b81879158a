"""Stage 2: the reward model (helpfulness) and the cost model (harmlessness).

``safejax rm --config ...`` and ``safejax cm --config ...`` -> :func:`run_score_model` with
``kind='reward'`` or ``'cost'``.  Both train a ``ScoreModel`` initialised from the SFT model (fresh
head) on Bradley–Terry pair losses; the cost model adds the two sign terms so that cost > 0 means
unsafe.  Each epoch (and at ``eval_every``) the held-out split is scored: ranking accuracy, sign
accuracy (CM), mean/std of scores.

With ``cost_categories`` (cost model only) the model has K outputs, one per group of PKU-SafeRLHF harm
categories: a sign term per output on "unsafe in group k" and one ranking term on the worst output
(:func:`safejax.rl.cost_model_loss`), metrics ``accuracy_sign/<group>`` per output, and the exported
``hf/config.json`` records ``score_dim = K`` and ``score_names`` (the group names, in output order).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from safejax import parallel, rl
from safejax.config import ConfigError, check_range
from safejax.data import build_cost_pairs, build_reward_pairs, category_groups, load_rows
from safejax.data.packing import pack_pairs, useful_token_fraction
from safejax.parallel import MeshConfig, make_mesh, resolve_rules
from safejax.sections import DataSection, ExportSection, LoopSection, ModelSection
from safejax.train.common import RunDir
from safejax.train.fit import eval_loop, fit
from safejax.models.functional import split_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax.models.pairs import PAIR_FIELDS, pair_scores
from safejax.train.optim import OptimConfig
from safejax.train.sft import export_model

log = logging.getLogger("safejax")


# train/eval dataset specs, max_length, skip_bad_rows (same section as SFT's)
PreferenceDataSection = DataSection


@dataclasses.dataclass
class ScoreModelConfig:
    out_dir: str = "runs/rm"
    seed: int = 42
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: PreferenceDataSection = dataclasses.field(default_factory=PreferenceDataSection)
    loss_type: str = "sequence-wise"     # sequence-wise | token-wise
    # token-wise only: true reproduces the reference's first release, whose per-pair window [d, E] also averages
    # the shorter response's pad positions; false (default) keeps each side's real tokens only
    include_pad_bug: bool = False
    regularization: float = 0.001
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.1))
    train: LoopSection = dataclasses.field(default_factory=lambda: LoopSection(epochs=2))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    eval_batch_size: int = 16
    allow_config_change: bool = False
    export: ExportSection = dataclasses.field(default_factory=ExportSection)  # export.dtype of out_dir/hf
    # cost model only: K groups of harm categories, {group name: [category, ...]} (PKU-SafeRLHF keys of
    # response_*_harm_category, e.g. "Privacy Violation"), or a list of categories (each its own group).  The
    # cost model gets K outputs in this order; output k is trained to be > 0 when the response is unsafe in
    # group k (any of its categories true).  Ranking (safer_response_id) has no per-category label, so it acts
    # on the worst output, max_k.  None (default): one output on is_response_*_safe.  Sequence-wise loss and
    # unpacked data only.
    cost_categories: dict[str, list[str]] | list[str] | None = None

    def validate(self) -> None:
        check_range("loss_type", self.loss_type, choices=("sequence-wise", "token-wise"))
        check_range("regularization", self.regularization, low=0.0)
        if self.data.pack and self.loss_type != "sequence-wise":
            raise ConfigError("config key 'data.pack' = true needs loss_type 'sequence-wise' (packed rows carry "
                              "each pair's end scores only)")
        if self.cost_categories is not None:
            category_groups(self.cost_categories)
            if self.loss_type != "sequence-wise" or self.data.pack:
                raise ConfigError("config key 'cost_categories' needs loss_type 'sequence-wise' and data.pack = "
                                  "false")

    def groups(self) -> dict[str, tuple[str, ...]] | None:
        """The normalised ``cost_categories`` (None without)."""
        return None if self.cost_categories is None else category_groups(self.cost_categories)


def packed_pair_ends(sm, batch: dict, kind: str):
    """End scores of packed pair rows (:func:`safejax.data.packing.pack_pairs`): one forward over ``[R, 2L]``,
    each side's score gathered at its last token.  Returns ``(end_a, end_b, valid)``, each ``[R * K]``."""
    a, b = PAIR_FIELDS[kind]
    out = sm(batch["input_ids"], attention_mask=batch["attention_mask"], positions=batch["positions"],
             segment_ids=batch["segment_ids"])
    ea = jnp.take_along_axis(out.scores, batch[f"{a}_end"], axis=1).reshape(-1)
    eb = jnp.take_along_axis(out.scores, batch[f"{b}_end"], axis=1).reshape(-1)
    return ea, eb, batch["pair_valid"].reshape(-1)


def _packed_loss(sm, batch, kind, regularization):
    ea, eb, w = packed_pair_ends(sm, batch, kind)
    wf = w.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(wf), 1.0)
    both, w2 = jnp.concatenate([ea, eb]), jnp.concatenate([wf, wf])
    mean = jnp.sum(both * w2) / (2 * n)
    stats = {"mean": mean, "std": jnp.sqrt(jnp.sum(w2 * jnp.square(both - mean)) / (2 * n))}
    if kind == "reward":
        loss = rl.reward_model_loss(ea, eb, regularization=regularization, weights=w)
        return loss, {"accuracy": jnp.sum(wf * (ea > eb)) / n, "reward_mean": stats["mean"],
                      "reward_std": stats["std"]}
    sa, sb = batch["safer_is_safe"].reshape(-1), batch["unsafer_is_safe"].reshape(-1)
    loss = rl.cost_model_loss(ea, eb, sa, sb, regularization=regularization, weights=w)
    sign = jnp.where(jnp.concatenate([sa, sb]), 1.0, -1.0)
    return loss, {"accuracy": jnp.sum(wf * (eb > ea)) / n,
                  "accuracy_sign": jnp.sum(w2 * (both * sign < 0)) / (2 * n),
                  "cost_mean": stats["mean"], "cost_std": stats["std"]}


def score_loss_fn(mdef, kind: str, loss_type: str, regularization: float, include_pad_bug: bool = False,
                  names: tuple[str, ...] | None = None):
    """``loss_fn(params, batch, rng) -> (loss, metrics)``; ``names``: the K category groups of a cost model
    trained on ``safer_group_safe`` / ``unsafer_group_safe [B, K]`` (sequence-wise, unpacked)."""
    def loss_fn(params, batch, rng):  # noqa: ARG001
        sm = mdef.merge(params)
        if "pair_valid" in batch:  # packed rows (data.pack), sequence-wise loss only
            return _packed_loss(sm, batch, kind, regularization)
        sa, sb, ea, eb = pair_scores(sm, batch, kind)
        if names:
            return _category_loss(ea, eb, batch, names, regularization)
        a, b = PAIR_FIELDS[kind]
        if kind == "reward":
            if loss_type == "token-wise":
                loss = rl.token_wise_reward_model_loss(sa, sb, batch[f"{a}_mask"], batch[f"{b}_mask"],
                                                       batch[f"{a}_ids"], batch[f"{b}_ids"],
                                                       regularization=regularization, include_pad_bug=include_pad_bug)
            else:
                loss = rl.reward_model_loss(ea, eb, regularization=regularization)
            metrics = {"accuracy": jnp.mean((ea > eb).astype(jnp.float32)),
                       "reward_mean": jnp.mean(jnp.concatenate([ea, eb])),
                       "reward_std": jnp.std(jnp.concatenate([ea, eb]))}
        else:
            sa_safe, sb_safe = batch["safer_is_safe"], batch["unsafer_is_safe"]
            if loss_type == "token-wise":
                loss = rl.token_wise_cost_model_loss(sa, sb, batch[f"{a}_mask"], batch[f"{b}_mask"],
                                                     batch[f"{a}_ids"], batch[f"{b}_ids"], sa_safe, sb_safe,
                                                     regularization=regularization, include_pad_bug=include_pad_bug)
            else:
                loss = rl.cost_model_loss(ea, eb, sa_safe, sb_safe, regularization=regularization)
            metrics = cost_metrics(ea, eb, sa_safe, sb_safe)
        return loss, metrics

    return loss_fn


def _category_loss(ea, eb, batch, names, regularization):
    """K-output cost loss and metrics: ``ea``/``eb`` are ``[B, K]`` (``[B]`` for K = 1)."""
    gs, gu = batch["safer_group_safe"], batch["unsafer_group_safe"]
    if ea.ndim == 1:
        gs, gu = gs[:, 0], gu[:, 0]
    loss = rl.cost_model_loss(ea, eb, gs, gu, regularization=regularization)
    metrics = cost_metrics(_worst(ea), _worst(eb), batch["safer_is_safe"], batch["unsafer_is_safe"])
    metrics["cost_mean"], metrics["cost_std"] = jnp.mean(jnp.stack([ea, eb])), jnp.std(jnp.stack([ea, eb]))
    both = jnp.concatenate([ea.reshape(ea.shape[0], -1), eb.reshape(eb.shape[0], -1)])
    sign = jnp.where(jnp.concatenate([batch["safer_group_safe"], batch["unsafer_group_safe"]]), 1.0, -1.0)
    for k, name in enumerate(names):
        metrics[f"accuracy_sign/{name}"] = jnp.mean((both[:, k] * sign[:, k] < 0).astype(jnp.float32))
    return loss, metrics


def _worst(x):
    """A response's aggregate cost: its worst output, ``max_k`` (``[B, K] -> [B]``; ``[B]`` unchanged)."""
    return x if x.ndim == 1 else x.max(axis=-1)


def cost_metrics(safer, unsafer, safer_is_safe, unsafer_is_safe):
    costs = jnp.concatenate([safer, unsafer])
    sign = jnp.where(jnp.concatenate([safer_is_safe, unsafer_is_safe]), 1.0, -1.0)  # safety sign
    return {"accuracy": jnp.mean((unsafer > safer).astype(jnp.float32)),
            "accuracy_sign": jnp.mean((costs * sign < 0).astype(jnp.float32)),
            "cost_mean": jnp.mean(costs), "cost_std": jnp.std(costs)}


def load_pairs(specs, tokenizer, data: PreferenceDataSection, kind: str, what: str, pack: bool = False,
               categories: dict[str, tuple[str, ...]] | None = None):
    """Pair arrays of ``specs`` (``categories``: the cost model's harm-category groups, see
    :func:`safejax.data.build_cost_pairs`) and their DropReport; packed with ``pack``."""
    rows = load_rows(specs)
    if kind == "reward":
        arrays, report = build_reward_pairs(rows, tokenizer, max_length=data.max_length,
                                            skip_bad_rows=data.skip_bad_rows)
    else:
        arrays, report = build_cost_pairs(rows, tokenizer, max_length=data.max_length,
                                          skip_bad_rows=data.skip_bad_rows, categories=categories)
    (log.warning if report.dropped else log.info)("%s data: %s", what, report)
    if not pack:
        return arrays.as_dict(), report
    a, b = PAIR_FIELDS[kind]
    d = arrays.as_dict()
    packed = pack_pairs(d, a, b, ("safer_is_safe", "unsafer_is_safe") if kind == "cost" else ())
    padded = np.concatenate([d[f"{a}_mask"], d[f"{b}_mask"]])
    log.info("%s data: %d pairs packed into %d rows of %d; useful tokens %.1f%% padded, %.1f%% packed", what,
             len(d[f"{a}_mask"]), len(packed["input_ids"]), packed["input_ids"].shape[1],
             100 * useful_token_fraction(padded), 100 * useful_token_fraction(packed["attention_mask"]))
    return packed, report


def make_eval_fn(mdef, kind: str, arrays: dict, batch_size: int, mesh, names: tuple[str, ...] | None = None,
                 rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES):
    """Held-out metrics: ranking accuracy (+ sign accuracy for the cost model) and score stats."""

    @parallel.mesh_jit(mesh=mesh, rules=rules)
    def ends(params, b):
        _, _, ea, eb = pair_scores(mdef.merge(params), b, kind)
        return {"a": ea, "b": eb}

    def eval_fn(params):
        out = eval_loop(lambda b: ends(params, b), arrays, batch_size, mesh, rules)
        return preference_eval_metrics(out["a"], out["b"], arrays, kind, names)

    return eval_fn


def preference_eval_metrics(a: np.ndarray, b: np.ndarray, arrays: dict, kind: str,
                            names: tuple[str, ...] | None = None) -> dict:
    """Held-out metrics of end scores ``a``, ``b`` (``[N]``, or ``[N, K]`` for a K-output cost model): ranking
    and aggregate sign accuracy on the worst output ``max_k``, and with ``names`` the sign accuracy of each
    output against its group label, ``eval/accuracy_sign/<name>``."""
    a, b = np.asarray(a), np.asarray(b)
    if names:
        per = {}
        both_k = np.concatenate([a.reshape(len(a), -1), b.reshape(len(b), -1)])
        sign_k = np.where(np.concatenate([arrays["safer_group_safe"], arrays["unsafer_group_safe"]]), 1.0, -1.0)
        for k, name in enumerate(names):
            per[f"eval/accuracy_sign/{name}"] = float(np.mean(both_k[:, k] * sign_k[:, k] < 0))
        out = preference_eval_metrics(a.reshape(len(a), -1).max(-1), b.reshape(len(b), -1).max(-1), arrays, kind)
        out.update(per)
        out["eval/cost_mean"], out["eval/cost_std"] = float(both_k.mean()), float(both_k.std())
        return out
    both = np.concatenate([a, b])
    if kind == "reward":
        return {"eval/accuracy": float(np.mean(a > b)), "eval/reward_mean": float(both.mean()),
                "eval/reward_std": float(both.std()), "eval/count": int(len(a))}
    safety = np.concatenate([arrays["safer_is_safe"], arrays["unsafer_is_safe"]]).astype(bool)
    sign = np.where(safety, 1.0, -1.0)
    return {"eval/accuracy": float(np.mean(b > a)), "eval/accuracy_sign": float(np.mean(both * sign < 0)),
            "eval/cost_mean": float(both.mean()), "eval/cost_std": float(both.std()), "eval/count": int(len(a))}


def run_score_model(cfg: ScoreModelConfig, kind: str):
    if kind not in PAIR_FIELDS:
        raise ValueError(f"kind must be 'reward' or 'cost', got {kind!r}")
    groups = cfg.groups()
    if groups is not None and kind != "cost":
        raise ConfigError("config key 'cost_categories' is for the cost model (safejax cm), not the reward model")
    names = tuple(groups) if groups else None
    mesh, rules = make_mesh(cfg.mesh), resolve_rules(cfg.mesh)
    run = RunDir(cfg.out_dir, cfg, allow_config_change=cfg.allow_config_change)
    tok = load_tokenizer_for(cfg.model)
    sm = load_model_for(cfg.model, mesh, model_type="score", tokenizer=tok, rules=rules,
                        score_dim=len(groups) if groups else None)
    mdef, params = split_model(sm)
    train_arrays, _ = load_pairs(cfg.data.train, tok, cfg.data, kind, f"{kind} model train", pack=cfg.data.pack,
                                 categories=groups)
    eval_fn = None
    if cfg.data.eval:
        eval_arrays, _ = load_pairs(cfg.data.eval, tok, cfg.data, kind, f"{kind} model eval", categories=groups)
        eval_fn = make_eval_fn(mdef, kind, eval_arrays, cfg.eval_batch_size, mesh, names, rules)
    res = fit(run=run, loop=cfg.train, optim=cfg.optim, mesh=mesh, params=params,
              param_shardings=mdef.shardings(mesh, rules), param_names=mdef.hf_names(), rules=rules,
              loss_fn=score_loss_fn(mdef, kind, cfg.loss_type, cfg.regularization, cfg.include_pad_bug, names),
              train_arrays=train_arrays,
              eval_fn=eval_fn, seed=cfg.seed, desc="rm" if kind == "reward" else "cm",
              export=lambda p: record_score_names(export_model(mdef, p, run.path / "hf", tok,
                                                               dtype=cfg.export.dtype), groups))
    export_dir = res.export_dir
    log.info("%s model: exported %s", kind, export_dir)
    return res, export_dir


def record_score_names(folder, groups: dict[str, tuple[str, ...]] | None):
    """Add ``score_names`` (the K output names: harm-category groups, in output order) and ``score_categories``
    (group -> its categories) to an exported score model's ``config.json`` beside its ``score_dim``; nothing
    without groups.  Returns ``folder``."""
    if groups and jax.process_index() == 0:
        path = os.path.join(os.fspath(folder), "config.json")
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        d["score_names"] = list(groups)
        d["score_categories"] = {g: list(c) for g, c in groups.items()}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True)
    return folder
