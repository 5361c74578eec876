"""divprune_ext.llava: the first integration's signature over divprune_ext.hf.prune_inputs.

What pruning does on these classes is tested through divprune_ext.hf (test_hf.py, the same
code path); here, only what the wrapper adds: its positional signature, its class check,
and that it returns what divprune_ext.hf returns.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="llava extra: pip install transformers")
from divprune_ext import hf, llava  # noqa: E402
from hf_tiny import FAMILIES, build, collate, one_thread, row  # noqa: E402,F401  (one_thread: autouse)


@pytest.mark.parametrize("kind", ["llava", "llava_next", "llava_next_video"])
def test_returns_what_hf_returns(kind):
    model = build(kind)
    assert type(model).__name__ in llava.SUPPORTED_MODELS
    # Left-padded rows with one and two images; LLaVA-NeXT-Video's second row also has a video.
    inputs, _ = collate([row(model, kind, 1, seed=0), row(model, kind, 2, video=FAMILIES[kind].video, seed=1)])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    positional = llava.prune_inputs(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                    inputs.get("image_sizes"), inputs.get("pixel_values_videos"), labels,
                                    keep_ratio=0.3)
    by_name = llava.prune_inputs(model, **inputs, labels=labels, keep_ratio=0.2, order="selection",
                                 padding_side="right")
    for got, settings in ((positional, dict(keep_ratio=0.3)),
                          (by_name, dict(keep_ratio=0.2, order="selection", padding_side="right"))):
        expected = hf.prune_inputs(model, **inputs, labels=labels, **settings)
        assert got.keys() == expected.keys() == {"inputs_embeds", "attention_mask", "labels"}
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_other_classes_are_sent_to_divprune_ext_hf():
    with pytest.raises(TypeError, match=r"divprune_ext.llava supports LlavaForConditionalGeneration, "
                                        r"LlavaNextForConditionalGeneration, LlavaNextVideoForConditionalGeneration; "
                                        r"got LlavaOnevisionForConditionalGeneration \(divprune_ext.hf.prune_inputs "
                                        r"serves more families\)"):
        llava.prune_inputs(build("onevision"), torch.zeros(1, 1, dtype=torch.long))
