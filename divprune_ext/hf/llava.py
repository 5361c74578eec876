"""Adapters for the LLaVA family: LLaVA-1.5, LLaVA-NeXT (1.6), LLaVA-NeXT-Video, LLaVA-OneVision.

All of them insert the projected visual tokens into the LLM's input embeddings with
``masked_scatter`` and use 1-D RoPE, so the pruned prompt is returned as
``inputs_embeds`` (``Adapter.outputs``'s default; ``generate()`` then returns only the
new tokens) with contiguous positions after pruning, as in the authors' code. This
works with transformers 5.17 and later.

Selection runs on the tokens exactly as the model inserts them: after the projector,
image-newline tokens included (LLaVA-NeXT / OneVision images, OneVision videos).
"""
import math
from typing import List

import torch

from .core import Adapter, Visual, register


def token_id(config, name: str) -> int:
    """The placeholder id: transformers 5 says ``image_token_id``; older configs ``image_token_index``."""
    value = getattr(config, f"{name}_token_id", None)
    return getattr(config, f"{name}_token_index") if value is None else value


def per_item(output) -> List[torch.Tensor]:
    """Per-image / per-video ``(n, H)`` features from a ``get_*_features`` output, whatever its type."""
    features = getattr(output, "pooler_output", output)
    if isinstance(features, torch.Tensor):
        features = list(features) if features.dim() == 3 else [features]
    # LLaVA-NeXT-Video on 5.17 gives each video as (frames, tokens, H); the model flattens it in that order.
    return [f.flatten(0, -2) for f in features]


def feature_choice(config) -> dict:
    """The vision layer / CLS choice the model's forward uses (its config's)."""
    return {"vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy}


@register
class Llava(Adapter):
    """LLaVA-1.5, LLaVA-NeXT (anyres tiles + image-newline tokens), LLaVA-NeXT-Video (images and videos)."""
    models = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
              "LlavaNextVideoForConditionalGeneration")
    inputs = ("pixel_values", "image_sizes", "pixel_values_videos")

    def visual(self, model, inputs):
        config, visuals = model.config, []
        if "pixel_values" in inputs:
            sizes = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
            output = model.model.get_image_features(inputs["pixel_values"], **sizes, **feature_choice(config))
            visuals += [Visual(token_id(config, "image"), f) for f in per_item(output)]
        if "pixel_values_videos" in inputs:
            output = model.model.get_video_features(inputs["pixel_values_videos"], **feature_choice(config))
            visuals += [Visual(token_id(config, "video"), f, modality="video") for f in per_item(output)]
        return visuals


@register
class LlavaOnevision(Adapter):
    """LLaVA-OneVision: one image per prompt is tiled (anyres), several are not (``batch_num_images``
    decides, as in the model); a video is one item of frames x pooled tokens + one newline token."""
    models = ("LlavaOnevisionForConditionalGeneration",)
    # image_sizes_videos: taken by the model, unused by its forward
    inputs = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos", "image_sizes_videos")

    def visual(self, model, inputs):
        config, visuals = model.config, []
        if "pixel_values" in inputs:
            output = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs.get("batch_num_images"),
                vision_aspect_ratio=config.vision_aspect_ratio, **feature_choice(config))
            visuals += [Visual(token_id(config, "image"), f) for f in per_item(output)]
        if "pixel_values_videos" in inputs:
            pixels = inputs["pixel_values_videos"]
            videos = model.model.get_video_features(pixels, **feature_choice(config)).pooler_output
            side = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
            if videos.shape[1] == pixels.shape[1] * side * side:
                # transformers < 5.18 appends the newline token in forward, later ones in get_video_features.
                newline = model.model.image_newline.to(videos.dtype).expand(len(videos), 1, -1)
                videos = torch.cat([videos, newline], dim=1)
            visuals += [Visual(token_id(config, "video"), v, modality="video") for v in videos]
        return visuals
