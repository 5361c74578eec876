"""The benchmark suite's own code, on the CPU with tiny shapes and models, so that a
run of `bash bench/gpu_check.sh` on a GPU never meets it untried."""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch

import divprune_ext
from bench import e2e, run
from bench.seed_loop import seed_loop_select


def run_bench(tmp_path, *extra):
    run.main(["--device", "cpu", "--budget", "0", "--min-reps", "2", "--no-plot", "--out-dir", str(tmp_path),
              *extra])
    with open(tmp_path / "bench_results.json") as f:
        return json.load(f)


def test_bench_json_covers_every_case_and_checks_picks(tmp_path, capsys):
    result = run_bench(tmp_path, "--shapes", "1x40x8,3x30x8", "--dtypes", "fp32,bf16", "--ratios", "0.1,0.5")
    rows = result["results"]
    assert result["environment"]["device"] == "cpu"
    cases = {(r["shape"], r["dtype"], r["keep_ratio"]) for r in rows}
    assert len(cases) == 2 * 2 * 2
    for r in rows:
        assert r["k"] == divprune_ext.keep_count(r["M"], r["keep_ratio"])
        assert r["reps"] >= 2 and 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"]
        if r["impl"] in ("divprune_ext", "reference"):
            assert r["same_picks_as_reference"] is True  # the CPU op is bit-identical to the reference
        if r["impl"] == "reference":
            assert r["speedup_vs_reference"] == 1.0
    seed = [r for r in rows if r["impl"] == "seed loop"]
    assert seed and all(r["B"] == 1 for r in seed)  # the seed snippet is batch size 1
    assert "vs reference" in capsys.readouterr().out
    summary = (tmp_path / "bench_summary.md").read_text()
    assert "| 1×40×8 (4) |" in summary and "| 3×30×8 (3) |" in summary and "fp32, keep 10%" in summary


def test_seed_loop_is_a_faithful_baseline():
    # Random inputs have no duplicate rows, where the seed snippet and the exact
    # algorithm agree.
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seed_loop_select(x, 12), divprune_ext.reference.select(x, 12))


def test_a_failing_implementation_is_reported_not_fatal(tmp_path, monkeypatch, capsys):
    def broken(x, k):
        raise RuntimeError("boom")

    monkeypatch.setitem(run.IMPLEMENTATIONS, "broken", broken)
    rows = run_bench(tmp_path, "--shapes", "1x20x4", "--dtypes", "fp32", "--ratios", "0.25",
                    "--impls", "reference,broken,divprune_ext")["results"]
    assert [r["impl"] for r in rows] == ["reference", "broken", "divprune_ext"]
    assert rows[1]["error"] == "RuntimeError: boom" and rows[1]["speedup_vs_reference"] is None
    assert "median_us" in rows[0] and "median_us" in rows[2]
    assert "failed" in capsys.readouterr().out
    assert "Failed: broken on 1x20x4 fp32: RuntimeError: boom" in (tmp_path / "bench_summary.md").read_text()


def test_bad_shape_is_one_line_error():
    with pytest.raises(SystemExit, match="bad shape '1x0x8'"):
        run.parse_shape("1x0x8")


transformers = pytest.importorskip("transformers", reason="e2e needs transformers")


def tiny_llama_config():
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, vocab_size=100, max_position_embeddings=512)


def test_e2e_prefill_runs_on_a_tiny_model():
    rows = e2e.prefill_benchmark("cpu", visual_counts=(40, 90), text_tokens=8, config=tiny_llama_config(),
                                 dtype=torch.float32, reps=2)
    assert [r["kept"] for r in rows] == [4, 9]
    for r in rows:
        assert r["prefill_full_ms"] > 0 and r["prefill_pruned_ms"] > 0 and r["select_ms"] > 0
        assert r["select_pct_of_pruned_prefill"] == pytest.approx(100 * r["select_ms"] / r["prefill_pruned_ms"])


def test_e2e_llava_prefill_runs_on_a_tiny_model():
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=7)
    config = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=tiny_llama_config().to_dict(),
                                      image_token_id=99, vision_feature_layer=-1)
    row = e2e.llava_prefill_benchmark("cpu", keep_ratio=0.25, text_tokens=8, config=config, dtype=torch.float32,
                                      reps=2)
    assert (row["visual_tokens"], row["kept"]) == (16, 4)
    assert min(row["prefill_full_ms"], row["prefill_with_helper_ms"], row["llm_prefill_pruned_ms"]) > 0


def test_e2e_full_size_models_skip_without_a_gpu(capsys):
    assert e2e.prefill_benchmark("cpu") is None
    assert e2e.llava_prefill_benchmark("cpu") is None
    assert "needs a GPU" in capsys.readouterr().out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules of the test suite: python_tests itself and what its folders put on sys.path by name.
TEST_SUITE = {"python_tests", "hf_tiny", "helpers", "simt_kernels", "checkpoints", "harness", "engine_runs"}


def test_tools_and_package_do_not_import_the_test_suite():
    """The arrows run from the tests to the code, never back: bench/ and divprune_ext/ take what they
    share with the tests from divprune_ext.testing."""
    offenders = []
    for folder in ("bench", "divprune_ext"):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                    offenders += [f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {m}" for m in modules
                                  if m.split(".")[0] in TEST_SUITE]
    assert offenders == []


def test_serving_builds_its_random_checkpoint_without_vllm(tmp_path):
    """bench.serving's random LLaVA-1.5-shaped checkpoint (its pieces from divprune_ext.testing) saves
    as vLLM loads it and gives 576 image tokens an image; a fresh Python, since importing bench.serving
    moves the repository root to the end of sys.path where divprune_ext is installed."""
    code = ("import sys\n"
            "from bench import serving\n"
            "args = serving.parse_args(['--quick'])\n"
            "requests = serving.Requests('USER: <image>\\nhello ASSISTANT:', args.image_size)(0.25, 2)\n"
            "assert [r['mm_processor_kwargs'] for r in requests] == [{'divprune_keep_ratio': 0.25}] * 2\n"
            "print(serving.build(args, sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    path = done.stdout.strip().splitlines()[-1]
    from PIL import Image
    from safetensors import safe_open

    from divprune_ext.testing import pixels
    names = []
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                names += list(f.keys())
    assert any("vision_tower.vision_model." in n for n in names)  # renamed as vLLM's CLIP loads them
    processor = transformers.AutoProcessor.from_pretrained(path)
    inputs = processor(images=Image.fromarray(pixels((336, 336), 0)), text="USER: <image>\nhello ASSISTANT:",
                       return_tensors="pt")
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs["input_ids"] == image_token).sum().item() == 576


def test_sweep_percentiles_and_cells():
    """The sweep's p50 / p99 are nearest-rank (p99 of a small cell is its slowest request) and every
    cell has at least 8 requests."""
    from bench.serving_sweep import cell_requests, percentile
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0 and percentile(values, 99) == 5.0 and percentile(values, 1) == 1.0
    assert percentile(list(range(1, 201)), 99) == 198
    assert [cell_requests(c, 2) for c in (1, 4, 16)] == [8, 8, 32]


def test_sweep_arguments():
    code = ("from bench import serving\n"
            "args = serving.parse_args(['--sweep', '--concurrency', '2,8'])\n"
            "print(args.sweep, args.concurrency, args.sweep_requests)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "[2,", "8]", "2"]
    bad = subprocess.run([sys.executable, "-m", "bench.serving", "--sweep", "--concurrency", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--concurrency" in bad.stderr
