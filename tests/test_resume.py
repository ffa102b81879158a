"""Preemption-proof training: runs killed with SIGKILL (also in the middle of an async checkpoint
save) or stopped with SIGTERM, then rerun with the same command, write the same metrics file, byte for
byte, as an uninterrupted run; the restored train state (params, optimizer, RNG, Lagrange multiplier
and its episode-cost window) and the data position equal the uninterrupted run's at the same step.

The stage runs are real ``python -m safejax.cli`` subprocesses on one CPU device (no fake devices),
so they can be killed; the unit tests of the checkpoint / metric-file machinery run in-process.
The kill points are drawn from ``SAFEJAX_KILL_SEED`` (default 12345): set it to try other draws.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_world
from safejax.checkpoint import CheckpointError, CheckpointMismatchError, Checkpointer
from safejax.metrics import MetricWriter, read_metrics

REPO = Path(__file__).resolve().parents[1]
KILL_SEED = int(os.environ.get("SAFEJAX_KILL_SEED", "12345"))  # fixed in CI; set it to explore other draws
STAGE_TIMEOUT = float(os.environ.get("SAFEJAX_RESUME_TEST_TIMEOUT", "240"))  # seconds per stage run (loaded hosts)


# ----------------------------------------------------------------------------- subprocess harness


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device: the fake 8-device flag is for in-process tests only
    # SAFEJAX_RESUME_TEST_PLATFORM=cuda runs the stages on a GPU (a device check; the exactness promise is CPU's)
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS=os.environ.get("SAFEJAX_RESUME_TEST_PLATFORM", "cpu"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("SAFEJAX_TEST_JAX_CACHE", str(Path(
                   os.environ.get("TMPDIR", "/tmp")) / "safejax-test-jax-cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return env


class Outcome:
    def __init__(self, rc: int, stderr: str, killed_at: int | None):
        self.rc, self.stderr, self.killed_at = rc, stderr, killed_at


def run_stage(cmd: list[str], *, stop_after_save: int | None = None, delay: float = 0.0,
              sig: int = signal.SIGKILL, timeout: float = STAGE_TIMEOUT) -> Outcome:
    """Run ``python -m safejax.cli *cmd``; when ``stop_after_save`` is set, send ``sig`` ``delay`` seconds
    after the log line announcing the async save of that step (delay 0 lands inside the save)."""
    p = subprocess.Popen([sys.executable, "-m", "safejax.cli", *cmd], cwd=REPO, env=_env(), text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, killed = [], None
    deadline = time.time() + timeout
    try:
        for line in p.stderr:
            lines.append(line)
            if stop_after_save is not None and killed is None and f"saving step {stop_after_save} " in line:
                if delay:
                    time.sleep(delay)
                p.send_signal(sig)
                killed = stop_after_save
            if time.time() > deadline:
                raise TimeoutError(f"safejax {' '.join(cmd)} ran for more than {timeout} s")
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return Outcome(p.returncode, "".join(lines), killed)


def _ok(out: Outcome, what: str) -> None:
    assert out.rc == 0, f"{what} failed (rc {out.rc}):\n{out.stderr[-3000:]}"


def _state(run: Path, step: int):
    """The whole saved train state and meta of ``step`` (host arrays)."""
    ck = Checkpointer(run / "checkpoints", read_only=True)
    try:
        state, meta, s = ck.restore_subtree((), step=step)
    finally:
        ck.close()
    return jax.tree.map(np.asarray, state), meta


def _latest(run: Path) -> int | None:
    ck = Checkpointer(run / "checkpoints", read_only=True)
    try:
        return ck.latest_step()
    finally:
        ck.close()


def _assert_trees_equal(a, b, what: str) -> None:
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"{what}: tree structures differ"
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def _same_run_meta(meta: dict) -> dict:
    """A checkpoint's meta without the one field two runs into different folders differ in (``out_dir``)."""
    meta = dict(meta)
    meta["config"] = {k: v for k, v in meta.get("config", {}).items() if k != "out_dir"}
    return meta


