"""The plugin's placeholder and selection bookkeeping without an engine: vLLM's own classes.

- Processor side: an item's replacement keeps, per run of placeholders, the first
  ``kept_per_run`` of them and every other token (Gemma 3's ``<start_of_image>`` /
  ``<end_of_image>`` and pan-and-scan text; InternVL videos: each frame's run and its text;
  Qwen3-VL, Gemma 4 and GLM-4.1V videos and Mistral 3 images: every kept token in the first
  frame's / row's run); what a family does not prune (several runs where it expects one, mixed
  placeholder ids) raises ``NotImplementedError`` naming it.
- Model side: each part (:meth:`segments`) is selected apart and equals ``divprune_ext.select``
  on it; Qwen3-VL (and -MoE) selects on the merged tokens and keeps the deepstack columns of the
  same rows; Mistral 3 writes each row's kept tokens before that row's break; a pruned GLM-4.1V
  video's rows are its markers, each frame's kept tokens and its timestamp, at the positions
  GLM-4.1V's rope index gives them unpruned.
- Gemma 4: its video rows are laid out frame by frame (each kept token in its own frame) with each
  row's token id for the per-layer inputs; a model with bidirectional image attention refuses
  pruned videos.
  ``<end_of_image>`` and pan-and-scan text; Qwen3-VL and Qwen3.5 videos: every kept token in the
  first frame's run); what a family does not prune (several runs where it expects one, mixed
  placeholder ids) raises ``NotImplementedError`` naming it.
- Model side: each part (:meth:`segments`) is selected apart and equals ``divprune_ext.select``
  on it; Qwen3-VL selects on the merged tokens and keeps the deepstack columns of the same rows;
  Qwen3.5 (no deepstack) selects whole rows, with vLLM's Qwen3.5 processing, not Qwen3-VL's.
"""
from types import SimpleNamespace

import pytest
import torch

import divprune_ext
from divprune_ext.vllm import KEY
from divprune_ext.vllm.core import OFFSET_INTS, _pruning_class, embed_runs
from divprune_ext.vllm.gemma3 import DivPruneGemma3
from divprune_ext.vllm.gemma4 import PLE_INTS, DivPruneGemma4, Gemma4VideoRatioCheck
from divprune_ext.vllm.glm4v import TEXT_FIELD, DivPruneGlm4v, VideoText
from divprune_ext.vllm.internvl import DivPruneInternVL
from divprune_ext.vllm.llava import DivPruneLlava
from divprune_ext.vllm.mistral3 import DivPruneMistral3
from divprune_ext.vllm.qwen_vl import DivPruneQwen3VL, DivPruneQwen3VLMoe
from divprune_ext.vllm.qwen3_5 import DivPruneQwen3_5, DivPruneQwen3_5Moe
from divprune_ext.vllm.qwen_vl import DivPruneQwen3VL
from vllm.model_executor.models.gemma3_mm import Gemma3MultiModalProcessor
from vllm.model_executor.models.gemma4_mm import Gemma4MultiModalProcessor
from vllm.model_executor.models.glm4_1v import Glm4vMultiModalProcessor
from vllm.model_executor.models.interns1 import InternS1MultiModalProcessor
from vllm.model_executor.models.llava import LlavaMultiModalProcessor
from vllm.model_executor.models.mistral3 import Mistral3MultiModalProcessor
from vllm.model_executor.models.qwen3_vl import Qwen3VLMultiModalProcessor
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeProcessingInfo
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

IMG, BOI, EOI, NL, WORD = 9, 2, 3, 4, 5


def processor(processor_cls, model_cls):
    proc = object.__new__(_pruning_class(processor_cls))
    proc._divprune_model = model_cls
    return proc


def replaced(proc, content, ratio, modality="image"):
    update = proc._pruned_update(PromptReplacement(modality=modality, target=[BOI], replacement=content), ratio)
    return update.replacement(0)


