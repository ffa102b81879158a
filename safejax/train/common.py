"""Pieces shared by every stage: config sections, the train-state pytree, the run directory
(config snapshot, resume checks, checkpoints, metrics), and the host-side loop with a progress bar.

The host loop is deliberately thin: it fetches a batch, calls the jitted ``step(state, batch)``,
and only every ``log_every`` steps pulls metrics back to the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from safejax import parallel
from safejax.checkpoint import Checkpointer
from safejax.config import ConfigError, check_range, dump_yaml, to_dict
from safejax.metrics import MetricWriter

log = logging.getLogger("safejax")


# ----------------------------------------------------------------------------- config sections


@dataclasses.dataclass
class ModelSection:
    path: str = ""                 # HF folder (config.json + *.safetensors)
    tokenizer: str = ""            # tokenizer folder (default: model.path)
    dtype: str = "float32"         # compute dtype: float32 | bfloat16
    remat: bool = False
    scan_layers: bool = False

    def validate(self) -> None:
        check_range("model.dtype", self.dtype, choices=("float32", "bfloat16"))


@dataclasses.dataclass
class LoopSection:
    epochs: int = 1
    batch_size: int = 16           # global batch (rows) per optimizer update
    max_steps: int = -1            # stop after this many updates (-1 = epochs decide)
    log_every: int = 1
    eval_every: int = 0            # 0 = at the end of each epoch only
    save_every: int = 0            # 0 = only at the end
    keep_checkpoints: int = 2
    progress: bool = True

    def validate(self) -> None:
        check_range("train.epochs", self.epochs, low=1)
        check_range("train.batch_size", self.batch_size, low=1)
        check_range("train.log_every", self.log_every, low=1)
        check_range("train.eval_every", self.eval_every, low=0)
        check_range("train.save_every", self.save_every, low=0)
        check_range("train.keep_checkpoints", self.keep_checkpoints, low=1)


# ----------------------------------------------------------------------------- train state


@struct.dataclass
class TrainState:
    """One optimizer-driven model: ``params`` (pure dict), ``opt_state``, ``step`` and ``rng`` (raw key data)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def scalar_on_mesh(x, mesh, dtype=jnp.int32):
    return jax.device_put(jnp.asarray(x, dtype), NamedSharding(mesh, P()))


def init_train_state(params: Any, param_shardings: Any, tx, mesh, seed: int) -> tuple[TrainState, Any]:
    """Place params on their shardings, create the optimizer state sharded like the params, and
    return ``(state, state_shardings)`` (the latter for ``jit`` in/out shardings)."""
    params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, param_shardings)
    opt_sh = parallel.opt_state_shardings(tx, params, param_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    rep = NamedSharding(mesh, P())
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), rep)
    state = TrainState(step=scalar_on_mesh(0, mesh), params=params, opt_state=opt_state, rng=rng)
    shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_sh, rng=rep)
    return state, shardings


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


def micro_batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Sharding of an ``[accum, micro, ...]`` batch leaf: the micro axis over data x fsdp."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(None, lead, *([None] * (ndim - 2))))


def put_batch(batch: dict, mesh) -> dict:
    """Host numpy micro-batched arrays -> global device arrays (multi-host: each host its rows)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sh = micro_batch_sharding(mesh, v.ndim) if v.ndim >= 2 else NamedSharding(mesh, P())
        if jax.process_count() > 1:
            out[k] = jax.make_array_from_process_local_data(sh, v)
        else:
            out[k] = jax.device_put(v, sh)
    return out


# ----------------------------------------------------------------------------- run directory


# config keys whose change makes a resumed run differ from the original
RESUME_CRITICAL = ("model", "data", "train.batch_size", "optim", "seed", "algorithm", "ppo", "lagrange", "rollout")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def config_differences(old: dict, new: dict, keys=RESUME_CRITICAL) -> list[str]:
    fo, fn = _flatten(old), _flatten(new)
    diffs = []
    for k in sorted(set(fo) | set(fn)):
        if any(k == c or k.startswith(c + ".") for c in keys) and fo.get(k) != fn.get(k):
            diffs.append(f"{k}: {fo.get(k)!r} -> {fn.get(k)!r}")
    return diffs


class RunDir:
    """Output folder of one stage: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
    ``checkpoints/``, ``hf/`` (exported model)."""

    def __init__(self, out_dir: str | Path, cfg: Any, *, allow_config_change: bool = False):
        self.path = Path(out_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        snap = self.path / "config.json"
        new = to_dict(cfg)
        if snap.exists() and (self.path / "checkpoints").exists():
            old = json.loads(snap.read_text())
            diffs = config_differences(old, new)
            if diffs and not allow_config_change:
                raise ConfigError(
                    f"{self.path} holds a run with a different config; resuming would not continue it:\n  "
                    + "\n  ".join(diffs) + "\nUse a new out_dir, or pass allow_config_change=true to resume anyway.")
        snap.write_text(json.dumps(new, indent=1))
        dump_yaml(cfg, self.path / "config.yaml")
        self.checkpoints = None

    def checkpointer(self, keep: int) -> Checkpointer:
        if self.checkpoints is None:
            self.checkpoints = Checkpointer(self.path / "checkpoints", max_to_keep=keep)
        return self.checkpoints


# ----------------------------------------------------------------------------- numerics guard


class NonFiniteError(FloatingPointError):
    """A loss, gradient norm or multiplier became NaN/Inf; the message names the step and quantity."""


def check_finite(step: int, metrics: dict, keys: Iterable[str] | None = None) -> None:
    for k, v in metrics.items():
        if keys is not None and k not in keys:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
            raise NonFiniteError(f"step {step}: '{k}' is {v}; stopping (the last checkpoint is intact)")


def host_metrics(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


class GracefulStop:
    """Turn SIGTERM (preemption notice) into a flag the loop checks to save and exit cleanly."""

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

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, leave=False)