def _kill_chain(cmd: list[str], run: Path, baseline: Path, kills: list[tuple[int, float, int]],
                compare_subtrees) -> list[Outcome]:
    """Run ``cmd`` into ``run`` interrupted per ``kills`` = [(step, delay, signal)], each time comparing the
    checkpoint the rerun will resume from with the baseline's at the same step; finally run to the end."""
    outs = []
    for step, delay, sig in kills:
        before = _latest(run) if (run / "checkpoints").exists() else None
        out = run_stage(cmd, stop_after_save=step, delay=delay, sig=sig)
        outs.append(out)
        if out.rc == 0:  # the delay let the run finish: nothing left to interrupt
            return outs
        assert out.killed_at == step, f"seed {KILL_SEED}: never saw the save of step {step}:\n{out.stderr[-2000:]}"
        if sig == signal.SIGTERM:
            assert out.rc == 143, f"SIGTERM must exit 143 after saving, got {out.rc}:\n{out.stderr[-2000:]}"
            assert "stopped: " in out.stderr.strip().splitlines()[-1]
        else:
            assert out.rc == -signal.SIGKILL
        resume = _latest(run)
        if resume is None:  # killed before the first save completed: the rerun starts afresh
            assert before is None
            continue
        assert before is None or resume >= before
        got_state, got_meta = _state(run, resume)
        want_state, want_meta = _state(baseline, resume)
        for name, pick in compare_subtrees.items():
            _assert_trees_equal(pick(got_state), pick(want_state), f"seed {KILL_SEED}, step {resume}, {name}")
        assert _same_run_meta(got_meta) == _same_run_meta(want_meta), \
            f"seed {KILL_SEED}: meta (data position, metric offset, fingerprints) at step {resume}"
    _ok(run_stage(cmd), "the final resumed run")
    return outs


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_world")
    paths = tiny_world.make_world(root)
    paths["root"] = root
    return paths


def _sft_cmd(world, out: Path) -> list[str]:
    # 128 rows / 32 = 4 steps per epoch, 2 epochs: the run crosses an epoch boundary
    return ["sft", f"out_dir={out}", f"model.path={world['model']}", f"data.train=[{world['sft']}]",
            "data.max_length=24", "train.batch_size=32", "train.epochs=2", "optim.lr=3e-3", "train.save_every=1",
            "train.keep_checkpoints=100", "train.progress=false"]


def _ppo_cmd(world, out: Path) -> list[str]:
    m = world["model"]
    # 64 prompts / 8 = 8 iterations per epoch; a 12-slot cost window wraps after 2 iterations
    return ["ppo-lag", f"out_dir={out}", f"actor.path={m}", f"reward_model={m}", f"cost_model={m}",
            f"data.prompts=[{world['prompts']}]", "data.prompt_width=16", "rollout.max_new_tokens=6",
            "train.batch_size=8", "ppo.micro_batch_size=4", "train.max_steps=6", "train.save_every=1",
            "train.keep_checkpoints=100", "train.progress=false", "lagrange.episode_cost_window_size=12",
            "lagrange.threshold=-0.5", "actor_optim.lr=1e-3", "critic_optim.lr=1e-3"]


# ----------------------------------------------------------------------------- end-to-end kills


