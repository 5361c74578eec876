#!/usr/bin/env python3
"""Break the vLLM plugin on purpose and check that its tests fail.

Each mutant changes one line of the plugin the tests import (the wheel that scripts/vllm_env.sh
installs in the vLLM test environment, or the copy first on PYTHONPATH: then that copy is
edited) and runs the vLLM tests that must catch it; the file is restored afterwards. Run it after
the environment is set up (minutes per mutant: each runs engines):
Each mutant changes one line of the plugin that the vLLM tests import (the copy of
``divprune_ext.vllm`` the interpreter finds: the wheel that scripts/vllm_env.sh installs, or
the one PYTHONPATH puts first, which may be the source tree) and runs the vLLM tests that must
catch it; the file is restored afterwards. Run it after the environment is
set up (minutes per mutant: each runs engines):
installs in the vLLM test environment, or the copy PYTHONPATH puts first: that one is the source
tree if it links there) and runs the vLLM tests that must catch it; the file is restored
afterwards. Run it after the environment is set up (minutes per mutant: each runs engines):

    DIVPRUNE_VLLM_SETUP_ONLY=1 bash scripts/vllm_env.sh
    .venv-vllm/bin/python -P scripts/vllm_mutants.py [names...]

Prints a table (mutant, caught or not, seconds); exits 1 if any mutant survived (or its control
tests, which must pass with it in, failed: they show which mode of the tests catches it), 2 if a
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
    # tests that must still pass with the mutant in: they show that `tests` catch it, not these
    control: list = dataclasses.field(default_factory=list)


GEMMA3 = ["python_tests/vllm/test_families.py", "python_tests/vllm/test_placeholders.py", "-k",
          "gemma3 and (pruned or placeholder)"]
# the engine tests with and without the graph-replay mode (the runner's position buffer reaches the decoder)
REPLAYED = ["python_tests/vllm/test_families.py", "-k", "qwen2_vl and replay and (pruned or two_items)"]
EAGER = ["python_tests/vllm/test_families.py", "-k", "qwen2_vl and not replay and (pruned or two_items)"]
GRAPH = ["python_tests/vllm/test_positions.py", "-k", "replayed_graph"]
GEMMA4 = ["python_tests/vllm/test_placeholders.py", "python_tests/vllm/test_families.py", "-k",
          "gemma4 and (pruned or placeholder or two_items or video)"]
QWEN3 = ["python_tests/vllm/test_families.py", "python_tests/vllm/test_placeholders.py",
         "python_tests/vllm/test_positions.py", "-k", "qwen3 and (pruned or placeholder or positions)"]
# the unit tests first (seconds), then the engines
INTERNVL = ["python_tests/vllm/test_placeholders.py", "python_tests/vllm/test_families.py", "-k",
            "internvl and (pruned or placeholder or keeps or selects)"]
MISTRAL3 = ["python_tests/vllm/test_placeholders.py", "python_tests/vllm/test_families.py", "-k",
            "mistral3 and (pruned or placeholder or puts or writes)"]

MEMORY = ["python_tests/vllm/test_memory.py"]
# the bookkeeping tests first (seconds), then the engines (GLM-4.1V: no test_positions case of its own)
GLM4V = ["python_tests/vllm/test_placeholders.py", "python_tests/vllm/test_families.py", "-k",
         "glm4v and (pruned or placeholder or two_items)"]
QWEN3_MOE = ["python_tests/vllm/test_placeholders.py", "python_tests/vllm/test_families.py", "-k",
             "qwen3_vl_moe and (pruned or placeholder or deepstack)"]
# Qwen3.5 (qwen3_5.py: which vLLM class, which pruning code): the tests without an engine
QWEN3_5 = ["python_tests/vllm/test_loading.py", "python_tests/vllm/test_placeholders.py",
           "python_tests/vllm/test_positions.py", "-k", "qwen3_5 or sits_on or before_vllms"]

MUTANTS = [
    Mutant("wrong-k-placeholders", "core.py", "out += ids[cursor:start] + [token] * k",
           "out += ids[cursor:start] + [token] * (k + 1)", "one placeholder too many per item"),
    Mutant("wrong-k-selected", "core.py",
           "counts = self.kept_per_run(modality, parts, ratio, type(self).__name__)",
           "counts = [max(1, c - 1) for c in self.kept_per_run(modality, parts, ratio, type(self).__name__)]",
           "one token too few selected per item"),
    Mutant("order-not-kept", "core.py", "sorted=True,", "sorted=False,",
           "kept tokens in selection order instead of their original order"),
    Mutant("positions-not-restored", "core.py", "positions.add_(self.position_offsets[:, :tokens])",
           "positions.add_(0 * self.position_offsets[:, :tokens])", "kept tokens all at their item's start position"),
    Mutant("positions-new-tensor", "core.py", "positions.add_(self.position_offsets[:, :tokens])",
           "positions = positions + self.position_offsets[:, :tokens]",
           "positions passed as a new tensor (a replayed graph reads the runner's buffer)", REPLAYED, EAGER),
    Mutant("positions-added-by-python", "core.py", "if positions.dim() == 2:",
           "if positions.dim() == 2 and bool(self.position_offsets.any()):",
           "the add runs only when Python sees offsets (a graph captured without them never adds them)",
           GRAPH, ["python_tests/vllm/test_positions.py", "-k", "offsets_ride"]),
    Mutant("text-positions-renumbered", "core.py",
           "full = self.full_span(feature, input_tokens[offset:offset + length])",
           "full = input_tokens[offset:offset + length]",
           "text after a pruned item numbered as if the item had k tokens"),
    Mutant("ratio-ignored-by-model", "core.py", "ratios = ratios_from_bits(bits)",
           "ratios = [1.0] * len(ratios_from_bits(bits))", "the model keeps every token (placeholders pruned)"),
    Mutant("rank-dependent-picks", "core.py",
           "local = local - start  # rows of `packed` -> the item's own token indices (ascending)",
           "local = (local - start + (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)) "
           "% len(items[i])", "tensor parallelism: rank 1 keeps the rows after the picks",
           ["python_tests/vllm/test_tensor_parallel.py"], ["python_tests/vllm/test_placeholders.py"]),
    Mutant("gemma3-crops-together", "gemma3.py", "return [rows // crops] * crops", "return [rows]",
           "Gemma 3: an image's crops selected together (the prompt keeps k per crop)", GEMMA3),
    Mutant("gemma3-crops-share-k", "gemma3.py", "return [divprune_ext.keep_count(n, ratio) for n in lengths]",
           "return [divprune_ext.keep_count(sum(lengths), ratio)] + [0] * (len(lengths) - 1)",
           "Gemma 3: one k for all crops, kept in the first crop's span", GEMMA3),
    Mutant("qwen3-deepstack-compared", "qwen_vl.py", "return item[:, :self.visual_dim]", "return item",
           "Qwen3-VL: DivPrune compares the deepstack columns too", QWEN3),
    Mutant("qwen3-video-per-frame", "qwen_vl.py", "counts = torch.bincount(picks // (h * w), minlength=t)",
           "counts = torch.bincount(picks % t, minlength=t)",
           "Qwen3-VL video: kept tokens put in the wrong frames", QWEN3),
    Mutant("qwen3-video-text-positions", "qwen_vl.py", "offsets[~is_token] = positions[:, ~was_token].t()",
           "offsets[~is_token] = 0", "Qwen3-VL video: its timestamps and markers at the video's start", QWEN3),
    Mutant("qwen3-video-text-not-embedded", "qwen_vl.py",
           "rows[(~is_token).to(item.device), :self.visual_dim] = self.get_language_model()",
           "rows[(~is_token).to(item.device), :0] = self.get_language_model()",
           "Qwen3-VL video: its timestamps and markers left as zero rows", QWEN3),
    Mutant("encoder-work-unbounded", "core.py",
           "groups = encoder_groups(ints_of(tokens[modality]), self.profiled_tokens())",
           "groups = encoder_groups(ints_of(tokens[modality]), 0)",
           "a call's pruned items encoded all at once, beyond the profiled work", MEMORY),
    Mutant("profile-without-selection", "core.py",
           "self._prune(list(items), [SMALLEST_RATIO] * len(ratios), modality, kwargs)", "pass",
           "the profile run does not measure the selection's workspace", MEMORY),
    Mutant("groups-read-the-whole-batch", "core.py",
           "out += self._prune(items, ratios[start:end], modality, batch)",
           "out += self._prune(items, ratios[start:end], modality, kwargs)",
           "a group's items read their grids from the whole call's kwargs (wrong items)", MEMORY),
    Mutant("groups-get-the-first-items", "core.py",
           "for item in items[start:end]])", "for item in items[:end - start]])",
           "every group encodes the call's first items", MEMORY),
    Mutant("gemma4-video-per-frame", "gemma4.py",
           "frame_of = torch.bucketize(picks, torch.tensor(frames).cumsum(0), right=True)",
           "frame_of = picks % len(frames)", "Gemma 4 video: kept tokens put in the wrong frames", GEMMA4),
    Mutant("gemma4-video-text-not-embedded", "gemma4.py",
           "rows[(~is_token).to(item.device)] = self.get_language_model().embed_input_ids(text).to(item.dtype)",
           "rows[(~is_token).to(item.device)] = 0", "Gemma 4 video: its timestamps and markers left as zero rows",
           GEMMA4),
    Mutant("gemma4-per-layer-inputs-from-prompt", "gemma4.py",
           "if ple_ids is not None and self.per_layer_embeddings is not None:", "if False:",
           "Gemma 4 video: per-layer inputs of the pruned prompt's ids, which lie elsewhere than the rows'",
           ["python_tests/vllm/test_families.py", "-k", "gemma4 and pruned"]),
    Mutant("gemma4-per-layer-inputs-of-placeholders", "gemma4.py",
           "return with_token_ids(rows, torch.where(is_token, 0, ids))", "return with_token_ids(rows, ids)",
           "Gemma 4 video: per-layer inputs of the video token id at kept tokens (transformers: padding)", GEMMA4),
    Mutant("gemma4-bidirectional-video-pruned", "gemma4.py", "if (ratio is not None and inputs.mm_data_items",
           "if (False and inputs.mm_data_items", "Gemma 4: videos pruned where vLLM's GPU attention would "
           "make the whole pruned span bidirectional", GEMMA4),
    Mutant("internvl-frames-together", "internvl.py", "return [rows // frames] * frames", "return [rows]",
           "InternVL video: its frames selected together (the prompt keeps k per frame)", INTERNVL),
    Mutant("internvl-frames-share-k", "internvl.py", "return [divprune_ext.keep_count(n, ratio) for n in lengths]",
           "return [divprune_ext.keep_count(sum(lengths), ratio)] + [0] * (len(lengths) - 1)",
           "InternVL video: one k for all frames, kept in the first frame's span", INTERNVL),
    Mutant("mistral3-rows-apart", "mistral3.py", "return kept_in_first_run(lengths, ratio)",
           "return [divprune_ext.keep_count(n, ratio) for n in lengths]",
           "Mistral 3: each row of an image selected apart", MISTRAL3),
    Mutant("mistral3-grid-transposed", "mistral3.py", "return int(height) // side, int(width) // side",
           "return int(width) // side, int(height) // side",
           "Mistral 3: rows and columns swapped (kept tokens before the wrong breaks)", MISTRAL3),
    Mutant("mistral3-breaks-last", "mistral3.py", "at_break = torch.searchsorted(row, each_row, right=True) + each_row",
           "at_break = each_row + len(picks); at_token = torch.arange(len(picks), device=item.device)",
           "Mistral 3: all kept tokens first, then the row breaks", MISTRAL3),
    Mutant("mistral3-end-as-break", "mistral3.py", "ids[-1] = end", "ids[-1] = row_break",
           "Mistral 3: the last row ends with [IMG_BREAK] instead of [IMG_END]", MISTRAL3),
    Mutant("qwen3-moe-without-deepstack", "qwen_vl.py",
           "class DivPruneQwen3VLMoe(Qwen3VLPruning, Qwen3VLMoeForConditionalGeneration):",
           "class DivPruneQwen3VLMoe(QwenVLPruning, Qwen3VLMoeForConditionalGeneration):",
           "Qwen3-VL-MoE pruned as Qwen2-VL (deepstack columns compared, videos per frame)", QWEN3_MOE),
    Mutant("glm4v-video-per-frame", "glm4v.py", "counts = torch.bincount(picks // (h * w), minlength=t)",
           "counts = torch.bincount(picks % t, minlength=t)", "GLM-4.1V video: kept tokens put in the wrong frames",
           GLM4V),
    Mutant("glm4v-video-text-positions", "glm4v.py", "offsets[~is_token] = positions[:, ~was_token].t()",
           "offsets[~is_token] = 0", "GLM-4.1V video: its timestamps and markers at the video's start", GLM4V),
    Mutant("glm4v-video-text-not-embedded", "glm4v.py",
           "rows[(~is_token).to(item.device)] = self.get_language_model()",
           "rows[(~is_token).to(item.device)] = 0 * self.get_language_model()",
           "GLM-4.1V video: its timestamps and markers left as zero rows", GLM4V),
    Mutant("glm4v-frames-one-run", "glm4v.py", "PlaceholderRange(offset, length, is_embed=is_embed)",
           "PlaceholderRange(offset, length, is_embed=None)",
           "GLM-4.1V video: positions as if its frames were one run (no text between them)", GLM4V),
    Mutant("qwen3_5-always-the-0.32-module", "qwen3_5.py",
           'importlib.util.find_spec("vllm.models.qwen3_5") is not None', "False",
           "Qwen3.5: vLLM 0.34's CUDA class (vllm.models.qwen3_5) not followed", QWEN3_5),
    Mutant("qwen3_5-vllm-class-first", "qwen3_5.py",
           "class DivPruneQwen3_5(Qwen3VLPruning, _vllm.Qwen3_5ForConditionalGeneration):",
           "class DivPruneQwen3_5(_vllm.Qwen3_5ForConditionalGeneration, Qwen3VLPruning):",
           "Qwen3.5: vLLM's forward / positions run instead of the plugin's", QWEN3_5),
    Mutant("qwen3_5-moe-on-the-dense-class", "qwen3_5.py",
           "class DivPruneQwen3_5Moe(Qwen3VLPruning, _vllm.Qwen3_5MoeForConditionalGeneration):",
           "class DivPruneQwen3_5Moe(Qwen3VLPruning, _vllm.Qwen3_5ForConditionalGeneration):",
           "Qwen3.5-MoE served by the dense class", QWEN3_5),
    Mutant("qwen3_5-videos-as-qwen2-vl", "qwen3_5.py", "from .qwen_vl import Qwen3VLPruning",
           "from .qwen_vl import QwenVLPruning as Qwen3VLPruning",
           "Qwen3.5: Qwen2-VL's pruning (no per-frame video runs)", QWEN3_5),
    Mutant("qwen3_5-qwen3-vl-processing", "qwen3_5.py", "from .qwen_vl import Qwen3VLPruning",
           "from .qwen_vl import DivPruneQwen3VL as Qwen3VLPruning",
           "Qwen3.5: the plugin's Qwen3-VL class (its processor, info for a Qwen3-VL config) as the base",
           QWEN3_5),
]


def installed_plugin() -> str:
    """The plugin's folder the tests import (PYTHONPATH first, else the installed wheel)."""
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("divprune_ext") is None:
        sys.exit("run with the vLLM environment's python (divprune_ext installed there): see the docstring")
    return os.path.dirname(importlib.util.find_spec("divprune_ext.vllm").origin)
    """The folder of the ``divprune_ext.vllm`` this interpreter imports (so do the tests it runs)."""
    spec = importlib.util.find_spec("divprune_ext.vllm")
    if spec is None:
        sys.exit("run with the vLLM environment's python (divprune_ext installed there): see the docstring")
    """The plugin folder the tests import: the installed copy, or the one PYTHONPATH puts first."""
    if importlib.util.find_spec("vllm") is None:
        sys.exit("run with the vLLM environment's python: see the docstring")
    spec = importlib.util.find_spec("divprune_ext.vllm")
    if spec is None:
        sys.exit("divprune_ext is not importable: install it in the vLLM environment (see the docstring)")
    return os.path.dirname(spec.origin)


def pytest(tests):
    return subprocess.run([sys.executable, "-P", "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q", *tests],
                          cwd=ROOT, capture_output=True, text=True)


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
        done = pytest(mutant.tests)
        control = pytest(mutant.control) if mutant.control else None
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    failed = [line.split(" ")[1] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    result = ("caught: " + failed[0]) if done.returncode != 0 and failed else "SURVIVED"
    if control is not None and control.returncode != 0:
        result += " (CONTROL FAILED: the control tests catch it too)"
    return result, time.time() - start


def main() -> int:
    folder = installed_plugin()
    chosen = [m for m in MUTANTS if not sys.argv[1:] or m.name in sys.argv[1:]]
    status = 0
    print("| mutant | what it breaks | result | s |\n| --- | --- | --- | --- |")
    for mutant in chosen:
        result, seconds = run(mutant, folder)
        status = max(status, 2 if result == "does not apply" else 1 if result == "SURVIVED" or "CONTROL" in result else 0)
        print(f"| {mutant.name} | {mutant.breaks} | {result} | {seconds:.0f} |", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
