#!/usr/bin/env python3
"""Mutation testing of the CUDA kernels on the host SIMT runtime.

Each mutant is a copy of csrc/kernels/ with one line changed: a missing barrier,
an off-by-one, a dropped check. The kernel tests (python_tests/test_kernels_on_cpu.py,
which run the kernels on the CPU) must fail on every one of them; a mutant that
passes is a hole in the tests. Run it after every kernel change:

    python3 scripts/mutants.py            # all mutants, 2 at a time
    python3 scripts/mutants.py -j 4 tile-edge-load greedy-extra-candidate
    python3 scripts/mutants.py --check    # is the recorded run for these sources? (CI)

Prints a table (mutant, the first test that failed, seconds) and exits 1 if any
mutant survived, 2 if a mutation no longer applies (the kernel source changed:
update its `before` text) or a mutant breaks the build instead of a test. A full run that catches every mutant writes
scripts/mutants.record: a hash of the kernels, the runtime and the kernel tests,
and the table (docs/testing.md shows the same table). CI checks both, so a change to
any of them lands only with a fresh passing run.
"""
import argparse
import concurrent.futures
import dataclasses
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "csrc", "kernels")
TESTS = os.path.join(ROOT, "python_tests", "test_kernels_on_cpu.py")
RECORD = os.path.join(ROOT, "scripts", "mutants.record")


@dataclasses.dataclass
class Mutant:
    name: str
    file: str    # in csrc/kernels/
    before: str  # must occur exactly once; only one of its lines changes
    after: str
    breaks: str  # what the change does to the kernel
    # A pytest -k expression: the tests aimed at this code, run first so that a catch
    # there skips the rest of the file; if they all pass, the whole file runs.
    first: str = ""


