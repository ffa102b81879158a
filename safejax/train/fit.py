"""The supervised fitting loop shared by SFT, the reward model and the cost model.

``fit`` owns resume, checkpoints, metrics, evaluation and the progress bar; the stage supplies a
pure ``loss_fn(params, micro_batch, rng) -> (loss, metrics)`` and an ``eval_fn``.  One jitted
``train_step(state, batch) -> (state, metrics)`` is compiled per stage, with explicit shardings and
the state donated.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from safejax import parallel
from safejax.config import ConfigError
from safejax.train.common import (SKIP_KEY, GracefulStop, LoopSection, MetricGuard, Preempted, RunDir, TrainState,
                                  accumulate_gradients, close_stage, init_train_state, progress, put_batch,
                                  save_checkpoint, split_micro)
from safejax.train.optim import OptimConfig, make_optimizer

log = logging.getLogger("safejax")

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule, state_shardings, batch_shardings,
                    *, skip_nonfinite: bool = False, inject_nan_step: int = 0):
    """Build the jitted ``step(state, batch) -> (state, metrics)`` (state donated).

    ``batch`` leaves are ``[accum, micro, ...]``; gradients are averaged over ``accum`` inside one
    ``lax.scan``.  ``skip_nonfinite``: when the loss or the gradient norm is NaN/Inf the update is
    dropped on device (params and optimizer state unchanged, ``step`` still advances) and the metric
    ``nonfinite_skipped`` is 1.  ``inject_nan_step`` (> 0, a test hook): the loss of that update
    (1-based) is multiplied by NaN before differentiation, so loss, gradients and params go NaN."""

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        poison = (jnp.where(state.step + 1 == inject_nan_step, jnp.float32(jnp.nan), jnp.float32(1.0))
                  if inject_nan_step > 0 else None)

        def scaled_loss(params, mb, key):
            loss, metrics = loss_fn(params, mb, key)
            return (loss if poison is None else loss * poison), metrics

        def loss_and_grad(params, mb, key):
            (loss, metrics), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params, mb, key)
            return dict(metrics, loss=loss), grads

        metrics, grads = accumulate_gradients(loss_and_grad, state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree_utils.tree_norm(grads)
        metrics["lr"] = schedule(state.step)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if skip_nonfinite:
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            kept = state.replace(step=state.step + 1)
            new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, kept)
            metrics[SKIP_KEY] = (~ok).astype(jnp.float32)
        return new, metrics

    mesh = jax.tree.leaves(state_shardings)[0].mesh
    return parallel.mesh_jit(step, mesh=mesh, in_shardings=(state_shardings, batch_shardings),
                             out_shardings=(state_shardings, None), donate_argnums=(0,))


def _batch_shardings(example: dict, mesh):
    from safejax.train.common import micro_batch_sharding

    return {k: micro_batch_sharding(mesh, np.ndim(v)) for k, v in example.items()}


@dataclasses.dataclass
class FitResult:
    state: TrainState
    last_metrics: dict
    eval_metrics: dict
    steps: int
    seconds: float


def fit(*, run: RunDir, loop: LoopSection, optim: OptimConfig, mesh, params, param_shardings, loss_fn: LossFn,
        train_arrays: dict, eval_fn: Callable[[Any], dict] | None, seed: int, desc: str,
        metric_prefix: str = "train/", param_names: Any = None) -> FitResult:
    """Train ``params`` on ``train_arrays`` (dict of equal-length numpy arrays) with resume support.

    Resume: the newest complete checkpoint in ``run`` restores the whole :class:`TrainState` (params,
    optimizer state, RNG, step), the data position (epoch, batch) and the metric file's offset, so the
    continuation is step-for-step identical to an uninterrupted run.  Checkpoints: every
    ``loop.save_every`` steps, at the end, and on SIGTERM (then :class:`Preempted` is raised).  A
    NaN/Inf metric or state raises :class:`NonFiniteError` before anything is saved.  ``param_names``: HF names
    shaped like ``params`` (:meth:`ModelDef.hf_names`) for the reference's weight-decay groups."""
    from safejax.data.batching import BatchIterator

    n = len(next(iter(train_arrays.values())))
    if n < loop.batch_size:
        raise ConfigError(f"{desc}: only {n} training rows but train.batch_size={loop.batch_size}")
    if loop.batch_size % optim.grad_accum:
        raise ConfigError(f"{desc}: train.batch_size={loop.batch_size} is not a multiple of "
                         f"optim.grad_accum={optim.grad_accum}")
    steps_per_epoch = n // loop.batch_size
    total = steps_per_epoch * loop.epochs
    if loop.max_steps > 0:
        total = min(total, loop.max_steps)
    tx, schedule = make_optimizer(optim, total, param_names)
    state, state_sh = init_train_state(params, param_shardings, tx, mesh, seed)

    batches = BatchIterator(train_arrays, loop.batch_size, seed=seed, shuffle=True, drop_last=True,
                            micro_batches=optim.grad_accum)
    run.record_data("train", train_arrays)
    ckpt = run.checkpointer(loop.keep_checkpoints)
    writer = None
    t0 = time.time()
    metrics: dict = {}
    eval_metrics: dict = {}
    bar = None
    try:
        restored = ckpt.restore(state, required_meta=("data",))
        start, meta = 0, {}
        guard = MetricGuard(prefix=metric_prefix, max_consecutive=loop.max_consecutive_skips)
        if restored is not None:
            state, meta, start = restored
            batches.restore(meta["data"])
            guard.restore(meta)
            log.info("%s: resumed from step %d in %s", desc, start, ckpt.directory)
        run.write_config()
        writer = run_writer(run, start if restored is not None else None, meta.get("metrics_offset"))

        example = split_micro({k: v[: loop.batch_size] for k, v in train_arrays.items()}, optim.grad_accum)
        step_fn = make_train_step(loss_fn, tx, schedule, state_sh, _batch_shardings(example, mesh),
                                  skip_nonfinite=loop.skip_nonfinite, inject_nan_step=loop.inject_nan_step)
        bar = progress(total, desc, loop.progress, initial=start)
        step = start
        with GracefulStop() as stop:
            it = iter(batches)
            while step < total:
                batch = next(it)
                batch = put_batch(split_micro(batch, optim.grad_accum), mesh)
                state, m = step_fn(state, batch)
                step += 1
                guard.add(step, m)
                bar.update(1)
                epoch_end = step % steps_per_epoch == 0
                if step % loop.log_every == 0 or step == total:
                    metrics = guard.drain()[step]
                    metrics["train/epoch"] = (step - 1) // steps_per_epoch
                    if loop.skip_nonfinite:
                        metrics[metric_prefix + SKIP_KEY + "_total"] = guard.skipped
                    bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
                                     if k.endswith(("loss", "accuracy"))})
                    writer.write(step, metrics)
                do_eval = eval_fn is not None and ((loop.eval_every and step % loop.eval_every == 0) or epoch_end
                                                   or step == total)
                if do_eval:
                    eval_metrics = eval_fn(state.params)
                    writer.write(step, eval_metrics)
                stop_now = stop.requested_now()
                if (loop.save_every and step % loop.save_every == 0) or step == total or stop_now:
                    save_checkpoint(ckpt, step, state, guard, writer, {"data": batches.state()})
                if stop_now:
                    raise Preempted(f"{desc}: SIGTERM received; saved a checkpoint at step {step}/{total} in "
                                    f"{ckpt.directory}; rerun the same command to resume", step)
    finally:
        close_stage(run, bar, writer)
    return FitResult(state=state, last_metrics=metrics, eval_metrics=eval_metrics, steps=step,
                     seconds=time.time() - t0)


