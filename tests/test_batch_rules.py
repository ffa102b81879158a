"""Inputs are placed through the one logical-axis rules table: the ``"batch"`` rule decides how rows are split."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from safejax import parallel
from safejax.evaluate.generate import rows_per_batch_multiple
from safejax.train.common import micro_batch_sharding


def _lead(mesh):
    """The batch split as written by hand before the table placed it: data x fsdp, size-1 axes dropped."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 4, 1), (1, 1, 8), (2, 2, 2)])
def test_batch_and_micro_batch_shardings_split_rows_over_data_and_fsdp(shape):
    mesh = parallel.make_mesh(parallel.MeshConfig(*shape), jax.devices()[:8])
    assert parallel.batch_sharding(mesh, 3).spec == P(_lead(mesh), None, None)
    assert micro_batch_sharding(mesh, 3).spec == P(None, _lead(mesh), None)
    assert rows_per_batch_multiple(mesh) == shape[0] * shape[1]


def test_an_overridden_batch_rule_moves_every_input_placement():
    mesh = parallel.make_mesh(parallel.MeshConfig(2, 4, 1), jax.devices()[:8])
    rules = tuple((k, "data" if k == "batch" else v) for k, v in parallel.LOGICAL_AXIS_RULES)
    assert parallel.batch_sharding(mesh, 2, rules=rules).spec == P("data", None)
    assert parallel.batch_sharding(mesh, 2, batch_axis=1, rules=rules).spec == P(None, "data")
    assert parallel.batch_shards(mesh, rules) == 2
