"""``safejax export --run DIR --out HF_DIR [--step N] [--dtype bfloat16]``: an HF folder from any checkpoint of a stage.

The stage is recognised from ``DIR/config.json`` (the snapshot every stage writes): PPO runs export
the actor (a causal LM that transformers loads), SFT runs the causal LM, RM/CM runs the score model
(that :func:`safejax.models.load_pretrained` loads).  Only the needed params subtree of the
checkpoint is read (``("actor", "params")`` or ``("params",)``), onto one device whatever mesh
saved it; its arrays are checked against the stage's model definition (built from the config's
model folder and tokenizer exactly as the stage built it) and poured into it.  The result equals the
stage's own ``hf/`` export for the final step.

Every export (this command's and each stage's final ``hf/``) goes through :func:`write_hf_folder`:
the folder is written next to its destination and moved in only when complete, so a full disk or a
permission error leaves an earlier export untouched (and is reported as one :class:`OSError`), and
the weight files get the same permissions as the rest of the folder (``0666`` less the umask, i.e.
``0644`` usually; safetensors creates them ``0600``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from safetensors import SafetensorError

from safejax.checkpoint import (CheckpointError, CheckpointMismatchError, Checkpointer, describe_mismatch, leaf_table,
                                named_leaves)
from safejax.models import save_pretrained
from safejax.models.functional import split_model
from safejax.models.lora import LoRAConfig, lora_model
from safejax.models.loading import load_model_for, load_tokenizer_for
from safejax.models.safetensors_files import WEIGHTS_INDEX_NAME
from safejax.sections import ModelSection

log = logging.getLogger("safejax")


def stage_of(cfg: dict) -> tuple[str, dict, str, tuple[str, ...]]:
    """``(stage, model section dict, model_type, params path in the state)`` of a config snapshot."""
    if "algorithm" in cfg and "actor" in cfg:
        return str(cfg["algorithm"]), cfg["actor"], "causal_lm", ("actor", "params")
    if "loss_type" in cfg:
        return "score-model", cfg["model"], "score", ("params",)
    if "model" in cfg:
        return "sft", cfg["model"], "causal_lm", ("params",)
    raise CheckpointError("unrecognised stage config (expected an sft, rm/cm or ppo config snapshot)")


def export_run(run_dir: str, out_dir: str, *, step: int | None = None, dtype: str = "float32") -> Path:
    """Write an HF folder (weights + config + tokenizer) for checkpoint ``step`` (default: the newest
    readable one) of the stage run in ``run_dir``, weights in ``dtype`` (``float32`` | ``bfloat16``).
    Returns ``Path(out_dir)``."""

    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: --run must be the out_dir of a training stage")
    try:
        cfg = json.loads(cfg_path.read_text())
        stage, section, model_type, key = stage_of(cfg)
    except (json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    ckpt_dir = run / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir} not found: the run saved no checkpoint")
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
        if not ckpt.all_steps():
            raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
        params, _, s = ckpt.restore_subtree(key, step=step)
    finally:
        ckpt.close()

    sec = ModelSection(**{k: v for k, v in section.items() if k in ModelSection.__dataclass_fields__})
    tok = load_tokenizer_for(sec)
    model = load_model_for(sec, None, model_type=model_type, tokenizer=tok)
    mdef, template = split_model(model)
    lora = (cfg.get("lora") or {}).get("actor") or {} if key == ("actor", "params") else {}
    if lora.get("rank"):  # a LoRA actor's checkpoint holds its adapters: merge them into the base
        base = template
        mdef, template = lora_model(mdef, base, LoRAConfig(**lora), seed=0, what="lora.actor")
    diff = describe_mismatch(leaf_table(params), leaf_table(template))
    if diff is not None:
        raise CheckpointMismatchError(f"checkpoint {ckpt_dir / str(s)} does not match the model at {sec.path}: {diff}")
    by_name = named_leaves(params)  # on-disk dict keys are strings ("0"), the model's may be ints
    flat, treedef = jax.tree_util.tree_flatten(template)
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(by_name[n], t.dtype)
                                                    for n, t in zip(named_leaves(template), flat)])
    model = mdef.base.merge(mdef.merged_params(params, base)) if lora.get("rank") else mdef.merge(params)
    write_hf_folder(model, out_dir, tokenizer=tok, dtype=dtype)
    log.info("exported %s (%s) step %d -> %s (%s)", run, stage, s, out_dir, dtype)
    return Path(out_dir)


def _file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_hf_folder(model, path: str | os.PathLike, *, tokenizer=None, dtype: str = "float32") -> Path:
    """:func:`safejax.models.save_pretrained` (weights in ``dtype``) into ``path``, never left half-written.

    Writes a complete folder ``.<name>.incomplete/`` beside ``path`` and makes every file ``0666 &
    ~umask``; then the folder is renamed to ``path`` (new) or its files are moved over the ones of
    the same name in ``path`` (other files there are left alone).  Any I/O failure while writing
    (full disk, read-only filesystem, permissions) removes the partial folder and raises one
    :class:`OSError` naming ``path``, before anything in ``path`` is touched.  All processes call it
    (the weights may be gathered collectively); only process 0 touches files."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.incomplete"
    primary = jax.process_index() == 0
    try:
        if primary:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp, tokenizer=tokenizer, dtype=dtype)
        if not primary:
            return path
        mode = _file_mode()
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, mode)
    except (OSError, SafetensorError) as e:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        code = getattr(e, "errno", None)
        why = os.strerror(code) if code else str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        err = OSError(f"cannot write the exported model to {path}: {why}; an earlier export there (if any) is "
                      "unchanged")
        err.errno = code or errno.EIO
        raise err from None
    if not path.exists():
        os.replace(tmp, path)
        return path
    stale_index = path / WEIGHTS_INDEX_NAME  # a sharded export replaced by a single file
    if stale_index.exists() and not (tmp / WEIGHTS_INDEX_NAME).exists():
        stale_index.unlink()
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # weights first, config last
        os.replace(f, path / f.name)
    tmp.rmdir()
    return path
