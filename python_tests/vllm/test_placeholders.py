"""The plugin's placeholder and selection bookkeeping without an engine: vLLM's own classes.

- Processor side: an item's replacement keeps, per run of placeholders, the first
  ``kept_per_run`` of them and every other token (Gemma 3's ``<start_of_image>`` /
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
from divprune_ext.vllm.llava import DivPruneLlava
from divprune_ext.vllm.qwen3_5 import DivPruneQwen3_5, DivPruneQwen3_5Moe
from divprune_ext.vllm.qwen_vl import DivPruneQwen3VL
from vllm.model_executor.models.gemma3_mm import Gemma3MultiModalProcessor
from vllm.model_executor.models.llava import LlavaMultiModalProcessor
from vllm.model_executor.models.qwen3_vl import Qwen3VLMultiModalProcessor
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


@pytest.mark.parametrize("ratio", [0.5, 0.1])
def test_qwen3_vl_selects_on_merged_tokens_and_keeps_their_deepstack_rows(ratio):
    model = qwen3_bare()
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
