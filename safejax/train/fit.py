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
from safejax.data.batching import BatchIterator
from safejax.train.common import SKIP_KEY, LoopSection, RunDir, TrainState, accumulate_gradients, split_micro
from safejax.train.loop import HostLoop, to_host
from safejax.train.optim import OptimConfig, make_optimizer
from safejax.train.step_memory import recording_step_memory
from safejax.train.state import ModelState, apply_gradients, build_state, keep_finite, spread, trainable

log = logging.getLogger("safejax")

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule, state_shardings, batch_shardings,
                    *, skip_nonfinite: bool = False, inject_nan_step: int = 0,
                    rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES):
    """Build the jitted ``step(state, batch) -> (state, metrics)`` (state donated), traced under ``rules``.

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
        model = apply_gradients(ModelState(state.params, state.opt_state), grads, tx)
        metrics["grad_norm"] = optax.tree_utils.tree_norm(grads)
        metrics["lr"] = schedule(state.step)
        new = state.replace(step=state.step + 1, params=model.params, opt_state=model.opt_state)
        if skip_nonfinite:
            new, metrics[SKIP_KEY] = keep_finite(state, new, (metrics["loss"], metrics["grad_norm"]))
        return new, metrics

    mesh = jax.tree.leaves(state_shardings)[0].mesh
    return parallel.mesh_jit(step, mesh=mesh, rules=rules, in_shardings=(state_shardings, batch_shardings),
                             out_shardings=(state_shardings, None), donate_argnums=(0,))


MICRO_AXES = ("accum", "batch")  # logical names of a micro-batched [accum, micro, ...] leaf's leading axes


def _batch_shardings(example: dict, mesh, rules: parallel.Rules):
    return {k: parallel.input_sharding(mesh, np.ndim(v), MICRO_AXES, rules) for k, v in example.items()}


@dataclasses.dataclass
class FitResult:
    state: TrainState
    last_metrics: dict
    eval_metrics: dict
    steps: int
    seconds: float
    export_dir: Any = None


def fit(*, run: RunDir, loop: LoopSection, optim: OptimConfig, mesh, params, param_shardings, loss_fn: LossFn,
        train_arrays: dict, eval_fn: Callable[[Any], dict] | None, seed: int, desc: str,
        metric_prefix: str = "train/", param_names: Any = None,
        export: Callable[[Any], Any] | None = None, rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> FitResult:
    """Train ``params`` on ``train_arrays`` (dict of equal-length numpy arrays) with resume support.

    Resume: the newest complete checkpoint in ``run`` restores the whole :class:`TrainState` (params,
    optimizer state, RNG, step), the data position (epoch, batch) and the metric file's offset, so the
    continuation is step-for-step identical to an uninterrupted run.  Checkpoints: every
    ``loop.save_every`` steps, at the end, and on SIGTERM (then :class:`Preempted` is raised).  A
    NaN/Inf metric or state raises :class:`NonFiniteError` before anything is saved.  ``param_names``: HF names
    shaped like ``params`` (:meth:`ModelDef.hf_names`) for the reference's weight-decay groups.  The loop itself
    is :class:`HostLoop`; this function adds the stage's log and eval hooks, and ``export(params) -> folder``
    (when given) as its export (:attr:`FitResult.export_dir`).  ``rules``: the run's logical-axis table
    (:func:`parallel.resolve_rules` of its ``mesh`` section): batches are placed and the step traced by it."""
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
    state, state_sh = build_state(TrainState, mesh, seed, **spread(trainable(params, param_shardings, tx, mesh)))

    batches = BatchIterator(train_arrays, loop.batch_size, seed=seed, shuffle=True, drop_last=True,
                            micro_batches=optim.grad_accum)
    run.record_data("train", train_arrays)
    t0 = time.time()
    eval_metrics: dict = {}
    example = split_micro({k: v[: loop.batch_size] for k, v in train_arrays.items()}, optim.grad_accum)
    step_fn = make_train_step(loss_fn, tx, schedule, state_sh, _batch_shardings(example, mesh, rules),
                              skip_nonfinite=loop.skip_nonfinite, inject_nan_step=loop.inject_nan_step, rules=rules)
    step_fn = recording_step_memory(step_fn, run.path)
    host = HostLoop(run, loop, name=desc, total=total, iterators={"data": batches}, metric_prefix=metric_prefix)

    def log_hook(h: HostLoop, step: int, state) -> None:
        metrics = h.log(step, {"train/epoch": (step - 1) // steps_per_epoch})
        h.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
                           if k.endswith(("loss", "accuracy"))})

    def eval_hook(h: HostLoop, step: int, state) -> None:
        nonlocal eval_metrics
        eval_metrics = eval_fn(state.params)
        h.write(step, eval_metrics)

    host.add_hook(log_hook, every=loop.log_every)
    if eval_fn is not None:
        host.add_hook(eval_hook, when=lambda s: bool(loop.eval_every and s % loop.eval_every == 0)
                      or s % steps_per_epoch == 0 or s == total)

    def step(st: TrainState, batch: dict):
        return step_fn(st, parallel.host_local_to_global(split_micro(batch, optim.grad_accum), mesh, rules,
                                                         axes=MICRO_AXES))

    if export is not None:
        host.add_export(lambda st: export(st.params))
    state, steps = host.run_steps(state, step, lambda: iter(batches))
    return FitResult(state=state, last_metrics=host.last_metrics, eval_metrics=eval_metrics, steps=steps,
                     seconds=time.time() - t0, export_dir=host.exported)


def batched_apply(fn: Callable, arrays: dict, batch_size: int) -> list:
    """Apply a jitted ``fn(batch)`` over fixed-size batches (last one padded by repetition)."""
    n = len(next(iter(arrays.values())))
    outs = []
    for i in range(0, n, batch_size):
        idx = np.arange(i, i + batch_size) % n
        b = {k: v[idx] for k, v in arrays.items()}
        out = jax.tree.map(to_host, fn(b))
        k = min(batch_size, n - i)
        outs.append(jax.tree.map(lambda x: np.asarray(x)[:k], out))
    return outs


def concat_outputs(outs: list) -> Any:
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def eval_loop(apply_fn: Callable, arrays: dict, batch_size: int, mesh,
              rules: parallel.Rules = parallel.LOGICAL_AXIS_RULES) -> Any:
    """``apply_fn`` over fixed-size batches of ``arrays`` placed by the ``batch`` rule; outputs concatenated."""
    return concat_outputs(batched_apply(  # every host holds every row: the global batch is the local one
        lambda b: apply_fn(parallel.host_local_to_global(b, mesh, rules, global_rows=batch_size)), arrays, batch_size))

