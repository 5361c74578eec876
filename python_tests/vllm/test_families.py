"""The plugin in vLLM's offline engine against transformers + divprune_ext.hf and against unpatched vLLM.

One module-scoped set of engine runs per family (a plugin engine, one with a 16-token prefill
budget, an unpatched engine), each in its own interpreter (``harness.run_engine``); the tests read
their results. Greedy tokens must equal, token for token:

- at ratio 1.0 and with no ratio: the unpatched engine (same prompt length too);
- below 1.0: transformers with ``divprune_ext.hf.prune_inputs`` at the same ratio on the same
  checkpoint (which keeps Qwen's original M-RoPE positions and the text's unpruned positions);
- in one batch of mixed ratios: the same requests one at a time;
- with chunked prefill (16 tokens a step; two pruned items in one chunk): the same as unchunked.

The M-RoPE families run a second time as ``<kind>-replay``: one engine with the 16-token prefill
budget (every prompt chunked) whose decoder gets the runner's own position buffer, whatever tensor
the model class passes it (``engine_runs.replay_positions``: what a replayed CUDA graph reads). The
tests of positions hold there too: pruned = transformers at every ratio, images, videos, image +
video, two items in one chunk, mixed ratios in one batch; the rest (caches, errors, embeddings,
defaults) is the eager variant's. The unpatched engine's results are shared between the variants.
"""
import itertools
from dataclasses import dataclass
from typing import Any, Dict, List

import pytest

import checkpoints
import harness

import divprune_ext

RATIOS = [0.5, 0.25, 0.1]
TEXT = "one two three four five six seven eight nine ten the cat sat on the mat ."
PROMPTS = {
    "llava": [
        ["what is in the image ?", ("image", (60, 50))],
        [("image", (40, 90)), "compare the two images", ("image", (56, 56))],
    ],
    "qwen": [
        ["what is in the image ?", ("image", (60, 90))],                       # wide
        [("image", (120, 50)), "compare the two images", ("image", (56, 56))],  # tall, then square
        ["describe", ("video", (4, 56, 84)), "the video"],
        [("image", (84, 56)), ("video", (2, 56, 56)), "one two"],               # an image and a video
    ],
    # LLaVA-NeXT / OneVision: 16-px tiles, anyres 1x2, 2x1 or 2x2 (NEXT_PINPOINTS); 36 to 70 tokens an image
    "llava_next": [
        ["what is in the image ?", ("image", (30, 60))],                        # wide
        [("image", (70, 30)), "compare the two images", ("image", (16, 16))],   # tall, then square
    ],
    # vLLM serves this architecture's videos only, one per prompt: 4 pooled tokens a frame
    "llava_next_video": [
        ["describe", ("video", (4, 32, 40)), "the video"],
        [("video", (2, 16, 16)), "one two"],
    ],
    "llava_onevision": [
        ["what is in the image ?", ("image", (30, 60))],
        [("image", (70, 30)), "compare the two images", ("image", (16, 16))],
        ["describe", ("video", (4, 32, 40)), "the video"],                     # 4 x 4 + 1 newline
        [("image", (36, 48)), ("video", (2, 16, 16)), "one two"],              # 2 x 2 tiles: 70 tokens
    ],
    # 16 tokens an image or crop; pan-and-scan (harness.PROCESSOR_KWARGS): a wide image 3 crops, a tall one 2
    "gemma3": [
        ["what is in the image ?", ("image", (56, 168))],                       # wide: 4 runs of 16
        [("image", (120, 50)), "compare the two images", ("image", (56, 56))],  # tall (3 runs), square (1)
    ],
    # at most 70 soft tokens an image or frame (an image is resized to fit 280 patches); a video's frames
    # each after its "mm:ss" timestamp, selected together: all its kept tokens in the first frame's run
    "gemma4": [
        ["what is in the image ?", ("image", (60, 90))],                        # 6 x 10 tokens
        [("image", (120, 50)), "compare the two images", ("image", (56, 56))],  # 12 x 5, 8 x 8
        ["describe", ("video", (4, 56, 84)), "the video"],                     # 4 frames of 6 x 10
        [("image", (84, 56)), ("video", (2, 56, 56)), "one two"],
    ],
    # 56-px tiles of 16 tokens, up to 4 + a thumbnail (an image is one run); a video frame is one tile
    "internvl": [
        ["what is in the image ?", ("image", (60, 90))],                       # 2 tiles + thumbnail: 48
        [("image", (120, 50)), "compare the two images", ("image", (56, 56))],  # 3 tiles (64), 1 tile (16)
        ["describe", ("video", (4, 56, 84)), "the video"],                     # 4 frames of 16
        [("image", (84, 56)), ("video", (2, 56, 56)), "one two"],
    ],
    # 16 px a token, rows ended by [IMG_BREAK], the last by [IMG_END]
    "mistral3": [
        ["what is in the image ?", ("image", (60, 90))],                       # 4 rows of 6
        [("image", (120, 50)), "compare the two images", ("image", (56, 56))],  # 6 rows of 3, 4 of 4
    ],
    # 28 x 28 px a merged token: 28, 21 and 16 tokens an image; the video 3 frames of 2 x 3 tokens, each
    # frame a run after <|begin_of_image|>. No image + video prompt: transformers (5.19 to 5.25) cannot run
    # one unpruned (its placeholder mask counts the video's frames as image tokens); two_in_one_chunk has one.
    "glm4v": [
        ["what is in the image ?", ("image", (112, 196))],
        [("image", (196, 84)), "compare the two images", ("image", (112, 112))],
        ["describe", ("video", (6, 84, 112)), "the video"],
    ],
}
# Two pruned items inside one 16-token prefill chunk (placeholders at 0.25: 4 + 4 for LLaVA, 4 + 4 for Qwen).
TWO_IN_ONE_CHUNK = {"llava": [("image", (56, 56)), ("image", (50, 60)), "two"],
                    "qwen": [("image", (56, 56)), ("image", (56, 60)), "two"],
                    # 36 tokens an image: at 0.1, 4 + 4 (NeXT), 4 + 1 (OneVision's 9-token video)
                    "llava_next": [("image", (16, 16)), ("image", (16, 20)), "two"],
                    "llava_onevision": [("image", (16, 16)), ("video", (2, 16, 16)), "two"]}
