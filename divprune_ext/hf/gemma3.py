"""Adapter for Gemma 3 (``Gemma3ForConditionalGeneration``): images, any number per prompt.

Gemma 3's ``generate()`` takes no ``inputs_embeds`` (its ``prepare_inputs_for_generation``
has no such parameter, so ``GenerationMixin`` refuses it), so the pruned prompt is returned
as ``input_ids`` that keep one placeholder per kept token, plus ``mm_encoder_outputs``
holding the kept features: ``generate()`` returns the pruned prompt followed by the new
tokens. ``mm_encoder_outputs`` exists from transformers 5.18; older versions raise a
RuntimeError naming the version instead of silently ignoring it.

Image tokens attend to each other in both directions where ``token_type_ids`` marks them
(the processor returns it): it is gathered with the kept tokens, so one image's kept tokens
stay one contiguous, marked block. Positions are contiguous after pruning (1-D RoPE), as in
the authors' code.

With beam search or ``num_return_sequences``, ``generate()`` expands ``mm_encoder_outputs``
in place: prune again before reusing a result in another such call.
"""
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .core import Adapter, Visual, register, require_encoder_outputs


@register
class Gemma3(Adapter):
    models = ("Gemma3ForConditionalGeneration",)
    inputs = ("pixel_values", "num_crops")  # num_crops: pan-and-scan count, already expanded into the prompt

    def check(self, model):
        require_encoder_outputs(model, "Gemma 3")

    def visual(self, model, inputs):
        if "pixel_values" not in inputs:
            return []
        features = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        return [Visual(model.config.image_token_id, f) for f in features]  # (images, tokens, H)

    def outputs(self, model, batch):
        encoded = None
        if batch.kept:  # every image has mm_tokens_per_image tokens, so all keep the same count
            kept = torch.stack([k.features for k in batch.kept])  # (images, kept, H), prompt order
            encoded = {"image": BaseModelOutputWithPooling(pooler_output=kept)}
        return {"input_ids": batch.input_ids, "mm_encoder_outputs": encoded}
