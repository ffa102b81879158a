"""The one builder of a sharded train state and its shardings, for any set of trainable models.

Every stage's state is a ``flax.struct`` dataclass with a ``step`` ([] int32) and an ``rng`` (raw key
data), both replicated, plus its own fields: trainable models (:func:`trainable`: params placed on
their shardings, optimizer state sharded like them), replicated pytrees (:func:`replicated`) or
``None``.  :func:`build_state` assembles the state and the same-shaped tree of shardings that ``jit``
takes as in/out shardings::

    state, shardings = build_state(PPOState, mesh, seed, actor=trainable(p, sh, tx, mesh), ...)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from safejax import parallel


@struct.dataclass
class ModelState:
    """One trainable model: ``params`` (pure dict) and its optimizer state."""

    params: Any
    opt_state: Any


@struct.dataclass
class TrainState:
    """One optimizer-driven model (SFT, RM, CM): ``params`` (pure dict), ``opt_state``, ``step`` and ``rng``
    (raw key data)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def spread(model: tuple[ModelState, ModelState]) -> dict:
    """A :func:`trainable` pair as the ``params=`` / ``opt_state=`` fields of :class:`TrainState`."""
    value, sh = model
    return {"params": (value.params, sh.params), "opt_state": (value.opt_state, sh.opt_state)}


def place(params: Any, shardings: Any) -> Any:
    """Put every leaf of ``params`` on its sharding (a tree shaped like ``params``)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def trainable(params: Any, shardings: Any, tx, mesh) -> tuple[ModelState, ModelState]:
    """``(ModelState(params, opt_state), ModelState(param shardings, opt-state shardings))``: the params
    placed on ``shardings`` and ``tx.init`` run on device with the moments sharded like their parameter."""
    params = place(params, shardings)
    opt_sh = parallel.opt_state_shardings(tx, params, shardings, mesh)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return ModelState(params, opt), ModelState(shardings, opt_sh)


def replicated(tree: Any, mesh) -> tuple[Any, Any]:
    """``(tree on every device, its shardings)`` for small state such as the Lagrange multiplier."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), rep), tree), jax.tree.map(lambda _: rep, tree)


def scalar_on_mesh(x, mesh, dtype=jnp.int32) -> jax.Array:
    """A replicated scalar on ``mesh``."""
    return jax.device_put(jnp.asarray(x, dtype), NamedSharding(mesh, P()))


def build_state(cls, mesh, seed: int, **fields: tuple[Any, Any]) -> tuple[Any, Any]:
    """``(cls(step=0, rng=key(seed), **values), cls(step=rep, rng=rep, **shardings))``.

    Each keyword is a ``(value, shardings)`` pair as :func:`trainable` and :func:`replicated` return, or
    ``(None, None)`` for an absent model.  ``step`` is a replicated int32 0 and ``rng`` the raw key data of
    ``jax.random.key(seed)``, replicated."""
    rep = NamedSharding(mesh, P())
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), rep)
    state = cls(step=scalar_on_mesh(0, mesh), rng=rng, **{k: v for k, (v, _) in fields.items()})
    shardings = cls(step=rep, rng=rep, **{k: s for k, (_, s) in fields.items()})
    return state, shardings


def apply_gradients(model: ModelState, grads: Any, tx) -> ModelState:
    """Gradients -> optimizer -> the model's new params and optimizer state (every stage's update)."""
    updates, opt_state = tx.update(grads, model.opt_state, model.params)
    return ModelState(optax.apply_updates(model.params, updates), opt_state)


def keep_finite(old: Any, new: Any, values: Any) -> tuple[Any, jax.Array]:
    """The non-finite guard of every stage (``train.skip_nonfinite``), inside the jitted step.

    When every float leaf of ``values`` (the step's loss, gradient norm, metrics...) is finite, returns
    ``(new, 0.0)``; else ``(old with step + 1, 1.0)``: the update is dropped, only ``step`` advances.  The
    flag is what the step reports as ``nonfinite_skipped``."""
    leaves = [jnp.asarray(v) for v in jax.tree.leaves(values)]  # constant schedules give Python floats
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves if jnp.issubdtype(v.dtype, jnp.inexact)]))
    kept = old.replace(step=old.step + 1)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, kept), (~ok).astype(jnp.float32)