TWO_IN_ONE_CHUNK["gemma3"] = [("image", (56, 56)), ("image", (50, 56)), "two"]  # 2 + 2, with <boi> / <eoi>
TWO_IN_ONE_CHUNK["gemma4"] = [("image", (56, 56)), ("image", (50, 56)), "two"]  # 3 + 3, with <boi> / <eoi>
TWO_IN_ONE_CHUNK["internvl"] = [("image", (56, 56)), ("image", (50, 56)), "two"]  # 4 + 4, with <img> / </img>
TWO_IN_ONE_CHUNK["mistral3"] = [("image", (32, 48)), ("image", (48, 32)), "two"]  # 2 + 2, with 2 / 3 row ends
TWO_IN_ONE_CHUNK["glm4v"] = [("image", (56, 56)), ("video", (2, 56, 56)), "two"]  # 9 tokens each: 2 + 2
TWO_IN_ONE_CHUNK_RATIO = {"llava_next": 0.1, "llava_onevision": 0.1, "gemma3": 0.1, "gemma4": 0.05}  # else 0.25
MEDIA = {"llava": {"image": 2}, "llava_next": {"image": 2}, "llava_next_video": {"video": 1},
         "gemma3": {"image": 2}, "mistral3": {"image": 2}}  # else 2 + 1
NO_IMAGE_EMBEDS = {"gemma3": "vLLM's Gemma 3 takes no image_embeds", "gemma4": "vLLM's Gemma 4 takes no image_embeds",
                   "mistral3": "vLLM's Mistral 3 processor sizes an image's rows from its pixels (no image_embeds)",
                   "glm4v": "vLLM's GLM-4.1V takes image_embeds from 0.34 on"}
CACHE_PROMPT = [("image", (56, 56)), TEXT + " " + TEXT]
# LLaVA-NeXT / OneVision: a 36-token image (0.51 keeps as many as 0.5); NeXT-Video: a 16-token video
CACHE_PROMPTS = {"llava_next": [("image", (16, 16)), TEXT + " " + TEXT],
                 "llava_onevision": [("image", (16, 16)), TEXT + " " + TEXT],
                 "llava_next_video": [("video", (4, 16, 16)), TEXT + " " + TEXT]}
