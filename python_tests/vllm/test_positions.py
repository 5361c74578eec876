"""The multimodal RoPE path of the plugin without an engine: vLLM's own classes, a stub parent.

- ``get_mrope_input_positions`` at k == n is vLLM's own (Qwen2-VL and Qwen2.5-VL, images and
  videos, tall and wide grids); with pruned items, every text token keeps the position it has
  in the unpruned prompt, placeholders get their item's start, and the decode delta continues
  from the unpruned prompt (also when the prompt ends with an item).
- the (t, h, w) offsets ride with their rows exactly, in bf16 above 256 too (vLLM's own video
  pruning carries them in embedding columns, which bf16 rounds there), through chunking, and
  ``forward`` adds them in place to the runner's position buffer, the one a CUDA graph captured;
- under CUDA-graph semantics (:class:`Graph`: the ops of ``forward`` captured once, replayed on
  the captured tensors without the Python around them) the decoder reads the exact positions;
- no host sync (everything runs on the ``meta`` device, which has no data to read back);
- configurations that would lose the offsets are refused at engine start.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import divprune_ext
from divprune_ext.vllm.core import OFFSET_INTS, _ratio_bits
from divprune_ext.vllm.core import MRoPEPruning
from divprune_ext.vllm.qwen3_5 import DivPruneQwen3_5, DivPruneQwen3_5Moe
from divprune_ext.vllm.qwen_vl import DivPruneQwen2_5_VL, DivPruneQwen2VL, DivPruneQwen3VL
from mrope_stubs import MERGE, Stub, bare, feature
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

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


def qwen3_bare(cls=DivPruneQwen3VL):
    model = bare(cls)
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


def pruned_rows(dtype=torch.float32, n=600, ratio=0.25):
    """A tall image (merged 300 x 2: h offsets up to 299) pruned: its kept rows with their offsets,
    the source rows, and the expected (3, k) offsets."""
    model = bare(Stub)
    thw = (1, 2 * 300, 2 * 2)
    torch.manual_seed(0)
    model.features = [torch.randn(n, 8).to(dtype)]
    kept, = model.embed_multimodal(image_grid_thw=torch.tensor([thw]), divprune_image_ratio=_ratio_bits(ratio, 1))
    picks = divprune_ext.select(model.features[0], divprune_ext.keep_count(n, ratio), sorted=True, validate=False)
    expected = torch.from_numpy(np.indices((1, 300, 2)).reshape(3, -1))[:, picks]  # (t, row, column)
    return kept, model.features[0][picks], expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_offsets_ride_exactly_with_their_rows(dtype):
    kept, source, expected = pruned_rows(dtype)
    k = len(source)
    assert kept.shape == (k, 8 + OFFSET_INTS * 4 // kept.element_size()) and kept.dtype == dtype
    assert torch.equal(kept[:, :8], source)
    assert expected.max() > 256 and not torch.equal(expected.to(torch.bfloat16).long(), expected)

    # the runner: text, then the item's placeholders in two prefill chunks (start position 5)
    model = bare(Stub)
    for chunks in ([k], [k // 3, k - k // 3]):
        start = 0
        collected = []
        for size in chunks:
            rows = kept[start:start + size]
            mask = torch.zeros(size + 2, dtype=torch.bool)
            mask[1:1 + size] = True
            buffer = torch.full((3, size + 3), 5, dtype=torch.int64)  # one padding column
            model.embed_input_ids(torch.zeros(size + 2, dtype=torch.long), [rows], is_multimodal=mask)
            assert torch.equal(model.merged[0], rows[:, :8])
            seen = model.forward(None, buffer, inputs_embeds=torch.zeros(size + 3, 8))
            assert torch.equal(seen, buffer)  # the decoder reads the runner's buffer, corrected in place
            assert (buffer[:, [0, -2, -1]] == 5).all()  # text and padding keep theirs
            assert not model.position_offsets.any()  # consumed
            collected.append(buffer[:, 1:1 + size] - 5)
            start += size
        assert torch.equal(torch.cat(collected, dim=1), expected)
    # the next step (decode) adds nothing
    assert torch.equal(model.forward(None, torch.zeros(3, 1, dtype=torch.long), inputs_embeds=torch.zeros(1, 8)),
                       torch.zeros(3, 1, dtype=torch.long))


class Graph(TorchDispatchMode):
    """A CUDA graph's semantics on the CPU. Capture (``with graph:``) runs and records every tensor
    op with the tensors it read and wrote; :meth:`replay` runs the recorded ops again on the captured
    tensors, writing each result into the memory the captured result had, and none of the Python
    around them: what is not a tensor op at capture is gone at replay, and a tensor the code
    makes afresh at replay time is never read."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out

    def replay(self):
        for func, args, kwargs, captured in self.ops:
            result = func(*args, **kwargs)
            for old, new in zip(tree_leaves(captured), tree_leaves(result)):
                if isinstance(old, torch.Tensor) and new is not old:
                    old.copy_(new)


