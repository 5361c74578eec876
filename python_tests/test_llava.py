"""divprune_ext.llava on tiny randomly initialised LLaVA, LLaVA-NeXT and LLaVA-NeXT-Video models.

Models run in float64 so that batched and one-by-one runs agree to ~1e-12 and
greedy decoding can't flip on rounding.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="llava extra: pip install transformers")
import divprune_ext  # noqa: E402
from divprune_ext import hf, llava  # noqa: E402
from hf_tiny import one_thread  # noqa: E402,F401

IMAGE_TOKEN, VIDEO_TOKEN, PAD = 99, 98, 0
GRID = [[28, 28], [28, 56], [56, 28], [56, 56]]
KINDS = ["llava", "llava_next", "llava_next_video"]


def tiny_model(kind):
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=7)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, vocab_size=100, max_position_embeddings=512,
                                    pad_token_id=PAD)
    common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN,
                  vision_feature_layer=-1)
    torch.manual_seed(0)
    if kind == "llava":
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**common))
    elif kind == "llava_next":
        model = transformers.LlavaNextForConditionalGeneration(
            transformers.LlavaNextConfig(image_grid_pinpoints=GRID, **common))
    else:
        model = transformers.LlavaNextVideoForConditionalGeneration(transformers.LlavaNextVideoConfig(
            image_grid_pinpoints=GRID, video_token_id=VIDEO_TOKEN, spatial_pool_stride=2, **common))
    model.generation_config.pad_token_id = PAD
    return model.double().eval()


def pixel_inputs(model, kind, images, videos=0, seed=0):
    """Random pixels for `images` images (and `videos` videos), plus each one's token count."""
    g = torch.Generator().manual_seed(seed)
    inputs, counts = {}, []
    if kind == "llava":
        inputs["pixel_values"] = torch.randn(images, 3, 28, 28, generator=g, dtype=torch.float64)
        counts += [16] * images
    else:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        sizes = torch.tensor([[28, 56], [56, 56], [56, 28]] * images)[:images]
        patches = [image_size_to_num_patches(s.tolist(), GRID, 28) for s in sizes]
        inputs["pixel_values"] = torch.randn(images, max(patches), 3, 28, 28, generator=g, dtype=torch.float64)
        inputs["image_sizes"] = sizes
        ids = torch.zeros(1, 1, dtype=torch.long)
        counts += [len(v.features) for v in hf.visual_features(model, ids, pixel_values=inputs["pixel_values"],
                                                                image_sizes=sizes)]
    if videos:
        inputs["pixel_values_videos"] = torch.randn(videos, 4, 3, 28, 28, generator=g, dtype=torch.float64)
    return inputs, counts


