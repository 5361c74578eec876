"""divprune_ext.hf on tiny randomly initialised Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V and Qwen3.5 models.

The models (hf_tiny.build) run in float64 so that pruned / unpruned and batched /
one-by-one runs agree to ~1e-12 and greedy decoding can't flip on rounding (Qwen3.5: its
Gated-DeltaNet layers compute in float32, so runs of one prompt in batches padded
differently agree to ~1e-5 only, ``hf_tiny.across_batches_atol``); their text
model is initialised with a large spread so that a wrong position shows up as a
different logit, not a rounding error. Qwen3-VL needs transformers >= 5.18
(``mm_encoder_outputs``); on older versions only the error it raises is tested.
"""
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="hf extra: pip install transformers")
import divprune_ext  # noqa: E402
from divprune_ext import hf  # noqa: E402
from divprune_ext.hf import core  # noqa: E402
from hf_tiny import (BOI, EOI, HAS_ENCODER_OUTPUTS, IMAGE, PAD, QWEN_KINDS, VIDEO, HostReads,  # noqa: E402,F401
                     across_batches_atol, build, check_padding_sides, new_tokens, one_thread,  # (one_thread: autouse)
                     qwen_batch, qwen_token_types)

# The KV cache argument and output: `cache` from transformers 5.2x (past_key_values deprecated), before: past_key_values.
CACHE = "cache" if "cache" in inspect.signature(transformers.Qwen2VLForConditionalGeneration.forward).parameters \
    else "past_key_values"
# Row 0: an image and a video; row 1: two images of other sizes (so the rows differ in length).
# Items are patch grids before the 2x2 merge: ("image", h, w) or ("video", t, h, w).
ROWS = [[("image", 4, 6), ("video", 4, 4, 4)], [("image", 6, 4), ("image", 4, 4)]]
# GLM-4.1V: transformers' own model refuses a batch with images and videos (its image mask also
# counts the videos' frames, which use the image token), so its reference batches hold images only;
# test_video_alone gives it a video.
GLM_ROWS = [[("image", 4, 6), ("image", 6, 6)], [("image", 6, 4), ("image", 4, 4)]]


def rows_of(model):
    return GLM_ROWS if type(model).__name__.startswith("Glm4v") else ROWS


def rope_index(model, inputs):
    """The model's own (t, h, w) positions of the unpruned prompt, (3, B, L)."""
    extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                      attention_mask=inputs["attention_mask"], **extra)


def by_hand(model, inputs, keep_ratio, order="original"):
    """The pruned prompt, built from the model's own pieces: its merged features, the operator's
    picks on them, its embeddings and its rope index of the unpruned prompt.

    Returns, for the left-padded pruned batch: inputs_embeds, position_ids, attention_mask,
    input_ids, and (Qwen3-VL) the deepstack features in their slots, one (B, L', H) per layer."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    unpruned = rope_index(model, inputs)[0]
    positions = unpruned.clone()
    embeds = model.get_input_embeddings()(ids)
    deepstack = None
    types = inputs["mm_token_type_ids"]  # 1 image, 2 video (GLM-4.1V's frames are image tokens)
    keep = mask.bool() & (types == 0)
    for modality, value, pixels, grid in (("image", 1, "pixel_values", "image_grid_thw"),
                                          ("video", 2, "pixel_values_videos", "video_grid_thw")):
        if pixels not in inputs:
            continue
        out = getattr(model.model, f"get_{modality}_features")(inputs[pixels], inputs[grid], return_dict=True)
        layers = [list(layer) for layer in getattr(out, "deepstack_features", None) or []]
        if layers and deepstack is None:
            deepstack = [torch.zeros_like(embeds) for _ in layers]
        slots, start = ((types == value) & mask.bool()).nonzero(), 0
        for n, features in enumerate(out.pooler_output):
            where = slots[start:start + len(features)]
            start += len(features)
            picks = torch.ops.divprune.select(features.float(), divprune_ext.keep_count(len(features), keep_ratio))
            carried = picks if order == "selection" else picks.sort().values  # what fills the kept slots, in order
            dest, src = where[picks.sort().values], where[carried]
            keep[dest[:, 0], dest[:, 1]] = True
            embeds[dest[:, 0], dest[:, 1]] = features[carried]
            positions[:, dest[:, 0], dest[:, 1]] = unpruned[:, src[:, 0], src[:, 1]]
            for layer, values in zip(deepstack or [], layers):
                layer[dest[:, 0], dest[:, 1]] = values[n][carried]
    width = int(keep.sum(1).max())
    out = {"inputs_embeds": embeds.new_zeros(len(ids), width, embeds.shape[-1]),
           "position_ids": positions.new_zeros(3, len(ids), width),
           "attention_mask": mask.new_zeros(len(ids), width),
           "input_ids": ids.new_full((len(ids), width), PAD),
           "deepstack": [embeds.new_zeros(len(ids), width, embeds.shape[-1]) for _ in deepstack or []]}
    for b in range(len(ids)):
        cols = keep[b].nonzero().squeeze(1)
        span = slice(width - len(cols), width)
        out["inputs_embeds"][b, span] = embeds[b, cols]
        out["position_ids"][:, b, span] = positions[:, b, cols]
        out["attention_mask"][b, span] = 1
        out["input_ids"][b, span] = ids[b, cols]
        for layer, values in zip(out["deepstack"], deepstack or []):
            layer[b, span] = values[b, cols]
    return out


def run_language_model(model, hand):
    """The model's LLM and head on a by-hand prompt: the unmodified model, fed by hand."""
    extra = {}
    if hand["deepstack"]:
        visual = (hand["input_ids"] == IMAGE) | (hand["input_ids"] == VIDEO)
        extra = {"visual_pos_masks": visual, "deepstack_visual_embeds": [layer[visual] for layer in hand["deepstack"]]}
    hidden = model.model.language_model(inputs_embeds=hand["inputs_embeds"], position_ids=hand["position_ids"],
                                        attention_mask=hand["attention_mask"], **extra).last_hidden_state
    return model.lm_head(hidden)


