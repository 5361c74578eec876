#!/usr/bin/env bash
# Everything a GPU run must prove: build, the full test suite, compute-sanitizer
# (memcheck + racecheck) over every kernel, the benchmark with CUDA graphs, the
# ragged-batch (select_varlen) table and the end-to-end prefill. Results go to $OUT
# (default bench/out/gpu): 8 files at most, so a remote runner that returns a folder
# of limited size brings them all back.
#   bash bench/gpu_check.sh                  # every stage: build test sanitize bench
#   bash bench/gpu_check.sh build test       # some stages (each call must fit 10 minutes)
#   SKIP_E2E=1 bash bench/gpu_check.sh bench # the benchmark without the 7B prefills
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
stages="${*:-build test sanitize bench}"
status=0
export FORCE_CUDA=1 DIVPRUNE_PTXAS_VERBOSE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

for stage in $stages; do
  echo "== $stage ($(date -u +%H:%M:%S))" | tee -a "$OUT/summary.txt"
  case "$stage" in
    build)
      { nvidia-smi; nvcc --version; "$PY" -c "import torch; print('torch', torch.__version__)"; } > "$OUT/build.log" 2>&1
      if ! "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
        tail -40 "$OUT/build.log"
        exit 1
      fi
      grep -E "Compiling entry|registers|spill" "$OUT/build.log" | tail -60 >> "$OUT/summary.txt" || true
      ;;
    test)
      # The kernels on the CPU host runtime are CI's part (every change); here the GPU runs them.
      "$PY" -m pytest python_tests -q -rs --ignore=python_tests/test_kernels_on_cpu.py > "$OUT/tests.log" 2>&1 || status=1
      tail -15 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
      ;;
    sanitize)
      : > "$OUT/sanitizer.log"
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" bench/sanitize_kernels.py >> "$OUT/sanitizer.log" 2>&1
        rc=$?
        echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer.log" | tail -1)" \
          | tee -a "$OUT/summary.txt"
        [ $rc -eq 0 ] || status=1
      done
      ;;
    bench)
      e2e="--e2e"
      [ -n "${SKIP_E2E:-}" ] && e2e=""
      "$PY" -m bench --device cuda --graph $e2e --out-dir "$OUT" > "$OUT/bench.log" 2>/dev/null || status=1
      # The ragged-batch table: select_varlen vs a loop of select vs the padded call.
      "$PY" -m bench.varlen --device cuda >> "$OUT/bench.log" 2>/dev/null || status=1
      tee -a "$OUT/summary.txt" < "$OUT/bench.log"
      ;;
    *)
      echo "unknown stage $stage (build, test, sanitize, bench)" >&2
      exit 2
      ;;
  esac
done
exit $status

# Not a stage (it needs a vLLM install with divprune_ext and a checkpoint): the vLLM serving
# benchmark, prompt tokens / KV blocks / TTFT / requests/s at keep ratios 1.0, 0.25, 0.1, from the
# repository root in that Python (writes bench/out/serving/; CPU results: bench/results/cpu-vllm/):
#   python -m bench.serving --model llava-hf/llava-1.5-7b-hf
