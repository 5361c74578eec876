#!/usr/bin/env bash
# Packaging check: the source distribution must carry every file the build reads.
# Builds the sdist (in a bare environment, so only MANIFEST.in decides what goes in),
# builds a wheel from it with the CUDA kernels (FORCE_CUDA=1), installs that wheel in a
# fresh virtual environment that sees the installed torch, imports it and runs
# torch.ops.divprune.select on the CPU. `pip install divprune_ext-*.tar.gz` is exactly
# these two steps (pip builds a wheel from the sdist, then installs it), so one CUDA
# compile checks both the sdist and the wheel.
#   bash scripts/check_sdist.sh     # from a git checkout; needs a CUDA build of torch and nvcc
# TORCH_CUDA_ARCH_LIST defaults to 9.0 here: the check is about files, not about GPUs, and
# one target instead of the default three saves about a quarter of the .cu compile time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# A fresh virtual environment that sees the installed torch (a CUDA build, several GB)
# instead of installing another; `build` goes into it, not into the caller's Python.
"$PY" -m venv --system-site-packages "$work/venv"
venv_py="$work/venv/bin/python"
# Asked from $work: in the checkout, the build_ext output folder build/ imports as a
# namespace package named `build` and would hide that the tool is missing.
(cd "$work" && "$venv_py" -c "import build.__main__") 2>/dev/null || "$venv_py" -m pip install --quiet build

echo "== sdist"
# From a copy of the files git knows (tracked, or new and not ignored), as a clean checkout
# has them: a stale *.egg-info/SOURCES.txt in the working tree adds the files it lists to
# the sdist, which would hide a file that MANIFEST.in forgets.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard > "$work/files"
tar --null -T "$work/files" --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$work/src"
"$venv_py" -m build --sdist --outdir "$work/dist" "$work/src" > "$work/sdist.log" 2>&1 \
  || { tail -30 "$work/sdist.log"; exit 1; }
sdist="$(ls "$work"/dist/divprune_ext-*.tar.gz)"
tar tzf "$sdist" | sed 's|^[^/]*/||' | grep -v '/$' | sort > "$work/contents.txt"
echo "$(basename "$sdist"): $(wc -l < "$work/contents.txt") files, $(du -k "$sdist" | cut -f1) KiB"
# Every file under csrc/, whatever its name or folder, and no build products or data.
missing="$(cd "$work/src" && find csrc -type f | sort | comm -23 - "$work/contents.txt")"
[ -z "$missing" ] || { echo "missing from the sdist:"; echo "$missing"; exit 1; }
unwanted="$(grep -E '\.(so|o|pyc|png)$|^build/|^bench/results/|^bench/out/' "$work/contents.txt" || true)"
[ -z "$unwanted" ] || { echo "should not be in the sdist:"; echo "$unwanted"; exit 1; }

echo "== wheel from the sdist (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
start=$SECONDS
# Run from $work: the repository's own divprune_ext/ must not be on the path.
(cd "$work" && "$venv_py" -m pip wheel --quiet --no-cache-dir --no-deps --wheel-dir "$work/wheels" "$sdist") \
  > "$work/wheel.log" 2>&1 || { tail -40 "$work/wheel.log"; exit 1; }
wheel="$(ls "$work"/wheels/divprune_ext-*.whl)"
echo "$(basename "$wheel") built in $((SECONDS - start)) s"

echo "== install in a fresh virtual environment"
(cd "$work" && "$venv_py" -m pip install --quiet "$wheel") > "$work/install.log" 2>&1 || { cat "$work/install.log"; exit 1; }
cd "$work"
"$venv_py" - "$work/venv" <<'PY'
import os, sys
import torch
import divprune_ext

here = os.path.realpath(os.path.dirname(divprune_ext.__file__))
assert here.startswith(os.path.realpath(sys.argv[1])), f"imported {here}, not the fresh install"
x = torch.randn(200, 32)
idx = torch.ops.divprune.select(x, 20)
assert idx.tolist() == divprune_ext.reference.select(x, 20).tolist(), "select differs from the reference"
assert divprune_ext.cuda_available(), "installed without its CUDA kernels"
print(f"divprune_ext {divprune_ext.__version__} (torch {torch.__version__}): select on the CPU matches "
      f"the reference; cuda_available() = {divprune_ext.cuda_available()}")
PY
echo "sdist check passed"
