#!/usr/bin/env python3
"""Break the vLLM plugin on purpose and check that its tests fail.

Each mutant changes one line of the plugin as installed in the vLLM test environment (the
wheel that scripts/vllm_env.sh installs; the source tree is not touched) and runs the vLLM tests
that must catch it; the installed file is restored afterwards. Run it after the environment is
set up (minutes per mutant: each runs engines):

    DIVPRUNE_VLLM_SETUP_ONLY=1 bash scripts/vllm_env.sh
    .venv-vllm/bin/python -P scripts/vllm_mutants.py [names...]

Prints a table (mutant, caught or not, seconds); exits 1 if any mutant survived, 2 if a
mutation no longer applies.
"""
import dataclasses
import importlib.util
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The engine tests first (the first test that fails is reported), then the position unit tests.
QWEN = ["python_tests/vllm/test_families.py", "python_tests/vllm/test_positions.py", "-k",
        "positions or offsets or (qwen2_vl and (pruned or placeholder or two_items))"]


@dataclasses.dataclass
class Mutant:
    name: str
    file: str      # in divprune_ext/vllm/
    before: str    # must occur exactly once
    after: str
    breaks: str
    tests: list = dataclasses.field(default_factory=lambda: QWEN)


MUTANTS = [
    Mutant("wrong-k-placeholders", "core.py", "return ids[:divprune_ext.keep_count(len(ids), ratio)]",
           "return ids[:divprune_ext.keep_count(len(ids), ratio) + 1]", "one placeholder too many per item"),
    Mutant("wrong-k-selected", "core.py",
           "counts = [divprune_ext.keep_count(len(item), r) for item, r in zip(items, ratios)]",
           "counts = [max(1, divprune_ext.keep_count(len(item), r) - 1) for item, r in zip(items, ratios)]",
           "one token too few selected per item"),
    Mutant("order-not-kept", "core.py", "sorted=True,\n", "sorted=False,\n",
           "kept tokens in selection order instead of their original order"),
    Mutant("positions-not-restored", "core.py",
           "positions = positions.index_add(1, rows, offsets.t().to(positions.device, positions.dtype))",
           "positions = positions", "kept tokens all at their item's start position"),
    Mutant("text-positions-renumbered", "core.py", "next_position = start + int(grid.max()) + 1",
           "next_position = start + k", "text after a pruned item numbered as if the item had k tokens"),
    Mutant("ratio-ignored-by-model", "core.py", "ratios = ratios_from_bits(bits)",
           "ratios = [1.0] * len(ratios_from_bits(bits))", "the model keeps every token (placeholders pruned)"),
]


def installed_plugin() -> str:
    spec = importlib.util.find_spec("divprune_ext")
    if spec is None or not spec.origin.startswith(sys.prefix):
        sys.exit("run with the vLLM environment's python (divprune_ext installed there): see the docstring")
    return os.path.join(os.path.dirname(spec.origin), "vllm")


def run(mutant: Mutant, folder: str):
    path = os.path.join(folder, mutant.file)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    if original.count(mutant.before) != 1:
        return "does not apply", 0.0
    start = time.time()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(mutant.before, mutant.after))
        done = subprocess.run([sys.executable, "-P", "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q",
                               *mutant.tests], cwd=ROOT, capture_output=True, text=True)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    failed = [line.split(" ")[1] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return ("caught: " + failed[0]) if done.returncode != 0 and failed else "SURVIVED", time.time() - start


def main() -> int:
    folder = installed_plugin()
    chosen = [m for m in MUTANTS if not sys.argv[1:] or m.name in sys.argv[1:]]
    status = 0
    print("| mutant | what it breaks | result | s |\n| --- | --- | --- | --- |")
    for mutant in chosen:
        result, seconds = run(mutant, folder)
        status = max(status, 2 if result == "does not apply" else 1 if result == "SURVIVED" else 0)
        print(f"| {mutant.name} | {mutant.breaks} | {result} | {seconds:.0f} |", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