CACHE_PROMPTS["glm4v"] = [("image", (112, 112)), TEXT + " " + TEXT]  # 16 tokens (a 56 x 56 image: 9)
# Qwen3.5: vLLM makes the KV blocks of a hybrid model as large as its linear-attention state (96 tokens
# here) and caches prefixes of whole blocks: the prompt must be longer than one (this one: 119 tokens)
CACHE_PROMPTS["qwen3_5"] = [("image", (56, 56)), " ".join([TEXT] * 24)]
UNBATCHED_BASELINE = {"llava_onevision"}
CACHE_OTHER_RATIO = {"llava_next": 0.51, "llava_onevision": 0.51, "gemma4": 0.505}  # else 0.52 (Gemma 4: 64 tokens)
BLOCK = 32  # KV-cache block size of the test engines (vLLM's CPU default, 128, exceeds these prompts)
BAD_RATIOS = [0, -0.5, 1.5, float("nan"), "0.5", True]
SERVER_RATIO = 0.1  # the chunked engine's --hf-overrides default


def family_of(kind: str) -> str:
    return "qwen" if kind.startswith("qwen") else kind


def cache_prompt(kind: str) -> list:
    return CACHE_PROMPTS.get(kind, CACHE_PROMPT)


def has_images(kind: str) -> bool:
    return "image" in MEDIA.get(kind, {"image": 2})


def requests(prompts, ratio, seed=0):
    return [{"prompt": p, "ratio": ratio, "seed": seed} for p in prompts]


def mixed(prompts) -> List[dict]:
    """Every prompt at every ratio (and none), interleaved."""
    ratios = [None, 0.5, 0.1, 1.0, 0.25]
    return [{"prompt": p, "ratio": ratios[(i + j) % len(ratios)]}
            for j in range(len(ratios)) for i, p in enumerate(prompts)]


MROPE_KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5"]
# a video is one run of placeholders per frame, all kept tokens in the first one
FRAMES_APART = {"qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma4", "glm4v"}
VARIANTS = checkpoints.KINDS + [f"{kind}-replay" for kind in MROPE_KINDS]


@dataclass
class Runs:
    kind: str
    path: str
    prompts: List[list]
    plugin: Dict[str, Any]
    chunked: Dict[str, Any]
    plain: Dict[str, Any]
    replay: bool = False


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


_BUILT: Dict[str, str] = {}
_PLAIN: Dict[str, Any] = {}  # kind -> the unpatched engine's results (the same for both variants)


