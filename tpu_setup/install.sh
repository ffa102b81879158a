#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2016  # single-quoted $VARs in remote lines expand on the worker
# Install safejax and its TPU extra (jax[tpu]) into a virtual environment on every worker.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<'USAGE'
Usage: install.sh --name NAME --zone ZONE [options]

On every worker at once (gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...):
make sure PYTHON exists (installed from the deadsnakes PPA if the image lacks it), create the
virtual environment VENV, and pip install safejax (distribution safejax-rlhf) with its TPU extra.
By default the checkout this script lives in is built into a wheel here and copied to every worker,
so the workers run exactly the code you have.

Required:
  --name NAME          TPU VM / slice name
  --zone ZONE

Options:
  --source SRC         what to install (default: this checkout, built into a wheel here):
                         path/to/checkout (a folder with pyproject.toml) -> wheel built into CHECKOUT/dist, copied
                         git+https://github.com/ORG/safejax[@REF]   -> 'safejax-rlhf[tpu] @ git+...'
                         path/to/safejax_rlhf-X-py3-none-any.whl    -> copied to every worker first
                         gs://bucket/path/safejax_rlhf-X.whl        -> fetched by every worker
                         any other pip requirement
                       (never plain 'safejax': that PyPI name belongs to an unrelated project)
  --python PYTHON      interpreter on the workers (default: python3.12; safejax needs >= 3.11)
  --venv DIR           virtual environment on the workers (default: $HOME/safejax-venv)
  --project PROJECT
  --internal-ip        reach the workers by internal IP (when running inside the VPC)
  --dry-run            print the commands instead of running them
  -h, --help           this text
USAGE
}

parse_args "name zone project source python venv internal-ip dry-run" "$@"
((${#CMD_ARGS[@]} == 0)) || die "install.sh: unexpected arguments after --: ${CMD_ARGS[*]}"
require_name
require_zone
PYTHON="${OPT_PYTHON:-python3.12}"
[[ "$PYTHON" =~ ^python3\.[0-9]+$ ]] || die "install.sh: --python must look like python3.12, got '$PYTHON'"
# shellcheck disable=SC2016  # $HOME is expanded on the worker
VENV="${OPT_VENV:-\$HOME/safejax-venv}"
SOURCE="${OPT_SOURCE:-$(dirname "$HERE")}"
DIST="safejax-rlhf"   # the distribution name in pyproject.toml (import name: safejax)

# checkout_version DIR: the version in DIR/pyproject.toml's [project] table (pure bash: dry runs have no python)
checkout_version() {
  local line section="" v=""
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ ^\[([a-z.-]+)\] ]]; then section="${BASH_REMATCH[1]}"; continue; fi
    if [[ "$section" == project && "$line" =~ ^version[[:space:]]*=[[:space:]]*\"([^\"]+)\" ]]; then
      v="${BASH_REMATCH[1]}"; break
    fi
  done <"$1/pyproject.toml"
  [[ -n "$v" ]] || die "install.sh: no version in $1/pyproject.toml's [project] table"
  printf '%s' "$v"
}

fetch=""   # remote step that brings a wheel onto the worker (gs:// sources)
build=()   # local step that builds a wheel of a checkout
case "$SOURCE" in
  git+*)
    REQ="${DIST}[tpu] @ $SOURCE" ;;
  gs://*.whl)
    whl="${SOURCE##*/}"
    fetch="gcloud storage cp $(dq "$SOURCE") \"\$HOME/$whl\""
    REQ="\$HOME/${whl}[tpu]" ;;
  gs://*)
    die "install.sh: --source '$SOURCE' on GCS must be a .whl file" ;;
  *.whl)
    [[ -f "$SOURCE" ]] || die "install.sh: --source wheel '$SOURCE' does not exist"
    whl="${SOURCE##*/}"
    REQ="\$HOME/${whl}[tpu]" ;;
  *)
    if [[ -d "$SOURCE" ]]; then
      [[ -f "$SOURCE/pyproject.toml" ]] || die "install.sh: --source '$SOURCE' is a folder without pyproject.toml; pass a safejax checkout, a wheel, a git+ URL or a pip requirement"
      whl="${DIST//-/_}-$(checkout_version "$SOURCE")-py3-none-any.whl"
      build=(python3 -m pip wheel --no-deps -q -w "$SOURCE/dist" "$SOURCE")
      SOURCE="$SOURCE/dist/$whl"
      REQ="\$HOME/${whl}[tpu]"
    else
      REQ="$SOURCE"
    fi ;;
esac

REQ_Q="$(dq "$REQ")"   # double quotes: $HOME in a wheel path expands on the worker

steps=(
  "set -eu"
  "PY=$PYTHON"
  "VENV=$(remote_path "$VENV")"
  'if ! { command -v "$PY" && "$PY" -c "import ensurepip, venv"; } >/dev/null 2>&1; then sudo apt-get update -qq; if ! apt-cache show "$PY-venv" >/dev/null 2>&1; then sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq software-properties-common; sudo add-apt-repository -y ppa:deadsnakes/ppa; fi; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PY" "$PY-venv"; fi'
  '"$PY" -m venv "$VENV"'
  '"$VENV/bin/python" -m pip install -q --upgrade pip'
)
if [[ -n "$fetch" ]]; then steps+=("$fetch"); fi
if [[ "$REQ" == *.whl\[tpu\] ]]; then  # a rebuilt wheel keeps its version: pip would keep the old install
  steps+=("\"\$VENV/bin/python\" -m pip uninstall -q -y $DIST || true")
fi
steps+=(
  "\"\$VENV/bin/python\" -m pip install --upgrade $REQ_Q"
  '"$VENV/bin/python" -c "import importlib.metadata as m, jax, safejax; print(\"worker\", \"$(hostname)\", \"safejax\", m.version(\"safejax-rlhf\"), \"jax\", jax.__version__)"'
)
remote=""
for s in "${steps[@]}"; do remote+="${remote:+; }$s"; done

location_flags
if ((${#build[@]})); then run "${build[@]}"; fi
if [[ "$SOURCE" == *.whl && "$SOURCE" != gs://* ]]; then
  scp_cmd=("$GCLOUD" compute tpus tpu-vm scp "$SOURCE" "$OPT_NAME:$whl" "${LOCATION[@]}" --worker=all)
  if ((OPT_INTERNAL_IP)); then scp_cmd+=(--internal-ip); fi
  run "${scp_cmd[@]}"
fi
ssh_workers all "$remote"