def prompt(counts, token, seed, video_count=None):
    """Text, then each visual item's tokens separated by text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (3,), generator=g).tolist()
    for n in counts:
        ids += [token] * n + torch.randint(1, 90, (2,), generator=g).tolist()
    if video_count is not None:
        ids += [VIDEO_TOKEN] * video_count + torch.randint(1, 90, (2,), generator=g).tolist()
    return ids


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def batch_for(model, kind, images_per_row=(1, 2)):
    """A left-padded batch: row n has images_per_row[n] images."""
    inputs, counts = pixel_inputs(model, kind, sum(images_per_row))
    rows, start = [], 0
    for n, images in enumerate(images_per_row):
        rows.append(prompt(counts[start:start + images], IMAGE_TOKEN, seed=n))
        start += images
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, **inputs}, counts


@pytest.fixture(scope="module", params=KINDS)
def kind_and_model(request):
    return request.param, tiny_model(request.param)


def test_keep_all_gives_the_same_logits(kind_and_model):
    kind, model = kind_and_model
    inputs, _ = batch_for(model, kind)
    expected = model(**inputs).logits
    pruned = llava.prune_inputs(model, **inputs, keep_ratio=1.0)
    assert torch.equal(pruned["attention_mask"], inputs["attention_mask"])
    got = model(**pruned).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-12)


@pytest.mark.parametrize("do_sample", [False, True])
def test_keep_all_generates_the_same_ids(kind_and_model, do_sample):
    kind, model = kind_and_model
    inputs, _ = batch_for(model, kind)
    settings = dict(max_new_tokens=6, do_sample=do_sample, top_k=0 if do_sample else None)
    torch.manual_seed(1)
    expected = model.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]
    torch.manual_seed(1)
    got = model.generate(**llava.prune_inputs(model, **inputs, keep_ratio=1.0), **settings)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("keep_ratio", [0.1, 0.3])
def test_prefill_shrinks_by_the_pruned_tokens(kind_and_model, keep_ratio):
    kind, model = kind_and_model
    inputs, counts = batch_for(model, kind, images_per_row=(1, 2))
    pruned = llava.prune_inputs(model, **inputs, keep_ratio=keep_ratio)
    removed = [n - divprune_ext.keep_count(n, keep_ratio) for n in counts]
    real = inputs["attention_mask"].sum(dim=1)
    assert pruned["attention_mask"].sum(dim=1).tolist() == [real[0] - removed[0], real[1] - removed[1] - removed[2]]
    assert pruned["inputs_embeds"].shape[1] == max(pruned["attention_mask"].sum(dim=1))
    assert model.generate(**pruned, max_new_tokens=3, do_sample=False).shape == (2, 3)


@pytest.mark.parametrize("order", ["original", "selection"])
def test_kept_features_are_the_selected_ones(kind_and_model, order):
    kind, model = kind_and_model
    inputs, counts = batch_for(model, kind, images_per_row=(1,))
    features = hf.visual_features(model, **inputs)[0].features
    picks = torch.ops.divprune.select(features.float(), divprune_ext.keep_count(counts[0], 0.25))
    expected = features[picks if order == "selection" else picks.sort().values]
    pruned = llava.prune_inputs(model, **inputs, keep_ratio=0.25, order=order)
    first_visual = 3  # after three text tokens, with no padding in a one-row batch
    got = pruned["inputs_embeds"][0, first_visual:first_visual + len(picks)]
    assert torch.equal(got, expected)
    text = model.get_input_embeddings()(inputs["input_ids"][0, :first_visual])
    assert torch.equal(pruned["inputs_embeds"][0, :first_visual], text)


def test_batched_equals_one_by_one(kind_and_model):
    kind, model = kind_and_model
    inputs, counts = batch_for(model, kind, images_per_row=(1, 2))
    batched = llava.prune_inputs(model, **inputs, keep_ratio=0.2)
    batched_ids = model.generate(**batched, max_new_tokens=5, do_sample=False)
    batched_last = model(**batched).logits[:, -1]
    image_of_row = [[0], [1, 2]]
    for row in range(2):
        single = {"input_ids": inputs["input_ids"][row:row + 1][inputs["attention_mask"][row:row + 1].bool()][None]}
        single["attention_mask"] = torch.ones_like(single["input_ids"])
        single["pixel_values"] = inputs["pixel_values"][image_of_row[row]]
        if "image_sizes" in inputs:
            single["image_sizes"] = inputs["image_sizes"][image_of_row[row]]
        alone = llava.prune_inputs(model, **single, keep_ratio=0.2)
        assert torch.equal(model.generate(**alone, max_new_tokens=5, do_sample=False)[0], batched_ids[row])
        torch.testing.assert_close(model(**alone).logits[0, -1], batched_last[row], rtol=0, atol=1e-10)


def test_video_tokens_are_pruned_too():
    model = tiny_model("llava_next_video")
    inputs, counts = pixel_inputs(model, "llava_next_video", images=1, videos=1)
    video_tokens = 16  # 4 frames x (4x4 patches pooled by 2)
    ids = torch.tensor([prompt(counts, IMAGE_TOKEN, seed=0, video_count=video_tokens)])
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    full = llava.prune_inputs(model, **inputs, keep_ratio=1.0)
    torch.testing.assert_close(model(**full).logits, model(**inputs).logits, rtol=0, atol=1e-12)
    pruned = llava.prune_inputs(model, **inputs, keep_ratio=0.25)
    removed = counts[0] - divprune_ext.keep_count(counts[0], 0.25) + video_tokens - 4
    assert pruned["attention_mask"].shape[1] == ids.shape[1] - removed


def test_labels_follow_the_kept_tokens():
    model = tiny_model("llava")
    inputs, _ = batch_for(model, "llava", images_per_row=(1,))
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
    pruned = llava.prune_inputs(model, **inputs, labels=labels, keep_ratio=0.25)
    kept_labels = pruned["labels"][0]
    text = labels[0][labels[0] != -100]
    assert torch.equal(kept_labels[kept_labels != -100], text)
    assert (kept_labels == -100).sum() == divprune_ext.keep_count(16, 0.25)
    assert model(**pruned).loss.isfinite()


def test_errors():
    model = tiny_model("llava")
    inputs, _ = batch_for(model, "llava", images_per_row=(1,))
    with pytest.raises(TypeError, match="supports LlavaForConditionalGeneration.*got Linear"):
        llava.prune_inputs(torch.nn.Linear(2, 2), **inputs)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        llava.prune_inputs(model, **inputs, keep_ratio=0)
    with pytest.raises(ValueError, match="order must be 'original' or 'selection'"):
        llava.prune_inputs(model, **inputs, order="random")
    short = dict(inputs, input_ids=inputs["input_ids"][:, :-5], attention_mask=inputs["attention_mask"][:, :-5])
    with pytest.raises(ValueError, match="13 tokens with id 99 in input_ids but the model makes 16 visual features"):
        llava.prune_inputs(model, **short)
