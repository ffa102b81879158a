"""Deterministic, resumable, multi-host batching over in-memory numpy arrays (static shapes).

Every host holds the same full arrays and computes the same per-epoch permutation from
``(seed, epoch)``; each host then takes only its contiguous slice of every *global* batch::

    global batch rows  [ host 0 | host 1 | ... | host n-1 ]      (batch_size / process_count each)

which is what ``jax.make_array_from_process_local_data`` (``safejax.parallel.host_local_to_global``)
expects.  The position (epoch, batches consumed in the epoch) is two integers, saved in the
train state, so that a restart continues with exactly the batches that would have come next.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import numpy as np

from safejax.config import ConfigError
from safejax.errors import DataError

VALID_KEY = "valid"


class BatchIterator:
    """Infinite (or ``num_epochs``-long) iterator of fixed-shape batches.

    Args:
      arrays: ``{name: [N, ...] array}``, all with the same leading size N.
      batch_size: the **global** batch size B (all hosts together); must divide by the process count.
      seed: permutation seed; epoch ``e`` uses ``np.random.default_rng([seed, e]).permutation(N)``.
      shuffle: False keeps the row order in every epoch.
      drop_last: True drops the last incomplete batch of an epoch (``N // B`` batches per epoch).
        False keeps it, filling the missing rows by wrapping around to the start of the epoch's
        order, and adds a ``"valid"`` key ``[B_local] bool`` (False on the filler rows) to *every*
        batch so shapes and keys stay static.
      num_epochs: stop after this many epochs (None: never stop).
      process_index, process_count: this host's index and the number of hosts (default
        ``jax.process_index()`` / ``jax.process_count()``).
      micro_batches: A, the gradient-accumulation micro-batches the global batch is split into.

    Each item is ``{name: [B / process_count, ...] array}``: this host's rows of the global batch —
    its contiguous slice of each of the A global micro-batches (one contiguous slice when A = 1).
    """

    def __init__(self, arrays: Mapping[str, Any], batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = True, num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, micro_batches: int = 1):
        if not arrays:
            raise ValueError("BatchIterator: no arrays given")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(f"BatchIterator: arrays must share the leading size, got {sizes}")
        if VALID_KEY in self.arrays and not drop_last:
            raise ValueError(f"BatchIterator: the key {VALID_KEY!r} is reserved when drop_last=False")
        self.num_rows = int(next(iter(sizes.values())))
        if process_index is None or process_count is None:
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size < 1:
            raise ValueError(f"BatchIterator: batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"BatchIterator: process_index {process_index} not in [0, {process_count})")
        if batch_size % process_count:
            raise ConfigError(f"BatchIterator: global batch size {batch_size} is not divisible by "
                             f"{process_count} processes")
        if self.num_rows == 0:
            raise ValueError("BatchIterator: the arrays have no rows")
        if drop_last and self.num_rows < batch_size:
            raise DataError(f"BatchIterator: {self.num_rows} rows are fewer than one batch of {batch_size} "
                             f"(use drop_last=False or a smaller batch)")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_epochs = num_epochs
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.local_batch_size = self.batch_size // self.process_count
        # With gradient accumulation the global batch is A micro-batches; each host takes its slice of
        # *every* micro-batch, so that a global micro-batch holds the same rows whatever the host count.
        a = int(micro_batches)
        if a < 1 or self.batch_size % (a * self.process_count):
            raise ConfigError(f"BatchIterator: global batch {batch_size} must be divisible by micro_batches={a} x "
                             f"{self.process_count} processes")
        per = self.batch_size // (a * self.process_count)
        self.host_rows = (np.arange(self.batch_size).reshape(a, self.process_count, per)[:, self.process_index]
                          .reshape(-1))
        if drop_last:
            self.steps_per_epoch = self.num_rows // self.batch_size
        else:
            self.steps_per_epoch = -(-self.num_rows // self.batch_size)
        self._epoch = 0
        self._position = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    # ------------------------------------------------------------------ order

    def permutation(self, epoch: int) -> np.ndarray:
        """``[N]`` int64 row order of ``epoch`` (identical on every host)."""
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_rows)
            else:
                self._perm = np.arange(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, epoch: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of global batch ``position`` of ``epoch``: ``(indices [B] int64, valid [B] bool)``."""
        if not 0 <= position < self.steps_per_epoch:
            raise ValueError(f"BatchIterator: position {position} not in [0, {self.steps_per_epoch})")
        flat = position * self.batch_size + np.arange(self.batch_size)
        valid = flat < self.num_rows
        return self.permutation(epoch)[flat % self.num_rows], valid

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, int]:
        """``{"epoch": e, "position": p}``: ``p`` batches of epoch ``e`` were already produced."""
        return {"epoch": int(self._epoch), "position": int(self._position)}

    def restore(self, state: Mapping[str, Any]) -> "BatchIterator":
        """Continue from a :meth:`state` (the next batch is the one that would have come next)."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"BatchIterator.restore: expected {{'epoch': int, 'position': int}}, got {state!r}") from e
        if epoch < 0 or not 0 <= position <= self.steps_per_epoch:
            raise ValueError(f"BatchIterator.restore: state {state!r} out of range "
                             f"({self.steps_per_epoch} batches per epoch)")
        self._epoch, self._position = epoch, position
        return self

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._position >= self.steps_per_epoch:
            self._epoch += 1
            self._position = 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        idx, valid = self.global_indices(self._epoch, self._position)
        self._position += 1
        local = idx[self.host_rows]
        batch = {k: v[local] for k, v in self.arrays.items()}
        if not self.drop_last:
            batch[VALID_KEY] = valid[self.host_rows]
        return batch
