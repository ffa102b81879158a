"""What a resumed run must share with the run that wrote its checkpoints: the config and the data.

* **config**: the snapshot of the earlier run is read from whatever survives, in this order:
  ``config.json``, ``config.yaml``, then the ``config`` recorded in the newest checkpoint's meta
  (every checkpoint carries one).  When none can be read the resume is refused: a run directory
  whose config is unknown cannot be shown to continue the same run.
* **data**: every checkpoint records a fingerprint (row count + SHA-256 of the tokenized arrays) of
  each dataset the stage trains on (``train``; ``prompts`` and ``ptx`` for the RL stage).  A resume
  whose data differs is refused naming the dataset, unless ``train.allow_data_change=true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from safejax.checkpoint import read_step_meta
from safejax.config import ConfigError

log = logging.getLogger("safejax")

CONFIG_KEY = "config"            # checkpoint meta: the stage config (dict)
DATA_KEY = "data_fingerprint"    # checkpoint meta: {dataset name: {"rows": n, "sha256": hex}}


class DataChangedError(ConfigError):
    """The data of a resumed run differs from the data its checkpoint was trained on."""


def array_fingerprint(arrays: Mapping[str, Any]) -> dict:
    """``{"rows": n, "sha256": hex}`` of a dict of equal-length arrays (keys, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    rows = 0
    for k in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[k]))
        rows = int(a.shape[0]) if a.ndim else 1
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return {"rows": rows, "sha256": h.hexdigest()}


def data_differences(old: Mapping[str, dict], new: Mapping[str, dict]) -> list[str]:
    """``["prompts: 848 rows (sha256 1234abcd...) -> 500 rows (...)", ...]`` for every dataset that differs."""
    def show(fp):
        return "absent" if not fp else f"{fp.get('rows')} rows (sha256 {str(fp.get('sha256', ''))[:12]})"

    return [f"{k}: {show(old.get(k))} -> {show(new.get(k))}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def check_data(meta: dict, step_dir: Path, current: Mapping[str, dict], *, allow: bool) -> None:
    """Refuse (:class:`DataChangedError`) to resume from ``step_dir`` when its recorded data fingerprint
    differs from ``current`` (checkpoints without one are accepted)."""
    recorded = meta.get(DATA_KEY)
    if not isinstance(recorded, dict) or not current:
        return
    diffs = data_differences(recorded, current)
    if not diffs:
        return
    if allow:
        log.warning("resuming from %s on changed data (train.allow_data_change): %s", step_dir, "; ".join(diffs))
        return
    raise DataChangedError(f"the training data changed since checkpoint {step_dir} was saved ({'; '.join(diffs)}), "
                           "so resuming would not continue the same run; restore the data, use a new out_dir, or "
                           "pass train.allow_data_change=true to resume anyway")


def newest_step_dirs(ckpt_dir: Path) -> list[Path]:
    """Complete-looking step folders (``<digits>/``) of ``ckpt_dir``, newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: -int(p.name))


def read_snapshot(run_path: Path) -> tuple[dict, str]:
    """The config of the run checkpointed in ``run_path`` and where it was read from.

    Tries ``config.json``, ``config.yaml``, then the newest checkpoint meta holding a config;
    raises :class:`ConfigError` naming what was tried when none is readable."""
    tried = []
    for name, parse in (("config.json", json.loads), ("config.yaml", yaml.safe_load)):
        p = run_path / name
        if not p.exists():
            tried.append(f"{name} missing")
            continue
        try:
            cfg = parse(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError) as e:
            tried.append(f"{name} unreadable ({type(e).__name__})")
            continue
        if isinstance(cfg, dict):
            return cfg, str(p)
        tried.append(f"{name} not a mapping")
    for step_dir in newest_step_dirs(run_path / "checkpoints"):
        meta = read_step_meta(step_dir)
        if meta is not None and isinstance(meta.get(CONFIG_KEY), dict):
            return meta[CONFIG_KEY], str(step_dir / "meta")
    tried.append("no checkpoint records its config")
    raise ConfigError(f"{run_path} holds checkpoints but the config of the run that wrote them cannot be read "
                      f"({'; '.join(tried)}), so resuming cannot be checked to continue the same run; use a new "
                      "out_dir, or pass allow_config_change=true to resume anyway")