@pytest.fixture(scope="module", params=QWEN_KINDS)
def model(request):
    if request.param.startswith("qwen3_vl") and not HAS_ENCODER_OUTPUTS:
        pytest.skip("Qwen3-VL needs transformers >= 5.18 (mm_encoder_outputs)")
    return build(request.param)


def test_keep_all_reproduces_the_logits_and_the_rope_delta(model):
    inputs = qwen_batch(model, rows_of(model))
    expected = model(**inputs).logits
    expected_deltas = model.model.rope_deltas.clone()
    model.model.rope_deltas = None
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=1.0)
    assert torch.equal(pruned["attention_mask"], inputs["attention_mask"])
    assert torch.equal(pruned["position_ids"][:, inputs["attention_mask"].bool()],
                       rope_index(model, inputs)[0][:, inputs["attention_mask"].bool()])
    assert torch.equal(model.model.rope_deltas, expected_deltas)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(model(**pruned).logits[real], expected[real], rtol=0, atol=1e-12)


@pytest.mark.parametrize("do_sample", [False, True])
def test_keep_all_generates_the_same_ids(model, do_sample):
    inputs = qwen_batch(model, rows_of(model))
    settings = dict(max_new_tokens=6, do_sample=do_sample, top_k=0 if do_sample else None)
    torch.manual_seed(1)
    expected = model.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=1.0)
    torch.manual_seed(1)
    got = model.generate(**pruned, **settings)
    assert torch.equal(new_tokens(pruned, got), expected)
    if "input_ids" in pruned:  # Qwen3-VL: the prompt comes back too
        assert torch.equal(got[:, :pruned["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("settings", [dict(num_beams=2), dict(do_sample=True, top_k=0, num_return_sequences=2)],
                         ids=["beams", "sequences"])
def test_keep_all_expands_like_the_model(model, settings):
    # generate() expands the prompt per beam / sequence: position_ids (3, B, L) along dim 1 and
    # Qwen3-VL's mm_encoder_outputs per prompt (in place, so each call gets a fresh prune).
    # One image per prompt: transformers 5.18 expands the encoder outputs of several images per
    # prompt in the wrong order (fixed by 5.24), which would make the unpruned reference wrong.
    inputs = qwen_batch(model, [rows_of(model)[0], rows_of(model)[1][:1]])
    torch.manual_seed(2)
    expected = model.generate(**inputs, max_new_tokens=4, **settings)[:, inputs["input_ids"].shape[1]:]
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=1.0)
    torch.manual_seed(2)
    assert torch.equal(new_tokens(pruned, model.generate(**pruned, max_new_tokens=4, **settings)), expected)


@pytest.mark.parametrize("order", ["original", "selection"])
def test_kept_tokens_are_the_selected_ones_at_their_original_positions(model, order):
    inputs = qwen_batch(model, rows_of(model))
    hand = by_hand(model, inputs, keep_ratio=0.3, order=order)
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=0.3, order=order)
    real = hand["attention_mask"].bool()
    assert torch.equal(pruned["attention_mask"], hand["attention_mask"])
    assert torch.equal(pruned["position_ids"][:, real], hand["position_ids"][:, real])
    # Text keeps its positions: the last token (text) is numbered as in the unpruned prompt.
    assert torch.equal(pruned["position_ids"][..., -1], rope_index(model, inputs)[0][..., -1])
    if "inputs_embeds" in pruned:
        assert torch.equal(pruned["inputs_embeds"][real], hand["inputs_embeds"][real])
    else:
        assert torch.equal(pruned["input_ids"], hand["input_ids"])
        for modality, token in (("image", IMAGE), ("video", VIDEO)):
            encoded = pruned["mm_encoder_outputs"][modality]
            slots = pruned["input_ids"] == token
            assert torch.equal(torch.cat(encoded.pooler_output), hand["inputs_embeds"][slots])
            assert len(encoded.deepstack_features) == len(hand["deepstack"]) == 2
            for layer, values in zip(encoded.deepstack_features, hand["deepstack"]):
                assert torch.equal(torch.cat(layer), values[slots])


