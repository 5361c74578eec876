"""divprune_ext.hf on tiny random LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision, Gemma 3, InternVL
and Mistral 3 models.

The unmodified model is the reference: its own forward / generate on the unpruned
prompt, and the visual tokens as they enter its LLM (recorded with a hook). Every batch
is left-padded (right padding: test_padding_sides), has prompts of different lengths,
one and two images per prompt (for OneVision: a tiled single image and untiled
multi-image), and a video where the family has one.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="hf extra: pip install transformers")
import divprune_ext  # noqa: E402
import divprune_ext.hf as hf  # noqa: E402
from divprune_ext.hf import core  # noqa: E402
from hf_tiny import (BOI, EOI, FAMILIES, HAS_ENCODER_OUTPUTS, IMAGE, PAD, QWEN_KINDS,  # noqa: E402,F401
                     HostReads, build,
                     check_padding_sides, collate, llm_inputs, new_tokens, one_thread, row,
                     with_positions)  # (one_thread: autouse)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    family = FAMILIES[request.param]
    if family.needs_encoder_outputs and not HAS_ENCODER_OUTPUTS:
        pytest.skip("needs transformers >= 5.18 (test_gemma3_names_the_version_it_needs covers older ones)")
    return family, build(family.kind)


def batch_for(model, family, images=(1, 2)):
    """Left-padded rows with images[n] images; the last row also has the family's video."""
    rows = [row(model, family.kind, n, video=family.video and r == len(images) - 1, seed=r)
            for r, n in enumerate(images)]
    return rows, *collate(rows)


def last_logits(model, pruned):
    """Logits at the last token, with positions counted from each row's first real token as generate() counts them."""
    return model(**with_positions(pruned)).logits[:, -1]


def by_hand(model, inputs, items, keep_ratio, order):
    """The pruned prompt built from the unmodified model's LLM inputs: each item's kept tokens are
    those torch.ops.divprune.select picks on its tokens as they enter the LLM; left-padded.

    Returns the keyword arguments that feed it to the model (inputs_embeds, attention_mask and,
    for Gemma 3, token_type_ids) and ``gather(values, pad)``, which prunes any other per-token tensor."""
    with llm_inputs(model) as calls:
        model(**inputs)
    embeds = calls[0]["inputs_embeds"]
    sources = []
    for b, row_items in enumerate(items):
        starts = dict(row_items)
        out, p = [], int(inputs["attention_mask"][b].argmax())
        ids = inputs["input_ids"][b].tolist()
        while p < embeds.shape[1]:
            if p in starts:  # the item's n placeholders from p on; other tokens among them stay in place
                n, token = starts[p], ids[p]
                slots = [q for q in range(p, len(ids)) if ids[q] == token][:n]
                picks = torch.ops.divprune.select(embeds[b, slots].float(), divprune_ext.keep_count(n, keep_ratio))
                content = iter(slots[i] for i in (picks if order == "selection" else picks.sort().values).tolist())
                kept = {slots[i] for i in picks.tolist()}
                out += [next(content) if q in kept else q for q in range(p, slots[-1] + 1)
                        if q in kept or ids[q] != token]
                p = slots[-1] + 1
            else:
                out.append(p)
                p += 1
        sources.append(out)
    width = max(len(s) for s in sources)

    def gather(values, pad=0):
        result = values.new_full((len(sources), width) + values.shape[2:], pad)
        for b, s in enumerate(sources):
            result[b, width - len(s):] = values[b, s]
        return result

    hand = {"inputs_embeds": gather(embeds), "attention_mask": gather(torch.ones_like(inputs["attention_mask"]))}
    if "token_type_ids" in inputs:
        hand["token_type_ids"] = gather(inputs["token_type_ids"])
    if "mm_token_type_ids" in inputs:  # Gemma 4: its bidirectional runs, and its per-layer inputs from the ids
        hand["mm_token_type_ids"] = gather(inputs["mm_token_type_ids"])
        ids = gather(inputs["input_ids"]).masked_fill(hand["mm_token_type_ids"] != 0, PAD)
        hand["per_layer_inputs"] = model.model.language_model.get_per_layer_inputs(ids)
    return hand, gather


