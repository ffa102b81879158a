"""The one host loop (train/loop.py) and the one state builder (train/state.py), on a toy step function."""

import dataclasses
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from safejax.data.batching import BatchIterator
from safejax.parallel import MeshConfig, make_mesh
from safejax.train.common import GracefulStop, LoopSection, Preempted, RunDir
from safejax.train.loop import HostLoop, to_host
from safejax.train.state import ModelState, TrainState, apply_gradients, build_state, keep_finite, replicated, \
    spread, trainable


@dataclasses.dataclass
class ToyConfig:
    seed: int = 0


@struct.dataclass
class ToyState:
    step: jax.Array
    model: ModelState
    extra: object
    rng: jax.Array


def _toy(tmp_path, total=6, **loop_kw):
    loop = LoopSection(progress=False, keep_checkpoints=3, **loop_kw)
    run = RunDir(tmp_path / "run", ToyConfig())
    arrays = {"x": np.arange(12, dtype=np.float32)}
    it = BatchIterator(arrays, 2, seed=0, shuffle=True, drop_last=True)
    run.record_data("x", arrays)
    host = HostLoop(run, loop, name="toy", total=total, iterators={"x": it}, metric_prefix="train/")
    state = {"step": jnp.int32(0), "sum": jnp.float32(0)}

    def step(s, batch):
        new = {"step": s["step"] + 1, "sum": s["sum"] + jnp.sum(batch["x"])}
        return new, {"loss": new["sum"]}

    return host, state, step, it


def test_host_loop_runs_hooks_in_order_and_on_their_steps(tmp_path):
    host, state, step, it = _toy(tmp_path, total=6, log_every=2, save_every=4)
    calls = []
    host.add_hook(lambda h, s, st: calls.append(("log", s, float(h.log(s)["train/loss"]))), every=2)
    host.add_hook(lambda h, s, st: calls.append(("eval", s, None)), when=lambda s: s == 3)
    host.add_end_hook(lambda h, s, st: calls.append(("end", s, None)))
    host.add_export(lambda st: (calls.append(("export", int(st["step"]), host.run.checkpoints)), "hf")[1])
    final, n = host.run_steps(state, step, lambda: iter(it))
    assert n == 6 and int(final["step"]) == 6
    assert [c[:2] for c in calls] == [("log", 2), ("eval", 3), ("log", 4), ("log", 6), ("end", 6), ("export", 6)]
    assert calls[-1][2] is None and host.exported == "hf"  # exported after the stage closed its checkpointer
    assert calls[-3][2] == pytest.approx(float(final["sum"]))
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]


def test_host_loop_resumes_state_iterator_and_metric_offset(tmp_path):
    host, state, step, it = _toy(tmp_path, total=4, log_every=1, save_every=2)
    host.add_hook(lambda h, s, st: h.log(s), every=1)
    full, _ = host.run_steps(state, step, lambda: iter(it))
    full_metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    host.run.release()

    # the same run stopped after 2 steps, then continued from its checkpoint
    shutil.rmtree(tmp_path / "run")
    host, state, step, it = _toy(tmp_path, total=2, log_every=1, save_every=2)
    host.add_hook(lambda h, s, st: h.log(s), every=1)
    host.run_steps(state, step, lambda: iter(it))
    host.run.release()
    host, state, step, it = _toy(tmp_path, total=4, log_every=1, save_every=2)
    host.add_hook(lambda h, s, st: h.log(s), every=1)
    resumed, n = host.run_steps(state, step, lambda: iter(it))
    assert n == 4 and float(resumed["sum"]) == float(full["sum"])
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == full_metrics


def test_host_loop_sigterm_saves_then_raises_preempted(tmp_path):
    host, state, step, it = _toy(tmp_path, total=6)
    host.add_export(lambda st: pytest.fail("a preempted run must not export"))

    def stop_at_2(s, batch):
        if int(s["step"]) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(s, batch)

    with pytest.raises(Preempted, match="saved a checkpoint at step 2/6") as e:
        host.run_steps(state, stop_at_2, lambda: iter(it))
    assert e.value.step == 2
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_graceful_stop_poll_is_the_flag_on_one_process():
    stop = GracefulStop()
    assert stop.poll(1) is False
    stop.requested = True
    assert stop.poll(3) is True  # one process: every step, no collective


def test_build_state_places_trainable_and_replicated_fields_on_the_mesh():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    params = {"w": np.ones((8, 4), np.float32)}
    sh = {"w": NamedSharding(mesh, P("fsdp", None))}
    tx = optax.adam(1e-2)
    state, state_sh = build_state(ToyState, mesh, 3, model=trainable(params, sh, tx, mesh),
                                  extra=replicated({"lam": np.float32(2.0)}, mesh))
    assert state.model.params["w"].sharding == sh["w"]
    assert state.model.opt_state[0].mu["w"].sharding.spec == sh["w"].spec  # moments sharded like their param
    assert state_sh.extra["lam"] == NamedSharding(mesh, P())
    np.testing.assert_array_equal(to_host(state.rng), np.asarray(jax.random.key_data(jax.random.key(3))))
    assert int(state.step) == 0 and state_sh.step == NamedSharding(mesh, P())
    ts, ts_sh = build_state(TrainState, mesh, 0, **spread(trainable(params, sh, tx, mesh)))
    assert ts_sh.params == sh and jax.tree.structure(ts.opt_state) == jax.tree.structure(state.model.opt_state)


def test_apply_gradients_is_the_optax_update():
    tx = optax.adamw(0.1, weight_decay=0.1)
    params = {"w": jnp.arange(3.0)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    ms = apply_gradients(ModelState(params, tx.init(params)), grads, tx)
    upd, opt = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(ms.params["w"], optax.apply_updates(params, upd)["w"])
    assert int(ms.opt_state[0].count) == 1


def test_keep_finite_drops_the_update_and_advances_step_only():
    old = TrainState(step=jnp.int32(4), params={"w": jnp.ones(2)}, opt_state=(), rng=jnp.zeros(2, jnp.uint32))
    new = old.replace(step=jnp.int32(5), params={"w": jnp.full(2, 7.0)})
    kept, flag = keep_finite(old, new, {"loss": jnp.float32(jnp.nan), "count": jnp.int32(1)})
    assert float(flag) == 1.0 and int(kept.step) == 5 and float(kept.params["w"][0]) == 1.0
    kept, flag = keep_finite(old, new, {"loss": jnp.float32(0.5), "lr": 1e-3})
    assert float(flag) == 0.0 and float(kept.params["w"][0]) == 7.0