def test_pruned_output_equals_the_model_fed_by_hand(model):
    inputs = qwen_batch(model, rows_of(model))
    hand = by_hand(model, inputs, keep_ratio=0.3)
    real = hand["attention_mask"].bool()
    got = model(**hf.prune_inputs(model, **inputs, keep_ratio=0.3)).logits
    expected = run_language_model(model, hand)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-12)
    # The check has teeth: contiguous positions (or, for Qwen3-VL, no deepstack) change the output.
    wrong = dict(hand, position_ids=hand["attention_mask"].cumsum(1).sub(1).clamp(min=0).expand(3, -1, -1))
    assert (run_language_model(model, wrong)[real] - expected[real]).abs().max() > 1e-3
    if hand["deepstack"]:
        assert (run_language_model(model, dict(hand, deepstack=[]))[real] - expected[real]).abs().max() > 1e-3


def test_decoding_continues_from_the_unpruned_positions(model):
    inputs = qwen_batch(model, rows_of(model))
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=0.3)
    steps = 4
    generated = new_tokens(pruned, model.generate(**pruned, max_new_tokens=steps, do_sample=False))
    # A greedy loop by hand: each new token is numbered (last position of the unpruned prompt) + 1, + 2, ...
    last = rope_index(model, inputs)[0][..., -1:]  # (3, B, 1); left padding: the last column is real
    out = model(**pruned, use_cache=True)
    mask, tokens = pruned["attention_mask"], []
    for step in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        prompt = {"input_ids": token} if "input_ids" in pruned else {"inputs_embeds": model.get_input_embeddings()(token)}
        position = last + 1 + step
        out = model(**prompt, **{CACHE: getattr(out, CACHE)}, attention_mask=mask, position_ids=position,
                    use_cache=True)
    assert torch.equal(generated, torch.cat(tokens, dim=1))


def test_the_rope_delta_describes_the_shortened_sequence(model):
    # One unpadded row with a video (its temporal positions run past the text after it). Without
    # positions, the model numbers the token after a cached prompt with its rope delta:
    # cache length + delta, which must be the unpruned prompt's largest position + 1.
    inputs = qwen_batch(model, [[("video", 4, 4, 4), ("image", 4, 6)]])
    unpruned = rope_index(model, inputs)[0]
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=0.3)
    length = pruned["attention_mask"].shape[1]
    assert model.model.rope_deltas.tolist() == [[int(unpruned.max()) + 1 - length]]
    out = model(**pruned, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    step = {"input_ids": token} if "input_ids" in pruned else {"inputs_embeds": model.get_input_embeddings()(token)}
    implicit = model(**step, **{CACHE: getattr(out, CACHE)}, use_cache=True).logits
    cache = getattr(model(**pruned, use_cache=True), CACHE)
    explicit = model(**step, **{CACHE: cache}, position_ids=unpruned.max().view(1, 1, 1).expand(3, 1, 1) + 1).logits
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=1e-12)


