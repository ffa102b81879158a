"""Inputs are placed through the one logical-axis rules table by the one mover, ``parallel.host_local_to_global``:
the ``"batch"`` rule decides how rows are split, the ``"accum"`` rule how micro-batches are stacked."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from safejax import parallel
from safejax.evaluate.generate import rows_per_batch_multiple, run_batched
from safejax.train.fit import MICRO_AXES, eval_loop

def _lead(mesh):
    """The batch split as written by hand before the table placed it: data x fsdp, size-1 axes dropped."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 4, 1), (1, 1, 8), (2, 2, 2)])
def test_batch_and_micro_batch_inputs_split_rows_over_data_and_fsdp(shape):
    mesh = parallel.make_mesh(parallel.MeshConfig(*shape), jax.devices()[:8])
    assert parallel.input_sharding(mesh, 3).spec == P(_lead(mesh), None, None)
    assert parallel.input_sharding(mesh, 3, MICRO_AXES).spec == P(None, _lead(mesh), None)
    assert rows_per_batch_multiple(mesh) == shape[0] * shape[1]
    placed = parallel.host_local_to_global({"ids": np.zeros((8, 4), np.int32), "n": np.int32(3)}, mesh)
    assert placed["ids"].sharding.spec == P(_lead(mesh), None) and placed["n"].sharding.spec == P()
    micro = parallel.host_local_to_global({"ids": np.arange(64).reshape(2, 8, 4)}, mesh, axes=MICRO_AXES)["ids"]
    assert micro.sharding.spec == P(None, _lead(mesh), None)
    np.testing.assert_array_equal(np.asarray(micro), np.arange(64).reshape(2, 8, 4))


def test_an_overridden_batch_rule_moves_every_input_placement():
    mesh = parallel.make_mesh(parallel.MeshConfig(2, 4, 1), jax.devices()[:8])
    rules = parallel.resolve_rules(parallel.MeshConfig(2, 4, 1, rules={"batch": "data"}))
    assert parallel.input_sharding(mesh, 2, rules=rules).spec == P("data", None)
    assert parallel.input_sharding(mesh, 2, MICRO_AXES, rules).spec == P(None, "data")
    assert parallel.batch_shards(mesh, rules) == rows_per_batch_multiple(mesh, rules) == 2
    x = np.arange(12).reshape(6, 2)
    got = parallel.host_local_to_global({"x": x}, mesh, rules)["x"]
    assert got.sharding.spec == P("data", None)
    np.testing.assert_array_equal(np.asarray(got), x)
    seen = []
    eval_loop(lambda b: seen.append(b["x"].sharding.spec) or {"y": b["x"]}, {"x": x}, 6, mesh, rules)
    run_batched(lambda b, i: seen.append(b["x"].sharding.spec) or {"y": b["x"]}, {"x": x}, 6, mesh, rules=rules)
    assert seen == [P("data", None), P("data", None)]


def test_global_rows_names_the_global_batch_size_and_a_wrong_one_is_refused():
    mesh = parallel.make_mesh(parallel.MeshConfig(1, 8, 1), jax.devices()[:8])
    x = np.arange(16).reshape(8, 2)
    got = parallel.host_local_to_global(x, mesh, global_rows=8)
    assert got.shape == (8, 2) and got.sharding.spec == P("fsdp", None)
    with pytest.raises(ValueError, match="global_shape"):  # one process: the global batch is the local one
        parallel.host_local_to_global(x, mesh, global_rows=16)


def test_the_batch_movers_that_the_table_replaced_are_gone():
    from safejax.train import common, fit

    for mod, name in ((common, "put_batch"), (common, "micro_batch_sharding"), (fit, "to_device_batch"),
                      (parallel, "batch_sharding")):
        assert not hasattr(mod, name), f"{mod.__name__}.{name} is back"
