"""Gemma 3 in vLLM, pruned: images, several per prompt, with or without pan-and-scan crops.

vLLM replaces each image's ``<start_of_image>`` with its text: per crop (the image itself, then
its pan-and-scan crops, with their "Here is the original image ... crops" text) ``"\\n\\n"``,
``<start_of_image>``, ``mm_tokens_per_image`` image tokens, ``<end_of_image>``, ``"\\n\\n"``; only
the image tokens take embeddings (``is_embed``), and ``embed_multimodal`` returns one image's
crops' projected tokens one after the other. Each crop is one run of image tokens and is
selected apart, ``keep_count(mm_tokens_per_image, ratio)`` tokens each, as ``divprune_ext.hf``
does (each crop is its own image there); the ``<start_of_image>`` / ``<end_of_image>`` tokens and
the text stay. Positions are 1-D: the kept tokens take the pruned prompt's contiguous positions,
as in ``divprune_ext.hf``.

Attention: Gemma 3 lets an image's tokens see each other both ways. vLLM's GPU attention
backends derive those spans from the runs of embedding tokens of each item
(``PlaceholderRange.extract_embeds_range``), so each crop's kept tokens, one contiguous run, stay
one bidirectional span, as ``divprune_ext.hf`` keeps them one ``token_type_ids`` block. vLLM's CPU
backend has no such spans and runs the image tokens causally, pruned or not (as transformers does
without ``token_type_ids``).
"""
from typing import List

from vllm.model_executor.models.gemma3_mm import Gemma3ForConditionalGeneration

import divprune_ext

from .core import PruningModel, with_pruning_processor


@with_pruning_processor
class DivPruneGemma3(PruningModel, Gemma3ForConditionalGeneration):
    @classmethod
    def kept_per_run(cls, modality: str, lengths: List[int], ratio: float, family: str) -> List[int]:
        return [divprune_ext.keep_count(n, ratio) for n in lengths]  # one run per crop

    def segments(self, modality: str, index: int, kwargs, rows: int) -> List[int]:
        crops = int(kwargs["num_patches"][index])  # the image and its pan-and-scan crops
        return [rows // crops] * crops
