"""The plugin inside vLLM's memory profile, in an engine (docs/vllm_plugin_design.md, "Memory").

vLLM sizes the KV cache from a profile run that encodes ``mm_max_items_per_batch`` items of the
largest size in one ``embed_multimodal`` call. One engine (Qwen2-VL, tiny, images only: the
profile encodes 4 images of 64 tokens; 256 tokens a step, chunked prefill) with a recorder in its worker (``engine_runs`` ``"spy"``) runs the runner's own
``profile_run`` (the CPU runner skips it in eager mode) and then a batch of large images, most
at 0.1, for which the scheduler (charging ``k`` placeholders, not the ``n`` tokens the encoder
computes) hands ``embed_multimodal`` more than the profile encoded:

- the profile run runs the selection on its dummy items (``k = 1``: the workspace depends on
  ``n`` only) and returns their unpruned rows;
- no encoder call and no selection at serving time works on more than the profile did (tokens,
  Σ n²), while the calls handed to ``embed_multimodal`` exceed it (the workload needs the split);
- every item is encoded once, and the tokens equal transformers + ``divprune_ext.hf``.
"""
import pytest

import checkpoints
import harness
from divprune_ext.vllm.core import PROFILE_RATIO, encoder_groups

KIND = "qwen2_vl"
STEP = 256  # max_num_batched_tokens and encoder budget: the profile encodes 4 images of at most 64 tokens
# 54 to 63 tokens an image (the tiny processor's pixel limit), grids differing from item to item (a
# group reading another item's grid would place its kept tokens wrongly)
SIZES = [(392, 308), (308, 420), (364, 336), (448, 280), (280, 448), (420, 364), (336, 392)]
RATIOS = [0.1, 0.25, 0.1, 0.5, 0.1, 0.1, 1.0, 0.1, 0.1, 0.25, 0.1, 0.1]


def prompt(i):
    return [("image", SIZES[2 * i % len(SIZES)]), "compare the two images", ("image", SIZES[(2 * i + 1) % len(SIZES)])]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("memory")
    path = checkpoints.build(KIND, str(workdir / KIND))
    requests = [{"prompt": prompt(i), "ratio": r, "seed": i} for i, r in enumerate(RATIOS)]
    engine = {"max_num_batched_tokens": STEP, "enable_chunked_prefill": True, "block_size": 32,
              "limit_mm_per_prompt": {"image": 2, "video": 0}}
    jobs = {"profile": {"kind": "profile"}, "profiled_calls": {"kind": "spy"},
            "serve": {"requests": requests}, "served_calls": {"kind": "spy"}}
    out = harness.run_engine({"path": path, "spy": True, "engine": engine, "jobs": jobs}, str(workdir))
    out.update(path=path, requests=requests)
    return out


def test_profile_run_measures_the_selection(run):
    log, = run["profiled_calls"]  # one worker
    call, = log["calls"]
    assert set(call["ratios"]) == {PROFILE_RATIO}
    assert sum(call["tokens"]) == run["profiled"]  # what the plugin takes as the profiled work
    assert log["encoded"] == [{"modality": call["modality"], "rows": call["tokens"]}]  # encoded once, unpruned
    assert log["selected"] == [{"lengths": call["tokens"], "k": [1] * len(call["tokens"])}]


def profiled(run):
    call, = run["profiled_calls"][0]["calls"]
    return sum(call["tokens"]), sum(n * n for n in call["tokens"])


def test_serving_works_within_the_profile(run):
    tokens, workspace = profiled(run)
    log, = run["served_calls"]
    assert max(sum(c["tokens"]) for c in log["calls"]) > tokens  # the scheduler handed out more than profiled
    for encoded in log["encoded"]:
        assert sum(encoded["rows"]) <= tokens or len(encoded["rows"]) == 1
    for selected in log["selected"]:
        assert sum(n * n for n in selected["lengths"]) <= workspace
    # every item encoded exactly once, in order
    assert [n for c in log["calls"] for n in c["tokens"]] == [n for e in log["encoded"] for n in e["rows"]]


def test_split_calls_give_transformers_tokens(run):
    for request, result in zip(run["requests"], run["serve"]):
        expected = harness.hf_generate(run["path"], request["prompt"], request["ratio"], request["seed"])
        assert result["tokens"] == expected, request


@pytest.mark.parametrize("tokens, limit, groups", [
    ([80, 88, 80, 88], 448, [(0, 4)]),
    ([200, 200, 100, 300], 448, [(0, 2), (2, 4)]),
    ([500, 10, 10], 448, [(0, 1), (1, 3)]),        # an item above the limit: alone
    ([10, 500, 10], 448, [(0, 1), (1, 2), (2, 3)]),
    ([224, 224, 224], 448, [(0, 2), (2, 3)]),      # exactly the limit fits
    ([5, 5], 0, [(0, 2)]),                         # nothing profiled: one group
])
def test_encoder_groups(tokens, limit, groups):
    assert encoder_groups(tokens, limit) == groups
