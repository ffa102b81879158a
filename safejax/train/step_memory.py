"""Device memory of a compiled step, by XLA's own memory analysis.

``peak = temp + argument + output - alias`` bytes per device: the buffers the executable needs while it runs,
arguments and outputs included, less the outputs that reuse a donated argument's buffer.  Every training stage
writes it for its jitted step(s) to ``<out_dir>/step_memory.json`` on the first call
(:func:`recording_step_memory`), so runs of different algorithms can be compared on the same footing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax

log = logging.getLogger("safejax")

STEP_MEMORY_FILE = "step_memory.json"


def step_memory(jitted, *args) -> dict[str, int]:
    """XLA's memory analysis of ``jitted`` (a ``jax.jit`` function) compiled for ``args``.

    Returns ``{"temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "peak_bytes"}`` (per device), or ``{}``
    where the backend reports no analysis.  Lowering does not consume donated arguments; with the same arguments as
    the real call the compilation is jax's cached one."""
    stats = jitted.lower(*args).compile().memory_analysis()
    if stats is None:
        return {}
    if isinstance(stats, (list, tuple)):  # one entry per device on some backends: they agree, take the first
        stats = stats[0]
    out = {"temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes),
           "output_bytes": int(stats.output_size_in_bytes), "alias_bytes": int(stats.alias_size_in_bytes)}
    out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    return out


def recording_step_memory(jitted, run_path: str | os.PathLike, phase: str = "train_step") -> Callable[..., Any]:
    """``jitted`` that, on its first call, records :func:`step_memory` of that call under ``phase`` in
    ``run_path/step_memory.json`` (process 0; other phases already in the file are kept), then runs it."""
    done = False

    def call(*args):
        nonlocal done
        if not done:
            done = True
            if jax.process_index() == 0:
                record(Path(run_path), phase, step_memory(jitted, *args))
        return jitted(*args)

    return call


def record(run_path: Path, phase: str, stats: dict) -> None:
    path = run_path / STEP_MEMORY_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    data[phase] = stats
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    if stats:
        log.info("%s: XLA memory analysis: peak %.1f MiB per device (temp %.1f, arguments %.1f, outputs %.1f, "
                 "aliased %.1f)", phase, stats["peak_bytes"] / 2**20, stats["temp_bytes"] / 2**20,
                 stats["argument_bytes"] / 2**20, stats["output_bytes"] / 2**20, stats["alias_bytes"] / 2**20)


def read_step_memory(run_path: str | os.PathLike) -> dict:
    """``{phase: stats}`` a run recorded (``{}`` when none)."""
    path = Path(run_path) / STEP_MEMORY_FILE
    return json.loads(path.read_text()) if path.exists() else {}
