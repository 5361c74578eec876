"""DivPrune for Hugging Face ``transformers`` LLaVA models (the first integration; kept as it was).

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration``
(LLaVA-1.6, anyres tiles + image-newline tokens) and ``LlavaNextVideoForConditionalGeneration``
(images and videos). :func:`prune_inputs` is :func:`divprune_ext.hf.prune_inputs` restricted to
these classes, with the original positional signature; ``divprune_ext.hf`` also serves
LLaVA-OneVision, Gemma 3 and Qwen-VL models. It returns ``inputs_embeds`` + ``attention_mask``
(+ ``labels``) of the shortened sequences, ready for ``model(...)`` or ``model.generate(...)``
(which then returns only the new tokens)::

    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    pruned = divprune_ext.llava.prune_inputs(model, **inputs, keep_ratio=0.1)
    new_tokens = model.generate(**pruned, max_new_tokens=64)   # only the new tokens

Selection runs on the projected visual tokens exactly as they enter the LLM (image-newline
tokens included for LLaVA-1.6), positions are contiguous after pruning, as in the authors'
code; ``order="selection"`` feeds the kept tokens in selection order, which the authors
state produced the paper's numbers.
"""
from typing import Dict, Optional

import torch

from . import hf

SUPPORTED_MODELS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                    "LlavaNextVideoForConditionalGeneration")

__all__ = ["prune_inputs", "SUPPORTED_MODELS"]


def prune_inputs(model, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, image_sizes: Optional[torch.Tensor] = None,
                 pixel_values_videos: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                 keep_ratio: float = 0.1, order: str = "original", padding_side: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Prune each image's / video's visual tokens before the LLM's first layer.

    Args:
        model: a LLaVA model of ``SUPPORTED_MODELS``.
        input_ids, attention_mask, pixel_values, image_sizes, pixel_values_videos, labels:
            as the model's processor returns them.
        keep_ratio: fraction of each image's / video's tokens to keep, in (0, 1].
        order: ``"original"`` or ``"selection"``: the order the kept tokens enter the LLM.
        padding_side: ``"left"`` or ``"right"``; default: left if any row starts with padding.

    Returns:
        ``{"inputs_embeds", "attention_mask"}`` (and ``"labels"`` if given) for the pruned prompts.
    """
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise TypeError(f"divprune_ext.llava supports {', '.join(SUPPORTED_MODELS)}; got {name} "
                        "(divprune_ext.hf.prune_inputs serves more families)")
    return hf.prune_inputs(model, input_ids, attention_mask, pixel_values=pixel_values, image_sizes=image_sizes,
                           pixel_values_videos=pixel_values_videos, labels=labels, keep_ratio=keep_ratio,
                           order=order, padding_side=padding_side)
