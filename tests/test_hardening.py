"""Regression tests of the hardening issue: one writer per run directory, content fingerprints of
checkpointed arrays, the config and the data a resumed run continues, bounded NaN skipping, torn
metric files, I/O failures inside the exit-code contract, and file modes of exports.

Most tests point the CLI (in-process, ``safejax.cli.main``) at a copy of a real 4-step SFT run cut
back to step 2, as if it had been killed there."""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tiny_world
from safejax.checkpoint import FINGERPRINTS, Checkpointer, fingerprints
from safejax.cli import main
from safejax.metrics import MetricWriter, read_metrics
from safejax.runlock import LOCK_NAME, RunLock, RunLockedError
from safejax.train.common import MetricGuard, NonFiniteError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard_world")
    paths = tiny_world.make_world(root)
    paths["data"] = tiny_world.write_jsonl(root / "data" / "sft.jsonl", tiny_world.sft_rows(64, 3))
    return paths


def sft_args(world) -> list[str]:
    return [f"model.path={world['model']}", f"data.train=[{world['data']}]", "data.max_length=24",
            "train.batch_size=16", "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=100",
            "optim.lr=3e-3", "train.progress=false"]


@pytest.fixture(scope="module")
def base_run(world, tmp_path_factory):
    """``(run dir cut back to step 2, metrics.jsonl bytes of the uninterrupted 4-step run)``."""
    return tiny_world.sft_run_cut_back(tmp_path_factory.mktemp("hard_base") / "sft", sft_args(world))


