"""Shared helpers for the safejax.rl tests (float64 context, random masks, preference pairs), and their checks.

Other test_rl_*.py files import from here; the tests at the bottom make sure the generators cover the cases the
loss tests rely on."""

from __future__ import annotations

import jax
import numpy as np


def x64():
    """Context manager enabling float64 in JAX (``jax.enable_x64`` on new JAX, the experimental one on old)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # pragma: no cover - older JAX

    return enable_x64()


def right_padded_mask(rng, b, t, min_len=0):
    """[B, T] int mask: each row a prefix of ones of random length in [min_len, T] (lengths include 0 and T)."""
    lengths = rng.integers(min_len, t + 1, size=b)
    if b >= 2:
        lengths[0] = t
        lengths[1] = max(min_len, 0)
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)


def holey_mask(rng, b, t):
    """[B, T] int mask with random holes and an all-zero tail on some rows."""
    m = (rng.random((b, t)) < 0.7).astype(np.int32)
    tails = rng.integers(1, t + 1, size=b)
    m = m * (np.arange(t)[None, :] < tails[:, None])
    return m


def last_index(row):
    idx = [i for i, v in enumerate(row) if v]
    return idx[-1] if idx else None


def preference_pairs(rng, b, t, vocab=11):
    """Random right-padded pairs that share a prefix then diverge; pad id 0, tokens in [1, vocab).

    Covers: same length, a longer than b, b longer than a, and one sequence a strict prefix of the other.
    Returns (ids_a, ids_b, mask_a, mask_b) as int32 numpy arrays [B, T].
    """
    ids_a = np.zeros((b, t), np.int32)
    ids_b = np.zeros((b, t), np.int32)
    for i in range(b):
        kind = i % 4
        prefix = int(rng.integers(1, t - 2))
        la = int(rng.integers(prefix + 1, t + 1))
        lb = int(rng.integers(prefix + 1, t + 1))
        if kind == 0:
            lb = la
        elif kind == 3:  # a is a strict prefix of b
            la, lb = prefix, int(rng.integers(prefix + 1, t + 1))
        common = rng.integers(1, vocab, size=prefix)
        ra = rng.integers(1, vocab, size=la)
        rb = rng.integers(1, vocab, size=lb)
        ra[:prefix] = common[: min(prefix, la)]
        rb[:prefix] = common
        if la > prefix and lb > prefix and ra[prefix] == rb[prefix]:
            rb[prefix] = ra[prefix] % (vocab - 1) + 1
        ids_a[i, :la] = ra
        ids_b[i, :lb] = rb
    mask_a = (ids_a != 0).astype(np.int32)
    mask_b = (ids_b != 0).astype(np.int32)
    return ids_a, ids_b, mask_a, mask_b


def test_preference_pairs_cover_equal_longer_shorter_and_prefix_cases():
    rng = np.random.default_rng(0)
    ids_a, ids_b, mask_a, mask_b = preference_pairs(rng, 16, 9)
    kinds = set()
    for i in range(16):
        diff = np.nonzero(ids_a[i] != ids_b[i])[0]
        assert diff.size > 0, "pairs must differ"
        d = diff[0]
        ea, eb = last_index(mask_a[i]), last_index(mask_b[i])
        assert 0 < d <= max(ea, eb)
        assert np.all(mask_a[i, : ea + 1]) and np.all(mask_b[i, : eb + 1])  # right padded
        kinds.add("prefix" if d > min(ea, eb) else ("equal" if ea == eb else "unequal"))
    assert kinds == {"prefix", "equal", "unequal"}


def test_masks_include_empty_full_and_holey_rows():
    rng = np.random.default_rng(1)
    m = right_padded_mask(rng, 6, 5)
    assert m[0].sum() == 5 and m[1].sum() == 0
    h = holey_mask(rng, 20, 8)
    assert any(0 < r.sum() and last_index(r) + 1 > r.sum() for r in h)  # a row with a hole