def test_keep_all_gives_the_same_logits(family):
    _, model = family
    _, inputs, _ = batch_for(model, family[0])
    expected = model(**inputs).logits
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=1.0)
    assert torch.equal(pruned["attention_mask"], inputs["attention_mask"])
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(model(**pruned).logits[real], expected[real], rtol=0, atol=1e-12)


@pytest.mark.parametrize("search", ["greedy", "sample", "beams"])
def test_keep_all_generates_the_same_ids(family, search):
    _, model = family
    # One image per prompt for beam search: transformers 5.17's own beam search repeat-interleaves
    # pixel_values image by image, which gives a prompt with two images the wrong ones.
    _, inputs, _ = batch_for(model, family[0], images=(1, 1) if search == "beams" else (1, 2))
    settings = dict(max_new_tokens=6, do_sample=search == "sample", top_k=0 if search == "sample" else None,
                    num_beams=2 if search == "beams" else 1)
    torch.manual_seed(1)
    expected = model.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=1.0)
    torch.manual_seed(1)
    assert torch.equal(new_tokens(pruned, model.generate(**pruned, **settings)), expected)


@pytest.mark.parametrize("order", ["original", "selection"])
def test_pruned_prompt_is_the_selected_tokens_and_runs_like_them(family, order):
    _, model = family
    _, inputs, items = batch_for(model, family[0])
    hand, _ = by_hand(model, inputs, items, 0.3, order)
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=0.3, order=order)
    assert torch.equal(pruned["attention_mask"], hand["attention_mask"])
    if "token_type_ids" in hand:
        assert torch.equal(pruned["token_type_ids"], hand["token_type_ids"])
    with llm_inputs(model) as calls:
        logits = model(**pruned).logits
    real = hand["attention_mask"].bool()
    assert torch.equal(calls[0]["inputs_embeds"][real], hand["inputs_embeds"][real])
    torch.testing.assert_close(logits[real], model(**hand).logits[real], rtol=0, atol=1e-12)


def test_batched_equals_one_by_one(family):
    family, model = family
    rows, inputs, _ = batch_for(model, family)
    batched = hf.prune_inputs(model, **inputs, keep_ratio=0.2)
    batched_ids = new_tokens(batched, model.generate(**batched, max_new_tokens=5, do_sample=False))
    batched_last = last_logits(model, batched)
    for n, alone_row in enumerate(rows):
        alone = hf.prune_inputs(model, **collate([alone_row])[0], keep_ratio=0.2)
        assert torch.equal(new_tokens(alone, model.generate(**alone, max_new_tokens=5, do_sample=False))[0],
                           batched_ids[n])
        torch.testing.assert_close(last_logits(model, alone)[0], batched_last[n], rtol=0, atol=1e-12)


def labels_for(inputs):
    """Labels: the input ids, -100 at padding and at each row's first four columns."""
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, :4] = -100
    return labels


def test_labels_follow_the_kept_tokens(family):
    family, model = family
    _, inputs, items = batch_for(model, family)
    labels = labels_for(inputs)
    hand, gather = by_hand(model, inputs, items, 0.25, "original")
    pruned = hf.prune_inputs(model, **inputs, labels=labels, keep_ratio=0.25)
    assert torch.equal(pruned["labels"], gather(labels, -100))
    expected = model(**hand, labels=gather(labels, -100)).loss
    torch.testing.assert_close(model(**pruned).loss, expected)  # the loss is computed in float32


def test_padding_sides(family):
    family, model = family
    _, inputs, _ = batch_for(model, family)
    check_padding_sides(model, dict(inputs, labels=labels_for(inputs)), keep_ratio=0.3, order="selection")


