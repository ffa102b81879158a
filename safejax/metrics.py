"""Metric logging: one JSONL line per logged step, mirrored to TensorBoard (tensorboardX).

The JSONL file is the source of truth and is resume-safe: a checkpoint records the file's byte
length at save time (:meth:`MetricWriter.tell`), and ``MetricWriter(..., resume_offset=n)`` cuts
the file back to those ``n`` bytes, so a resumed run appends exactly what an uninterrupted run would
have written (records written after the checkpoint by the killed process are dropped).
``resume_step=s`` (drop records past step ``s``) is the fallback when no offset is known.  A file
found shorter than the recorded offset, or ending in a torn record (a crash mid-write, a filesystem
that lost its tail), is cut back to its last complete record with a warning before appending, so the
file always parses line by line.
TensorBoard events are append-only and may hold duplicates after a resume.

Only process 0 writes (multi-host runs share one output folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger("safejax")


def _to_py(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        v = v.item()
    if hasattr(v, "shape") and getattr(v, "shape", None) == ():
        v = np.asarray(v).item()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _is_primary() -> bool:
    try:
        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 - no backend: a single process
        return True


class MetricWriter:
    """Write ``{"step": s, **metrics}`` lines to ``<out_dir>/<filename>`` and TensorBoard events.

    Args:
      out_dir: the run folder.
      tensorboard: also write TensorBoard events under ``<out_dir>/tensorboard``.
      resume_offset: continue a run: truncate the file to this many bytes first (from :meth:`tell`
        recorded in a checkpoint).
      resume_step: continue a run whose checkpoint has no offset: drop records with ``step > s``.
      enabled: write at all (default: only on process 0).
    Without ``resume_offset``/``resume_step`` an existing file is replaced (a fresh run).
    """

    def __init__(self, out_dir: str | os.PathLike, *, tensorboard: bool = True, resume_step: int | None = None,
                 resume_offset: int | None = None, filename: str = "metrics.jsonl", enabled: bool | None = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / filename
        self.enabled = _is_primary() if enabled is None else bool(enabled)
        self._fh = None
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_offset is not None:
            self.truncate_to(int(resume_offset))
        elif resume_step is not None:
            self.truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "ab")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional at run time
                self._tb = None

    def truncate_to(self, offset: int) -> None:
        """Cut the file to ``offset`` bytes (the length recorded with a checkpoint)."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < offset:
            kept = self.repair_tail()
            log.warning("%s has %d bytes but the checkpoint recorded %d; kept its %d complete bytes (records "
                        "before the resume point are missing)", self.path, size, offset, kept)
            return
        with open(self.path, "r+b") as fh:
            fh.truncate(offset)
        self.repair_tail()

    def repair_tail(self) -> int:
        """Cut the file back to its last complete record (a newline-terminated line that parses as JSON);
        returns the kept length in bytes."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        keep = len(data)
        while keep > 0:
            if data[keep - 1:keep] != b"\n":
                keep = data.rfind(b"\n", 0, keep) + 1  # drop the unterminated tail
                continue
            start = data.rfind(b"\n", 0, keep - 1) + 1
            line = data[start:keep - 1]
            try:
                if line.strip():
                    json.loads(line.decode("utf-8"))
                break
            except ValueError:  # torn or garbled: drop it and look at the line before
                keep = start
        if keep != len(data):
            log.warning("%s: dropped %d bytes of a torn last record", self.path, len(data) - keep)
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
        return keep

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step > step`` (and a torn last line)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def tell(self) -> int:
        """Bytes written so far (all records flushed): store it in a checkpoint's meta."""
        if self._fh is None:
            return 0
        self._fh.flush()
        return int(self._fh.tell())

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step)}
        rec.update({k: _to_py(v) for k, v in metrics.items()})
        self._fh.write((json.dumps(rec) + "\n").encode("utf-8"))
        self._fh.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm progress bar of ``total`` steps, shown on process 0 only (``enabled=False``: hidden)."""
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, leave=False)
