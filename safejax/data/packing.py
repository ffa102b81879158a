"""Packed training rows: several examples per row, so that the compute goes to real tokens, not padding.

An example keeps its tokens, its loss mask and its positions ``0 .. n-1``; it only moves to an offset inside a
row.  ``segment_ids [R, W]`` number the examples of a row ``1, 2, ...`` (0 = padding) and the model lets a token
attend only inside its own segment (``CausalLM(..., segment_ids=...)``), so every per-token log-prob and every
score equals the unpacked one.  Rows are filled by first-fit decreasing over the example lengths (deterministic:
ties keep the input order).

* Supervised (SFT, ptx): rows of the same width ``L`` as the unpacked arrays; the next-token loss pairs
  ``ids[:, 1:]`` with ``label_mask[:, 1:]`` as before (a segment's first token, the prompt's BOS, never counts, so
  no label crosses a boundary).
* Preference pairs (RM, CM): both sides of a pair go into the same row, one after the other, in rows of width
  ``2 L`` (one unpacked pair costs two rows of ``L``, so a pair always fits).  Up to ``K`` pairs per row; per slot
  ``a_end``/``b_end [R, K]`` give the column of each side's last token and ``pair_valid [R, K]`` marks used slots.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from safejax.data.supervised import SupervisedArrays


def first_fit_decreasing(lengths: np.ndarray, width: int) -> list[list[int]]:
    """Bins of item indices, each bin's total length ``<= width`` (every length must be ``<= width``)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > width:
        raise ValueError(f"an item of length {int(lengths.max())} does not fit a row of width {width}")
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(int(i))
                free[b] -= n
                break
        else:
            bins.append([int(i)])
            free.append(width - n)
    return bins


def _place(bins, pieces, width: int):
    """Concatenate each bin's pieces into one row.  ``pieces(i)`` -> list of ``{name: [n] array}`` segments.

    Returns ``(columns {name: [R, W]}, segment_ids [R, W], positions [R, W], ends [R][segments])``."""
    rows = len(bins)
    segment_ids = np.zeros((rows, width), np.int32)
    positions = np.zeros((rows, width), np.int32)
    cols: dict[str, np.ndarray] = {}
    ends: list[list[int]] = []
    for r, items in enumerate(bins):
        off, seg, row_ends = 0, 0, []
        for i in items:
            for part in pieces(i):
                n = len(next(iter(part.values())))
                seg += 1
                for k, v in part.items():
                    if k not in cols:
                        cols[k] = np.zeros((rows, width), v.dtype)
                    cols[k][r, off:off + n] = v
                segment_ids[r, off:off + n] = seg
                positions[r, off:off + n] = np.arange(n)
                off += n
                row_ends.append(off - 1)
        ends.append(row_ends)
    return cols, segment_ids, positions, ends


def pack_supervised(arrays: SupervisedArrays | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Right-padded supervised arrays ``[N, L]`` -> packed ``{input_ids, attention_mask, label_mask, segment_ids,
    positions}``, each ``[R, L]`` with ``R <= N``."""
    d = arrays.as_dict() if isinstance(arrays, SupervisedArrays) else dict(arrays)
    ids, mask, labels = (np.asarray(d[k]) for k in ("input_ids", "attention_mask", "label_mask"))
    width = ids.shape[1]
    lengths = mask.astype(bool).sum(axis=1)
    bins = first_fit_decreasing(lengths, width)

    def pieces(i):
        n = lengths[i]
        return [{"input_ids": ids[i, :n], "attention_mask": mask[i, :n].astype(bool), "label_mask": labels[i, :n]}]

    cols, seg, pos, _ = _place(bins, pieces, width)
    return {**cols, "segment_ids": seg, "positions": pos}


def pack_pairs(arrays: Mapping[str, np.ndarray], a: str, b: str, labels: tuple[str, ...] = ()
               ) -> dict[str, np.ndarray]:
    """Preference pairs ``{a}_ids/{a}_mask``, ``{b}_ids/{b}_mask [N, L]`` (plus ``[N]`` per-pair ``labels``) ->
    packed ``{input_ids, attention_mask, segment_ids, positions [R, 2L], {a}_end, {b}_end, pair_valid [R, K],
    label [R, K] ...}``.  Side ``a`` of a pair is the segment just before side ``b``."""
    ia, ma, ib, mb = (np.asarray(arrays[k]) for k in (f"{a}_ids", f"{a}_mask", f"{b}_ids", f"{b}_mask"))
    width = 2 * ia.shape[1]
    la, lb = ma.astype(bool).sum(axis=1), mb.astype(bool).sum(axis=1)
    bins = first_fit_decreasing(la + lb, width)

    def pieces(i):
        return [{"input_ids": ia[i, :la[i]], "attention_mask": np.ones(la[i], bool)},
                {"input_ids": ib[i, :lb[i]], "attention_mask": np.ones(lb[i], bool)}]

    cols, seg, pos, ends = _place(bins, pieces, width)
    k = max(len(x) for x in bins)
    out = {**cols, "segment_ids": seg, "positions": pos,
           f"{a}_end": np.zeros((len(bins), k), np.int32), f"{b}_end": np.zeros((len(bins), k), np.int32),
           "pair_valid": np.zeros((len(bins), k), bool)}
    for name in labels:
        src = np.asarray(arrays[name])
        out[name] = np.zeros((len(bins), k), src.dtype)
    for r, items in enumerate(bins):
        for j, i in enumerate(items):
            out[f"{a}_end"][r, j], out[f"{b}_end"][r, j] = ends[r][2 * j], ends[r][2 * j + 1]
            out["pair_valid"][r, j] = True
            for name in labels:
                out[name][r, j] = arrays[name][i]
    return out


def useful_token_fraction(attention_mask: np.ndarray) -> float:
    """Real tokens / computed tokens of a ``[R, W]`` mask."""
    m = np.asarray(attention_mask).astype(bool)
    return float(m.sum() / max(m.size, 1))