def test_every_item_keeps_its_share():
    model = build("llava_next_video")
    _, inputs, items = batch_for(model, FAMILIES["llava_next_video"])
    for keep_ratio in (0.05, 0.5):
        pruned = hf.prune_inputs(model, **inputs, keep_ratio=keep_ratio)
        removed = [sum(n - divprune_ext.keep_count(n, keep_ratio) for _, n in row_items) for row_items in items]
        assert pruned["attention_mask"].sum(1).tolist() == [
            real - gone for real, gone in zip(inputs["attention_mask"].sum(1).tolist(), removed)]


@pytest.mark.parametrize("kind", ["llava_next_video", "gemma3"])
def test_one_host_read_outside_the_models_own_code(kind, monkeypatch):
    if FAMILIES[kind].needs_encoder_outputs and not HAS_ENCODER_OUTPUTS:
        pytest.skip("needs transformers >= 5.18")
    model = build(kind)
    _, inputs, _ = batch_for(model, FAMILIES[kind])
    labels = inputs["input_ids"].clone()
    visuals = hf.visual_features(model, **inputs)  # the model's own feature code, outside the count
    monkeypatch.setattr(type(core.adapter_for(model)), "visual", lambda self, model, inputs: visuals)
    with HostReads(monkeypatch) as counter:
        hf.prune_inputs(model, **inputs, labels=labels, keep_ratio=0.3, order="selection")
    assert counter.reads == 1


def test_errors():
    model = build("llava")
    _, inputs, items = batch_for(model, FAMILIES["llava"])
    with pytest.raises(TypeError, match="supports Gemma3ForConditionalGeneration, Gemma4ForConditionalGeneration, "
                                        "Glm4vForConditionalGeneration, InternVLForConditionalGeneration, "
                                        "LlavaForConditionalGeneration, "
                                        ".*LlavaOnevisionForConditionalGeneration.*; got Linear"):
        hf.prune_inputs(torch.nn.Linear(2, 2), **inputs)
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
            hf.prune_inputs(model, **inputs, keep_ratio=bad)
    with pytest.raises(ValueError, match="order must be 'original' or 'selection'"):
        hf.prune_inputs(model, **inputs, order="random")
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'top'"):
        hf.prune_inputs(model, **inputs, padding_side="top")
    with pytest.raises(TypeError, match="got unexpected image_grid_thw"):
        hf.prune_inputs(model, **inputs, image_grid_thw=torch.ones(1, 3))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        hf.prune_inputs(model, **dict(inputs, input_ids=inputs["input_ids"][0]))
    fewer = inputs["input_ids"].clone()
    fewer[1, items[1][0][0]] = 1  # one image placeholder less
    with pytest.raises(ValueError, match="47 tokens with id 99 in input_ids but the model makes 48 visual features"):
        hf.prune_inputs(model, **dict(inputs, input_ids=fewer))
    moved = fewer.clone()  # ... and one more at the end of row 0: row 1's first image starts there
    moved[0, -1] = IMAGE
    with pytest.raises(ValueError, match="visual item 1 with token id 99 .16 tokens. spans several prompts: its row "
                                         "has 1 placeholders left"):
        hf.prune_inputs(model, **dict(inputs, input_ids=moved))


@pytest.mark.parametrize("kind", list(FAMILIES) + QWEN_KINDS)
def test_placeholders_without_their_pixels_are_an_error(kind):
    """The unpruned model would read such placeholders as text (no error): almost always a missing input."""
    if kind.startswith(("gemma", "qwen3_vl")) and not HAS_ENCODER_OUTPUTS:
        pytest.skip("needs transformers >= 5.18")
    model = build(kind)
    checked = 0
    inputs = [("image", "pixel_values"), ("video", "pixel_values_videos")]
    if kind == "glm4v":  # its videos' frames are image tokens too
        inputs = [("image", "pixel_values or pixel_values_videos")]
    for modality, key in inputs:
        token = getattr(model.config, f"{modality}_token_id", None)
        token = getattr(model.config, f"{modality}_token_index", None) if token is None else token
        if token is None:
            continue
        with pytest.raises(ValueError, match=f"placeholder tokens with id {token} but no {key}"):
            hf.prune_inputs(model, input_ids=torch.tensor([[1, 2] + [token] * 4 + [3]]), keep_ratio=0.5)
        checked += 1
    assert checked == (2 if kind not in ("llava", "llava_next", "gemma3", "internvl", "mistral3", "glm4v") else 1)
    text = torch.tensor([[1, 2, 3]])  # no placeholders, no pixels: a text prompt goes through
    assert torch.equal(hf.prune_inputs(model, input_ids=text, keep_ratio=0.5)["attention_mask"], torch.ones_like(text))