def run_writer(run: RunDir, resume_step: int | None, resume_offset: int | None = None):
    from safejax.metrics import MetricWriter

    return MetricWriter(run.path, resume_step=resume_step, resume_offset=resume_offset)


def batched_apply(fn: Callable, arrays: dict, batch_size: int) -> list:
    """Apply a jitted ``fn(batch)`` over fixed-size batches (last one padded by repetition)."""
    n = len(next(iter(arrays.values())))
    outs = []
    for i in range(0, n, batch_size):
        idx = np.arange(i, i + batch_size) % n
        b = {k: v[idx] for k, v in arrays.items()}
        out = jax.tree.map(_fetch, fn(b))
        k = min(batch_size, n - i)
        outs.append(jax.tree.map(lambda x: np.asarray(x)[:k], out))
    return outs


def _fetch(x):
    """Device array -> numpy, gathering batch-sharded outputs from every host when multi-host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def concat_outputs(outs: list) -> Any:
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def to_device_batch(batch: dict, mesh) -> dict:
    from safejax.parallel import batch_sharding

    return {k: jax.device_put(np.asarray(v), batch_sharding(mesh, np.ndim(v))) for k, v in batch.items()}


def eval_loop(apply_fn: Callable, arrays: dict, batch_size: int, mesh) -> Any:
    return concat_outputs(batched_apply(lambda b: apply_fn(to_device_batch(b, mesh)), arrays, batch_size))


def jnp_mean(x):
    return jnp.mean(jnp.asarray(x, jnp.float32))