def test_batched_equals_one_by_one(model):
    inputs = qwen_batch(model, rows_of(model))
    batched = hf.prune_inputs(model, **inputs, keep_ratio=0.3)
    batched_ids = new_tokens(batched, model.generate(**batched, max_new_tokens=5, do_sample=False))
    batched_last = model(**batched).logits[:, -1]
    for row, items in enumerate(rows_of(model)):
        alone = hf.prune_inputs(model, **qwen_batch(model, [items], seeds=[row]), keep_ratio=0.3)
        assert torch.equal(new_tokens(alone, model.generate(**alone, max_new_tokens=5, do_sample=False))[0],
                           batched_ids[row])
        torch.testing.assert_close(model(**alone).logits[0, -1], batched_last[row], rtol=0,
                                   atol=max(1e-10, across_batches_atol(model)))


def test_video_alone(model):
    inputs = qwen_batch(model, [[("video", 4, 4, 4)]])
    full = hf.prune_inputs(model, **inputs, keep_ratio=1.0)
    torch.testing.assert_close(model(**full).logits, model(**inputs).logits, rtol=0, atol=1e-12)
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=0.25)
    assert pruned["attention_mask"].shape[1] == inputs["input_ids"].shape[1] - (16 - 4)
    hand = by_hand(model, inputs, keep_ratio=0.25)
    torch.testing.assert_close(model(**pruned).logits, run_language_model(model, hand), rtol=0, atol=1e-12)


def test_labels_follow_the_kept_tokens(model):
    inputs = qwen_batch(model, ROWS[:1])
    visual = (inputs["input_ids"] == IMAGE) | (inputs["input_ids"] == VIDEO)
    labels = inputs["input_ids"].masked_fill(visual, -100)
    pruned = hf.prune_inputs(model, **inputs, labels=labels, keep_ratio=0.25)
    kept = pruned["labels"][0]
    assert torch.equal(kept[kept != -100], labels[0][labels[0] != -100])
    assert (kept == -100).sum() == divprune_ext.keep_count(6, 0.25) + divprune_ext.keep_count(16, 0.25)
    loss = model(**pruned).loss
    assert loss.isfinite()
    logits = run_language_model(model, by_hand(model, inputs, keep_ratio=0.25))
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], kept[1:], ignore_index=-100)
    torch.testing.assert_close(loss, expected.to(loss.dtype))  # the model computes the loss in float32


def test_padding_sides(model):
    inputs = qwen_batch(model, rows_of(model))
    visual = (inputs["input_ids"] == IMAGE) | (inputs["input_ids"] == VIDEO)
    labels = inputs["input_ids"].masked_fill(visual | (inputs["attention_mask"] == 0), -100)
    check_padding_sides(model, dict(inputs, labels=labels), keep_ratio=0.3, order="selection")


@pytest.mark.parametrize("types_given", [True, False], ids=["mm_token_type_ids", "no_mm_token_type_ids"])
def test_host_reads_outside_the_models_own_code(model, types_given, monkeypatch):
    if not types_given and type(model).__name__.startswith("Glm4v"):
        pytest.skip("GLM-4.1V needs mm_token_type_ids (test_glm4v_needs_token_types)")
    inputs = qwen_batch(model, rows_of(model))
    positions = rope_index(model, inputs)  # the model's own feature code and rope index, outside the count
    visuals = hf.visual_features(model, **inputs)
    if not types_given:
        del inputs["mm_token_type_ids"]
    monkeypatch.setattr(type(core.adapter_for(model)), "visual", lambda self, model, inputs: visuals)
    monkeypatch.setattr(model.model, "get_rope_index", lambda *args, **kwargs: positions)
    with HostReads(monkeypatch) as counter:
        hf.prune_inputs(model, **inputs, keep_ratio=0.3, order="selection")
    # The core's one read; the adapter's check: the grids, the placeholder runs (a nonzero and a read),
    # and whether mm_token_type_ids agrees with input_ids.
    assert counter.reads == 1 + 3 + types_given


def without_placeholder(inputs, token, which):
    """The prompt with the which-th placeholder of `token` (row-major) replaced by text."""
    ids = inputs["input_ids"].clone()
    where = (ids == token).nonzero()[which]
    ids[where[0], where[1]] = 5
    return dict(inputs, input_ids=ids, mm_token_type_ids=qwen_token_types(ids))


