"""Pieces shared by every stage: config sections, the train-state pytree, the run directory
(config snapshot, resume checks, checkpoints, metrics), and the host-side loop with a progress bar.

The host loop is deliberately thin: it fetches a batch, calls the jitted ``step(state, batch)``,
and only every ``log_every`` steps pulls metrics back to the host.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from safejax import parallel
from safejax.checkpoint import Checkpointer, _key_name
from safejax.config import ConfigError, dump_yaml, to_dict
from safejax.errors import NonFiniteError  # noqa: F401  (re-exported)
from safejax.metrics import progress  # noqa: F401  (re-exported)
from safejax.runlock import RunLock
from safejax.sections import DataSection, ExportSection, LoopSection, ModelSection  # noqa: F401  (re-exported)
from safejax.train.resume_guard import CONFIG_KEY, DATA_KEY, array_fingerprint, check_data, read_snapshot
from safejax.train.state import TrainState  # noqa: F401  (re-exported: the supervised stages' state)

log = logging.getLogger("safejax")


# ----------------------------------------------------------------------------- train state


def tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def accumulate_gradients(loss_and_grad: Callable, params, micro_batches, rng=None):
    """Average gradients and metrics over the leading micro-batch axis with ``lax.scan``.

    ``loss_and_grad(params, micro_batch, rng) -> (metrics: dict, grads)``; ``micro_batches`` leaves are
    ``[accum, micro, ...]``.  Returns ``(mean_metrics, mean_grads)``."""
    n = jax.tree.leaves(micro_batches)[0].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, params)

    def body(carry, xs):
        mb, i = xs
        key = None if rng is None else jax.random.fold_in(rng, i)
        metrics, grads = loss_and_grad(params, mb, key)
        return tree_add(carry, grads), metrics

    grads, metrics = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(n)))
    grads = jax.tree.map(lambda g: g / n, grads)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    return metrics, grads


def split_micro(batch: dict, accum: int) -> dict:
    """``[B, ...]`` host arrays -> ``[accum, B/accum, ...]``."""

    def one(x):
        b = x.shape[0]
        if b % accum:
            raise ValueError(f"batch of {b} rows is not divisible by grad_accum={accum}")
        return x.reshape(accum, b // accum, *x.shape[1:])

    return {k: one(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- run directory


# config keys that may change between a run and its resumption: they do not change the training
# trajectory (logging, checkpoint cadence, the mesh layout, remat, the exact one-off weight cast of the
# sampler, fault handling).  Every other key (model, data, batch size, optimizer, schedule length, seed,
# algorithm...) must stay the same.
RESUME_IGNORED = ("out_dir", "allow_config_change", "train.log_every", "train.eval_every", "train.save_every",
                  "train.keep_checkpoints", "train.progress", "train.skip_nonfinite", "train.inject_nan_step",
                  "train.max_consecutive_skips", "train.allow_data_change",
                  "mesh", "eval_batch_size", "*.remat", "data.eval_prompts", "*.cast_weights", "export")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _ignored(key: str, ignore) -> bool:
    for c in ignore:
        if c.startswith("*."):
            if key.endswith(c[1:]) or key == c[2:]:
                return True
        elif key == c or key.startswith(c + "."):
            return True
    return False


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def config_differences(old: dict, new: dict, ignore=RESUME_IGNORED, defaults: dict | None = None) -> list[str]:
    """``["key: old -> new", ...]`` for every flattened key that differs and is not in ``ignore``
    (keys missing on one side count as ``None``).  ``defaults``: the config class's default values; a key the old
    snapshot lacks (written by a version before the key existed) counts as its default, so a run that keeps the
    default of a new key resumes."""
    fo, fn, fd = _flatten(old), _flatten(new), _flatten(defaults or {})
    diffs = []
    for k in sorted(set(fo) | set(fn)):
        if _ignored(k, ignore):
            continue
        if k not in fo and k in fd and _same(fd[k], fn.get(k)):
            continue
        if not _same(fo.get(k), fn.get(k)):
            diffs.append(f"{k}: {fo.get(k)!r} -> {fn.get(k)!r}")
    return diffs


def _default_config(cfg: Any) -> dict | None:
    """The default values of ``cfg``'s config class (None when it cannot be built without arguments)."""
    try:
        return to_dict(type(cfg)())
    except TypeError:
        return None


