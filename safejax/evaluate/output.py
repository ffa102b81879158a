"""The output folder of an eval command: ``config.yaml``, strict-JSON ``summary.json`` / ``*.jsonl``, text and
plots, written by process 0 only."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from safejax.config import dump_yaml


def jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays converted, NaN/inf -> None (strict JSON)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None
    return x


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "policy"


class OutputDir:
    """The output folder; only process 0 writes."""

    def __init__(self, cfg: Any):
        self.path = Path(cfg.out_dir)
        self.main = jax.process_index() == 0
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.path / "config.yaml")

    def file(self, name: str) -> Path:
        return self.path / name

    def json(self, name: str, obj: Any) -> None:
        if self.main:
            self.file(name).write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")

    def text(self, name: str, text: str) -> None:
        if self.main:
            self.file(name).write_text(text, encoding="utf-8")

    def jsonl(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.main:
            with open(self.file(name), "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(jsonable(r), ensure_ascii=False, allow_nan=False) + "\n")

    def plot(self, fn: Callable, *args, **kwargs) -> None:
        if self.main:
            fn(*args, **kwargs)