def gemma_crops(tokens_per_crop, crops):
    """Gemma 3's replacement of one image: the image, then its crops, each \\n\\n<boi> tokens <eoi>\\n\\n."""
    ids = []
    for c in range(crops):
        ids += ([WORD, WORD] if c else []) + [NL, BOI] + [IMG] * tokens_per_crop + [EOI, NL]
    return PromptUpdateDetails.select_token_id(ids, IMG)


def test_embed_runs():
    assert embed_runs([]) == []
    assert embed_runs([True, True, False, True]) == [(0, 2), (3, 1)]
    assert embed_runs([False, True, True, True, False]) == [(1, 3)]


@pytest.mark.parametrize("crops", [1, 3])
@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.07])
def test_gemma3_keeps_each_crops_first_k_and_its_text(crops, ratio):
    proc = processor(Gemma3MultiModalProcessor, DivPruneGemma3)
    full = gemma_crops(16, crops)
    out = replaced(proc, lambda i: full, ratio)
    k = divprune_ext.keep_count(16, ratio)
    assert out.full == gemma_crops(k, crops).full
    assert out.is_embed(out.full).tolist() == [t == IMG for t in out.full]


def test_one_run_families_refuse_several_runs():
    """Pixtral checkpoints served by LLaVA's class put break tokens between rows of one image."""
    proc = processor(LlavaMultiModalProcessor, DivPruneLlava)
    rows = PromptUpdateDetails.select_token_id([IMG] * 4 + [WORD] + [IMG] * 4 + [EOI], IMG)
    with pytest.raises(NotImplementedError, match=f"2 runs.*{KEY}=1.0"):
        replaced(proc, rows, 0.5)
    assert replaced(proc, [IMG] * 10, 0.5) == [IMG] * 5


def test_mixed_placeholder_ids_are_refused():
    proc = processor(LlavaMultiModalProcessor, DivPruneLlava)
    with pytest.raises(NotImplementedError, match="not one repeated token"):
        replaced(proc, [IMG] * 4 + [WORD], 0.5)


@pytest.mark.parametrize("model_cls", [DivPruneQwen3VL, DivPruneQwen3_5], ids=["qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("ratio, k", [(0.5, 2), (0.75, 3), (0.25, 1)])
def test_qwen3_vl_video_puts_every_kept_token_in_the_first_frame(ratio, k, model_cls):
    """One selection over the video's frames; the model fills the whole replacement (from_seq)."""
    proc = processor(Qwen3VLMultiModalProcessor, model_cls)
    frame = [WORD, NL, IMG, IMG, EOI]
    out = replaced(proc, PromptUpdateDetails.select_token_id(frame * 2, IMG), ratio, modality="video")
    assert out.full == [WORD, NL] + [IMG] * k + [EOI, WORD, NL, EOI] and out.is_embed is None
    unpruned = PromptUpdateDetails.select_token_id(frame * 2, IMG)
    assert replaced(proc, unpruned, 0.9, modality="video") is unpruned  # k == n: vLLM's own replacement
    assert replaced(proc, [IMG] * 8, 0.25, modality="image") == [IMG] * 2


def reference_rows(item, parts, ratio, columns=None):
    """Each part's rows at divprune_ext.select's picks (ascending), parts in order."""
    out, start = [], 0
    for n in parts:
        part = item[start:start + n]
        picks = divprune_ext.select(part if columns is None else part[:, :columns],
                                    divprune_ext.keep_count(n, ratio), sorted=True)
        out.append(part[picks])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_gemma3_selects_each_crop_apart(ratio):
    model = object.__new__(DivPruneGemma3)
    torch.manual_seed(0)
    items = [torch.randn(3 * 16, 8), torch.randn(16, 8), torch.randn(2 * 16, 8)]
    kwargs = {"num_patches": torch.tensor([3, 1, 2])}
    kept = model._prune(list(items), [ratio, 1.0, ratio], "image", kwargs)
    assert torch.equal(kept[0], reference_rows(items[0], [16] * 3, ratio))
    assert kept[1] is items[1]  # ratio 1.0: untouched
    assert torch.equal(kept[2], reference_rows(items[2], [16] * 2, ratio))


def qwen3_bare(hidden=8, levels=2, cls=DivPruneQwen3VL):
    model = object.__new__(cls)
    object.__setattr__(model, "visual_dim", hidden)
    object.__setattr__(model, "multiscale_dim", hidden * levels)
    object.__setattr__(model, "config", SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2)))
    return model