class RunDir:
    """Output folder of one stage: ``config.yaml``/``config.json`` (snapshot), ``metrics.jsonl``,
    ``tensorboard/``, ``checkpoints/``, ``hf/`` (exported model).

    Creating a RunDir takes the folder's lock (:class:`safejax.runlock.RunLock`, process 0 only; held
    until the process ends or :meth:`release`).  Over a checkpointed folder it checks that the config
    continues the same run (:data:`RESUME_IGNORED`; earlier config from :func:`read_snapshot`), else
    raises :class:`ConfigError` listing the differences (``allow_config_change=True`` resumes anyway).
    :meth:`write_config` writes the snapshot once the inputs are loaded, so bad input never replaces
    it.  :meth:`record_data` fingerprints the training data into every checkpoint; a resume on other
    data is refused (``train.allow_data_change`` overrides)."""

    def __init__(self, out_dir: str | Path, cfg: Any, *, allow_config_change: bool = False):
        self.path = Path(out_dir)
        self.cfg = cfg
        self.checkpoints = None
        self.data: dict[str, dict] = {}
        self.lock = RunLock(self.path)
        if jax.process_index() == 0:
            self.lock.acquire()
        if self.has_checkpoint():
            try:
                old, where = read_snapshot(self.path)
            except ConfigError:
                if not allow_config_change:
                    raise
                old, where = None, None
                log.warning("resuming %s without a readable config snapshot (allow_config_change)", self.path)
            diffs = config_differences(old, to_dict(cfg), defaults=_default_config(cfg)) if old is not None else []
            if diffs and not allow_config_change:
                raise ConfigError(
                    f"{self.path} holds a checkpointed run with a different config (read from {where}), so resuming "
                    f"would not continue it; differences: {'; '.join(diffs)}. Use a new out_dir, or pass "
                    "allow_config_change=true to resume anyway.")
            if diffs:
                log.warning("resuming %s with a changed config (allow_config_change): %s", self.path, "; ".join(diffs))
        self.path.mkdir(parents=True, exist_ok=True)

    def record_data(self, name: str, arrays: dict) -> None:
        """Fingerprint the dataset ``name`` (dict of equal-length arrays) the stage trains on; call before
        :meth:`checkpointer`."""
        self.data[name] = array_fingerprint(arrays)

    def release(self) -> None:
        """Give the run directory's lock back (also done at process exit)."""
        self.lock.release()

    def has_checkpoint(self) -> bool:
        """True when ``checkpoints/`` holds at least one step folder (complete or not)."""
        d = self.path / "checkpoints"
        return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())

    def write_config(self) -> None:
        """Write ``config.json`` / ``config.yaml`` (process 0)."""
        if jax.process_index() != 0:
            return
        tmp = self.path / "config.json.tmp"
        tmp.write_text(json.dumps(to_dict(self.cfg), indent=1))
        os.replace(tmp, self.path / "config.json")
        tmp = self.path / "config.yaml.tmp"
        dump_yaml(self.cfg, tmp)
        os.replace(tmp, self.path / "config.yaml")

    def checkpointer(self, keep: int) -> Checkpointer:
        """The stage's :class:`Checkpointer`: every save also records the config and the data fingerprint,
        and a restore on different data is refused (see :meth:`record_data`)."""
        if self.checkpoints is None:
            loop = getattr(self.cfg, "train", None)
            allow = bool(getattr(loop, "allow_data_change", False))
            current = dict(self.data)
            self.checkpoints = Checkpointer(
                self.path / "checkpoints", max_to_keep=keep,
                base_meta={CONFIG_KEY: to_dict(self.cfg), DATA_KEY: current},
                check_meta=lambda meta, step_dir: check_data(meta, step_dir, current, allow=allow))
        return self.checkpoints


# ----------------------------------------------------------------------------- numerics guard


