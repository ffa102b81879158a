"""Multi-host correctness on one machine: two JAX processes (2 fake CPU devices each) joined with
``jax.distributed`` over localhost give the same results as one process with the same global mesh.

The children run ``tests/multihost_worker.py``; the single-process references run here (first 4 of
the 8 fake devices, same mesh shape).  Children get a free port, no ``XLA_FLAGS``, a 30 s
initialisation timeout, a subprocess timeout, and are killed by PID if anything goes wrong.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import multihost_worker as worker
import tiny_world
from safejax import distributed, parallel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "multihost_worker.py"


# ----------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(process_id: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", SAFEJAX_COORDINATOR=f"127.0.0.1:{port}", SAFEJAX_NUM_PROCESSES="2",
               SAFEJAX_PROCESS_ID=str(process_id), SAFEJAX_DISTRIBUTED_TIMEOUT="30", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env["SAFEJAX_TEST_JAX_CACHE"] = cache
    return env


def launch_two(mode: str, spec: dict, tmp: Path, timeout: float) -> list[dict]:
    """Run two worker processes of ``mode`` and return their result dicts (process 0 first)."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec_path = tmp / f"{mode}_spec.json"
    spec_path.write_text(json.dumps(spec))
    port = _free_port()
    procs, logs = [], []
    try:
        for i in range(2):
            log = open(tmp / f"{mode}_{i}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), mode, "--spec", str(spec_path), "--out", str(tmp / f"{mode}_{i}.json")],
                env=_child_env(i, port), stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                start_new_session=True))
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the child's own process group (its pid)
                p.wait()
        for log in logs:
            log.close()
    results = []
    for i, p in enumerate(procs):
        out = tmp / f"{mode}_{i}.json"
        tail = (tmp / f"{mode}_{i}.log").read_text()[-3000:]
        assert out.exists(), f"worker {i} ({mode}) wrote no result (exit {p.returncode}); log tail:\n{tail}"
        r = json.loads(out.read_text())
        assert r["ok"], f"worker {i} ({mode}) failed: {r.get('error')}\n{r.get('traceback', '')}\nlog tail:\n{tail}"
        results.append(r)
    assert [r["process_index"] for r in results] == [0, 1]
    return results