@pytest.mark.skipif(HAS_ENCODER_OUTPUTS, reason="transformers >= 5.18 runs Gemma 3 pruned")
def test_gemma3_names_the_version_it_needs():
    model = build("gemma3")
    _, inputs, _ = batch_for(model, FAMILIES["gemma3"])
    with pytest.raises(RuntimeError, match=r"Gemma 3 needs transformers >= 5.18 .*installed: 5\.1[0-7]"):
        hf.prune_inputs(model, **inputs)


def test_gemma3_generate_takes_no_inputs_embeds():
    """Why the Gemma 3 adapter returns input_ids: the model's generate() refuses inputs_embeds."""
    model = build("gemma3")
    embeds = model.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="You passed `inputs_embeds` to `.generate\\(\\)`"):
        model.generate(inputs_embeds=embeds, max_new_tokens=1)


def test_gemma3_pan_and_scan_crops_are_pruned_apart():
    """do_pan_and_scan=True: the processor gives an image its crops, each its own <boi> ... <eoi> span
    and its own pixel_values entry (num_crops says how many); each crop keeps its own share."""
    if not HAS_ENCODER_OUTPUTS:
        pytest.skip("needs transformers >= 5.18")
    model = build("gemma3")
    crops = row(model, "gemma3", 3, seed=4)  # the image and its two crops: three spans of 16 tokens
    crops.inputs["num_crops"] = torch.tensor([2])
    inputs, items = collate([crops])
    hand, _ = by_hand(model, inputs, items, 0.25, "original")
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=0.25)
    assert (pruned["input_ids"] == IMAGE).sum() == 3 * divprune_ext.keep_count(16, 0.25)
    assert torch.equal(pruned["token_type_ids"], hand["token_type_ids"])
    with llm_inputs(model) as calls:
        model(**pruned)
    assert torch.equal(calls[0]["inputs_embeds"][0], hand["inputs_embeds"][0])


@pytest.mark.skipif("gemma4" not in FAMILIES or not HAS_ENCODER_OUTPUTS,
                    reason="needs Gemma 4 and transformers >= 5.18")
def test_gemma4_video_is_one_item_over_its_frames():
    from hf_tiny import PATCH, VIDEO, Row
    model = build("gemma4")
    g = torch.Generator().manual_seed(5)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1).reshape(-1, 2)
    frames = 3  # 16 patches a frame pooled 2x2: 4 tokens a frame, 12 a video
    ids = [5, 6, BOI] + [VIDEO] * 12 + [EOI, 7, 8]
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "mm_token_type_ids": 2 * (torch.tensor([ids]) == VIDEO).long(),
              "pixel_values_videos": torch.randn(frames, 16, 3 * PATCH * PATCH, generator=g, dtype=torch.float64),
              "video_position_ids": grid.expand(frames, -1, -1).clone(), "num_frames_per_video": torch.tensor([frames])}
    full = hf.prune_inputs(model, **inputs, keep_ratio=1.0)
    torch.testing.assert_close(model(**full).logits, model(**inputs).logits, rtol=0, atol=1e-12)
    batch, items = collate([Row(inputs, [(3, 12)])])
    hand, _ = by_hand(model, batch, items, 0.25, "original")
    pruned = hf.prune_inputs(model, **inputs, keep_ratio=0.25)
    assert (pruned["input_ids"] == VIDEO).sum() == 3
    with llm_inputs(model) as calls:
        logits = model(**pruned).logits
    assert torch.equal(calls[0]["inputs_embeds"], hand["inputs_embeds"])
    torch.testing.assert_close(logits, model(**hand).logits, rtol=0, atol=1e-12)
