"""``safejax export --run DIR --out HF_DIR``: an HF folder from any checkpoint of a stage.

The stage is recognised from ``DIR/config.json``: PPO runs export the actor (causal LM), SFT runs
the causal LM, RM/CM runs the score model.  The checkpoint is restored without a target (plain
arrays) and its params are poured into the stage's model definition.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("safejax")


def export_run(run_dir: str, out_dir: str, *, step: int | None = None) -> Path:
    from safejax.models import save_pretrained
    from safejax.train.common import ModelSection
    from safejax.train.functional import split_model
    from safejax.train.loading import load_model_for, load_tokenizer_for

    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: --run must be a stage's out_dir")
    cfg = json.loads(cfg_path.read_text())
    if "algorithm" in cfg:
        section, model_type, key = cfg["actor"], "causal_lm", ("actor", "params")
    elif "loss_type" in cfg:
        section, model_type, key = cfg["model"], "score", ("params",)
    else:
        section, model_type, key = cfg["model"], "causal_lm", ("params",)
    ckpt_dir = run / "checkpoints"
    mngr = ocp.CheckpointManager(ckpt_dir.absolute(), item_names=("state", "meta"))
    steps = sorted(mngr.all_steps())
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    s = step if step is not None else steps[-1]
    if s not in steps:
        raise ValueError(f"step {s} is not among the checkpoints in {ckpt_dir}: {steps}")
    raw = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    params = raw["state"]
    for k in key:
        params = params[k]
    sec = ModelSection(**section)
    tok = load_tokenizer_for(sec)
    model = load_model_for(sec, None, model_type=model_type, tokenizer=tok)
    mdef, template_params = split_model(model)
    got = jax.tree.structure(jax.tree.map(np.asarray, params))
    if got != jax.tree.structure(template_params):
        raise ValueError(f"checkpoint {ckpt_dir}/{s} does not match the model at {sec.path}")
    save_pretrained(mdef.merge(params), out_dir, tokenizer=tok)
    log.info("exported %s step %d -> %s", run, s, out_dir)
    return Path(out_dir)