@pytest.fixture(scope="module", params=VARIANTS)
def runs(request, workdir) -> Runs:
    kind, _, variant = request.param.partition("-")
    replay = variant == "replay"
    if kind not in _BUILT:
        _BUILT[kind] = checkpoints.build(kind, str(workdir / kind))
    path = _BUILT[kind]
    prompts = PROMPTS[family_of(kind)]
    limits = {"limit_mm_per_prompt": MEDIA.get(kind, {"image": 2, "video": 1}), "block_size": BLOCK}
    chunking = dict(max_num_batched_tokens=16, enable_chunked_prefill=True)
    plain = _plain(kind, path, prompts, limits, workdir)
    if replay:
        jobs = {f"r{r}": {"requests": requests(prompts, r)} for r in [None, 1.0] + RATIOS}
        jobs["mixed"] = {"requests": mixed(prompts)}
        if family_of(kind) in TWO_IN_ONE_CHUNK:
            jobs["two_in_one_chunk"] = {"requests": requests([TWO_IN_ONE_CHUNK[family_of(kind)]],
                                                             TWO_IN_ONE_CHUNK_RATIO.get(kind, 0.25))}
        both = harness.run_engine({"path": path, "engine": dict(limits, **chunking), "jobs": jobs,
                                   "replay_positions": True}, str(workdir))
        return Runs(kind, path, prompts, both, both, plain, replay=True)
    other = CACHE_OTHER_RATIO.get(kind, 0.52)
    jobs: Dict[str, Any] = {f"r{r}": {"requests": requests(prompts, r)} for r in [None, 1.0] + RATIOS}
    jobs["mixed"] = {"requests": mixed(prompts)}
    jobs["mixed_one_at_a_time"] = {"requests": mixed(prompts), "sequential": True}
    jobs["cache"] = {"sequential": True, "requests": [
        {"prompt": cache_prompt(kind), "ratio": r, "seed": 7} for r in (0.5, 0.5, other, other, None, None)]}
    jobs["process"] = {"kind": "process", "requests": [
        {"prompt": cache_prompt(kind), "ratio": r, "seed": 7} for r in (0.5, 0.5, other, 1.0, None)]}
    for n, bad in enumerate(BAD_RATIOS):
        jobs[f"bad{n}"] = {"kind": "error", "requests": requests(prompts[:1], bad)}
    jobs["after_bad"] = {"requests": requests(prompts[:1], 0.5)}
    if has_images(kind) and kind not in NO_IMAGE_EMBEDS:
        jobs["embeds"] = {"kind": "embeds", "request": {"prompt": prompts[0], "ratio": 0.5}}
    engine = dict(limits, enable_prefix_caching=True, enable_mm_embeds=True)
    plugin = harness.run_engine({"path": path, "engine": engine, "jobs": jobs}, str(workdir))

    # This engine also has a server-wide default (--hf-overrides): requests without a ratio take it,
    # the profile run does not.
    chunk_jobs = {f"r{r}": {"requests": requests(prompts, r)} for r in [1.0, 0.25]}
    if family_of(kind) in TWO_IN_ONE_CHUNK:
        chunk_jobs["two_in_one_chunk"] = {"requests": requests([TWO_IN_ONE_CHUNK[family_of(kind)]],
                                                               TWO_IN_ONE_CHUNK_RATIO.get(kind, 0.25))}
    chunk_jobs["server_default"] = {"requests": requests(prompts, None)}
    chunk_jobs["dummy"] = {"kind": "dummy", "modality": "image" if has_images(kind) else "video"}
    chunked = harness.run_engine({"path": path, "engine": dict(limits, **chunking,
                                                               hf_overrides={"divprune_keep_ratio": SERVER_RATIO}),
                                  "jobs": chunk_jobs}, str(workdir))
    return Runs(kind, path, prompts, plugin, chunked, plain)


def _plain(kind, path, prompts, limits, workdir):
    """The unpatched engine's results (once per kind)."""
    # Unpatched vLLM's OneVision returns a (1, n, H) tensor per video when a batch holds videos of
    # different frame counts, and its runner then fails (it wants (n, H)): its baseline runs one at a time.
    plain_jobs = {"r": {"requests": requests(prompts, None), "sequential": kind in UNBATCHED_BASELINE},
                  "cache": {"sequential": True, "requests": [{"prompt": cache_prompt(kind), "seed": 7}] * 2}}
    if kind not in _PLAIN:
        _PLAIN[kind] = harness.run_engine({"path": path, "engine": limits, "jobs": plain_jobs}, str(workdir),
                                          plugins=False)
    return _PLAIN[kind]


def eager_only(runs):
    if runs.replay:
        pytest.skip("the eager variant tests this (the replay variant tests positions)")


def test_replay_mode_is_in_effect(runs):
    """In the -replay variants every worker's decoder reads the runner's position buffer."""
    if not runs.replay:
        pytest.skip("eager variant")
    assert runs.plugin["replay_positions"]


def tokens(results):
    return [r["tokens"] for r in results]


def test_unpatched_engine_matches_transformers(runs):
    """The baseline first: vLLM without the plugin = transformers on the same checkpoint."""
    assert tokens(runs.plain["r"]) == [harness.hf_generate(runs.path, p) for p in runs.prompts]


@pytest.mark.parametrize("ratio", [None, 1.0])
def test_ratio_one_is_unpatched_vllm(runs, ratio):
    got = runs.plugin[f"r{ratio}"]
    assert tokens(got) == tokens(runs.plain["r"])
    assert [r["prompt"] for r in got] == [r["prompt"] for r in runs.plain["r"]]


