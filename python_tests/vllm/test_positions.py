"""The multimodal RoPE path of the plugin without an engine: vLLM's own classes, a stub parent.

- ``get_mrope_input_positions`` at k == n is vLLM's own (Qwen2-VL and Qwen2.5-VL, images and
  videos, tall and wide grids); with pruned items, every text token keeps the position it has
  in the unpruned prompt, placeholders get their item's start, and the decode delta continues
  from the unpruned prompt (also when the prompt ends with an item).
- the (t, h, w) offsets ride with their rows exactly, in bf16 above 256 too (vLLM's own video
  pruning carries them in embedding columns, which bf16 rounds there), through chunking, and
  ``forward`` adds them without touching the runner's position buffer.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import divprune_ext
from divprune_ext.vllm.core import OFFSET_INTS, _ratio_bits
from divprune_ext.vllm.qwen_vl import DivPruneQwen2_5_VL, DivPruneQwen2VL, DivPruneQwen3VL, QwenVLPruning
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

MERGE = 2


def feature(modality, offset, length, thw, seconds=None):
    data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(thw))}
    if seconds is not None:
        data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(seconds))
    return SimpleNamespace(modality=modality, data=data, mm_position=SimpleNamespace(offset=offset, length=length))


def bare(cls, tokens_per_second=2.0):
    """An instance of a plugin model class with just the config its position code reads."""
    model = object.__new__(cls)
    config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=tokens_per_second),
                             text_config=SimpleNamespace(hidden_size=8))
    object.__setattr__(model, "config", config)
    return model


# (modality, text before, (t, h, w) in patches, second_per_grid_ts)
ITEMS = [("image", 3, (1, 8, 4), None),      # tall: 4 x 2 merged
         ("image", 2, (1, 4, 12), None),     # wide: 2 x 6
         ("video", 1, (3, 4, 6), 0.5),       # t scaled by 0.5 * tokens_per_second
         ("image", 0, (1, 6, 6), None)]      # right after the video


def prompt(items, keep, tail=4):
    """Token ids and mm features of a prompt of the items with keep(n) placeholders each."""
    tokens, features = [], []
    for modality, before, thw, seconds in items:
        tokens += [1] * before
        n = thw[0] * thw[1] * thw[2] // MERGE ** 2
        features.append(feature(modality, len(tokens), keep(n), thw, seconds))
        tokens += [9] * keep(n)
    return tokens + [1] * tail, features


@pytest.mark.parametrize("cls, vllm_cls", [(DivPruneQwen2VL, Qwen2VLForConditionalGeneration),
                                            (DivPruneQwen2_5_VL, Qwen2_5_VLForConditionalGeneration)])
@pytest.mark.parametrize("tail", [4, 0])
def test_unpruned_positions_are_vllms_own(cls, vllm_cls, tail):
    model = bare(cls)
    tokens, features = prompt(ITEMS, lambda n: n, tail)
    ours, our_delta = model.get_mrope_input_positions(tokens, features)
    theirs, their_delta = vllm_cls.get_mrope_input_positions(model, tokens, features)
    assert torch.equal(ours, theirs) and our_delta == their_delta


@pytest.mark.parametrize("ratio", [0.5, 0.1])
@pytest.mark.parametrize("tail", [4, 0])
def test_pruned_prompt_keeps_the_unpruned_positions_of_text(ratio, tail):
    model = bare(DivPruneQwen2_5_VL)
    full_tokens, full_features = prompt(ITEMS, lambda n: n, tail)
    full, full_delta = model.get_mrope_input_positions(full_tokens, full_features)
    keep = lambda n: divprune_ext.keep_count(n, ratio)  # noqa: E731
    tokens, features = prompt(ITEMS, keep, tail)
    pruned, delta = model.get_mrope_input_positions(tokens, features)
    assert pruned.shape == (3, len(tokens))
    is_text = torch.tensor(full_tokens) == 1
    assert torch.equal(pruned[:, torch.tensor(tokens) == 1], full[:, is_text])
    for f_full, f in zip(full_features, features):  # placeholders: the item's start, in all three rows
        start = full[:, f_full.mm_position.offset]
        assert torch.equal(pruned[:, f.mm_position.offset:f.mm_position.offset + f.mm_position.length],
                           start[:, None].expand(3, f.mm_position.length))
    # decoding continues where the unpruned prompt would: the next token's position is the same
    assert len(tokens) + delta == len(full_tokens) + full_delta
    assert len(full_tokens) + full_delta == int(full.max()) + 1


# Qwen3-VL: token ids of its config; a video is per frame a timestamp (TS), VS, the frame's tokens, VE.
Q3 = dict(image_token_id=8, video_token_id=7, vision_start_token_id=5, vision_end_token_id=6)
TS = 3


def qwen3_bare():
    model = bare(DivPruneQwen3VL)
    model.config.__dict__.update(Q3)
    return model


def qwen3_prompt(keep, tail=3):
    """Text, a tall image, text, a 3-frame video (4 x 6 merged a frame), an image right after it, text."""
    tokens, features = [1, 1], []

    def image(thw):
        n = thw[1] * thw[2] // MERGE ** 2
        features.append(feature("image", len(tokens), keep(n), thw))
        tokens.extend([Q3["image_token_id"]] * keep(n))

    image((1, 8, 4))
    tokens.extend([1] * 2)
    frames, per_frame = 3, 4 * 6
    k = keep(frames * per_frame)
    counts = [k] + [0] * (frames - 1) if k < frames * per_frame else [per_frame] * frames
    span = []
    for count in counts:
        span += [TS, TS, Q3["vision_start_token_id"]] + [Q3["video_token_id"]] * count + [Q3["vision_end_token_id"]]
    features.append(feature("video", len(tokens), len(span), (frames, 8, 12)))
    tokens.extend(span)
    image((1, 6, 6))
    return tokens + [1] * tail, features


@pytest.mark.parametrize("tail", [3, 0])
def test_qwen3_vl_unpruned_positions_are_vllms_own(tail):
    model = qwen3_bare()
    tokens, features = qwen3_prompt(lambda n: n, tail)
    ours, our_delta = model.get_mrope_input_positions(tokens, features)
    theirs, their_delta = Qwen3VLForConditionalGeneration._get_mrope_input_positions(tokens, features, model.config)
    assert torch.equal(ours, theirs) and our_delta == their_delta


@pytest.mark.parametrize("ratio", [0.5, 0.1])
@pytest.mark.parametrize("tail", [3, 0])
def test_qwen3_vl_pruned_prompt_keeps_the_unpruned_positions_of_text(ratio, tail):
    """Images and a video (its kept tokens all in the first frame, its timestamps and markers text)."""
    model = qwen3_bare()
    full_tokens, full_features = qwen3_prompt(lambda n: n, tail)
    full, full_delta = model.get_mrope_input_positions(full_tokens, full_features)
    tokens, features = qwen3_prompt(lambda n: divprune_ext.keep_count(n, ratio), tail)
    pruned, delta = model.get_mrope_input_positions(tokens, features)
    assert pruned.shape == (3, len(tokens))
    placeholder = (Q3["image_token_id"], Q3["video_token_id"])
    is_text = torch.tensor([t not in placeholder for t in full_tokens])
    starts = [full[:, f.mm_position.offset] for f in full_features]
    for f, start in zip(features, starts):  # a pruned item: every token of its span at the span's start
        span = pruned[:, f.mm_position.offset:f.mm_position.offset + f.mm_position.length]
        assert torch.equal(span, start[:, None].expand_as(span))
        tokens[f.mm_position.offset:f.mm_position.offset + f.mm_position.length] = [0] * f.mm_position.length
    kept_text = torch.tensor([t not in placeholder and t != 0 for t in tokens])
    video = full_features[1].mm_position
    is_text[video.offset:video.offset + video.length] = False  # the video's text rides in its rows
    assert torch.equal(pruned[:, kept_text], full[:, is_text])
    assert len(tokens) + delta == len(full_tokens) + full_delta == int(full.max()) + 1


def test_tall_image_does_not_shift_the_text_after_it():
    """vLLM's own video pruning advanced the text after an item by the grid width; the text after a
    tall item must start after its tallest row (h > w)."""
    model = bare(DivPruneQwen2VL)
    tokens, features = prompt([("image", 2, (1, 20, 4), None)], lambda n: 3, tail=2)
    positions, _ = model.get_mrope_input_positions(tokens, features)
    assert positions[:, -2].tolist() == [2 + 10, 2 + 10, 2 + 10]  # start 2, merged 10 x 2: max offset 9


class Parent:
    """Stands for vLLM's model class: what the plugin's overrides call with super()."""
    features = None

    def embed_multimodal(self, **kwargs):
        return list(self.features)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self.merged = multimodal_embeddings
        return torch.zeros(len(input_ids), 8)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return positions


class Stub(QwenVLPruning, Parent):
    pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_offsets_ride_exactly_with_their_rows(dtype):
    model = bare(Stub)
    thw = (1, 2 * 300, 2 * 2)  # merged 300 x 2: h offsets up to 299
    n = 600
    torch.manual_seed(0)
    model.features = [torch.randn(n, 8).to(dtype)]
    ratio = 0.25
    kept, = model.embed_multimodal(image_grid_thw=torch.tensor([thw]), divprune_image_ratio=_ratio_bits(ratio, 1))
    k = divprune_ext.keep_count(n, ratio)
    assert kept.shape == (k, 8 + OFFSET_INTS * 4 // kept.element_size()) and kept.dtype == dtype
    picks = divprune_ext.select(model.features[0], k, sorted=True, validate=False)
    assert torch.equal(kept[:, :8], model.features[0][picks])
    expected = torch.from_numpy(np.indices((1, 300, 2)).reshape(3, -1))[:, picks]  # (t, row, column)
    assert expected.max() > 256 and not torch.equal(expected.to(torch.bfloat16).long(), expected)

    # the runner: text, then the item's placeholders in two prefill chunks (start position 5)
    for chunks in ([k], [k // 3, k - k // 3]):
        start = 0
        collected = []
        for size in chunks:
            rows = kept[start:start + size]
            mask = torch.zeros(size + 2, dtype=torch.bool)
            mask[1:1 + size] = True
            buffer = torch.full((3, size + 2), 5, dtype=torch.int64)
            model.embed_input_ids(torch.zeros(size + 2, dtype=torch.long), [rows], is_multimodal=mask)
            assert torch.equal(model.merged[0], rows[:, :8])
            positions = model.forward(None, buffer, inputs_embeds=torch.zeros(size + 2, 8))
            assert torch.equal(buffer, torch.full((3, size + 2), 5))  # the runner's buffer is untouched
            assert torch.equal(positions[:, [0, -1]], buffer[:, [0, -1]])
            collected.append(positions[:, 1:1 + size] - 5)
            start += size
        assert torch.equal(torch.cat(collected, dim=1), expected)
    # the next step (decode) adds nothing
    assert torch.equal(model.forward(None, torch.zeros(3, 1, dtype=torch.long), inputs_embeds=torch.zeros(1, 8)),
                       torch.zeros(3, 1, dtype=torch.long))


def test_items_at_ratio_one_are_returned_untouched():
    model = bare(Stub)
    model.features = [torch.randn(16, 8), torch.randn(4, 8)]
    out = model.embed_multimodal(image_grid_thw=torch.tensor([[1, 8, 8], [1, 4, 4]]),
                                 divprune_image_ratio=torch.cat([_ratio_bits(1.0, 1), _ratio_bits(0.5, 1)]))
    assert out[0] is model.features[0] and out[1].shape == (2, 8 + 4)


@pytest.mark.parametrize("seconds", [0.5, 0.35])
def test_video_offsets_are_vllms_own_positions(seconds):
    """A pruned video's rows carry the offsets vLLM's Qwen2.5-VL gives those tokens unpruned
    (its frames scaled by second_per_grid_ts x tokens_per_second and truncated)."""
    model = bare(DivPruneQwen2_5_VL)
    thw, n = (5, 4, 6), 5 * 2 * 3
    kwargs = {"video_grid_thw": torch.tensor([thw]), "second_per_grid_ts": torch.tensor([seconds])}
    picks = torch.tensor([0, 7, 12, 20, 29])
    kept = model._kept(torch.randn(n, 8), picks, "video", 0, kwargs)
    offsets = kept[:, 8:].contiguous().view(torch.int32)[:, :3].t().long()
    tokens, features = prompt([("video", 0, thw, seconds)], lambda n: n, tail=0)
    theirs, _ = Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(model, tokens, features)
    assert torch.equal(offsets, theirs[:, picks])


def test_pipeline_parallelism_is_refused():
    """Later pipeline stages never see the offsets (only the first embeds the prompt)."""
    config = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="pipeline parallelism"):
        DivPruneQwen2VL(vllm_config=config)