def test_placeholder_mismatch_says_which():
    model = build("qwen2_vl")
    inputs = qwen_batch(model, rows_of(model))
    with pytest.raises(ValueError, match="15 tokens with id 99 in input_ids but the model makes 16 visual features"):
        hf.prune_inputs(model, **without_placeholder(inputs, IMAGE, 0))
    # Right total, wrong split: image 1's run is one token short, image 2's one token long.
    ids = inputs["input_ids"].clone()
    run = (ids[1] == IMAGE).nonzero().squeeze(1)  # image 1 (6 tokens), then image 2 (4 tokens)
    ids[1, run[5]] = 5  # image 1's last placeholder becomes text
    ids[1, run[6] - 1] = IMAGE  # image 2's vision-start token becomes a placeholder
    shifted = dict(inputs, input_ids=ids, mm_token_type_ids=qwen_token_types(ids))
    with pytest.raises(ValueError, match=r"image 1 \(image_grid_thw \[1, 6, 4\]\) makes 6 tokens per run but its "
                                         r"placeholder run in row 1 has 5 tokens with id 99"):
        hf.prune_inputs(model, **shifted)
    no_video = {k: v for k, v in inputs.items() if k not in ("pixel_values_videos", "video_grid_thw")}
    with pytest.raises(ValueError, match=r"16 placeholder tokens with id 98 but no pixel_values_videos"):
        hf.prune_inputs(model, **no_video)
    with pytest.raises(ValueError, match="mm_token_type_ids must be 1 exactly at the image tokens"):
        hf.prune_inputs(model, **dict(inputs, mm_token_type_ids=torch.zeros_like(inputs["input_ids"])))
    with pytest.raises(ValueError, match="pixel_values needs image_grid_thw"):
        hf.prune_inputs(model, **{k: v for k, v in inputs.items() if k != "image_grid_thw"})
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        hf.prune_inputs(model, **inputs, keep_ratio=1.5)
    # mm_token_type_ids is optional: made from the placeholder ids as the processor makes it.
    derived = hf.prune_inputs(model, **{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, keep_ratio=0.3)
    assert torch.equal(derived["position_ids"], hf.prune_inputs(model, **inputs, keep_ratio=0.3)["position_ids"])


@pytest.mark.parametrize("kind", [k for k in QWEN_KINDS if k in ("qwen3_vl", "qwen3_5")])  # Qwen3.5: Qwen3-VL's videos
def test_qwen3_vl_checks_each_frame(kind):
    if kind == "qwen3_vl" and not HAS_ENCODER_OUTPUTS:
        pytest.skip("Qwen3-VL needs transformers >= 5.18")
    model = build(kind)
    inputs = qwen_batch(model, [[("video", 4, 4, 4)]])
    # The video written as one run, the way Qwen2-VL writes it: right count, but 1 run for 4 frames.
    ids = torch.tensor([[7, 8, 9, BOI] + [VIDEO] * 16 + [EOI, 10, 11]])
    one_run = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=qwen_token_types(ids))
    with pytest.raises(ValueError, match=r"input_ids has 1 runs of video tokens \(id 98\) but video_grid_thw makes 4 "
                                         r"\(one per frame\)"):
        hf.prune_inputs(model, **one_run)


@pytest.mark.skipif(HAS_ENCODER_OUTPUTS, reason="transformers >= 5.18 runs Qwen3-VL")
def test_qwen3_vl_names_the_version_it_needs():
    model = build("qwen3_vl")
    with pytest.raises(RuntimeError, match=r"Qwen3-VL .* needs transformers >= 5.18"):
        hf.prune_inputs(model, **qwen_batch(model, rows_of(model)), keep_ratio=0.5)


def test_glm4v_puts_images_and_videos_in_prompt_order():
    """GLM-4.1V's images and video frames share the image token: the kept features must still go to
    their own item's slots when a video comes before an image (transformers' own model refuses such
    a batch, so the reference is the by-hand prompt)."""
    model = build("glm4v")
    inputs = qwen_batch(model, [[("video", 4, 4, 4), ("image", 4, 6)], [("image", 6, 4), ("video", 2, 4, 4)]])
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=0.25)
    hand = by_hand(model, inputs, keep_ratio=0.25)
    assert torch.equal(pruned["inputs_embeds"], hand["inputs_embeds"])
    assert torch.equal(pruned["position_ids"], hand["position_ids"])
    torch.testing.assert_close(model(**pruned).logits, run_language_model(model, hand), rtol=0, atol=1e-12)


def test_glm4v_needs_token_types():
    model = build("glm4v")
    inputs = {k: v for k, v in qwen_batch(model, GLM_ROWS).items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="GLM-4.1V needs mm_token_type_ids"):
        hf.prune_inputs(model, **inputs, keep_ratio=0.5)
