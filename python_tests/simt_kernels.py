"""The CUDA kernels on the CPU: builds csrc/simt/kernel_runner (the kernel headers on
the host SIMT runtime, with AddressSanitizer and UBSan) and runs it on tensors.

The runner is a standalone program without torch, so the sanitizers see only the
kernels and the runtime. It is built once per source version under ``build/simt/``. ``DIVPRUNE_SIMT_KERNELS=DIR`` builds it from ``DIR/kernels/``
instead of ``csrc/kernels/`` (scripts/mutants.py uses it for mutated copies).
Without a C++ compiler or CUDA's headers the kernel tests skip, unless
``DIVPRUNE_REQUIRE_SIMT=1`` (CI sets it) makes that an error.
"""
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FLAGS = ["-std=c++17", "-O2", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-strict-aliasing", "-ffp-contract=off"]
RUNTIME_SOURCES = ["runtime.cpp", "self_test.cpp"]  # kernel_runner.cpp includes the kernels
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# The runner's default device: an H100 (132 SMs, sm_90 code loaded).
DEFAULT_SMS, DEFAULT_PTX = 132, 90
MAX_GRID_Z = 65_535


def _cuda_include() -> Optional[str]:
    """A folder with cuda_fp16.h and vector_types.h: the toolkit's, else the one in
    torch's CUDA wheels (nvidia/cu*/include)."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/include")
    for path in sys.path:
        candidates += sorted(glob.glob(os.path.join(path, "nvidia", "cu*", "include")))
    for folder in candidates:
        if all(os.path.exists(os.path.join(folder, h)) for h in ("cuda_fp16.h", "cuda_bf16.h", "vector_types.h")):
            return folder
    return None


def _unavailable(reason: str):
    if os.environ.get("DIVPRUNE_REQUIRE_SIMT", "0") not in ("", "0"):
        pytest.fail(f"the host SIMT runtime can't be built: {reason}")
    pytest.skip(f"the host SIMT runtime can't be built: {reason}")


def kernels_root() -> str:
    """The folder whose kernels/ subfolder holds the kernel headers to test."""
    return os.environ.get("DIVPRUNE_SIMT_KERNELS") or CSRC


def _digest(*parts, files=()) -> str:
    digest = hashlib.sha256(" ".join(parts).encode())
    for path in files:
        digest.update(path.encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _compile(command, output):
    temporary = f"{output}.{os.getpid()}.tmp"  # parallel builds of one file each write their own
    result = subprocess.run([*command, "-o", temporary], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the kernel runner failed:\n{' '.join(command)}\n{result.stderr[-5000:]}")
    os.replace(temporary, output)  # atomic


def _sanitizers_link(compiler: str) -> bool:
    """Whether the compiler has the sanitizer runtimes (some distributions package them apart)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([compiler, *FLAGS, "-x", "c++", "-", "-o", os.path.join(tmp, "probe")],
                                input="int main() { return 0; }\n", capture_output=True, text=True)
    return result.returncode == 0


def build_runner() -> str:
    """Compiles the kernel runner if this version of its sources isn't built yet. The
    runtime's objects are built once; only kernel_runner.cpp, which includes the
    kernels, is compiled per kernel version (each mutant of scripts/mutants.py)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    include = _cuda_include()
    if not compiler:
        _unavailable("no C++ compiler (set CXX)")
    if not include:
        _unavailable("CUDA's cuda_fp16.h not found (install the CUDA toolkit or set CUDA_HOME)")
    root = kernels_root()
    simt_files = sorted(glob.glob(os.path.join(CSRC, "simt", "*")))
    kernel_files = sorted(glob.glob(os.path.join(root, "kernels", "*")))
    compile_flags = [*FLAGS, f"-I{root}", f"-I{CSRC}", f"-I{include}"]
    build = os.path.join(ROOT, "build", "simt")
    runner_dir = os.path.join(build, "runner-" + _digest(compiler, *compile_flags, files=simt_files + kernel_files))
    runner = os.path.join(runner_dir, "kernel_runner")
    if os.path.exists(runner):
        return runner
    if not _sanitizers_link(compiler):
        _unavailable(f"{compiler} cannot link -fsanitize=address,undefined programs (install libasan / libubsan)")

    objects_dir = os.path.join(build, "runtime-" + _digest(compiler, *FLAGS, include, files=simt_files))
    objects = [os.path.join(objects_dir, name + ".o") for name in RUNTIME_SOURCES]
    os.makedirs(objects_dir, exist_ok=True)
    for name, obj in zip(RUNTIME_SOURCES, objects):
        if not os.path.exists(obj):
            _compile([compiler, *FLAGS, f"-I{CSRC}", f"-I{include}", "-c", os.path.join(CSRC, "simt", name)], obj)
    os.makedirs(runner_dir, exist_ok=True)
    _compile([compiler, *compile_flags, os.path.join(CSRC, "simt", "kernel_runner.cpp"), *objects], runner)
    return runner


class KernelError(RuntimeError):
    """The runner stopped: a sanitizer report or a check of the SIMT runtime."""


@dataclasses.dataclass
class KernelRun:
    plan: dict
    dist: Optional[torch.Tensor] = None      # (B, M, M) float32
    row_min: Optional[torch.Tensor] = None   # (B, M) float32, decoded from the kernels' keys
    picks: Optional[torch.Tensor] = None     # (B, k) int64


def decode_min_keys(keys: torch.Tensor) -> torch.Tensor:
    """The kernels' row-minimum keys (kernels/common.cuh: min_key), read as int32, as
    float32; key 0 is NaN."""
    u = keys.to(torch.int64) & 0xFFFFFFFF
    bits = torch.where(u >= 2**31, u - 2**31, 0xFFFFFFFF - u)  # from_ordered_bits
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _run(runner: str, args, what: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=9",
               UBSAN_OPTIONS="print_stacktrace=1")
    result = subprocess.run([runner, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise KernelError(f"{what}: exit {result.returncode}\n{result.stderr[-6000:]}")
    return result


def _shape_args(batch, rows, dim, dtype, k, sms, ptx_version, max_threads, max_grid_z):
    args = ["--dtype", DTYPE_NAMES[dtype], "--batch", str(batch), "--rows", str(rows), "--dim", str(dim),
            "--sms", str(sms), "--ptx-version", str(ptx_version), "--max-threads", str(max_threads),
            "--max-grid-z", str(max_grid_z)]
    return args + (["--k", str(k)] if k else [])


def plan(runner: str, batch: int, rows: int, dim: int, dtype=torch.float32, k: int = 0, *, sms: int = DEFAULT_SMS,
         ptx_version: int = DEFAULT_PTX, max_threads: int = 1024, max_grid_z: int = MAX_GRID_Z) -> dict:
    """The launch plan and the launches, without running anything."""
    args = _shape_args(batch, rows, dim, dtype, k, sms, ptx_version, max_threads, max_grid_z) + ["--plan-only"]
    return json.loads(_run(runner, args, "kernel_runner --plan-only").stdout)


def run_kernels(runner: str, x: torch.Tensor, k: int = 0, *, sms: int = DEFAULT_SMS, ptx_version: int = DEFAULT_PTX,
                max_threads: int = 1024, max_grid_z: int = MAX_GRID_Z, seed: int = 0, offset: int = 0) -> KernelRun:
    """Runs the CUDA operators' kernels on x (M, D) or (B, M, D) on the host runtime:
    distances and row minima, and the greedy selection of k when k > 0.

    sms / ptx_version describe the device (they decide split-D and the tensor-core
    core), max_threads caps the greedy block (smaller values reach the wide greedy
    paths at small M), max_grid_z caps the items x splits of one tile launch (smaller
    values spread small batches over several launches), seed shuffles CTAs and thread
    interleavings (0: in order), offset places x that many elements into its buffer
    (offset % 8 != 0: misaligned).
    """
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    batch, rows, dim = x3.shape
    dtype = x3.dtype
    raw = x3.contiguous().cpu()
    raw = raw if dtype == torch.float32 else raw.view(torch.int16)
    with tempfile.TemporaryDirectory(prefix="simt-") as tmp:
        raw.numpy().tofile(os.path.join(tmp, "x"))
        out = os.path.join(tmp, "out")
        args = _shape_args(batch, rows, dim, dtype, k, sms, ptx_version, max_threads, max_grid_z)
        args += ["--seed", str(seed), "--offset", str(offset), "--input", os.path.join(tmp, "x"), "--out", out]
        result = _run(runner, args, f"kernel_runner {' '.join(args[:16])}")

        def read(suffix, dtype, shape):
            return torch.from_file(out + suffix, size=int(torch.Size(shape).numel()), dtype=dtype).view(shape).clone()

        run = KernelRun(plan=json.loads(result.stdout))
        run.dist = read(".dist", torch.float32, (batch, rows, rows))
        run.row_min = decode_min_keys(read(".rowmin", torch.int32, (batch, rows)))
        if k:
            run.picks = read(".picks", torch.int64, (batch, k))
    if x.dim() == 2:
        run.dist, run.row_min = run.dist[0], run.row_min[0]
        run.picks = run.picks[0] if k else None
    return run


@dataclasses.dataclass
class VarlenRun:
    plan: dict
    dist: list            # per segment (n_i, n_i) float32, from the packed workspace
    row_min: torch.Tensor  # (N,) float32, decoded from the kernels' keys
    picks: torch.Tensor    # (sum k_i,) int64: rows of x, each segment's in selection order


def _varlen_args(lengths, ks, dim, dtype, sms, ptx_version, max_threads, max_grid_z):
    return ["--dtype", DTYPE_NAMES[dtype], "--lengths", ",".join(map(str, lengths)), "--ks", ",".join(map(str, ks)),
            "--dim", str(dim), "--sms", str(sms), "--ptx-version", str(ptx_version), "--max-threads", str(max_threads),
            "--max-grid-z", str(max_grid_z)]


def plan_varlen(runner: str, lengths, ks, dim: int, dtype=torch.float32, *, sms: int = DEFAULT_SMS,
                ptx_version: int = DEFAULT_PTX, max_threads: int = 1024, max_grid_z: int = MAX_GRID_Z) -> dict:
    """select_varlen's launch plan and launches, without running anything."""
    args = _varlen_args(lengths, ks, dim, dtype, sms, ptx_version, max_threads, max_grid_z) + ["--plan-only"]
    return json.loads(_run(runner, args, "kernel_runner --lengths --plan-only").stdout)


def run_varlen_kernels(runner: str, x: torch.Tensor, lengths, ks, *, sms: int = DEFAULT_SMS,
                       ptx_version: int = DEFAULT_PTX, max_threads: int = 1024, max_grid_z: int = MAX_GRID_Z,
                       seed: int = 0, offset: int = 0) -> VarlenRun:
    """Runs the CUDA select_varlen's kernels on packed x (N, D) with segments of
    `lengths` rows and `ks` picks; the options are those of :func:`run_kernels`."""
    n, dim = x.shape
    raw = x.contiguous().cpu()
    raw = raw if x.dtype == torch.float32 else raw.view(torch.int16)
    with tempfile.TemporaryDirectory(prefix="simt-") as tmp:
        raw.numpy().tofile(os.path.join(tmp, "x"))
        out = os.path.join(tmp, "out")
        args = _varlen_args(lengths, ks, dim, x.dtype, sms, ptx_version, max_threads, max_grid_z)
        args += ["--seed", str(seed), "--offset", str(offset), "--input", os.path.join(tmp, "x"), "--out", out]
        result = _run(runner, args, f"kernel_runner {' '.join(args[:12])}")

        def read(suffix, dtype, count):
            return torch.from_file(out + suffix, size=count, dtype=dtype).clone()

        packed = read(".dist", torch.float32, sum(m * m for m in lengths))
        dist = [block.view(m, m) for block, m in zip(packed.split([m * m for m in lengths]), lengths)]
        return VarlenRun(plan=json.loads(result.stdout), dist=dist,
                         row_min=decode_min_keys(read(".rowmin", torch.int32, n)),
                         picks=read(".picks", torch.int64, sum(ks)))


def self_test(runner: str, name: str) -> subprocess.CompletedProcess:
    """Runs one of the runner's deliberately broken kernels (csrc/simt/self_test.cpp)."""
    return subprocess.run([runner, "--self-test", name], capture_output=True, text=True,
                          env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
