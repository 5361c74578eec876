"""Adapter for Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral Small 3.1 and other
Pixtral-style models): images of any size, several per prompt.

The processor writes an image as its merged patch grid, row by row: ``[IMG]`` tokens
(``config.image_token_id``), one per merged patch, each row ended by ``[IMG_BREAK]``, the last by
``[IMG_END]``; the model writes the image's features (``get_image_features``: one
``(rows * columns, H)`` tensor per image, its size from ``image_sizes``) into the ``[IMG]``
tokens only. So the ``[IMG]`` tokens are the candidates; ``[IMG_BREAK]`` / ``[IMG_END]`` are
text (the LLM's own embeddings, no image content) and always stay, so the kept tokens of a row
stay before that row's break (a row may keep none). An image is grouped by ``image_sizes``, not
by runs (its runs are its rows). Positions are 1-D: the pruned prompt goes in as
``inputs_embeds`` with contiguous positions; ``generate()`` returns only the new tokens.
"""
from .core import Adapter, Visual, register


@register
class Mistral3(Adapter):
    models = ("Mistral3ForConditionalGeneration",)
    inputs = ("pixel_values", "image_sizes")

    def visual(self, model, inputs):
        if "pixel_values" not in inputs:
            return []
        if "image_sizes" not in inputs:
            raise ValueError("Mistral 3: pixel_values needs image_sizes (each image's height and width)")
        output = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                vision_feature_layer=model.config.vision_feature_layer,
                                                return_dict=True)
        return [Visual(model.config.image_token_id, f) for f in output.pooler_output]
