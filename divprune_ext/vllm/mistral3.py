"""Mistral 3 in vLLM (``Mistral3ForConditionalGeneration``: Mistral Small 3.1 and other Pixtral-style
checkpoints in the Hugging Face format), pruned: images of any size, several per prompt.

vLLM replaces each ``[IMG]`` with the image's merged patch grid, row by row: ``columns`` ``[IMG]``
tokens a row, each row ended by ``[IMG_BREAK]``, the last by ``[IMG_END]``; only the ``[IMG]``
tokens take embeddings (``is_embed``), and ``embed_multimodal`` returns one ``(rows * columns, H)``
tensor an image, row-major. DivPrune selects over the whole image (all its rows together), as
``divprune_ext.hf`` does; the breaks and the end token are text and stay, each kept token stays
in its row, before that row's break (a row may keep none). How many tokens each row keeps is
known only after the encoder, while vLLM's prompt is fixed before it. So, as for Qwen3-VL's
videos (``divprune_ext.vllm.qwen_vl``), the prompt holds all ``k`` placeholders in the first row
(``[IMG]`` x k, then the ``rows`` break / end tokens) and the replacement is filled whole: the
plugin writes the image's ``k + rows`` rows in the layout ``divprune_ext.hf`` gives the pruned
image (each row's kept tokens, then its ``[IMG_BREAK]`` / ``[IMG_END]`` as the LLM's own
embedding of that token). The LLM sees what transformers + ``divprune_ext.hf`` give it; the
layout is computed on the device (no host read). Positions are 1-D: the kept tokens take the
pruned prompt's contiguous positions, as in ``divprune_ext.hf``.

The grid of an image comes from its ``pixel_values`` (vLLM crops them to the image's size: height
and width are multiples of ``patch_size * spatial_merge_size``). vLLM 0.32's Mistral 3 takes no
``image_embeds`` (0.33 and 0.34 accept them in the model, but their processor still sizes the
replacement from the image itself), so the plugin prunes pixel inputs only. vLLM 0.34's encoder
CUDA graph for Pixtral (``cudagraph_mm_encoder``) is refused at engine start, as for every family.

Pixtral-format checkpoints that vLLM serves with ``LlavaForConditionalGeneration`` (pixtral-12b
in the Hugging Face format: the same rows and breaks) are not covered here: their processor is
LLaVA's Pixtral branch, and ``divprune_ext.vllm.llava`` refuses their break tokens below ratio 1.
"""
from typing import List

import torch
from transformers import PixtralProcessor
from vllm.model_executor.models.mistral3 import Mistral3ForConditionalGeneration
from vllm.transformers_utils.processor import cached_processor_from_config

from .core import PruningModel, kept_in_first_run, with_pruning_processor


@with_pruning_processor
class DivPruneMistral3(PruningModel, Mistral3ForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._model_config = vllm_config.model_config

    def row_end_ids(self) -> tuple:
        """The ids of ``[IMG_BREAK]`` and ``[IMG_END]``, looked up as vLLM's processor does (at the
        first pruned image: serving unpruned never needs the processor here)."""
        if not hasattr(self, "_row_end_ids"):
            processor = cached_processor_from_config(self._model_config, processor_cls=PixtralProcessor)
            vocab = processor.tokenizer.get_vocab()
            self._row_end_ids = vocab[processor.image_break_token], vocab[processor.image_end_token]
        return self._row_end_ids

    @classmethod
    def kept_per_run(cls, modality: str, lengths: List[int], ratio: float, family: str) -> List[int]:
        # one selection over the image's rows; the first row's run holds every kept token
        return kept_in_first_run(lengths, ratio)

    @classmethod
    def embeds_whole_span(cls, modality: str) -> bool:
        return True

    def grid(self, index: int, kwargs) -> tuple:
        """(rows, columns) of image ``index``'s merged patch grid."""
        height, width = kwargs["pixel_values"][index].shape[-2:]
        side = self.config.vision_config.patch_size * self.config.spatial_merge_size
        return int(height) // side, int(width) // side

    def _kept(self, item, picks, modality, index, kwargs):
        rows, columns = self.grid(index, kwargs)
        if rows * columns != len(item):
            raise RuntimeError(f"divprune_ext: image {index} has {len(item)} tokens, its grid {rows} x {columns}")
        picks = picks.to(item.device)
        row = picks // columns  # ascending, as the picks
        each_row = torch.arange(rows, device=item.device)
        # each kept token moves down by the breaks of the rows above it; row r's break follows the
        # kept tokens of rows 0..r (searchsorted: no host sync, unlike bincount on a GPU)
        at_token = torch.arange(len(picks), device=item.device) + row
        at_break = torch.searchsorted(row, each_row, right=True) + each_row
        row_break, end = self.row_end_ids()
        ids = torch.full((rows,), row_break, dtype=torch.long, device=item.device)
        ids[-1] = end
        out = item.new_empty(len(picks) + rows, item.shape[1])
        out[at_token] = item.index_select(0, picks)
        out[at_break] = self.get_language_model().embed_input_ids(ids).to(item.dtype)
        return out
