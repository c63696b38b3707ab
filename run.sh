#!/usr/bin/env bash
# One entry point for people and CI:  bash run.sh demo [args]  |  bash run.sh test [pytest args]
# Creates ./.venv on first use and installs ciuic with its dev extras. On a machine without CUDA
# it pins the CPU build torch==2.13.0 (an unpinned torch would pull a multi-GB CUDA build);
# set CIUIC_TORCH=keep to use whatever torch you installed in .venv yourself (e.g. a CUDA build).
set -euo pipefail
cd "$(dirname "$0")"

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  echo "[run.sh] creating .venv with $python_bin"
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.ciuic-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if [ "${CIUIC_TORCH:-cpu}" = "cpu" ]; then
    echo "[run.sh] installing torch==2.13.0 (CPU build)"
    python -m pip install --quiet torch==2.13.0
  fi
  echo "[run.sh] installing ciuic[dev] (editable)"
  python -m pip install --quiet -e ".[dev]"
  touch "$stamp"
fi

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  demo) exec python -m ciuic.demo "$@" ;;
  # two workers (the machines here have 2 cores); files that share a fixture stay on one worker
  test) exec python -m pytest -q -n "${CIUIC_TEST_WORKERS:-2}" --dist loadgroup "$@" ;;
  # every GPU number we owe, in one run (< 20 min on one H100/H200; needs a CUDA torch: CIUIC_TORCH=keep)
  gpu) python benchmarks/kernels.py || echo "[run.sh] the kernel report found problems (above)"; exec python benchmarks/gpu_suite.py "$@" ;;
  *) echo "usage: bash run.sh demo [--steps N --modes 4:1,8:1 --dtype fp32|bf16] | bash run.sh test [pytest args] | bash run.sh gpu [--dry-run]" >&2; exit 2 ;;
esac
