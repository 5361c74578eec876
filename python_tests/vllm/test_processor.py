"""The plugin's processor inside vLLM's own multimodal processor, without an engine.

``MULTIMODAL_REGISTRY.create_processor`` builds the processor vLLM's front-end would (the plugin
loaded through vLLM's own loader) for a tiny checkpoint, and ``apply`` processes the family test
prompts. This runs under every supported vLLM, also where no engine can run (0.33, 0.34 on this
CPU): per item and per run of placeholders ``keep_count`` placeholders and the text untouched; the
ratio field carries the exact ratio to the model (1.0 without one); the items' hashes (the
processor-, encoder- and prefix-cache identity) are equal for equal ratios and differ across
ratios, with no ratio hashing as 1.0; bad ratios are a ``ValueError`` naming the key.

The memory profile (``test_memory.py`` runs it in an engine): each item carries its unpruned
placeholder count; the profile's dummy items are marked and keep all their placeholders, and no
request can mark its own; a batch of items, as the runner batches it, splits back into groups
equal to the groups batched apart (vLLM's field definitions, as the plugin splits a call); Model
Runner V2's own profile step runs the selection on the dummy items.
"""
import itertools
import os
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import divprune_ext
import harness
from divprune_ext.vllm import KEY
from divprune_ext.vllm.core import PROFILE, PROFILE_RATIO, PruningModel, ratios_from_bits
from test_families import BAD_RATIOS, PROMPTS, family_of

KINDS = ["llava", "qwen2_vl", "gemma3", "qwen3_vl", "llava_onevision", "gemma4", "internvl", "mistral3",
         "qwen3_vl_moe", "glm4v"]
WHOLE_SPAN_VIDEOS = ("qwen3_vl", "qwen3_vl_moe", "glm4v", "gemma4")  # a pruned video: every token of its span takes a row


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


_MADE = {}


