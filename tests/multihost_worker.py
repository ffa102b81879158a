"""Child process of ``tests/test_multihost.py``: one of two JAX processes joined over localhost.

Run by the test as::

    SAFEJAX_COORDINATOR=127.0.0.1:PORT SAFEJAX_NUM_PROCESSES=2 SAFEJAX_PROCESS_ID=i \\
        python tests/multihost_worker.py {step|ppo} --spec SPEC.json --out RESULT_i.json

Each process has 2 fake CPU devices (``jax_num_cpu_devices``; the parent strips ``XLA_FLAGS``), so
the global mesh has 4 devices, 2 per process.  Modes:

* ``step``: a sharded SFT train step (``safejax.train.fit.make_train_step``) on a model loaded with
  ``load_pretrained(mesh=...)`` (each host reads only its shards of the weights) and batches from
  ``BatchIterator`` (each host takes only its rows) made global by ``parallel.host_local_to_global``.  Writes the
  per-step metrics, a parameter checksum and what this host loaded.
* ``ppo``: ``run_ppo`` (the RL stage, PPO-Lagrangian) from a config given as ``key=value``
  overrides; writes the metrics history that ``run_ppo`` returns.

Both processes write their own result file; the parent compares them with a single-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root (safejax)
sys.path.insert(0, HERE)                    # tiny_world

import jax  # noqa: E402
import numpy as np  # noqa: E402

from safejax import distributed, parallel  # noqa: E402

# ----------------------------------------------------------------------------- step (shared with the parent)

STEP_ROWS, STEP_LEN, STEP_BATCH, STEP_STEPS = 24, 12, 8, 2


def step_arrays(vocab: int) -> dict:
    """Deterministic SFT arrays ``[STEP_ROWS, STEP_LEN]``: random ids, right padding, loss on the tail."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, vocab, size=(STEP_ROWS, STEP_LEN)).astype(np.int32)
    lengths = rng.integers(STEP_LEN // 2, STEP_LEN + 1, size=STEP_ROWS)
    mask = (np.arange(STEP_LEN)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 3).astype(np.int32)
    label = mask.copy()
    label[:, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "label_mask": label}


def run_step(model_path: str, mesh_shape: tuple[int, int, int], accum: int = 1) -> dict:
    """Two sharded SFT steps on ``mesh_shape`` over all global devices, ``accum`` micro-batches per
    step; returns metrics + evidence.  Used by the workers (2 processes) and by the parent (1 process)."""
    from jax.experimental import multihost_utils

    from safejax.data.batching import BatchIterator
    from safejax.models import load_pretrained
    from safejax.train.common import TrainState, split_micro
    from safejax.train.fit import MICRO_AXES, make_train_step
    from safejax.models.functional import split_model
    from safejax.train.optim import OptimConfig, make_optimizer
    from safejax.train.sft import sft_loss_fn
    from safejax.train.state import build_state, spread, trainable

    mesh = parallel.make_mesh(parallel.MeshConfig(*mesh_shape))
    lm = load_pretrained(model_path, mesh=mesh)
    mdef, params = split_model(lm)
    # evidence that each host built only its own shards of the weights: the (row, col) offsets of the
    # embedding blocks this process holds
    emb = params["model"]["embed_tokens"]["embedding"]
    local_weight_blocks = sorted({(s.index[0].start or 0, s.index[1].start or 0) for s in emb.addressable_shards})
    arrays = step_arrays(lm.config.vocab_size)
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, schedule="constant", weight_decay=0.01), STEP_STEPS)
    state, state_sh = build_state(TrainState, mesh, 0, **spread(trainable(params, mdef.shardings(mesh), tx, mesh)))
    example = split_micro({k: v[:STEP_BATCH] for k, v in arrays.items()}, accum)
    batch_sh = {k: parallel.input_sharding(mesh, np.ndim(v), MICRO_AXES) for k, v in example.items()}
    step = make_train_step(sft_loss_fn(mdef), tx, schedule, state_sh, batch_sh)
    batches = BatchIterator(arrays, STEP_BATCH, seed=3, shuffle=True, drop_last=True, micro_batches=accum)
    whole = BatchIterator(arrays, STEP_BATCH, seed=3, shuffle=True, drop_last=True, process_index=0, process_count=1,
                          micro_batches=accum)
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "local_rows": [], "global_batch_matches": [], "metrics": [], "local_weight_blocks": local_weight_blocks,
           "embedding_is_fully_addressable": bool(getattr(emb, "is_fully_addressable", True))}
    for _ in range(STEP_STEPS):
        local = next(batches)
        ref = next(whole)
        idx, _ = batches.global_indices(batches.state()["epoch"], batches.state()["position"] - 1)
        out["local_rows"].append([int(i) for i in idx[batches.host_rows]])
        assert len(local["input_ids"]) == STEP_BATCH // jax.process_count()
        glob = parallel.host_local_to_global(split_micro(local, accum), mesh, axes=MICRO_AXES)
        gathered = multihost_utils.process_allgather(glob["input_ids"], tiled=True)
        out["global_batch_matches"].append(
            bool(np.array_equal(np.asarray(gathered), split_micro(ref, accum)["input_ids"])))
        state, m = step(state, glob)
        out["metrics"].append({k: float(np.asarray(v)) for k, v in jax.device_get(m).items()})
    kernel = state.params["model"]["layers"][0]["mlp"]["down_proj"]["kernel"]
    out["param_checksum"] = float(np.asarray(jax.jit(lambda x: jax.numpy.sum(jax.numpy.abs(x)),
                                                     out_shardings=parallel.replicated(mesh))(kernel)))
    return out


# ----------------------------------------------------------------------------- ppo


def run_ppo_overrides(overrides: list[str]) -> dict:
    from safejax.config import load_config
    from safejax.train.ppo import PPOConfig
    from safejax.train.ppo_loop import run_ppo

    cfg = load_config(PPOConfig, None, list(overrides))
    res = run_ppo(cfg, export=True)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(), "history": res.history,
            "device_count": jax.device_count()}


def configure_jax() -> None:
    """2 fake CPU devices per process (before any backend starts), float32 matmuls as in the tests."""
    jax.config.update("jax_num_cpu_devices", int(os.environ.get("SAFEJAX_TEST_LOCAL_DEVICES", "2")))
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_default_matmul_precision", "highest")
    if os.environ.get("SAFEJAX_TEST_JAX_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["SAFEJAX_TEST_JAX_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main() -> int:
    configure_jax()
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("step", "ppo"))
    ap.add_argument("--spec", required=True, help="JSON: {model_path, mesh} (step) or {overrides} (ppo)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    result: dict = {"ok": False}
    try:
        result["distributed"] = distributed.maybe_initialize_distributed(
            timeout_s=int(os.environ.get("SAFEJAX_DISTRIBUTED_TIMEOUT", "30")))
        result["init_s"] = time.time() - t0
        result["process_index"], result["process_count"] = jax.process_index(), jax.process_count()
        spec = json.load(open(args.spec))
        if args.mode == "step":
            result["runs"] = {str(a): run_step(spec["model_path"], tuple(spec["mesh"]), a) for a in spec["accums"]}
        else:
            result.update(run_ppo_overrides(spec["overrides"]))
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    result["seconds"] = time.time() - t0
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    sys.stdout.flush()
    if result["ok"] and result.get("distributed"):
        jax.distributed.shutdown()  # a barrier: neither process leaves while the other still works
    # on failure skip the shutdown barrier (it would wait for a peer that may never come)
    os._exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    sys.exit(main())
