"""The one host loop every stage runs: resume, step, hooks, checkpoint, preemption, progress bar.

A stage is a jitted ``step(state, batch) -> (state, metrics)``, the host iterators its batches come from
and its hooks.  :class:`HostLoop` owns what every stage repeats:

- resume: the newest complete checkpoint restores the state, every iterator's position, the skip
  counters of the :class:`MetricGuard` and the metric file's offset;
- per step: call the step, queue its metrics (no device sync), advance the progress bar, then run the
  hooks whose ``when(step)`` holds, in the order they were added (log, eval, ...);
- checkpoint every ``save_every`` steps, at the last step and on SIGTERM (then :class:`Preempted`);
- after the last step the end hooks (e.g. a final evaluation), and on every exit the stage is closed
  (bar, in-flight save, metric writer);
- then, once the run finished and its last checkpoint is committed, the export (the HF folder).

Hooks are ``fn(loop, step, state)``; they reach the metric writer, the guard and the bar through the
loop (:meth:`HostLoop.log` is the logging hook every stage uses).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from safejax.metrics import MetricWriter
from safejax.train.common import (SKIP_KEY, GracefulStop, LoopSection, MetricGuard, Preempted, RunDir, close_stage,
                                  progress, save_checkpoint)

log = logging.getLogger("safejax")

Hook = Callable[["HostLoop", int, Any], None]


@dataclasses.dataclass
class _HookEntry:
    when: Callable[[int], bool]
    fn: Hook


class HostLoop:
    """One stage's host loop (see the module docstring).

    Args:
      run: the stage's :class:`RunDir` (config snapshot, data fingerprints, checkpointer).
      loop: the stage's ``train`` section (``log_every``, ``save_every``, ``keep_checkpoints``,
        ``progress``, ``skip_nonfinite``, ``max_consecutive_skips``).
      name: shown on the progress bar and in log/preemption messages.
      total: number of steps of the whole run.
      iterators: ``{meta key: BatchIterator}`` whose positions travel in every checkpoint.
      unit: what one step is called in messages (``step`` or ``iteration``).
      metric_prefix: prefix of the metric names the step returns without one (``train/`` for the
        supervised stages; the PPO update names its own).
    """

    def __init__(self, run: RunDir, loop: LoopSection, *, name: str, total: int, iterators: dict,
                 unit: str = "step", metric_prefix: str = ""):
        self.run, self.loop, self.name, self.total, self.unit = run, loop, name, total, unit
        self.iterators = iterators
        self.guard = MetricGuard(prefix=metric_prefix, max_consecutive=loop.max_consecutive_skips)
        self.skip_key = (metric_prefix or "train/") + SKIP_KEY + "_total"
        self.hooks: list[_HookEntry] = []
        self.end_hooks: list[Hook] = []
        self.writer: MetricWriter | None = None
        self.bar = None
        self.last_metrics: dict = {}
        self.export_fn: Callable[[Any], Any] | None = None
        self.exported: Any = None

    def add_hook(self, fn: Hook, *, every: int = 0, when: Callable[[int], bool] | None = None) -> None:
        """Run ``fn(loop, step, state)`` after the steps where ``when(step)`` holds (default: every
        ``every`` steps and at the last step; ``every=0`` with no ``when``: only at the last step)."""
        if when is None:
            when = lambda s: (every > 0 and s % every == 0) or s == self.total  # noqa: E731
        self.hooks.append(_HookEntry(when, fn))

    def add_end_hook(self, fn: Hook) -> None:
        """Run ``fn(loop, step, state)`` once after the last step (after its checkpoint)."""
        self.end_hooks.append(fn)

    def add_export(self, fn: Callable[[Any], Any]) -> None:
        """Run ``fn(final state)`` once the loop finished and the stage is closed; its result is :attr:`exported`."""
        self.export_fn = fn

    def log(self, step: int, extra: dict | None = None) -> dict:
        """Pull the pending metrics (checked for NaN/Inf) and write the step's line; returns it."""
        metrics = self.guard.drain()[step]
        metrics.update(extra or {})
        if self.loop.skip_nonfinite:
            metrics[self.skip_key] = self.guard.skipped
        self.writer.write(step, metrics)
        self.last_metrics = metrics
        return metrics

    def write(self, step: int, metrics: dict) -> None:
        """Write metrics that did not come from the step (e.g. evaluation) to the step's line."""
        self.writer.write(step, metrics)

    def _save(self, ckpt, step: int, state) -> None:
        save_checkpoint(ckpt, step, state, self.guard, self.writer,
                        {k: it.state() for k, it in self.iterators.items()})

    def run_steps(self, state: Any, step_fn: Callable[[Any, Any], tuple[Any, Any]],
                  batches: Callable[[], Iterator]) -> tuple[Any, int]:
        """Resume if a checkpoint exists, then run ``step_fn(state, batch)`` on ``next(batches())`` until
        ``total``; returns ``(state, step)``.  ``batches`` is called once, after the iterators are restored."""
        ckpt = self.run.checkpointer(self.loop.keep_checkpoints)
        try:
            restored = ckpt.restore(state, required_meta=tuple(self.iterators))
            start, meta = 0, {}
            if restored is not None:
                state, meta, start = restored
                for k, it in self.iterators.items():
                    it.restore(meta[k])
                self.guard.restore(meta)
                log.info("%s: resumed from %s %d in %s", self.name, self.unit, start, ckpt.directory)
            self.run.write_config()
            self.writer = MetricWriter(self.run.path, resume_step=start if restored is not None else None,
                                       resume_offset=meta.get("metrics_offset"))
            self.bar = progress(self.total, self.name, self.loop.progress, initial=start)
            step = start
            with GracefulStop() as stop:
                it = batches()
                while step < self.total:
                    state, m = step_fn(state, next(it))
                    step += 1
                    self.guard.add(step, m)
                    self.bar.update(1)
                    for h in self.hooks:
                        if h.when(step):
                            h.fn(self, step, state)
                    stop_now = stop.poll(step)
                    if (self.loop.save_every and step % self.loop.save_every == 0) or step == self.total or stop_now:
                        self._save(ckpt, step, state)
                    if stop_now:
                        raise Preempted(f"{self.name}: SIGTERM received; saved a checkpoint at {self.unit} {step}/"
                                        f"{self.total} in {ckpt.directory}; rerun the same command to resume", step)
            for fn in self.end_hooks:
                fn(self, step, state)
        finally:
            close_stage(self.run, self.bar, self.writer)
        if self.export_fn is not None:
            self.exported = self.export_fn(state)
        return state, step


def to_host(x) -> np.ndarray:
    """Device array -> numpy; a batch-sharded array spread over several hosts is gathered from all of them."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
