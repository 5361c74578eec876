"""DivPrune for Hugging Face ``transformers`` LLaVA models.

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration``
(LLaVA-1.6, anyres tiles + image-newline tokens) and ``LlavaNextVideoForConditionalGeneration``
(images and videos). Tested with transformers 5.17 and 5.24.

:func:`prune_inputs` computes the visual features exactly as the model would insert
them (after the multimodal projector, image-newline tokens included for LLaVA-1.6,
as in the authors' code), keeps ``max(1, round(n * keep_ratio))`` of each image's /
video's ``n`` tokens with ``torch.ops.divprune.select``, and returns
``inputs_embeds`` + ``attention_mask`` (+ ``labels``) of the shortened sequences,
ready for ``model(...)`` or ``model.generate(...)``::

    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    pruned = divprune_ext.llava.prune_inputs(model, **inputs, keep_ratio=0.1)
    new_tokens = model.generate(**pruned, max_new_tokens=64)   # only the new tokens

Details:
  * Image tokens are found by the model's image / video token id, any number per
    prompt, in real batches; sequences are re-padded on the side the input was
    padded (``padding_side`` overrides), so left-padded generation works.
  * After pruning, positions are contiguous (0..L'-1 over the kept tokens), as in
    the authors' code.
  * ``order="original"`` (default) feeds the kept tokens in their original order,
    like the authors' released code; ``order="selection"`` feeds them in selection
    order, which the authors state produced the paper's numbers.
"""
from typing import Dict, List, Optional

import torch

import divprune_ext

SUPPORTED_MODELS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                    "LlavaNextVideoForConditionalGeneration")

__all__ = ["prune_inputs", "SUPPORTED_MODELS"]


def _check_model(model) -> None:
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise TypeError(f"divprune_ext.llava supports {', '.join(SUPPORTED_MODELS)}; got {name}")


def _token_id(config, name: str) -> int:
    # transformers 5 says image_token_id; older configs image_token_index.
    value = getattr(config, f"{name}_token_id", None)
    return getattr(config, f"{name}_token_index") if value is None else value


def _as_list(output) -> List[torch.Tensor]:
    """Per-image / per-video (n, H) features from get_*_features, whatever its return type."""
    features = getattr(output, "pooler_output", output)
    if isinstance(features, torch.Tensor):
        features = list(features) if features.dim() == 3 else [features]
    # 5.17 gives each video as (frames, tokens, H); the model flattens it in that order.
    return [f.flatten(0, -2) for f in features]


def _visual_features(model, pixel_values, image_sizes, pixel_values_videos):
    """[(token id, [features of each image or video, in prompt order])]."""
    config = model.config
    vision_args = {"vision_feature_layer": config.vision_feature_layer,
                   "vision_feature_select_strategy": config.vision_feature_select_strategy}
    found = []
    if pixel_values is not None:
        if image_sizes is not None:
            vision_args["image_sizes"] = image_sizes
        found.append((_token_id(config, "image"), _as_list(model.model.get_image_features(pixel_values, **vision_args))))
        vision_args.pop("image_sizes", None)
    if pixel_values_videos is not None:
        found.append((_token_id(config, "video"),
                      _as_list(model.model.get_video_features(pixel_values_videos, **vision_args))))
    return found


def _selection_features(features: torch.Tensor) -> torch.Tensor:
    # The op takes float32/16/bf16; float64 models select on float32 copies.
    return features if features.dtype in (torch.float32, torch.float16, torch.bfloat16) else features.float()


@torch.no_grad()
def prune_inputs(model, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, image_sizes: Optional[torch.Tensor] = None,
                 pixel_values_videos: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                 keep_ratio: float = 0.1, order: str = "original", padding_side: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Prune each image's / video's visual tokens before the LLM's first layer.

    Args:
        model: a supported LLaVA model (see ``SUPPORTED_MODELS``).
        input_ids, attention_mask, pixel_values, image_sizes, pixel_values_videos, labels:
            as the model's processor returns them.
        keep_ratio: fraction of each image's / video's tokens to keep, in (0, 1].
        order: ``"original"`` or ``"selection"``: the order the kept tokens enter the LLM.
        padding_side: ``"left"`` or ``"right"``; default: left if any row starts with padding.

    Returns:
        ``{"inputs_embeds", "attention_mask"}`` (and ``"labels"`` if given) for the pruned prompts.
    """
    _check_model(model)
    divprune_ext.keep_count(1, keep_ratio)  # validates keep_ratio
    if order not in ("original", "selection"):
        raise ValueError(f"order must be 'original' or 'selection', got {order!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if padding_side is None:
        padding_side = "left" if bool((attention_mask[:, 0] == 0).any()) else "right"
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

    visual = _visual_features(model, pixel_values, image_sizes, pixel_values_videos)
    visual_ids = [token for token, _ in visual]
    is_visual = torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device)) if visual_ids else \
        torch.zeros_like(input_ids, dtype=torch.bool)
    embeds = model.get_input_embeddings()(input_ids.masked_fill(is_visual, 0))
    keep = attention_mask.bool() & ~is_visual

    for token, features in visual:
        positions = (input_ids == token).nonzero()  # row-major, the order the model fills them in
        total = sum(len(f) for f in features)
        if total != len(positions):
            raise ValueError(f"{len(positions)} tokens with id {token} in input_ids but the model makes {total} "
                             f"visual features for them")
        # One selection call per group of equally long images / videos.
        starts = torch.tensor([0] + [len(f) for f in features]).cumsum(0).tolist()
        by_length: Dict[int, List[int]] = {}
        for n, f in enumerate(features):
            by_length.setdefault(len(f), []).append(n)
        for count, members in by_length.items():
            stacked = torch.stack([features[n] for n in members])
            picks = divprune_ext.select(_selection_features(stacked), keep_ratio=keep_ratio)
            for n, pick in zip(members, picks):
                where = positions[starts[n]:starts[n + 1]]
                row = int(where[0, 0])
                if not bool((where[:, 0] == row).all()):
                    raise ValueError(f"visual item {n} (token id {token}) spans several prompts")
                ascending = pick.sort().values
                slots = where[ascending, 1]
                chosen = pick if order == "selection" else ascending
                embeds[row, slots] = features[n][chosen].to(embeds.dtype)
                keep[row, slots] = True

    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if batch else 0
    out_embeds = embeds.new_zeros(batch, width, embeds.shape[-1])
    out_mask = attention_mask.new_zeros(batch, width)
    out_labels = labels.new_full((batch, width), -100) if labels is not None else None
    for b in range(batch):
        n = int(lengths[b])
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        out_embeds[b, span] = embeds[b, keep[b]]
        out_mask[b, span] = 1
        if labels is not None:
            out_labels[b, span] = labels[b, keep[b]]
    result = {"inputs_embeds": out_embeds, "attention_mask": out_mask}
    if labels is not None:
        result["labels"] = out_labels
    return result
