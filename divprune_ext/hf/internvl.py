"""Adapter for InternVL 3 / 3.5 (``InternVLForConditionalGeneration``): images, several per prompt.

The processor writes each image as ``<img>``, then ``image_seq_length`` image tokens
(``config.image_token_id``) per tile, then ``</img>``; the model writes its tiles' tokens
(vision tower, pixel shuffle, projector: ``get_image_features``) into those placeholders with
``masked_scatter``, tile after tile. Only the image tokens carry features and are candidates;
``<img>`` / ``</img>`` are text and always stay. One image is all its tiles together (one
selection over them, the thumbnail tile included), as an image is one item in the other
families. The processor keeps its per-image tile counts to itself (it consumes
``num_patches``), so the images are the contiguous runs of the image token in ``input_ids``:
``visual_features`` needs ``input_ids`` for this family. Video frames come from the processor
as images (one ``<img>`` … ``</img>`` each): each frame is one item.

Positions are 1-D: the pruned prompt goes in as ``inputs_embeds`` with contiguous positions,
as for LLaVA; ``generate()`` returns only the new tokens. Host syncs: one ``nonzero`` and one
read for the runs, besides the core's.
"""
from .core import Adapter, Visual, register, token_runs


@register
class InternVL(Adapter):
    models = ("InternVLForConditionalGeneration",)
    inputs = ("pixel_values",)

    def visual(self, model, inputs):
        if "pixel_values" not in inputs:
            return []
        if "input_ids" not in inputs:
            raise ValueError("InternVL: pass input_ids too (its images are the runs of its image token there)")
        config = model.config
        tiles = model.model.get_image_features(
            inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True).pooler_output
        images = inputs["input_ids"] == config.image_token_id
        if "attention_mask" in inputs:
            images &= inputs["attention_mask"].bool()
        lengths = [length for _, _, length in token_runs(images.int())]
        per_tile = tiles.shape[1]
        if sum(lengths) != tiles.shape[0] * per_tile or any(n % per_tile for n in lengths):
            raise ValueError(f"input_ids holds runs of {lengths} image tokens (id {config.image_token_id}); "
                             f"pixel_values make {tiles.shape[0]} tiles of {per_tile} tokens")
        return [Visual(config.image_token_id, f) for f in tiles.flatten(0, 1).split(lengths)]