class Preempted(RuntimeError):
    """SIGTERM stopped the run after a checkpoint was saved (the CLI exits with 143)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


SKIP_KEY = "nonfinite_skipped"
# which quantity to name first when several are non-finite
_PRIORITY = ("loss", "grad_norm", "lambda")


def _rank(key: str) -> int:
    for i, p in enumerate(_PRIORITY):
        if p in key:
            return i
    return len(_PRIORITY)


def nonfinite_keys(metrics: dict) -> list[str]:
    """Keys of non-finite float metrics, losses first, then gradient norms, then lambda, then the rest."""
    bad = [k for k, v in metrics.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)]
    return sorted(bad, key=lambda k: (_rank(k), k))


def check_finite(step: int, metrics: dict, keys: Iterable[str] | None = None) -> None:
    """Raise :class:`NonFiniteError` naming ``step`` and the non-finite quantity (losses named first)."""
    if keys is not None:
        keys = set(keys)
        metrics = {k: v for k, v in metrics.items() if k in keys}
    bad = nonfinite_keys(metrics)
    if bad:
        k = bad[0]
        others = f" (also non-finite: {', '.join(bad[1:6])}{' ...' if len(bad) > 6 else ''})" if len(bad) > 1 else ""
        raise NonFiniteError(f"step {step}: '{k}' is {metrics[k]}{others}; stopped without saving this state "
                             "(the last checkpoint is intact; train.skip_nonfinite=true skips such steps instead)")


class MetricGuard:
    """Per-step device metrics waiting for the host, checked for NaN/Inf in step order.

    The loop calls :meth:`add` after every step (no device sync) and :meth:`drain` when it logs or
    saves: all pending steps come back in one transfer, the first non-finite one raises
    :class:`NonFiniteError` (unless the step reported ``*nonfinite_skipped = 1``, i.e. it was skipped
    on device with ``train.skip_nonfinite``; those are counted in :attr:`skipped`).  More than
    ``max_consecutive`` skipped steps in a row (:attr:`consecutive`) raise :class:`NonFiniteError`:
    a diverging run stops instead of skipping to the end.  Both counters travel in checkpoints
    (:meth:`restore`)."""

    def __init__(self, skipped: int = 0, prefix: str = "", max_consecutive: int = LoopSection.max_consecutive_skips):
        self.pending: list[tuple[int, Any]] = []
        self.skipped = int(skipped)
        self.consecutive = 0
        self.max_consecutive = int(max_consecutive)
        self.prefix = prefix  # prepended to metric names (as they appear in metrics.jsonl)

    def restore(self, meta: dict) -> None:
        """Continue the counters recorded by :func:`save_checkpoint` in a checkpoint's ``meta``."""
        self.skipped = int(meta.get("nonfinite_skipped", 0))
        self.consecutive = int(meta.get("nonfinite_consecutive", 0))

    def add(self, step: int, metrics: Any) -> None:
        self.pending.append((int(step), metrics))

    def drain(self) -> dict[int, dict]:
        if not self.pending:
            return {}
        steps = [s for s, _ in self.pending]
        values = jax.device_get([m for _, m in self.pending])
        self.pending = []
        out = {}
        for s, m in zip(steps, values):
            hm = {self.prefix + k: float(np.asarray(v)) for k, v in m.items()}
            if any(k.endswith(SKIP_KEY) and v > 0 for k, v in hm.items()):
                self.skipped += 1
                self.consecutive += 1
                bad = nonfinite_keys(hm)
                if self.consecutive > self.max_consecutive:
                    self.pending = []
                    raise NonFiniteError(
                        f"step {s}: {self.consecutive} consecutive steps skipped for non-finite values (last: "
                        f"{', '.join(bad[:3]) or 'state'}), more than train.max_consecutive_skips="
                        f"{self.max_consecutive}; the run is diverging; stopped without saving (the last checkpoint "
                        "is intact; lower the learning rate or raise train.max_consecutive_skips)")
                log.warning("step %d: non-finite %s; update skipped (train.skip_nonfinite; %d skipped so far)",
                            s, ", ".join(bad[:4]) or "state", self.skipped)
            else:
                check_finite(s, hm)
                self.consecutive = 0
            out[s] = hm
        return out


@jax.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


def nonfinite_state_leaves(state: Any) -> list[str]:
    """Dotted paths of float arrays in ``state`` holding a NaN/Inf (one jitted reduction, one transfer)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    floats = [(p, x) for p, x in flat if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not floats:
        return []
    flags = np.asarray(jax.device_get(_finite_flags([x for _, x in floats])))
    return [".".join(_key_name(k) for k in p) for (p, _), ok in zip(floats, flags) if not ok]


def check_state_finite(step: int, state: Any) -> None:
    """Raise :class:`NonFiniteError` if any float array of ``state`` is non-finite (never checkpoint it)."""
    bad = nonfinite_state_leaves(state)
    if bad:
        raise NonFiniteError(f"step {step}: the train state holds NaN/Inf in '{bad[0]}'"
                             + (f" and {len(bad) - 1} other array(s)" if len(bad) > 1 else "")
                             + "; stopped without saving it (the last checkpoint is intact)")


def save_checkpoint(ckpt: Checkpointer, step: int, state: Any, guard: MetricGuard, writer, meta: dict) -> None:
    """Check every pending metric and the state for NaN/Inf, then start an async save of ``state``
    with ``meta`` plus the metric file's offset and the skip counter."""
    guard.drain()
    check_state_finite(step, state)
    meta = dict(meta, step=int(step), metrics_offset=writer.tell(), nonfinite_skipped=guard.skipped,
                nonfinite_consecutive=guard.consecutive)
    ckpt.save(step, state, meta)


class GracefulStop:
    """Turn SIGTERM (preemption notice) into a flag the loop checks to save and exit cleanly.

    :meth:`requested_now` agrees across processes (any host's flag stops all), so every host saves
    the same step."""

    every = 10  # multi-host: steps between two agreements on the flag (see :meth:`poll`)

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):  # noqa: ARG002
        self.requested = True

    def requested_now(self) -> bool:
        """The flag agreed by every process (one ``process_allgather`` when multi-host)."""
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.int32(self.requested))
            self.requested = bool(np.any(flags))
        return self.requested

    def poll(self, step: int) -> bool:
        """:meth:`requested_now` at ``step``: single-process every step (no sync); multi-host only every
        :attr:`every` steps, so the hosts agree without a collective per step."""
        if jax.process_count() > 1 and step % self.every:
            return False
        return self.requested_now()

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def close_stage(run: "RunDir", bar=None, writer=None) -> None:
    """End of a stage loop (also on errors): close the progress bar, wait for the in-flight save so the
    last good checkpoint is always committed, and close the metric writer."""
    if bar is not None:
        bar.close()
    if run.checkpoints is not None:
        run.checkpoints.close()
        run.checkpoints = None
    if writer is not None:
        writer.close()
