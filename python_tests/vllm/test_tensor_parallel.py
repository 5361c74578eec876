"""The plugin under tensor parallelism: two CPU workers, one core each.

Every rank runs ``embed_multimodal`` and the selection on the same rows, so the picks must be the
same on every rank; a rank that picked other rows would feed its attention heads other tokens.
One engine per family with ``tensor_parallel_size=2`` (LLaVA-1.5: 1-D RoPE, the vision tower's
weights split over the ranks; Qwen2-VL: M-RoPE, ``mm_encoder_tp_mode="data"``, each rank encodes
its share of the items and the embeddings are gathered): greedy tokens at 0.25 / 0.1 and in one
batch of mixed ratios equal transformers + ``divprune_ext.hf``, which the one-worker engines of
``test_families.py`` equal too.
"""
import os

import pytest

import checkpoints
import harness
from test_families import PROMPTS, family_of, mixed, requests, tokens

KINDS = {"llava": {}, "qwen2_vl": {"mm_encoder_tp_mode": "data"}}


@pytest.fixture(scope="module", params=sorted(KINDS))
def tp_runs(request, tmp_path_factory):
    kind = request.param
    workdir = tmp_path_factory.mktemp(f"tp-{kind}")
    path = checkpoints.build(kind, str(workdir / kind))
    prompts = PROMPTS[family_of(kind)]
    jobs = {f"r{r}": {"requests": requests(prompts, r)} for r in (0.25, 0.1)}
    jobs["mixed"] = {"requests": mixed(prompts)}
    engine = dict(tensor_parallel_size=2, limit_mm_per_prompt={"image": 2, "video": 1}, **KINDS[kind])
    # vLLM's CPU workers each bind their OpenMP threads to their own core(s); a binding without "|" (the
    # one core scripts/vllm_env.sh gives each test process) is for one worker
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    env = {"VLLM_CPU_OMP_THREADS_BIND": bind if "|" in bind else "0|1"}
    return kind, path, prompts, harness.run_engine({"path": path, "engine": engine, "jobs": jobs}, str(workdir),
                                                   env=env)


@pytest.mark.parametrize("ratio", [0.25, 0.1])
def test_two_ranks_equal_transformers(tp_runs, ratio):
    kind, path, prompts, out = tp_runs
    assert tokens(out[f"r{ratio}"]) == [harness.hf_generate(path, p, ratio) for p in prompts]


def test_two_ranks_mixed_ratios_in_one_batch(tp_runs):
    kind, path, prompts, out = tp_runs
    expected = [harness.hf_generate(path, r["prompt"], r["ratio"] or 1.0) for r in mixed(prompts)]
    assert tokens(out["mixed"]) == expected