@pytest.mark.parametrize("cls", [DivPruneQwen3VL, DivPruneQwen3VLMoe], ids=["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("ratio", [0.5, 0.1])
def test_qwen3_vl_selects_on_merged_tokens_and_keeps_their_deepstack_rows(ratio, cls):
    model = qwen3_bare(cls=cls)
    torch.manual_seed(1)
    main = torch.randn(24, 8)
    deepstack = torch.randn(24, 16) * 100  # would decide the picks if it were compared
    item = torch.cat([main, deepstack], dim=1)
    kwargs = {"image_grid_thw": torch.tensor([[1, 8, 12]])}  # 4 x 6 merged tokens
    kept = model._prune([item], [ratio], "image", kwargs)[0]
    assert kept.shape[1] == 24 + OFFSET_INTS
    assert torch.equal(kept[:, :24], reference_rows(item, [24], ratio, columns=8))
    picks = divprune_ext.select(main, divprune_ext.keep_count(24, ratio), sorted=True)
    offsets = kept[:, 24:].contiguous().view(torch.int32)
    assert offsets[:, :3].tolist() == [[0, int(p) // 6, int(p) % 6] for p in picks]
    assert model.embedding_width() == 24


@pytest.mark.parametrize("ratio, k", [(0.5, 2), (0.75, 3), (0.25, 1)])
def test_gemma4_video_puts_every_kept_token_in_the_first_frame(ratio, k):
    """Frames "mm:ss <boi> tokens <eoi>", one selection over them; the model fills the whole replacement."""
    proc = processor(Gemma4VideoRatioCheck, DivPruneGemma4)
    frame = [WORD, NL, BOI, IMG, IMG, EOI]
    out = replaced(proc, PromptUpdateDetails.select_token_id(frame * 2, IMG), ratio, modality="video")
    assert out.full == [WORD, NL, BOI] + [IMG] * k + [EOI, WORD, NL, BOI, EOI] and out.is_embed is None
    image = PromptUpdateDetails.select_token_id([BOI] + [IMG] * 8 + [EOI], IMG)  # an image: one run
    assert replaced(proc, image, 0.25).full == [BOI, IMG, IMG, EOI]


def gemma4_bare(bidirectional=None):
    model = object.__new__(DivPruneGemma4)
    text = SimpleNamespace(use_bidirectional_attention=bidirectional)
    config = SimpleNamespace(video_token_id=IMG, boi_token_id=BOI, eoi_token_id=EOI, get_text_config=lambda: text)
    object.__setattr__(model, "config", config)
    # a timestamp "mm:ss" is one WORD, NL here (its text does not matter, its place does)
    object.__setattr__(model, "_tokenizer", SimpleNamespace(encode=lambda text, **kw: [WORD, NL]))
    embed = SimpleNamespace(embed_input_ids=lambda ids: ids.float()[:, None].expand(-1, 8) * -1.0)
    object.__setattr__(model, "get_language_model", lambda: embed)
    return model


def test_qwen3_vl_moe_keeps_its_own_processing_info():
    """vLLM's MoE class registers Qwen3-VL's processor with processing info for the MoE config."""
    assert DivPruneQwen3VLMoe._processor_factory.info is Qwen3VLMoeProcessingInfo


BOV, EOV, TS0, TS1 = 6, 7, 8, 10


def glm_video(tokens_per_frame, timestamps=(TS0, TS1)):
    """GLM-4.1V's replacement of a video: <|begin_of_video|>, per frame <|begin_of_image|> tokens
    <|end_of_image|> and its second, <|end_of_video|>; its frames' tokens are image tokens."""
    ids = [BOV]
    for n, second in zip(tokens_per_frame, timestamps):
        ids += [BOI] + [IMG] * n + [EOI, second]
    return ids + [EOV]


@pytest.mark.parametrize("ratio, k", [(0.5, 6), (0.25, 3), (0.1, 1)])
def test_glm4v_video_puts_every_kept_token_in_the_first_frame(ratio, k):
    proc = object.__new__(_pruning_class(Glm4vMultiModalProcessor, VideoText))
    proc._divprune_model = DivPruneGlm4v
    assert proc._family_name() == "Glm4vMultiModalProcessor"
    full = PromptUpdateDetails.select_token_id(glm_video([6, 6]), IMG)
    out = replaced(proc, full, ratio, modality="video")
    assert out.full == [BOV, BOI] + [IMG] * k + [EOI, TS0, BOI, EOI, TS1, EOV] and out.is_embed is None
    assert replaced(proc, [IMG] * 8, 0.25) == [IMG] * 2  # an image: one run


def glm_bare(hidden=4):
    model = object.__new__(DivPruneGlm4v)
    config = SimpleNamespace(image_token_id=IMG, image_start_token_id=BOI,
                             vision_config=SimpleNamespace(spatial_merge_size=2))
    object.__setattr__(model, "config", config)
    embed = SimpleNamespace(embed_input_ids=lambda ids: -ids[:, None].float().expand(-1, hidden))
    object.__setattr__(model, "get_language_model", lambda: embed)
    return model


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_gemma4_video_rows_are_laid_out_frame_by_frame(ratio):
    """Each kept token in its own frame's span, the timestamps and markers as the LLM's embeddings of
    them, every row with its token id (0 at the kept tokens, as vLLM reads multimodal tokens)."""
    model = gemma4_bare()
    torch.manual_seed(2)
    frames = [6, 4, 6]
    item = torch.randn(sum(frames), 8)
    kwargs = {"video_num_soft_tokens": [torch.tensor(frames)], "video_timestamps": [torch.tensor([0.0, 0.5, 1.0])]}
    rows = model._prune([item], [ratio], "video", kwargs)[0]
    picks = divprune_ext.select(item, divprune_ext.keep_count(16, ratio), sorted=True).tolist()
    bounds = [0, 6, 10, 16]
    ids = []
    for f in range(3):
        kept = [p for p in picks if bounds[f] <= p < bounds[f + 1]]
        ids += [WORD, NL, BOI] + [IMG] * len(kept) + [EOI]
    assert rows.shape == (len(ids), 8 + PLE_INTS * 4 // rows.element_size())
    carried = rows[:, 8:].contiguous().view(torch.int32)[:, 0].tolist()
    assert carried == [0 if t == IMG else t for t in ids]
    is_token = torch.tensor(ids) == IMG
    assert torch.equal(rows[is_token, :8], item[picks])
    assert torch.equal(rows[~is_token, :8], -torch.tensor(ids)[~is_token].float()[:, None].expand(-1, 8))


@pytest.mark.parametrize("bidirectional", [None, "vision"])
def test_gemma4_videos_of_bidirectional_models_are_not_pruned(monkeypatch, bidirectional):
    """vLLM's GPU attention would make a pruned video's whole span one bidirectional block."""
    monkeypatch.setattr(Gemma4MultiModalProcessor, "apply", lambda self, inputs, timing_ctx: "processed")
    proc = object.__new__(Gemma4VideoRatioCheck)
    object.__setattr__(proc, "info", SimpleNamespace(get_hf_config=lambda: gemma4_bare(bidirectional).config))

    def inputs(ratio, counts):
        return SimpleNamespace(hf_processor_mm_kwargs={} if ratio is None else {KEY: ratio},
                               mm_data_items=SimpleNamespace(get_all_counts=lambda: counts))

    assert proc.apply(inputs(None, {"video": 1}), None) == "processed"
    assert proc.apply(inputs(0.5, {"image": 2}), None) == "processed"
    if bidirectional:
        with pytest.raises(ValueError, match=f"{KEY}=0.5 with a video"):
            proc.apply(inputs(0.5, {"image": 1, "video": 1}), None)
    else:
        assert proc.apply(inputs(0.5, {"image": 1, "video": 1}), None) == "processed"
def test_internvl_video_keeps_each_frames_first_k_and_its_text():
    """vLLM's InternVL video: "Frame<i>: <img>" + frame tokens + "</img>" per frame, each frame selected
    apart (transformers writes them as images, one item each); an image (all its tiles) is one run."""
    proc = processor(InternS1MultiModalProcessor, DivPruneInternVL)
    frame = [WORD, WORD, BOI] + [IMG] * 16 + [EOI, NL]
    out = replaced(proc, PromptUpdateDetails.select_token_id(frame * 3, IMG), 0.25, modality="video")
    assert out.full == ([WORD, WORD, BOI] + [IMG] * 4 + [EOI, NL]) * 3
    assert out.is_embed(out.full).tolist() == [t == IMG for t in out.full]
    image = replaced(proc, PromptUpdateDetails.select_token_id([BOI] + [IMG] * 48 + [EOI], IMG), 0.25)
    assert image.full == [BOI] + [IMG] * 12 + [EOI]


@pytest.mark.parametrize("ratio", [0.5, 0.1])
def test_internvl_selects_each_frame_apart_and_each_image_whole(ratio):
    model = object.__new__(DivPruneInternVL)
    torch.manual_seed(2)
    video, image = torch.randn(3 * 16, 8), torch.randn(5 * 16, 8)
    kept = model._prune([video], [ratio], "video", {"video_num_patches": torch.tensor([3])})[0]
    assert torch.equal(kept, reference_rows(video, [16] * 3, ratio))
    kept = model._prune([image], [ratio], "image", {"image_num_patches": torch.tensor([5])})[0]
    assert torch.equal(kept, reference_rows(image, [5 * 16], ratio))


BRK, END = 6, 7


@pytest.mark.parametrize("ratio, k", [(0.5, 6), (0.25, 3), (0.1, 1)])
def test_mistral3_puts_every_kept_token_in_the_first_row(ratio, k):
    """One selection over an image's rows; [IMG_BREAK] / [IMG_END] stay; the model fills the whole
    replacement (from_seq), each row's kept tokens before its break."""
    proc = processor(Mistral3MultiModalProcessor, DivPruneMistral3)
    rows = ([IMG] * 4 + [BRK]) * 3
    rows[-1] = END
    out = replaced(proc, PromptUpdateDetails.select_token_id(rows, IMG), ratio)
    assert out.full == [IMG] * k + [BRK, BRK, END] and out.is_embed is None
    one_row = PromptUpdateDetails.select_token_id([IMG] * 4 + [END], IMG)
    assert replaced(proc, one_row, 0.5).full == [IMG] * 2 + [END]
    assert replaced(proc, one_row, 0.9) is one_row  # k == n: vLLM's own replacement


class _Embedding:
    def embed_input_ids(self, ids):
        return ids.float().unsqueeze(1).expand(-1, 8) * 1000  # a recognisable row per token id


def mistral3_bare():
    model = object.__new__(DivPruneMistral3)
    object.__setattr__(model, "config", SimpleNamespace(vision_config=SimpleNamespace(patch_size=8),
                                                        spatial_merge_size=2))
    object.__setattr__(model, "_row_end_ids", (BRK, END))
    object.__setattr__(model, "get_language_model", lambda: _Embedding())
    return model


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_mistral3_writes_each_rows_kept_tokens_before_its_break(ratio):
    model = mistral3_bare()
    torch.manual_seed(3)
    rows, columns = 3, 5  # pixels 48 x 80: 16 px a merged token
    item = torch.randn(rows * columns, 8)
    kwargs = {"pixel_values": [torch.zeros(3, 48, 80)]}
    kept = model._prune([item], [ratio], "image", kwargs)[0]
    picks = divprune_ext.select(item, divprune_ext.keep_count(rows * columns, ratio), sorted=True).tolist()
    expected = []
    for r in range(rows):
        expected += [item[p] for p in picks if p // columns == r]
        expected.append(torch.full((8,), 1000.0 * (BRK if r < rows - 1 else END)))
    assert torch.equal(kept, torch.stack(expected))
def test_glm4v_pruned_video_rows_are_its_layout_at_unpruned_positions():
    """Frames of 2 x 3 merged tokens; the kept tokens 1, 4, 5 (frame 0) and 8 (frame 1)."""
    model = glm_bare()
    item = torch.arange(12 * 4, dtype=torch.float32).view(12, 4)
    kwargs = {"video_grid_thw": torch.tensor([[2, 4, 6]]), TEXT_FIELD: [torch.tensor(glm_video([0, 0]))]}
    picks = torch.tensor([1, 4, 5, 8])
    rows = model._kept(item, picks, "video", 0, kwargs)
    ids = [BOV, BOI, IMG, IMG, IMG, EOI, TS0, BOI, IMG, EOI, TS1, EOV]
    kept = iter(item[picks])
    expected = [next(kept) if t == IMG else torch.full((4,), -float(t)) for t in ids]
    assert torch.equal(rows[:, :4], torch.stack(expected))
    # GLM-4.1V's rope index on the unpruned video: <|begin_of_video|> 0, <|begin_of_image|> 1, frame 0 at
    # (2, 2 + row, 2 + column), the text after it from 2 + max(2, 3), frame 1 at (8, 8 + row, 8 + column)
    offsets = rows[:, 4:].contiguous().view(torch.int32)[:, :3].tolist()
    assert offsets == [[0, 0, 0], [1, 1, 1], [2, 2, 3], [2, 3, 3], [2, 3, 4], [5, 5, 5], [6, 6, 6], [7, 7, 7],
                       [8, 8, 10], [11, 11, 11], [12, 12, 12], [13, 13, 13]]


def test_glm4v_full_span_puts_each_frame_back():
    model = glm_bare()
    feature = SimpleNamespace(modality="video", data={"video_grid_thw": SimpleNamespace(data=torch.tensor([2, 4, 6]))})
    assert model.full_span(feature, glm_video([4, 0])) == glm_video([6, 6])
    assert model.full_span(feature, glm_video([6, 6])) == glm_video([6, 6])
@pytest.mark.parametrize("cls", [DivPruneQwen3_5, DivPruneQwen3_5Moe], ids=["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("ratio", [0.5, 0.1])
def test_qwen3_5_rows_are_the_merged_tokens_alone(cls, ratio):
    """Qwen3.5's vision tower has no deepstack (vLLM sets multiscale_dim 0): a row is the merged
    token, selected whole, with its offsets after it."""
    model = qwen3_bare(levels=0, cls=cls)
    torch.manual_seed(2)
    item = torch.randn(24, 8)
    kept = model._prune([item], [ratio], "image", {"image_grid_thw": torch.tensor([[1, 8, 12]])})[0]
    assert kept.shape[1] == 8 + OFFSET_INTS and model.embedding_width() == 8
    assert torch.equal(kept[:, :8], reference_rows(item, [24], ratio))


@pytest.mark.parametrize("cls", [DivPruneQwen3_5, DivPruneQwen3_5Moe], ids=["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_takes_vllms_qwen3_5_processing(cls):
    """The plugin's processor wraps the one vLLM registers for its Qwen3.5 class (its info reads a
    Qwen3.5 config), not Qwen3-VL's, whose pruning code it shares."""
    vllm_cls = next(c for c in cls.__mro__[1:] if "_processor_factory" in c.__dict__)
    assert vllm_cls.__name__ == cls.__name__.replace("DivPrune", "") + "ForConditionalGeneration"
    assert cls._processor_factory.info is vllm_cls._processor_factory.info
    assert cls._processor_factory.dummy_inputs is vllm_cls._processor_factory.dummy_inputs
    assert cls._processor_factory.info is not DivPruneQwen3VL._processor_factory.info