def test_sft_killed_mid_save_and_at_random_steps_resumes_bit_exactly(world, tmp_path):
    rng = random.Random(KILL_SEED)
    base, run = tmp_path / "uninterrupted", tmp_path / "killed"
    _ok(run_stage(_sft_cmd(world, base)), "the uninterrupted SFT run")
    a = rng.randint(1, 3)
    b = rng.randint(a + 1, 6)
    # 1st kill: right after the save of step a started (inside the async write);
    # 2nd kill: at a random moment after the save of step b (inside a later step or save)
    kills = [(a, 0.0, signal.SIGKILL), (b, rng.uniform(0.0, 0.4), signal.SIGKILL)]
    outs = _kill_chain(_sft_cmd(world, run), run, base, kills, {"params": lambda s: s["params"],
                                                                 "opt_state": lambda s: s["opt_state"],
                                                                 "rng_step": lambda s: (s["rng"], s["step"])})
    assert len(outs) == 2 and outs[0].killed_at == a
    assert (run / "metrics.jsonl").read_bytes() == (base / "metrics.jsonl").read_bytes(), f"seed {KILL_SEED}"
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 9)) and recs[-1]["train/epoch"] == 1
    assert not list((run / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    from safetensors.numpy import load_file

    got, want = load_file(str(run / "hf" / "model.safetensors")), load_file(str(base / "hf" / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_sft_kill_inside_async_save_leaves_previous_checkpoint_usable(world, tmp_path):
    """Kill right after a save started, until one kill provably landed inside it (an unfinished
    ``<step>.orbax-checkpoint-tmp`` folder is left): that step is not listed, the previous one is, and a
    rerun resumes from it."""
    run = tmp_path / "run"
    for step in (2, 3, 4):
        out = run_stage(_sft_cmd(world, run), stop_after_save=step)
        assert out.rc == -signal.SIGKILL
        unfinished = sorted(p.name for p in (run / "checkpoints").glob("*orbax-checkpoint-tmp*"))
        if unfinished:
            break
    assert unfinished, "no kill landed inside an async save in 3 tries"
    assert unfinished == [f"{step}.orbax-checkpoint-tmp"]
    assert _latest(run) == step - 1
    meta = _state(run, step - 1)[1]
    recs = read_metrics(run / "metrics.jsonl")
    assert recs[-1]["step"] >= step - 1  # the killed process logged past the checkpoint...
    _ok(run_stage(_sft_cmd(world, run)), "resume after a kill inside a save")
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 9))  # ...and the resume cut those records off
    assert meta["data"] == {"epoch": 0, "position": step - 1}
    assert not list((run / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def test_ppo_lag_sigkill_and_sigterm_resume_bit_exactly_with_lambda_and_window(world, tmp_path):
    rng = random.Random(KILL_SEED + 1)
    base, run = tmp_path / "uninterrupted", tmp_path / "killed"
    _ok(run_stage(_ppo_cmd(world, base)), "the uninterrupted PPO-Lag run")
    a = rng.randint(1, 2)
    b = rng.randint(a + 1, 4)
    kills = [(a, rng.uniform(0.0, 0.5), signal.SIGKILL), (b, 0.0, signal.SIGTERM)]
    outs = _kill_chain(_ppo_cmd(world, run), run, base, kills, {
        "lagrange": lambda s: s["lagrange"], "actor": lambda s: s["actor"],
        "critics": lambda s: (s["reward_critic"], s["cost_critic"]), "rng_step": lambda s: (s["rng"], s["step"])})
    assert len(outs) == 2
    assert (run / "metrics.jsonl").read_bytes() == (base / "metrics.jsonl").read_bytes(), f"seed {KILL_SEED + 1}"
    # the multiplier moved and the window wrapped, so the comparison above was not of initial values
    final, meta = _state(run, 6)
    lag = final["lagrange"]
    assert int(lag["window_count"]) == 12 and int(lag["step"]) == 6 * 2
    assert float(np.exp(lag["log_lambda"][0])) != 1.0
    assert meta["prompts"] == {"epoch": 0, "position": 6}
    lam = [r["train/lambda"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(lam) == 6 and len(set(lam)) > 1


@pytest.mark.parametrize("variant", ["k2_sgd_log", "k1_pid"])
def test_ppo_lag_k_constraints_and_pid_rule_resume_bit_exactly(world, tmp_path, variant):
    """A K = 2 run (a 2-output cost model, per-constraint thresholds) and a PID-rule run, killed once at a random
    save, resume to the uninterrupted run's metrics file and multiplier state (K windows, PID terms)."""
    from safejax.models import hf, load_pretrained

    rng = random.Random(KILL_SEED + 2 + len(variant))
    extra = ["lagrange.rule=pid", "lagrange.lambda_init=0.5"]
    if variant == "k2_sgd_log":
        cm2 = tmp_path / "cm2"
        hf.save_pretrained(load_pretrained(world["model"], model_type="score", score_dim=2, seed=2), cm2,
                           tokenizer=tiny_world.build_tokenizer(cm2))
        extra = [f"cost_model={cm2}", "lagrange.threshold=[-0.5,0.5]", "lagrange.names=[harm,privacy]"]
    base, run = tmp_path / "uninterrupted", tmp_path / "killed"
    _ok(run_stage(_ppo_cmd(world, base) + extra), f"the uninterrupted {variant} run")
    kills = [(rng.randint(1, 4), rng.uniform(0.0, 0.5), signal.SIGKILL)]
    _kill_chain(_ppo_cmd(world, run) + extra, run, base, kills, {
        "lagrange": lambda s: s["lagrange"], "actor": lambda s: s["actor"],
        "critics": lambda s: (s["reward_critic"], s["cost_critic"]), "rng_step": lambda s: (s["rng"], s["step"])})
    assert (run / "metrics.jsonl").read_bytes() == (base / "metrics.jsonl").read_bytes(), f"seed {KILL_SEED}"
    lag, _ = _state(run, 6)
    lag = lag["lagrange"]
    assert lag["cost_window"].shape == ((2, 12) if variant == "k2_sgd_log" else (1, 12))
    recs = read_metrics(run / "metrics.jsonl")
    if variant == "k2_sgd_log":
        assert len({r["train/lambda/harm"] for r in recs}) > 1 and len({r["train/lambda/privacy"] for r in recs}) > 1
    else:  # the PID terms were saved and moved
        assert {"integral", "delta_p", "cost_d", "cost_d_history"} <= set(lag) and float(lag["delta_p"][0]) != 0.0
        assert len({r["train/lambda"] for r in recs}) > 1


# ----------------------------------------------------------------------------- in-process units


def test_metric_writer_resume_offset_drops_records_written_after_the_checkpoint(tmp_path):
    w = MetricWriter(tmp_path, tensorboard=False)
    w.write(1, {"loss": 1.0})
    w.write(2, {"loss": 0.5})
    offset = w.tell()
    w.write(3, {"loss": 0.25})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "lo')  # torn line of a killed process
    w = MetricWriter(tmp_path, tensorboard=False, resume_offset=offset)
    w.write(3, {"loss": 0.125})
    w.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 0.5),
                                                                                          (3, 0.125)]
    w = MetricWriter(tmp_path, tensorboard=False, resume_step=2)
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def _tree(v: float, mesh=None):
    from jax.sharding import NamedSharding, PartitionSpec as P

    t = {"w": jnp.full((8, 4), v, jnp.float32), "step": jnp.int32(int(v)),
         "lag": {"log_lambda": jnp.full((1,), v), "window": jnp.arange(6, dtype=jnp.float32) * v}}
    if mesh is not None:
        t = {"w": jax.device_put(t["w"], NamedSharding(mesh, P("fsdp", None))),
             "step": jax.device_put(t["step"], NamedSharding(mesh, P())),
             "lag": jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), t["lag"])}
    return t


def _save_steps(d: Path, steps, mesh=None) -> None:
    ck = Checkpointer(d, max_to_keep=10)
    for s in steps:
        ck.save(s, _tree(float(s), mesh), {"data": {"epoch": 0, "position": s}})
    ck.close()


def test_corrupt_latest_checkpoint_is_skipped_moved_aside_and_step_can_be_saved_again(tmp_path, caplog):
    d = tmp_path / "checkpoints"
    _save_steps(d, [1, 2, 3])
    for f in (d / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0\0\0")  # damaged array data
    (d / "4").mkdir()  # a half-written step folder without any item
    ck = Checkpointer(d, max_to_keep=10)
    with caplog.at_level("WARNING", logger="safejax"):
        state, meta, step = ck.restore(_tree(0.0), required_meta=("data",))
    assert step == 2 and meta["data"]["position"] == 2 and float(state["w"][0, 0]) == 2.0
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "step 3" in warned and "step 4" in warned and "unreadable" in warned
    assert ck.all_steps() == [1, 2]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints.corrupt").iterdir()) == ["3", "4"]
    ck.save(3, _tree(30.0), {"data": {}})  # the step number is free again
    ck.wait()
    assert ck.restore(_tree(0.0))[2] == 3
    ck.close()


def test_unreadable_checkpoints_only_is_an_error_not_a_fresh_start(tmp_path):
    d = tmp_path / "checkpoints"
    _save_steps(d, [1])
    shutil.rmtree(d / "1" / "state")
    with pytest.raises(CheckpointError, match="no readable checkpoint"), Checkpointer(d) as ck:
        ck.restore(_tree(0.0))
    assert (d / "1").exists()  # nothing moved when there is nothing to fall back to


def test_checkpoint_of_another_model_is_refused_naming_the_array(tmp_path):
    d = tmp_path / "checkpoints"
    _save_steps(d, [1, 2])
    other = dict(_tree(0.0), w=jnp.zeros((8, 5)))
    with pytest.raises(CheckpointMismatchError, match=r"'w' has shape \[8, 4\] in the checkpoint but \[8, 5\]"), \
            Checkpointer(d) as ck:
        ck.restore(other)
    extra = dict(_tree(0.0), extra=jnp.zeros(3))
    with pytest.raises(CheckpointMismatchError, match="'extra' is not in the checkpoint"), Checkpointer(d) as ck:
        ck.restore(extra)
    with Checkpointer(d, read_only=True) as ck:
        assert ck.all_steps() == [1, 2]  # nothing was moved


def test_sharded_state_restores_onto_another_mesh_exactly(tmp_path):
    from safejax.parallel import MeshConfig, make_mesh

    fsdp8 = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    grid = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _save_steps(tmp_path / "c", [5], mesh=fsdp8)
    target = _tree(0.0, mesh=grid)
    with Checkpointer(tmp_path / "c") as ck:
        state, meta, step = ck.restore(target)
    assert step == 5 and state["w"].sharding == target["w"].sharding
    assert state["step"].sharding == target["step"].sharding  # scalars live on the mesh
    _assert_trees_equal(jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, _tree(5.0)), "resharded")
