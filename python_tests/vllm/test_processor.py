"""The plugin's processor inside vLLM's own multimodal processor, without an engine.

``MULTIMODAL_REGISTRY.create_processor`` builds the processor vLLM's front-end would (the plugin
loaded through vLLM's own loader) for a tiny checkpoint, and ``apply`` processes the family test
prompts. This runs under every supported vLLM, also where no engine can run (0.33, 0.34 on this
CPU): per item and per run of placeholders ``keep_count`` placeholders and the text untouched; the
ratio field carries the exact ratio to the model (1.0 without one); the items' hashes (the
processor-, encoder- and prefix-cache identity) are equal for equal ratios and differ across
ratios, with no ratio hashing as 1.0; bad ratios are a ``ValueError`` naming the key.
"""
import itertools
import os

import pytest
import torch

import checkpoints
import divprune_ext
import harness
from divprune_ext.vllm import KEY
from divprune_ext.vllm.core import ratios_from_bits
from test_families import BAD_RATIOS, PROMPTS, family_of

KINDS = ["llava", "qwen2_vl", "gemma3", "qwen3_vl", "qwen3_vl_moe", "glm4v"]
WHOLE_SPAN_VIDEOS = ("qwen3_vl", "qwen3_vl_moe", "glm4v")  # a pruned video: every token of its span takes a row


@pytest.fixture(scope="module", autouse=True)
def safe_path():
    """vLLM inspects a model class it has not cached in ``python -m`` from the working directory (the
    repository root, whose divprune_ext/ is the source tree): keep that directory off its sys.path."""
    before = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    yield
    if before is None:
        del os.environ["PYTHONSAFEPATH"]
    else:
        os.environ["PYTHONSAFEPATH"] = before


@pytest.fixture(scope="module", params=KINDS)
def processor(request, tmp_path_factory):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    kind = request.param
    path = checkpoints.build(kind, str(tmp_path_factory.mktemp(kind) / kind))
    config = ModelConfig(model=path, dtype="float32", mm_processor_kwargs=harness.processor_kwargs(path) or None)
    made = MULTIMODAL_REGISTRY.create_processor(config)
    assert type(made).__name__.startswith("DivPrune"), type(made).__mro__
    return kind, path, made


def process(processor, prompt, ratio=None):
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    _, path, made = processor
    request = harness.vllm_request(path, prompt, ratio)
    ids = made.info.get_tokenizer().encode(request["prompt"], add_special_tokens=False)
    items = made.info.parse_mm_data(request["multi_modal_data"])
    kwargs = {**harness.processor_kwargs(path), **request.get("mm_processor_kwargs", {})}
    return made.apply(ProcessorInputs(ids, items, hf_processor_mm_kwargs=kwargs), TimingContext(enabled=False))


def runs_of(placeholder) -> list:
    """Lengths of the runs of embedding tokens of one item's placeholder range."""
    mask = [True] * placeholder.length if placeholder.is_embed is None else placeholder.is_embed.tolist()
    return [len(list(group)) for embed, group in itertools.groupby(mask) if embed]


def runs_start(placeholder) -> int:
    return 0 if placeholder.is_embed is None else placeholder.is_embed.tolist().index(True)


def expected_embeds(kind, modality, runs, ratio) -> int:
    if kind in WHOLE_SPAN_VIDEOS and modality == "video":  # one selection over all frames
        return divprune_ext.keep_count(sum(runs), ratio)
    return sum(divprune_ext.keep_count(n, ratio) for n in runs)  # a run each (Gemma 3: a crop each)


def prompts_of(processor):
    return PROMPTS[family_of(processor[0])]


@pytest.mark.parametrize("ratio", [0.5, 0.1])
def test_placeholders_per_item_and_run(processor, ratio):
    kind = processor[0]
    for prompt in prompts_of(processor):
        full, pruned = process(processor, prompt), process(processor, prompt, ratio)
        assert full["mm_placeholders"].keys() == pruned["mm_placeholders"].keys()
        for modality, items in full["mm_placeholders"].items():
            token = [full["prompt_token_ids"][p.offset + runs_start(p)] for p in items]  # each item's placeholder id
            spans = [pruned["prompt_token_ids"][p.offset:p.offset + p.length] for p in pruned["mm_placeholders"][modality]]
            got = [span.count(t) for span, t in zip(spans, token)]
            assert got == [expected_embeds(kind, modality, runs_of(p), ratio) for p in items], (prompt, modality)
        if kind not in WHOLE_SPAN_VIDEOS:  # (their pruned videos are filled whole)
            assert text_of(pruned) == text_of(full), prompt


def text_of(out) -> list:
    """The prompt's tokens that take no multimodal row."""
    embedded = set()
    for placeholders in out["mm_placeholders"].values():
        for p in placeholders:
            mask = [True] * p.length if p.is_embed is None else p.is_embed.tolist()
            embedded.update(p.offset + i for i, e in enumerate(mask) if e)
    return [t for i, t in enumerate(out["prompt_token_ids"]) if i not in embedded]


@pytest.mark.parametrize("ratio", [None, 1.0, 0.5, 1 / 3])
def test_ratio_field_is_exact(processor, ratio):
    for prompt in prompts_of(processor):
        out = process(processor, prompt, ratio)
        for modality, items in out["mm_kwargs"].items():
            bits = torch.stack([item[f"divprune_{modality}_ratio"].data for item in items])
            assert ratios_from_bits(bits) == [1.0 if ratio is None else ratio] * len(items)


def test_hashes_are_per_ratio(processor):
    prompt = prompts_of(processor)[0]
    hashes = {r: process(processor, prompt, r)["mm_hashes"] for r in (0.5, 0.52, 1.0, None)}
    assert process(processor, prompt, 0.5)["mm_hashes"] == hashes[0.5]
    assert hashes[0.5] != hashes[0.52] and hashes[0.5] != hashes[1.0]
    assert hashes[1.0] == hashes[None]


@pytest.mark.parametrize("bad", BAD_RATIOS)
def test_bad_ratios_name_the_key(processor, bad):
    with pytest.raises(ValueError, match=KEY):
        process(processor, prompts_of(processor)[0], bad)


def test_glm4v_gives_the_model_each_videos_text(processor):
    """GLM-4.1V: each video's replacement less its frames' placeholders (markers, timestamps) reaches
    the model as a field, at every ratio: the model lays out a pruned video with it."""
    kind, path, made = processor
    if kind != "glm4v":
        pytest.skip("GLM-4.1V only")
    from divprune_ext.vllm.glm4v import TEXT_FIELD
    image = made.info.get_hf_config().image_token_id
    videos = [p for p in prompts_of(processor) if any(part[0] == "video" for part in p if not isinstance(part, str))]
    assert videos
    for prompt in videos:
        full = process(processor, prompt)
        (span,) = [full["prompt_token_ids"][p.offset:p.offset + p.length] for p in full["mm_placeholders"]["video"]]
        for ratio in (None, 0.5):
            (item,) = process(processor, prompt, ratio)["mm_kwargs"]["video"]
            assert item[TEXT_FIELD].data.tolist() == [t for t in span if t != image]