MUTANTS = [
    Mutant("staging-barrier", "distance_tiles.cuh",
           "      if (has_next) store_stage(st, smem, buf ^ 1);\n      __syncthreads();\n",
           "      if (has_next) store_stage(st, smem, buf ^ 1);\n",
           "tensor cores: no barrier after staging the next operand buffer"),
    Mutant("fma-consumed-barrier", "distance_tiles.cuh",
           "      __syncthreads();  // previous stage fully consumed\n", "",
           "FMA core: a stage is overwritten while other threads still read it"),
    Mutant("fma-loaded-barrier", "distance_tiles.cuh",
           "      }\n      __syncthreads();\n#pragma unroll\n      for (int c = 0; c < kStage; ++c) {",
           "      }\n#pragma unroll\n      for (int c = 0; c < kStage; ++c) {",
           "FMA core: products start before the stage is in shared memory"),
    Mutant("block-max-parity", "greedy_select.cuh",
           "pick = key_index(block_max(key, slots, (step + 1) & 1));",
           "pick = key_index(block_max(key, slots, 0));",
           "greedy: block_max reuses one slot buffer"),
    Mutant("block-max-unwritten-slots", "greedy_select.cuh",
           "key = lane < warps ? slots[parity][lane] : 0;", "key = slots[parity][lane];",
           "greedy: reads the slots of warps that do not exist"),
    Mutant("tile-edge-load", "distance_tiles.cuh",
           "smem.a[c][r] = (in_k && ra < job.rows)", "smem.a[c][r] = (in_k && ra <= job.rows)",
           "FMA core: loads one row past M"),
    Mutant("tile-edge-epilogue", "distance_tiles.cuh",
           "if (j >= M || (diagonal && c < r)) continue;", "if (j > M || (diagonal && c < r)) continue;",
           "epilogue: writes one column past M"),
    Mutant("tile-edge-vector-load", "distance_tiles.cuh",
           "if (row < job.rows && aligned && feature + kVec <= job.k_end) {",
           "if (aligned && feature + kVec <= job.k_end) {",
           "tensor cores: 16-byte loads of rows past M"),
    Mutant("misaligned-vector-load", "distance_tiles.cuh",
           "const bool aligned = job.dim % kVec == 0 && reinterpret_cast<uintptr_t>(xb) % 16 == 0;",
           "const bool aligned = job.dim % kVec == 0;",
           "tensor cores: 16-byte loads from a misaligned input", first="misaligned"),
    Mutant("split-last-arrival", "distance_tiles.cuh",
           "  if (!is_last) return false;\n", "",
           "split-D: every split thinks it arrived last"),
    Mutant("split-arrival-barrier", "distance_tiles.cuh",
           "  __threadfence();  // this split's partial is visible to the last one before it counts\n  __syncthreads();\n",
           "  __threadfence();  // this split's partial is visible to the last one before it counts\n",
           "split-D: a CTA counts itself done before all its threads stored their partials"),
    Mutant("launch-batch-offset", "distance_tiles.cuh",
           "const int64_t item = batch0 + blockIdx.z / splits;", "const int64_t item = blockIdx.z / splits;",
           "tile launches after the first recompute the first items"),
    Mutant("split-sum-order", "distance_tiles.cuh",
           "for (int s = 0; s < splits; ++s) sum +=", "for (int s = 1; s < splits; ++s) sum +=",
           "split-D: the first chunk's partial is left out"),
    Mutant("chunk-reset", "distance_tiles.cuh",
           "    for (int64_t k0 = job.k_begin; k0 < job.k_end; k0 += kStage) {\n      if (k0 % kChunkFeatures == 0) {",
           "    for (int64_t k0 = job.k_begin; k0 < job.k_end; k0 += kStage) {\n      if (k0 == job.k_begin) {",
           "FMA core: a chunk's sum starts from the previous chunk's"),
    Mutant("last-chunk-fold", "distance_tiles.cuh",
           "return (k0 + stage) % kChunkFeatures == 0 || k0 + stage >= job.k_end;",
           "return (k0 + stage) % kChunkFeatures == 0;",
           "the last, partial chunk is never added to the total"),
    Mutant("epilogue-barrier", "distance_tiles.cuh",
           "  uint32_t* row_min = row_min_bits + job.row_base;\n\n  __syncthreads();\n",
           "  uint32_t* row_min = row_min_bits + job.row_base;\n\n",
           "epilogue: converts the staging tile before every thread stored into it"),
    Mutant("row-min-diagonal", "distance_tiles.cuh",
           "if (c != r || !diagonal) m = min(m, min_key(v));", "m = min(m, min_key(v));",
           "a row's distance to itself counts as its nearest neighbour"),
    Mutant("row-norm-bound", "row_norms.cuh",
           "for (int64_t d = lane; d < dim; d += 32) {", "for (int64_t d = lane; d <= dim; d += 32) {",
           "row norms read one feature past D"),
    Mutant("greedy-extra-candidate", "greedy_select.cuh",
           "      if (i < rows) {\n        const float d = pick_row[i];",
           "      if (i <= rows) {\n        const float d = pick_row[i];",
           "greedy: reads one candidate too many"),
    Mutant("greedy-repick", "greedy_select.cuh",
           "      if (i == pick) picked |= uint64_t(1) << n;\n", "",
           "greedy: picked candidates are not marked"),
    Mutant("greedy-last-step", "greedy_select.cuh",
           "if (step + 1 == k) break;", "if (step == k) break;",
           "greedy: writes one pick past k"),
    Mutant("greedy-nan-minimum", "greedy_select.cuh",
           "const float m = d < min_distance[n] ? d : min_distance[n];",
           "const float m = !(d >= min_distance[n]) ? d : min_distance[n];",
           "greedy: a NaN distance enters the running minimum (the CPU op skips it)", first="nan"),
    Mutant("nan-row-minimum", "common.cuh",
           "return isnan(f) ? 0u : ordered_bits(f);", "return ordered_bits(f);",
           "NaN distances no longer make a row's minimum NaN", first="nan"),
    Mutant("varlen-segment-start", "distance_tiles.cuh",
           "job.row_base = table.row_start[segment];", "job.row_base = table.row_start[segment] + 1;",
           "varlen: a segment's tiles read its rows from one past its start", first="varlen"),
    Mutant("varlen-pick-offset", "greedy_select.cuh",
           "rows, k, first_row,", "rows, k, first_row + 1,",
           "varlen: a segment's picks are numbered from one past its start row", first="varlen"),
    Mutant("varlen-segment-leak", "distance_tiles.cuh",
           "job.rows = table.row_start[segment + 1] - table.row_start[segment];",
           "job.rows = table.row_start[segment + 1] - table.row_start[segment] + 1;",
           "varlen: a segment's distances take in the next segment's first row", first="varlen"),
    Mutant("varlen-segment-k", "greedy_select.cuh",
           "const int k = int(table.pick_start[segment + 1] - table.pick_start[segment]);",
           "const int k = int(table.pick_start[1] - table.pick_start[0]);",
           "varlen: every segment selects segment 0's k", first="varlen"),
    Mutant("varlen-tile-owner", "distance_tiles.cuh",
           "if (table.tile_start[mid] <= tile) lo = mid;", "if (table.tile_start[mid] < tile) lo = mid;",
           "varlen: a segment's first tile is computed as its predecessor's", first="varlen"),
    Mutant("varlen-table-chunk", "segment_table.cuh",
           "table[chunk.first + i] = chunk.values[i];", "table[i] = chunk.values[i];",
           "varlen: table launches after the first overwrite the first one's values", first="varlen"),
]


