#!/usr/bin/env bash
# One command per job, from a fresh machine: installs what is missing, builds the
# extension in place, then runs it.
#   bash scripts/dev.sh test     # the test suite (pytest python_tests)
#   bash scripts/dev.sh demo     # the main job: DivPrune on built-in data
#   bash scripts/dev.sh bench    # the benchmark suite (python -m bench)
#   bash scripts/dev.sh build    # only install and build
# Extra arguments go to the command run. FORCE_CUDA=1 makes a missing CUDA build an error.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-test}"
shift || true
PY="${PYTHON:-python3}"

# torch first: its CUDA 13 build where pip offers it (needed to compile the CUDA kernels).
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.14.1"
fi
# Build and test tools, plus the extras the demo, its tests and the bench plot use.
missing=$("$PY" - <<'PY'
import importlib.util
need = {"numpy": "numpy", "pytest": "pytest", "ninja": "ninja", "setuptools": "setuptools",
        "skimage": "scikit-image", "PIL": "pillow", "matplotlib": "matplotlib",
        "transformers": "transformers>=5.17,<6"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then "$PY" -m pip install --quiet $missing; fi

# torch's own CUDA_HOME guess fails where nvcc is a link in /usr/local/bin.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$PY" setup.py build_ext --inplace > build.log 2>&1 || { tail -50 build.log; exit 1; }
grep -m1 "^divprune_ext: building" build.log || true

case "$job" in
  test) "$PY" -m pytest python_tests -q "$@" ;;
  demo) "$PY" -m divprune_ext.demo "$@" ;;
  bench) "$PY" -m bench "$@" ;;
  build) ;;
  *) echo "usage: bash scripts/dev.sh {test|demo|bench|build} [args...]" >&2; exit 2 ;;
esac