def test_a_replayed_graph_reads_the_exact_positions():
    """Capture forward on the runner's buffers in a dummy step (no item), then a real step: the runner
    refills its buffers, calls embed_input_ids eagerly (vLLM does, before every replay) and replays."""
    kept, _, expected = pruned_rows()
    k = len(kept)
    model = bare(Stub)
    tokens = k + 6  # 3 text tokens, the item, 3 text tokens; capture size 64 more (padding)
    positions_buffer = torch.zeros(3, tokens + 64, dtype=torch.int64)
    embeds_buffer = torch.zeros(tokens + 64, 8)
    with Graph() as graph:
        seen = model.forward(None, positions_buffer, inputs_embeds=embeds_buffer)
    assert not seen.any()
    for step in range(2):  # the same graph serves two steps
        base = torch.arange(len(positions_buffer[0])).expand(3, -1) + 100 * step
        positions_buffer.copy_(base)  # the runner's prepare_positions
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[3:3 + k] = True
        model.embed_input_ids(torch.zeros(tokens, dtype=torch.long), [kept], is_multimodal=mask)
        graph.replay()
        want = base.clone()
        want[:, 3:3 + k] += expected
        assert torch.equal(seen, want)


def test_no_host_sync():
    """embed_input_ids and forward on the meta device: any read of data back to the host
    (``nonzero``, ``item``, boolean indexing, ``tolist``) raises there."""
    kept, _, _ = pruned_rows()
    model = bare(Stub, device="meta")
    mask = torch.zeros(len(kept) + 2, dtype=torch.bool)
    mask[1:-1] = True
    model.embed_input_ids(torch.zeros(len(mask), dtype=torch.long, device="meta"), [kept.to("meta")],
                          is_multimodal=mask.to("meta"))
    seen = model.forward(None, torch.zeros(3, len(mask), dtype=torch.int64, device="meta"),
                         inputs_embeds=torch.zeros(len(mask), 8, device="meta"))
    assert seen.device.type == "meta" and seen.shape == (3, len(mask))


def test_a_step_longer_than_the_buffer_is_an_error():
    model = bare(Stub, max_tokens=4)
    with pytest.raises(RuntimeError, match="max_num_batched_tokens"):
        model.forward(None, torch.zeros(3, 5, dtype=torch.int64), inputs_embeds=torch.zeros(5, 8))


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


def engine_config(pipeline=1, dbo=False, tokens=64):
    return SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=pipeline, use_ubatching=dbo),
                           scheduler_config=SimpleNamespace(max_num_batched_tokens=tokens))


@pytest.mark.parametrize("cls", [DivPruneQwen2VL, DivPruneQwen2_5_VL, DivPruneQwen3VL, DivPruneQwen3_5])
@pytest.mark.parametrize("setting, message", [(dict(pipeline=2), "pipeline parallelism"),
                                              (dict(dbo=True), "micro-batching")])
def test_configurations_that_lose_the_offsets_are_refused(cls, setting, message):
    """Later pipeline stages never see the offsets (only the first embeds the prompt); with
    micro-batching, forward runs once per micro-batch on a slice of the positions."""
    with pytest.raises(ValueError, match=message):
        cls(vllm_config=engine_config(**setting))


@pytest.mark.parametrize("cls", [DivPruneQwen3_5, DivPruneQwen3_5Moe], ids=["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.1])
def test_qwen3_5_positions_are_qwen3_vls(cls, ratio):
    """vLLM's Qwen3.5 class computes positions with its Qwen3-VL parent's code: so does the plugin."""
    keep = lambda n: divprune_ext.keep_count(n, ratio)  # noqa: E731
    tokens, features = qwen3_prompt(keep)
    ours, our_delta = qwen3_bare(cls).get_mrope_input_positions(tokens, features)
    theirs, their_delta = qwen3_bare().get_mrope_input_positions(tokens, features)
    assert torch.equal(ours, theirs) and our_delta == their_delta


@pytest.mark.parametrize("cls", [DivPruneQwen2VL, DivPruneQwen2_5_VL, DivPruneQwen3VL, DivPruneQwen3_5,
                                 DivPruneQwen3_5Moe])
def test_the_position_code_runs_before_vllms(cls):
    """The plugin's overrides come first in the class's method order (vLLM's own forward, e.g. the
    Qwen3.5 class that vLLM 0.34 runs on CUDA, would never add the offsets)."""
    for name in ("forward", "embed_input_ids", "get_mrope_input_positions"):
        assert getattr(cls, name) is getattr(MRoPEPruning, name), name