def mutate(mutant: Mutant, into: str) -> None:
    """Copies csrc/kernels/ to into/kernels/ with the mutation applied."""
    target = os.path.join(into, "kernels")
    shutil.copytree(KERNELS, target)
    path = os.path.join(target, mutant.file)
    with open(path) as f:
        source = f.read()
    if source.count(mutant.before) != 1:
        raise LookupError(f"mutant {mutant.name}: its `before` text occurs {source.count(mutant.before)} times in "
                          f"{mutant.file} (the kernel changed: update the mutant)")
    with open(path, "w") as f:
        f.write(source.replace(mutant.before, mutant.after))


def run(mutant: Mutant):
    """(caught, the first failing test or the reason it survived, seconds)."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        mutate(mutant, tmp)
        env = dict(os.environ, DIVPRUNE_SIMT_KERNELS=tmp, DIVPRUNE_REQUIRE_SIMT="1")
        for selection in ([["-k", mutant.first]] if mutant.first else []) + [[]]:
            result = subprocess.run([sys.executable, "-m", "pytest", TESTS, "-x", "-q", "-p", "no:cacheprovider",
                                     *selection], cwd=ROOT, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                break
    failed = re.search(r"^FAILED \S+::(\S+)", result.stdout, re.M)
    if result.returncode == 0:
        return False, "survived: every kernel test passed", time.time() - start
    if not failed:  # the mutant did not build, or a fixture broke: it proves nothing
        raise RuntimeError(f"mutant {mutant.name}: no test failed, pytest exit {result.returncode}:\n"
                           f"{result.stdout[-3000:]}")
    return True, failed.group(1), time.time() - start


def sources_hash() -> str:
    """What a mutation run vouches for: the kernels, the host runtime, the kernel tests (and the
    helpers they check with) and this script."""
    files = sorted(glob.glob(os.path.join(KERNELS, "*")) + glob.glob(os.path.join(ROOT, "csrc", "simt", "*")))
    files += [TESTS, os.path.join(ROOT, "python_tests", "simt_kernels.py"),
              os.path.join(ROOT, "python_tests", "helpers.py"), os.path.abspath(__file__)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def check_record() -> int:
    lines = open(RECORD).readlines() if os.path.exists(RECORD) else ["sources (none)\n"]
    recorded = lines[0].split()[-1]
    if recorded != sources_hash():
        print(f"scripts/mutants.record is for other sources ({recorded[:12]}, now {sources_hash()[:12]}): the "
              "kernels, the host runtime or the kernel tests changed; run `python3 scripts/mutants.py` and commit "
              "scripts/mutants.record", file=sys.stderr)
        return 1
    with open(os.path.join(ROOT, "docs", "testing.md")) as f:
        if "".join(lines[1:]) not in f.read():
            print("docs/testing.md's mutation table differs from scripts/mutants.record: copy the table over",
                  file=sys.stderr)
            return 1
    print("scripts/mutants.record matches the kernels, the runtime, the kernel tests and docs/testing.md")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="check that scripts/mutants.record is for these sources")
    args = parser.parse_args()
    if args.check:
        return check_record()
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.file:20} {m.breaks}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:  # every mutation still applies, before spending time
        for m in chosen:
            try:
                mutate(m, os.path.join(tmp, m.name))
            except LookupError as error:
                print(error, file=sys.stderr)
                return 2

    print(f"{'mutant':28} {'caught by':58} {'s':>5}")
    survivors, table = 0, ["| mutant | what it breaks | first test that failed |", "| --- | --- | --- |"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        try:
            for m, (caught, by, seconds) in zip(chosen, pool.map(run, chosen)):
                survivors += not caught
                print(f"{m.name:28} {by:58} {seconds:5.0f}", flush=True)
                table.append(f"| `{m.name}` | {m.breaks} | `{by}` |")
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 2
    print(f"{len(chosen) - survivors} of {len(chosen)} mutants caught")
    if survivors:
        return 1
    if len(chosen) == len(MUTANTS):
        with open(RECORD, "w") as f:
            f.write(f"sources {sources_hash()}\n" + "\n".join(table) + "\n")
        print("wrote scripts/mutants.record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