@pytest.fixture
def run_copy(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    return out


def error_line(err: str, cmd: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"safejax {cmd}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- 1, 2: skipping non-finite steps


def test_ppo_lag_with_skip_nonfinite_and_constant_schedules_runs(world, tmp_path):
    m = world["model"]
    rc = main(["ppo-lag", f"out_dir={tmp_path / 'ppo'}", f"actor.path={m}", f"reward_model={m}", f"cost_model={m}",
               f"data.prompts=[{world['prompts']}]", "data.prompt_width=16", "rollout.max_new_tokens=4",
               "train.batch_size=8", "ppo.micro_batch_size=4", "train.max_steps=2", "train.progress=false",
               "train.skip_nonfinite=true", "actor_optim.schedule=constant", "critic_optim.schedule=constant"])
    assert rc == 0
    recs = [r for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl") if "train/nonfinite_skipped" in r]
    assert [r["train/nonfinite_skipped"] for r in recs] == [0.0, 0.0]


def _guard_metrics(skipped: bool) -> dict:
    return {"loss": np.float32(np.nan if skipped else 1.0), "nonfinite_skipped": np.float32(1.0 if skipped else 0.0)}


def test_metric_guard_stops_after_too_many_consecutive_skips_naming_the_step():
    guard = MetricGuard(max_consecutive=2)
    for step, skipped in enumerate([False, True, True, False, True, True], start=1):
        guard.add(step, _guard_metrics(skipped))
    guard.drain()  # two in a row are allowed, a finite step resets the run of skips
    assert (guard.skipped, guard.consecutive) == (4, 2)
    guard.add(7, _guard_metrics(True))
    with pytest.raises(NonFiniteError, match=r"step 7: 3 consecutive steps skipped.*train.max_consecutive_skips=2"):
        guard.drain()
    resumed = MetricGuard(max_consecutive=2)
    resumed.restore({"nonfinite_skipped": 4, "nonfinite_consecutive": 2})
    resumed.add(7, _guard_metrics(True))
    with pytest.raises(NonFiniteError, match="step 7"):  # the run of skips continues across a resume
        resumed.drain()


def test_diverging_run_with_skip_nonfinite_exits_2_instead_of_skipping_to_the_end(world, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run_cli(["sft", f"out_dir={out}", *sft_args(world), "train.max_steps=8", "optim.lr=1e30",
                       "optim.clip_norm=0", "optim.schedule=constant", "train.skip_nonfinite=true",
                       "train.max_consecutive_skips=2", "data.max_length=24"], capsys)
    assert rc == 2, err
    line = error_line(err, "sft")
    assert "consecutive steps skipped" in line and "train.max_consecutive_skips=2" in line
    assert not (out / "hf").exists()


# ----------------------------------------------------------------------------- 3: one writer per run directory

HOLDER = ("import sys, time; sys.path.insert(0, sys.argv[2]); from safejax.runlock import RunLock; "
          "RunLock(sys.argv[1]).acquire(); print('held', flush=True); "
          "time.sleep(120) if sys.argv[3] == 'hold' else __import__('os')._exit(0)")


def _holder(path: Path, mode: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(REPO), mode], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_command_on_a_busy_out_dir_exits_2_with_one_line_and_writes_nothing(world, tmp_path, capsys):
    out = tmp_path / "busy"
    p = _holder(out, "hold")
    try:
        rc, err = run_cli(["sft", f"out_dir={out}", *sft_args(world)], capsys)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert rc == 2
    line = error_line(err, "sft")
    assert "in use by another safejax command" in line and f"pid {p.pid}" in line and LOCK_NAME in line
    assert sorted(x.name for x in out.iterdir()) == [LOCK_NAME]  # no checkpoints, metrics or snapshot


def test_lock_of_a_crashed_process_on_this_host_is_taken_over(tmp_path, caplog):
    p = _holder(tmp_path, "crash")  # exits without releasing
    p.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == p.pid
    with caplog.at_level("WARNING", logger="safejax"):
        lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "crashed" in caplog.text and "gone" in caplog.text
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_from_another_host_blocks_until_its_heartbeat_is_older_than_the_lease(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname() + "-tpu-worker-3", "pid": 1, "since": time.time()}))
    with pytest.raises(RunLockedError, match="in use"):
        RunLock(tmp_path, lease_s=60).acquire()
    old = time.time() - 61
    os.utime(path, (old, old))
    lock = RunLock(tmp_path, lease_s=60).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_held_lock_is_refreshed_by_the_heartbeat(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        deadline = time.time() + 10
        while lock.path.stat().st_mtime < old + 500 and time.time() < deadline:
            time.sleep(0.05)
        assert lock.path.stat().st_mtime > old + 500
    finally:
        lock.release()


# ----------------------------------------------------------------------------- 4: content fingerprints


def test_fingerprint_changes_under_any_single_bit_flip_and_not_with_the_sharding():
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((8, 6)).astype(np.float32), "i32": rng.integers(-9, 9, (16,), np.int32),
              "bf16": rng.standard_normal((4, 8)).astype(jnp.bfloat16), "u32": rng.integers(0, 2**32, (2,), np.uint32)}
    base = fingerprints(arrays)
    assert len(set(base.values())) == 4
    for name, a in arrays.items():
        raw = a.view(np.uint8).reshape(-1).copy()
        for pos in rng.choice(raw.size, 6, replace=False):
            for bit in (0, 7):
                flipped = raw.copy()
                flipped[pos] ^= np.uint8(1 << bit)
                other = dict(arrays, **{name: flipped.view(a.dtype).reshape(a.shape)})
                assert fingerprints(other)[name] != base[name], (name, pos, bit)
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.device_put(arrays["f32"], NamedSharding(mesh, P("x", None)))
    assert fingerprints({"f32": sharded})["f32"] == base["f32"]


def _flip_one_param_bit(step_dir: Path, params) -> None:
    """Flip the lowest mantissa bit of one element of ``params`` where it sits in ``step_dir``'s data files
    (stored uncompressed: zstd keeps random floats as raw blocks, without a checksum)."""
    files = {f: f.read_bytes() for f in sorted((step_dir / "state").rglob("*")) if f.is_file() and f.parent.name == "d"}
    for value in jax.tree.leaves(params):
        value = np.asarray(value).reshape(-1)
        for at in range(1, value.size - 4, 7):
            needle = value[at: at + 4].tobytes()
            where = [(f, data.find(needle)) for f, data in files.items() if needle in data]
            if len(where) == 1 and files[where[0][0]].count(needle) == 1:
                f, pos = where[0]
                data = bytearray(files[f])
                data[pos] ^= 0x01
                f.write_bytes(bytes(data))
                return
    raise AssertionError("no parameter bytes found uncompressed in the checkpoint data files")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bit_in_a_checkpoint_is_detected_and_the_previous_step_used(world, base_run, run_copy, capfd, caplog):
    ckpt = Checkpointer(run_copy / "checkpoints", read_only=True)
    params, meta, _ = ckpt.restore_subtree(("params",), step=2)
    ckpt.close()
    assert FINGERPRINTS in meta
    _flip_one_param_bit(run_copy / "checkpoints" / "2", params)
    capfd.readouterr()
    with caplog.at_level("WARNING", logger="safejax"):
        assert main(["sft", f"out_dir={run_copy}", *sft_args(world)]) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("checkpoint step 2" in w and "fingerprint" in w for w in warned), warned
    assert len(warned) <= 4, warned
    assert (run_copy / "metrics.jsonl").read_bytes() == base_run[1]  # resumed from step 1: the same run
    assert [p.name.split("-")[0] for p in (run_copy / "checkpoints.corrupt").iterdir()] == ["2"]


def test_export_refuses_a_checkpoint_whose_content_changed(base_run, run_copy, tmp_path, capsys):
    for s in (1, 2):
        ckpt = Checkpointer(run_copy / "checkpoints", read_only=True)
        params, _, _ = ckpt.restore_subtree(("params",), step=s)
        ckpt.close()
        _flip_one_param_bit(run_copy / "checkpoints" / str(s), params)
    rc, err = run_cli(["export", "--run", str(run_copy), "--out", str(tmp_path / "hf")], capsys)
    assert rc == 2
    assert "fingerprint" in error_line(err, "export")


# ----------------------------------------------------------------------------- 5: the config guard


@pytest.mark.parametrize("remove", [("config.json",), ("config.json", "config.yaml")])
def test_config_change_is_refused_when_the_snapshot_files_are_gone(world, run_copy, capsys, remove):
    for name in remove:
        (run_copy / name).unlink()
    rc, err = run_cli(["sft", f"out_dir={run_copy}", *sft_args(world), "optim.lr=1e-2", "seed=7"], capsys)
    assert rc == 2
    line = error_line(err, "sft")
    assert "different config" in line and "optim.lr: 0.003 -> 0.01" in line and "seed: 42 -> 7" in line
    assert ("config.yaml" if len(remove) == 1 else "checkpoints/2/meta") in line
    assert not (run_copy / "config.json").exists()  # the evidence is not overwritten


def test_resume_is_refused_when_no_config_of_the_earlier_run_can_be_read(world, run_copy, capsys):
    (run_copy / "config.json").unlink()
    (run_copy / "config.yaml").write_text("optim: [unterminated\n")
    for s in (1, 2):
        meta_file = run_copy / "checkpoints" / str(s) / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        del meta["config"]
        meta_file.write_text(json.dumps(meta))
    rc, err = run_cli(["sft", f"out_dir={run_copy}", *sft_args(world)], capsys)
    assert rc == 2
    line = error_line(err, "sft")
    assert "cannot be read" in line and "config.json missing" in line and "config.yaml unreadable" in line


# ----------------------------------------------------------------------------- 6: the training data


def test_changed_training_data_on_resume_exits_2_naming_it_unless_allowed(world, base_run, run_copy, capsys):
    data = Path(world["data"])
    original = data.read_bytes()
    try:
        tiny_world.write_jsonl(data, tiny_world.sft_rows(48, 3))
        rc, err = run_cli(["sft", f"out_dir={run_copy}", *sft_args(world)], capsys)
        assert rc == 2
        line = error_line(err, "sft")
        assert "training data changed" in line and "train: 64 rows" in line and "-> 48 rows" in line
        assert "train.allow_data_change=true" in line
        assert main(["sft", f"out_dir={run_copy}", *sft_args(world), "train.allow_data_change=true"]) == 0
    finally:
        data.write_bytes(original)


# ----------------------------------------------------------------------------- 8: torn metrics.jsonl


def test_metric_writer_cuts_a_torn_file_back_to_its_last_complete_record(tmp_path):
    w = MetricWriter(tmp_path, tensorboard=False)
    for s in (1, 2, 3):
        w.write(s, {"loss": float(s)})
    offset = w.tell()
    w.close()
    path = tmp_path / "metrics.jsonl"
    torn = path.read_bytes()[:-9]  # shorter than the offset, ending inside record 3
    path.write_bytes(torn)
    w = MetricWriter(tmp_path, tensorboard=False, resume_offset=offset)
    w.write(4, {"loss": 4.0})
    w.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 4]


def test_resume_onto_a_torn_metrics_file_keeps_it_parseable(world, base_run, run_copy):
    path = run_copy / "metrics.jsonl"
    data = path.read_bytes()
    cut = data.index(b"\n") + 10  # inside the second record: shorter than the checkpoint's offset
    path.write_bytes(data[:cut])
    assert main(["sft", f"out_dir={run_copy}", *sft_args(world)]) == 0
    recs = read_metrics(path)  # raises if a record was glued onto the torn line
    full = [json.loads(x) for x in base_run[1].decode().splitlines()]
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert recs == [full[0], full[2], full[3]]  # record 2 was torn away; 3 and 4 exactly as uninterrupted


# ----------------------------------------------------------------------------- 9, 11: I/O failures, file modes


def _no_space(*args, **kwargs):
    path = args[1] if len(args) > 1 else kwargs.get("filename")
    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensor_no_space(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                          "\"No space left on device\" })")


@pytest.mark.parametrize("fail", [_no_space, _safetensor_no_space], ids=["oserror", "safetensor_error"])
def test_full_disk_during_export_exits_2_with_one_line_and_keeps_the_earlier_export(base_run, tmp_path, capsys,
                                                                                    monkeypatch, fail):
    out = tmp_path / "hf"
    old_umask = os.umask(0o022)
    try:
        rc, err = run_cli(["export", "--run", str(base_run[0]), "--out", str(out)], capsys)
    finally:
        os.umask(old_umask)
    assert rc == 0, err
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    (out / "notes.txt").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    rc, err = run_cli(["export", "--run", str(base_run[0]), "--out", str(out), "--step", "1"], capsys)
    assert rc == 2
    line = error_line(err, "export")
    assert "cannot write the exported model" in line and "No space left on device" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial folder left beside it
    monkeypatch.undo()
    assert main(["export", "--run", str(base_run[0]), "--out", str(out), "--step", "1"]) == 0
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() and after["notes.txt"] == before["notes.txt"]
    assert after["model.safetensors"] != before["model.safetensors"]  # step 1's weights replaced step 2's


def test_full_disk_during_the_final_export_of_a_stage_exits_2_with_one_line(world, run_copy, capsys, monkeypatch):
    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", _no_space)
    rc, err = run_cli(["sft", f"out_dir={run_copy}", *sft_args(world)], capsys)
    assert rc == 2
    assert "No space left on device" in error_line(err, "sft")
    assert not (run_copy / "hf").exists()
    assert sorted(int(p.name) for p in (run_copy / "checkpoints").iterdir()) == [1, 2, 3, 4]


def test_failing_checkpoint_write_exits_2_with_a_few_lines_and_keeps_earlier_steps(world, base_run, run_copy):
    # a real failing write deep inside tensorstore: files may not grow past 100 kB (the metrics fit, the
    # checkpoint data files do not); SIGXFSZ ignored so that the write fails with EFBIG instead
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "safejax.cli", "sft", f"out_dir={run_copy}",
                                            *sft_args(world)])
    p = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 200; exec {cmd}"], cwd=REPO, env=dict(os.environ),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr, "sft")
    assert "cannot write step 3" in line and "checkpoints" in line and "File too large" in line
    assert len(p.stderr.splitlines()) <= 8, p.stderr[-3000:]
    ckpt = Checkpointer(run_copy / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def _asyncio_error_reaches_the_log(caplog) -> bool:
    caplog.clear()
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        logging.getLogger("asyncio").error("_GatheringFuture exception was never retrieved", exc_info=True)
    return any(r.name == "asyncio" and r.levelno >= logging.ERROR for r in caplog.records)


def test_library_noise_measures_last_while_a_checkpointer_is_open_and_after_a_failed_write(
        tmp_path, monkeypatch, caplog):
    import asyncio

    import orbax.checkpoint as ocp

    from safejax import checkpoint_noise
    monkeypatch.setattr(checkpoint_noise, "_GUARD", checkpoint_noise._Guard())  # isolated from earlier tests
    before = asyncio.BaseEventLoop.call_soon_threadsafe
    caplog.set_level(logging.ERROR)
    a, b = Checkpointer(tmp_path / "a"), Checkpointer(tmp_path / "b")
    assert checkpoint_noise.installed() and not _asyncio_error_reaches_the_log(caplog)
    a.close()
    assert checkpoint_noise.installed() and not _asyncio_error_reaches_the_log(caplog)
    b.close()
    b.close()  # a second close releases nothing more
    # a clean last close restores the library exactly: no patched loop method, no filter on its loggers
    assert not checkpoint_noise.installed() and asyncio.BaseEventLoop.call_soon_threadsafe is before
    assert _asyncio_error_reaches_the_log(caplog)

    def full(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    c = Checkpointer(tmp_path / "c")
    with pytest.raises(OSError, match="cannot write step 1"):
        c.save(1, {"x": jnp.zeros(2)})
    c.close()
    # after a failed write the stragglers of that write (futures logged when collected, callbacks on the closed
    # loop) may come after close: the measures stay until exit instead of printing tracebacks then
    assert checkpoint_noise.installed() and not _asyncio_error_reaches_the_log(caplog)
    checkpoint_noise._GUARD.uninstall()  # leave the process as the test found it


def test_unwritable_checkpoint_folder_exits_2_with_one_line(world, run_copy, capsys, monkeypatch):
    import orbax.checkpoint as ocp

    def denied(self, step, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.directory / f"{step}"))

    monkeypatch.setattr(ocp.CheckpointManager, "save", denied)
    rc, err = run_cli(["sft", f"out_dir={run_copy}", *sft_args(world)], capsys)
    assert rc == 2
    line = error_line(err, "sft")
    assert "cannot write step 3" in line and "Permission denied" in line and "earlier checkpoints are intact" in line
    assert sorted(int(p.name) for p in (run_copy / "checkpoints").iterdir()) == [1, 2]
