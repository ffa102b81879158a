"""Small shared helpers for :mod:`safejax.rl` (dtype promotion, shape checks, end indices)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def float_dtype(*xs: Any) -> jnp.dtype:
    """Compute dtype for floating math: the promoted dtype of ``xs``, at least float32.

    bfloat16/float16/integer inputs compute in float32; float64 inputs (with x64 enabled) stay float64.
    Python scalars are weakly typed and never widen the result.
    """
    arrs = [x for x in xs if x is not None]
    return jnp.result_type(*arrs, jnp.float32)


def check_same_shape(fn: str, **arrays: Any) -> tuple[int, ...]:
    """Raise ValueError naming ``fn`` and the tensors if the given arrays do not share one shape."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items() if a is not None}
    distinct = set(shapes.values())
    if len(distinct) > 1:
        desc = ", ".join(f"{k}{list(v)}" for k, v in shapes.items())
        raise ValueError(f"safejax.rl.{fn}: tensors must have the same shape, got {desc}")
    return next(iter(distinct)) if distinct else ()


def check_ndim(fn: str, name: str, x: Any, ndims: tuple[int, ...]) -> None:
    """Raise ValueError if ``x.ndim`` is not one of ``ndims``."""
    nd = jnp.ndim(x)
    if nd not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"safejax.rl.{fn}: {name} must have {want} dims, got shape {list(jnp.shape(x))}")


def end_index(mask: Any) -> jnp.ndarray:
    """Index of the last position where ``mask`` is nonzero, along the last axis.

    Args:
      mask: ``[..., T]`` bool/int mask.
    Returns:
      ``[...]`` int32 index; 0 for rows whose mask is all zero (see :func:`has_any`).
    """
    m = jnp.asarray(mask) != 0
    t = m.shape[-1]
    last_from_end = jnp.argmax(jnp.flip(m, axis=-1), axis=-1)
    idx = (t - 1 - last_from_end).astype(jnp.int32)
    return jnp.where(jnp.any(m, axis=-1), idx, 0)