def _assert_metrics_close(a: dict, b: dict, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        assert abs(a[k] - b[k]) <= atol + rtol * abs(a[k]), f"{what}: {k} = {a[k]} (1 process) vs {b[k]} (2)"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mh_world")
    paths = tiny_world.make_world(root)
    paths["root"] = root
    return paths


@pytest.fixture(scope="module")
def step_runs(world, tmp_path_factory):
    """One 2-process launch: SFT steps with 1 and 2 micro-batches on a (1, 2, 2) mesh."""
    spec = {"model_path": str(world["model"]), "mesh": [1, 2, 2], "accums": [1, 2]}
    return launch_two("step", spec, tmp_path_factory.mktemp("mh_step"), timeout=240)


# ----------------------------------------------------------------------------- foundation: one sharded step


def test_two_process_sharded_sft_step_matches_one_process(world, step_runs):
    one = worker.run_step(str(world["model"]), (1, 2, 2), accum=1)
    for r in step_runs:
        two = r["runs"]["1"]
        assert r["process_count"] == 2
        assert len(two["metrics"]) == len(one["metrics"]) == worker.STEP_STEPS
        for i, (a, b) in enumerate(zip(one["metrics"], two["metrics"])):
            _assert_metrics_close(a, b, f"process {r['process_index']} step {i + 1}")
        assert two["param_checksum"] == pytest.approx(one["param_checksum"], rel=1e-6)


def test_each_host_loads_only_its_rows_and_weight_shards(step_runs):
    p0, p1 = (r["runs"]["1"] for r in step_runs)
    for s in range(worker.STEP_STEPS):
        rows0, rows1 = p0["local_rows"][s], p1["local_rows"][s]
        assert len(rows0) == len(rows1) == worker.STEP_BATCH // 2
        assert not set(rows0) & set(rows1)            # disjoint halves of the global batch
    # ... which assemble into exactly the batch a single process would have fed
    assert all(p0["global_batch_matches"]) and all(p1["global_batch_matches"])
    # weights: the embedding [V, D] spans both processes and each built only its own blocks
    assert not p0["embedding_is_fully_addressable"]
    b0, b1 = {tuple(b) for b in p0["local_weight_blocks"]}, {tuple(b) for b in p1["local_weight_blocks"]}
    assert b0 and b1 and not b0 & b1


def test_two_process_grad_accumulation_matches_one_process(world, step_runs):
    one = worker.run_step(str(world["model"]), (1, 2, 2), accum=2)
    two = step_runs[0]["runs"]["2"]
    assert all(two["global_batch_matches"])
    for i, (a, b) in enumerate(zip(one["metrics"], two["metrics"])):
        _assert_metrics_close(a, b, f"accum=2 step {i + 1}")


# ----------------------------------------------------------------------------- the issue: a PPO-Lag iteration


@pytest.fixture(scope="module")
def rl_world(world):
    """SFT policy, reward model and cost model made by the CLI in this (single) process."""
    from safejax.cli import main

    root = world["root"]
    common = ["data.max_length=24", "train.batch_size=16", "train.progress=false", "train.max_steps=1"]
    assert main(["sft", f"out_dir={root}/sft", f"model.path={world['model']}", f"data.train=[{world['sft']}]",
                 *common]) == 0
    for stage in ("rm", "cm"):
        assert main([stage, f"out_dir={root}/{stage}", f"model.path={root}/sft/hf",
                     f"data.train=[{world['pref_train']}]", *common]) == 0
    return world


def _ppo_overrides(world, out_dir) -> list[str]:
    root = world["root"]
    return [f"out_dir={out_dir}", f"actor.path={root}/sft/hf", f"reward_model={root}/rm/hf",
            f"cost_model={root}/cm/hf", f"data.prompts=[{world['prompts']}]", "data.prompt_width=16",
            "rollout.max_new_tokens=8", "train.batch_size=8", "ppo.micro_batch_size=4", "train.max_steps=2",
            "train.log_every=1", "train.progress=false", "lagrange.lambda_lr=0.5",
            "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"]


@pytest.fixture(scope="module")
def ppo_runs(rl_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mh_ppo")
    one = worker.run_ppo_overrides(_ppo_overrides(rl_world, tmp / "one"))
    # both processes share one out_dir, as the hosts of a slice share a bucket
    two = launch_two("ppo", {"overrides": _ppo_overrides(rl_world, tmp / "two")}, tmp, timeout=480)
    return tmp, one, two


@pytest.mark.slow
def test_two_process_ppo_lag_iterations_match_one_process(ppo_runs):
    _, one, two = ppo_runs
    assert one["process_count"] == 1 and one["device_count"] == 8
    assert len(one["history"]) == 2
    for r in two:
        assert (r["process_count"], r["device_count"]) == (2, 4)
        assert len(r["history"]) == len(one["history"])
        for a, b in zip(one["history"], r["history"]):
            assert a["step"] == b["step"]
            _assert_metrics_close(a, b, f"process {r['process_index']} iteration {a['step']}")
    assert one["history"][-1]["train/lambda"] != pytest.approx(1.0)  # the multiplier really moved


def _restore_raw(run_dir: Path):
    """The newest checkpoint of a run, restored onto this process's first device (a different topology
    than the one that saved it), with shapes and dtypes from the checkpoint's own metadata."""
    import orbax.checkpoint as ocp
    from jax.sharding import SingleDeviceSharding

    ckdir = run_dir / "checkpoints"
    step = max(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    path = (ckdir / str(step) / "state").absolute()
    md = ocp.StandardCheckpointHandler().metadata(path)
    dev = SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                          getattr(md, "tree", md))
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(path, target)
    meta = json.loads((ckdir / str(step) / "meta" / "metadata").read_text())
    return step, state, meta


@pytest.mark.slow
def test_two_process_checkpoint_and_export_equal_one_process(ppo_runs):
    from safetensors.numpy import load_file

    tmp, _, _ = ppo_runs
    one = load_file(tmp / "one" / "hf" / "model.safetensors")
    two = load_file(tmp / "two" / "hf" / "model.safetensors")  # written by process 0 after an allgather
    assert set(one) == set(two)
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # the orbax checkpoint that both processes wrote together is complete and restores in one process
    s1, st1, meta1 = _restore_raw(tmp / "one")
    s2, st2, meta2 = _restore_raw(tmp / "two")
    assert s1 == s2 == 2 and meta1["prompts"] == meta2["prompts"]
    flat1, flat2 = dict(jax.tree_util.tree_leaves_with_path(st1)), dict(jax.tree_util.tree_leaves_with_path(st2))
    assert set(flat1) == set(flat2) and len(flat1) > 20
    for path, a in flat1.items():
        np.testing.assert_allclose(np.asarray(flat2[path]), np.asarray(a), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- maybe_initialize_distributed


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("SAFEJAX_DISTRIBUTED", "SAFEJAX_COORDINATOR", "SAFEJAX_NUM_PROCESSES", "SAFEJAX_PROCESS_ID",
              "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_no_distributed_environment_means_no_initialisation(clean_env):
    assert distributed.maybe_initialize_distributed() is False
    clean_env.setenv("TPU_ACCELERATOR_TYPE", "v4-8")   # a single-host TPU VM
    clean_env.setenv("TPU_WORKER_ID", "0")
    assert distributed.maybe_initialize_distributed() is False
    clean_env.setenv("TPU_ACCELERATOR_TYPE", "v4-32")  # multi-host, but switched off explicitly
    clean_env.setenv("SAFEJAX_DISTRIBUTED", "0")
    assert distributed.maybe_initialize_distributed() is False
    assert jax.process_count() == 1


def test_multi_host_slice_is_recognised_from_the_tpu_environment(clean_env):
    assert distributed._tpu_slice_hosts() == 0
    clean_env.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-16")
    assert distributed._tpu_slice_hosts() == 4
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert distributed._tpu_slice_hosts() == 2


def test_coordinator_without_process_id_raises_naming_the_missing_variable(clean_env):
    clean_env.setenv("SAFEJAX_COORDINATOR", "127.0.0.1:1234")
    clean_env.setenv("SAFEJAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="SAFEJAX_PROCESS_ID"):
        distributed.maybe_initialize_distributed()