@pytest.mark.parametrize("ratio", RATIOS)
def test_pruned_equals_transformers_with_divprune(runs, ratio):
    assert tokens(runs.plugin[f"r{ratio}"]) == [harness.hf_generate(runs.path, p, ratio) for p in runs.prompts]


def placeholder_ids(path) -> List[int]:
    import transformers
    config = transformers.AutoConfig.from_pretrained(path)
    ids = [v for k, v in vars(config).items() if k in ("image_token_id", "video_token_id", "image_token_index",
                                                       "video_token_index")]
    if harness.architecture(path) == "InternVLForConditionalGeneration":  # vLLM's video frames: <video>, not in the config
        ids.append(transformers.AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<video>"))
    return ids


@pytest.mark.parametrize("ratio", RATIOS)
def test_placeholder_counts(runs, ratio):
    """Per item k = keep_count(n, ratio) placeholders; the text is untouched."""
    ids = set(placeholder_ids(runs.path))
    for full, pruned in zip(runs.plugin["r1.0"], runs.plugin[f"r{ratio}"]):
        full_ids, pruned_ids = full["prompt"], pruned["prompt"]
        assert [t for t in full_ids if t not in ids] == [t for t in pruned_ids if t not in ids]
        runs_full, runs_pruned = placeholder_runs(full_ids, ids), placeholder_runs(pruned_ids, ids)
        if runs.kind == "mistral3":  # one run per row unpruned; an image's kept tokens all in its first row's run
            runs_full = [(None, n) for n in image_sizes(runs.path, full_ids)]
        assert [k for _, k in runs_pruned] == expected_runs(runs.kind, runs.path, runs_full, ratio, full_ids)


def image_sizes(path, ids) -> List[int]:
    """Mistral 3: the [IMG] tokens of each image (up to its [IMG_END])."""
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image, end = tokenizer.convert_tokens_to_ids("[IMG]"), tokenizer.convert_tokens_to_ids("[IMG_END]")
    sizes, n = [], 0
    for t in ids:
        n += t == image
        if t == end:
            sizes.append(n)
            n = 0
    return sizes


def expected_runs(kind, path, runs_full, ratio, full_ids) -> List[int]:
    """keep_count per run; the video (one a prompt here) of Qwen3-VL (-MoE), Qwen3.5, Gemma 4 and GLM-4.1V is one run
    per frame unpruned and keeps keep_count(all its frames' tokens) in its first frame's run."""
    if kind not in FRAMES_APART:
        return [divprune_ext.keep_count(n, ratio) for _, n in runs_full]
    import transformers
    config = transformers.AutoConfig.from_pretrained(path)
    if kind == "glm4v":  # frames are image tokens between <|begin_of_video|> and <|end_of_video|>
        video = [config.video_start_token_id, config.video_end_token_id]
        start, end = (full_ids.index(t) if t in full_ids else -1 for t in video)
        inside = [start < i < end for i, t in enumerate(full_ids) if t == config.image_token_id]
        frame_of_run, cursor = [], 0
        for _, n in runs_full:
            frame_of_run.append(inside[cursor])
            cursor += n
    else:
        frame_of_run = [t == config.video_token_id for t, _ in runs_full]
    frames = [n for (_, n), is_frame in zip(runs_full, frame_of_run) if is_frame]
    out, first = [], True
    for (t, n), is_frame in zip(runs_full, frame_of_run):
        if not is_frame:
            out.append(divprune_ext.keep_count(n, ratio))
        elif first:
            out.append(divprune_ext.keep_count(sum(frames), ratio))
            first = False
    return out


def placeholder_runs(ids, placeholder):
    """(token id, length) of each run of placeholder ids (one run per item in these prompts, but
    Gemma 3's pan-and-scan crops and Qwen3-VL's video frames)."""
    return [(t, len(list(group))) for t, group in itertools.groupby(ids) if t in placeholder]


def test_mixed_ratio_batch_equals_one_at_a_time(runs):
    if not runs.replay:  # (the replay variant: each request equals its ratio's own batch)
        assert tokens(runs.plugin["mixed"]) == tokens(runs.plugin["mixed_one_at_a_time"])
    by_ratio = {r: tokens(runs.plugin[f"r{r}"]) for r in [None, 1.0] + RATIOS}
    for n, request in enumerate(mixed(runs.prompts)):
        assert runs.plugin["mixed"][n]["tokens"] == by_ratio[request["ratio"]][runs.prompts.index(request["prompt"])]


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_chunked_prefill(runs, ratio):
    eager_only(runs)
    assert tokens(runs.chunked[f"r{ratio}"]) == tokens(runs.plugin[f"r{ratio}"])


def test_two_items_in_one_chunk(runs):
    if family_of(runs.kind) not in TWO_IN_ONE_CHUNK:
        pytest.skip(f"{runs.kind}: vLLM takes one item per prompt")
    prompt = TWO_IN_ONE_CHUNK[family_of(runs.kind)]
    ratio = TWO_IN_ONE_CHUNK_RATIO.get(runs.kind, 0.25)
    got = runs.chunked["two_in_one_chunk"][0]
    ids = set(placeholder_ids(runs.path))
    first = next(i for i, t in enumerate(got["prompt"]) if t in ids)
    last = max(i for i, t in enumerate(got["prompt"]) if t in ids)
    assert last // 16 == first // 16, "the test prompt must put both items in one 16-token chunk"
    assert got["tokens"] == harness.hf_generate(runs.path, prompt, ratio)


def test_cache_entries_are_per_ratio(runs):
    """Prefix cache: the same image and ratio twice hits; another ratio (even one giving the same
    k and so the same token ids) never does; the processor hashes say the same for the encoder cache."""
    eager_only(runs)
    first, again, other, other_again, plain, plain_again = runs.plugin["cache"]
    assert first["cached"] == 0 and again["cached"] >= BLOCK
    assert other["prompt"] == first["prompt"]  # 0.52 (0.51) keeps as many tokens as 0.5 here
    assert other["cached"] == 0 and other_again["cached"] >= BLOCK
    assert plain["cached"] == 0 and plain_again["cached"] >= BLOCK
    assert again["tokens"] == first["tokens"] and other_again["tokens"] == other["tokens"]
    assert [r["cached"] for r in runs.plain["cache"]] == [0, plain_again["cached"]]
    h05, h05_again, h052, h1, hnone = [p["hashes"] for p in runs.plugin["process"]]
    assert h05 == h05_again and h05 != h052 and h05 != h1 and h1 == hnone


@pytest.mark.parametrize("n", range(len(BAD_RATIOS)))
def test_bad_ratio_is_a_request_error(runs, n):
    eager_only(runs)
    message = runs.plugin[f"bad{n}"]
    assert message is not None and message.startswith("ValueError") and "divprune_keep_ratio" in message
    assert repr(BAD_RATIOS[n]) in message or str(BAD_RATIOS[n]) in message
    # ... and the engine goes on serving
    assert tokens(runs.plugin["after_bad"]) == tokens(runs.plugin["r0.5"])[:1]


def test_image_embeds_are_pruned_like_pixels(runs):
    eager_only(runs)
    if not has_images(runs.kind) or runs.kind in NO_IMAGE_EMBEDS:
        pytest.skip(NO_IMAGE_EMBEDS.get(runs.kind, f"{runs.kind}: vLLM serves no images for it"))
    assert tokens(runs.plugin["embeds"]) == tokens(runs.plugin["r0.5"])[:1]
    assert runs.plugin["embeds"][0]["prompt"] == runs.plugin["r0.5"][0]["prompt"]


def test_server_wide_default(runs):
    """Requests without a ratio take the engine's --hf-overrides default; explicit ratios override it."""
    eager_only(runs)
    assert tokens(runs.chunked["server_default"]) == tokens(runs.plugin[f"r{SERVER_RATIO}"])
    assert tokens(runs.chunked["r1.0"]) == tokens(runs.plain["r"])


def test_profile_run_is_unpruned(runs):
    """The memory profile measures the encoder output of an unpruned item, default ratio or not."""
    eager_only(runs)
    dummy = runs.chunked["dummy"]
    assert dummy["lengths"] == [dummy["max"]]


def test_prompt_is_shorter(runs):
    full = sum(len(r["prompt"]) for r in runs.plugin["r1.0"])
    for ratio in RATIOS:
        assert sum(len(r["prompt"]) for r in runs.plugin[f"r{ratio}"]) < full
