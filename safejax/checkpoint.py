"""Orbax checkpoints of whole train states (plus a small JSON of host-side positions).

Each checkpoint step holds two items: ``state`` (the train-state pytree, sharded, restored onto
the shardings of an abstract target) and ``meta`` (JSON: data-iterator position, config
fingerprint, metric-writer step...).  Saves are asynchronous and atomic (orbax writes to a
temporary folder and renames it when complete), so a crash mid-save leaves the previous
checkpoint usable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStruct target (with shardings) for restoring ``tree``'s structure."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
    """Keep-last-K asynchronous checkpoints under ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        return self._mngr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})), force=force)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """Restore the newest complete checkpoint (or ``step``) onto ``target``'s shapes/shardings.

        A corrupt or partial checkpoint is skipped with a warning and the previous one is tried."""
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        for s in steps:
            try:
                out = self._mngr.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()))
                return out["state"], dict(out["meta"] or {}), int(s)
            except Exception as e:  # noqa: BLE001 - fall back to an older checkpoint
                log.warning("checkpoint step %s in %s is unreadable (%s); trying an older one", s, self.directory,
                            str(e).splitlines()[0][:200])
                if step is not None:
                    raise
        return None

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