def make_processor(kind, tmp_path_factory):
    """(kind, checkpoint path, the processor vLLM's front-end builds for it), once per kind."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    if kind not in _MADE:
        load_general_plugins()
        path = checkpoints.build(kind, str(tmp_path_factory.mktemp(kind) / kind))
        config = ModelConfig(model=path, dtype="float32", mm_processor_kwargs=harness.processor_kwargs(path) or None)
        made = MULTIMODAL_REGISTRY.create_processor(config)
        assert type(made).__name__.startswith("DivPrune"), type(made).__mro__
        _MADE[kind] = kind, path, made
    return _MADE[kind]


@pytest.fixture(scope="module", params=KINDS)
def processor(request, tmp_path_factory):
    return make_processor(request.param, tmp_path_factory)


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
    if kind in WHOLE_SPAN_VIDEOS and modality == "video" or kind == "mistral3":  # one selection over all frames / rows
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
        if kind == "mistral3":  # (filled whole) the row breaks and the end token stay
            image = set(token)
            assert [t for t in pruned["prompt_token_ids"] if t not in image] == \
                [t for t in full["prompt_token_ids"] if t not in image], prompt
        elif kind not in WHOLE_SPAN_VIDEOS:  # (their pruned videos are filled whole: every token takes a row)
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


def embeds_per_item(out, modality) -> list:
    return [p.get_num_embeds() for p in out["mm_placeholders"][modality]]


@pytest.mark.parametrize("ratio", [None, 0.5, 0.1])
def test_items_carry_their_unpruned_token_count(processor, ratio):
    for prompt in prompts_of(processor):
        full, out = process(processor, prompt), process(processor, prompt, ratio)
        for modality, items in out["mm_kwargs"].items():
            tokens = [int(item[f"divprune_{modality}_tokens"].data) for item in items]
            assert tokens == embeds_per_item(full, modality), (prompt, modality)


def test_profile_items_are_marked_and_unpruned(processor):
    _, _, made = processor
    for modality in made.info.get_supported_mm_limits():
        dummy = made.get_dummy_mm_inputs({modality: 1})
        item, = dummy["mm_kwargs"][modality]
        assert ratios_from_bits(item[f"divprune_{modality}_ratio"].data.reshape(1)) == [PROFILE_RATIO]
        assert int(item[f"divprune_{modality}_tokens"].data) == embeds_per_item(dummy, modality)[0]


@pytest.mark.parametrize("value", [True, 1, "yes"])
def test_requests_cannot_mark_the_profile(processor, value):
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    _, path, made = processor
    request = harness.vllm_request(path, prompts_of(processor)[0])
    ids = made.info.get_tokenizer().encode(request["prompt"], add_special_tokens=False)
    inputs = ProcessorInputs(ids, made.info.parse_mm_data(request["multi_modal_data"]),
                             hf_processor_mm_kwargs={**harness.processor_kwargs(path), PROFILE: value})
    with pytest.raises(ValueError, match=PROFILE):
        made.apply(inputs, TimingContext(enabled=False))


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_batches_split_into_their_groups(processor):
    """What the plugin does with a call larger than the profile: the runner's batch of a modality's
    items (``group_and_batch_mm_kwargs``) split into consecutive groups equals each group batched apart."""
    from types import SimpleNamespace

    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    _, _, made = processor
    model = SimpleNamespace(mm_budget=lambda: SimpleNamespace(processor=made))
    outs = [process(processor, prompt, 0.5) for prompt in prompts_of(processor)]
    for modality in ("image", "video"):
        items = [(modality, item) for out in outs for item in out["mm_kwargs"].get(modality, [])]
        if len(items) < 2:
            continue
        (_, count, batch), = group_and_batch_mm_kwargs(items)
        assert count == len(items)
        fields = {k: v for k, v in batch.items() if not k.startswith("divprune_")}  # as embed_multimodal gets them
        groups = [(0, 1), (1, len(items) - 1), (len(items) - 1, len(items))] if len(items) > 2 else [(0, 1), (1, 2)]
        for (start, end), got in zip(groups, PruningModel._sub_batches(model, modality, fields, groups)):
            (_, _, expected), = group_and_batch_mm_kwargs(items[start:end])
            expected = {k: v for k, v in expected.items() if not k.startswith("divprune_")}
            assert got.keys() == expected.keys() and all(same(got[k], expected[k]) for k in got), (modality, start)


def test_model_runner_v2_profile_runs_the_selection(tmp_path_factory, monkeypatch):
    """Model Runner V2's own profile (``EncoderRunner.profile_encoder_cache``: what GPUs run, the only
    runner of 0.34) on the processor's dummy items: the plugin's model selects them once (k = 1 each)
    and hands back their unpruned rows. The family's tower is a stand-in (rows of the right count)."""
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    from divprune_ext.vllm.qwen_vl import QwenVLPruning
    from mrope_stubs import MERGE, bare

    class Tower:  # the family's embed_multimodal: one row per merged patch
        def embed_multimodal(self, **kwargs):
            return [torch.randn(int(g.prod()) // MERGE ** 2, 8) for g in kwargs["image_grid_thw"]]

    class Model(QwenVLPruning, Tower):
        pass

    _, _, made = make_processor("qwen2_vl", tmp_path_factory)
    item, = made.get_dummy_mm_inputs({"image": 1})["mm_kwargs"]["image"]
    n = int(item["divprune_image_tokens"].data)
    selected = []
    select = divprune_ext.select_varlen
    monkeypatch.setattr(divprune_ext, "select_varlen", lambda x, lengths, k, **kw: selected.append(
        (list(lengths), list(k))) or select(x, lengths, k, **kw))
    model = bare(Model)
    object.__setattr__(model, "_divprune_budget", SimpleNamespace(  # what vLLM's MultiModalBudget gives
        mm_max_toks_per_item={"image": n}, mm_max_items_per_batch={"image": 2}, get_modality_with_max_tokens=lambda: "image"))
    runner = SimpleNamespace(model=model, device="cpu", cudagraph_manager=None,
                             encoder_cache=SimpleNamespace(encoder_outputs={}))
    runner.execute_mm_encoder = lambda inputs: EncoderRunner.execute_mm_encoder(runner, inputs)
    budget = SimpleNamespace(get_encoder_budget=lambda: 2 * n, mm_max_toks_per_item={"image": n})
    EncoderRunner.profile_encoder_cache(runner, [("image", item)] * 2, budget)
    assert selected == [([n, n], [1, 1])]
    assert [len(v) for v in runner.encoder_cache.encoder_outputs.values()] == [n, n]
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
