"""Gemma 4 in vLLM, pruned: images, several per prompt, and videos.

Images: vLLM replaces each ``<|image|>`` with ``<boi>``, the image's soft tokens (70 to 1120 by
the processor's ``max_soft_tokens``, fewer for small images), ``<eoi>``; only the soft tokens take
rows (``is_embed``), one run. The item keeps ``keep_count(n, ratio)`` of them, picked on the
projected soft tokens (``embed_multimodal``'s rows) as ``divprune_ext.hf``; ``<boi>`` / ``<eoi>``
stay. Positions are 1-D: the kept tokens take the pruned prompt's contiguous positions, as in
``divprune_ext.hf``.

Videos: Gemma 4 has no video tower; vLLM encodes each frame as an image of at most 70 soft tokens
and writes a video as, per frame, its ``mm:ss`` timestamp (tokenized apart), ``<boi>``, the
frame's tokens, ``<eoi>``; ``embed_multimodal`` returns all frames' rows of a video as one item.
``divprune_ext.hf`` selects over all frames of a video together, so how many tokens each frame
keeps is known only after the encoder, while the prompt is fixed before it. As for Qwen3-VL
(``qwen_vl.py``): the prompt holds all ``k`` placeholders in the first frame, the replacement is
filled whole, and the plugin writes the video's rows in the layout ``divprune_ext.hf`` gives the
pruned video (each timestamp, ``<boi>``, the frame's kept tokens, ``<eoi>``), the text tokens as
the LLM's own embeddings of them. One host read per pruned video (the frames' kept counts).

Per-layer inputs: Gemma 4 adds to every layer an embedding of each token's id
(``embed_tokens_per_layer``), which vLLM computes in ``embed_input_ids`` from the prompt's ids with
every multimodal token read as id 0 (the padding id transformers reads there). In a pruned video's
span every token is multimodal and the prompt's ids lie elsewhere than the rows' (the text of the
frames moved), so each row of a pruned video carries the id its token has in the real layout (0 at
kept soft tokens) as int32 bits in extra columns (``PLE_INTS``), and :meth:`embed_input_ids`
recomputes the per-layer inputs from those ids, as transformers computes them from the pruned
prompt.

Attention: on GPUs vLLM makes each run of embedding tokens of an item bidirectional where
``text_config.use_bidirectional_attention == "vision"`` (``PlaceholderRange.extract_embeds_range``). An image's kept tokens stay one run, one
bidirectional span, as ``divprune_ext.hf`` keeps them one ``mm_token_type_ids`` run. A pruned
video's whole replacement is one run (timestamps and markers included), where transformers
makes each frame's kept tokens a span of their own: videos of those models are refused below
ratio 1 (``ValueError`` naming ``divprune_keep_ratio``, :class:`Gemma4VideoRatioCheck`); models with
causal image attention prune videos exactly (vLLM's CPU backend has no spans at all).
"""
from types import SimpleNamespace
from typing import List

