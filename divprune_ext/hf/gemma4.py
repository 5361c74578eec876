"""Adapter for Gemma 4 (``Gemma4ForConditionalGeneration``): images of any size, several per
prompt, and videos (transformers >= 5.18).

The processor writes an image as ``<boi>``, its soft tokens (``config.image_token_id``), ``<eoi>``,
and marks them in ``mm_token_type_ids`` (1 image, 2 video); the model writes ``get_image_features``'
rows (one ``(n, H)`` per image, ``n`` from its patches) into the soft tokens, and a video's rows
(all its frames, ``get_video_features``) into its video tokens. ``<boi>`` / ``<eoi>`` are text and
stay. Where ``text_config.use_bidirectional_attention == "vision"`` the model lets each contiguous
run of ``mm_token_type_ids`` attend to itself both ways: the core gathers ``mm_token_type_ids``
with the kept tokens, so an image's kept tokens stay one run.

As for Gemma 3, the pruned prompt goes in as ``input_ids`` with one placeholder per kept token plus
the kept rows as ``mm_encoder_outputs``: Gemma 4 computes its per-layer inputs from ``input_ids``
(placeholders read as padding) and refuses them next to ``inputs_embeds`` without
``per_layer_inputs``. ``generate()`` returns the pruned prompt followed by the new tokens.
Positions are 1-D and contiguous after pruning. Audio inputs are not taken (``TypeError``).
"""
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .core import Adapter, Visual, register, require_encoder_outputs


@register
class Gemma4(Adapter):
    models = ("Gemma4ForConditionalGeneration",)
    inputs = ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids",
              "num_frames_per_video")

    def check(self, model):
        require_encoder_outputs(model, "Gemma 4")

    def visual(self, model, inputs):
        config, found = model.config, []
        if "pixel_values" in inputs:
            if "image_position_ids" not in inputs:
                raise ValueError("Gemma 4: pixel_values needs image_position_ids (the processor returns both)")
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"], return_dict=True)
            found += [Visual(config.image_token_id, f) for f in out.pooler_output]
        if "pixel_values_videos" in inputs:
            out = model.model.get_video_features(inputs["pixel_values_videos"], inputs.get("video_position_ids"),
                                                 num_frames_per_video=inputs.get("num_frames_per_video"),
                                                 return_dict=True)
            found += [Visual(config.video_token_id, f, modality="video") for f in out.pooler_output]
        return found

    def outputs(self, model, batch):
        encoded = {}
        for modality in ("image", "video"):
            kept = tuple(k.features for k in batch.kept if k.visual.modality == modality)  # prompt order
            if kept:
                encoded[modality] = BaseModelOutputWithPooling(pooler_output=kept)
        return {"input_ids": batch.input_ids, "mm_encoder_outputs": encoded or None}