import torch
from vllm.model_executor.models.gemma4_mm import (Gemma4DummyInputsBuilder, Gemma4ForConditionalGeneration,
                                                  Gemma4MultiModalProcessor, Gemma4ProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import KEY
from .core import PruningModel, WholeVideoSpans, with_pruning_processor

# Each row of a pruned video carries the id of its token for the per-layer inputs as int32 bits
# (id, 0): 8 bytes, whole columns in float32 (2), bf16 / fp16 (4) and float64 (1).
PLE_INTS = 2


def with_token_ids(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``rows`` with each row's token id (``ids``: (rows,)) appended as int32 bits in ``PLE_INTS`` columns."""
    bits = torch.zeros(len(rows), PLE_INTS, dtype=torch.int32, device=rows.device)
    bits[:, 0] = ids.to(rows.device)
    return torch.cat([rows, bits.view(rows.dtype)], dim=1)


def bidirectional_vision(hf_config) -> bool:
    return getattr(hf_config.get_text_config(), "use_bidirectional_attention", None) == "vision"


class Gemma4VideoRatioCheck(Gemma4MultiModalProcessor):
    """vLLM's processor, refusing to prune the videos of a model with bidirectional image attention."""

    def apply(self, inputs, timing_ctx):
        ratio = inputs.hf_processor_mm_kwargs.get(KEY)  # the effective ratio (below 1) or none
        if (ratio is not None and inputs.mm_data_items.get_all_counts().get("video", 0)
                and bidirectional_vision(self.info.get_hf_config())):
            raise ValueError(f"divprune_ext: {KEY}={ratio} with a video: this Gemma 4 model attends to each video "
                             "frame both ways (use_bidirectional_attention='vision'), which vLLM cannot apply to a "
                             f"pruned video's frames; use {KEY}=1.0 for videos")
        return super().apply(inputs, timing_ctx)


@with_pruning_processor
@MULTIMODAL_REGISTRY.register_processor(Gemma4VideoRatioCheck, info=Gemma4ProcessingInfo,
                                        dummy_inputs=Gemma4DummyInputsBuilder)
class DivPruneGemma4(WholeVideoSpans, PruningModel, Gemma4ForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        from vllm.tokenizers.registry import cached_tokenizer_from_config

        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenizer = cached_tokenizer_from_config(vllm_config.model_config)  # a video's timestamps

    @staticmethod
    def _per_video(kwargs, key, index) -> list:
        value = kwargs[key][index]
        return value.tolist() if isinstance(value, torch.Tensor) else list(value)

    def _kept(self, item, picks, modality, index, kwargs):
        if modality != "video":
            return super()._kept(item, picks, modality, index, kwargs)
        frames = [int(n) for n in self._per_video(kwargs, "video_num_soft_tokens", index)]
        timestamps = [float(t) for t in self._per_video(kwargs, "video_timestamps", index)]
        picks = picks.cpu()  # the host read: the frames' counts decide the layout
        frame_of = torch.bucketize(picks, torch.tensor(frames).cumsum(0), right=True)
        counts = torch.bincount(frame_of, minlength=len(frames)).tolist()
        ids = torch.tensor(self._video_span(counts, timestamps))
        is_token = ids == self.config.video_token_id
        rows = item.new_zeros(len(ids), item.shape[1])
        rows[is_token.to(item.device)] = item.index_select(0, picks.to(item.device))
        text = ids[~is_token].to(item.device)
        rows[(~is_token).to(item.device)] = self.get_language_model().embed_input_ids(text).to(item.dtype)
        return with_token_ids(rows, torch.where(is_token, 0, ids))

    def _video_span(self, tokens_per_frame: List[int], timestamps: List[float]) -> List[int]:
        """vLLM's own replacement of a video with these tokens per frame."""
        info = SimpleNamespace(ctx=SimpleNamespace(get_tokenizer=lambda: self._tokenizer),
                               get_hf_config=lambda: self.config)
        return Gemma4ProcessingInfo.get_video_repl(
            info, timestamps=timestamps, num_soft_tokens_per_frame=tokens_per_frame,
            processor=SimpleNamespace(video_token_id=self.config.video_token_id)).full

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        hidden, ple_ids = self.config.text_config.hidden_size, None
        if (multimodal_embeddings is not None and is_multimodal is not None
                and any(e.shape[-1] != hidden for e in multimodal_embeddings)):
            stripped, per_row = [], []
            for embeds in multimodal_embeddings:
                if embeds.shape[-1] == hidden:  # not a pruned video: id 0, as vLLM reads every multimodal token
                    stripped.append(embeds)
                    per_row.append(torch.zeros(len(embeds), dtype=torch.int32, device=embeds.device))
                else:
                    part = embeds[:, :hidden]
                    if hasattr(embeds, "modality"):
                        part.modality = embeds.modality
                    stripped.append(part)
                    per_row.append(embeds[:, hidden:].contiguous().view(torch.int32)[:, 0])
            mask = is_multimodal.to(input_ids.device)
            row = (mask.long().cumsum(0) - 1).clamp_(min=0)  # token -> the multimodal row it takes
            carried = torch.cat(per_row).to(input_ids.device, input_ids.dtype).index_select(0, row)
            ple_ids = torch.where(mask, carried, input_ids)
            multimodal_embeddings = stripped
        embeds = super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        if ple_ids is not None and self.per_layer_embeddings is not None:
            self._write_per_layer_inputs(ple_ids)
        return embeds

    def _write_per_layer_inputs(self, ids: torch.Tensor) -> None:
        """The per-layer inputs of ``ids`` into vLLM's buffer, as its ``embed_input_ids`` writes them."""
        text = self.config.text_config
        per_layer = self.language_model.model.get_per_layer_inputs(ids)
        if per_layer is not None:
            per_layer = per_layer.reshape(-1, text.num_hidden_layers, text.hidden_size_per_layer_input)
            self.per_layer_embeddings[:len(per_layer)].copy_(per_layer)
