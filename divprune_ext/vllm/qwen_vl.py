"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE in vLLM, pruned: images, several per prompt, and videos.

Selection runs on each item's output of the vision tower's patch merger (a video: all its frames
together), as in ``divprune_ext.hf``. Positions: :class:`divprune_ext.vllm.core.MRoPEPruning`; the
grid of an item comes from the same fields vLLM's ``iter_mm_grid_thw`` reads (``*_grid_thw``
merged by ``spatial_merge_size``; a video's time axis scaled by ``second_per_grid_ts`` x
``vision_config.tokens_per_second``), so both sides agree on every offset.
"""
from types import SimpleNamespace

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration, Qwen3VLMultiModalProcessor
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

from .core import MRoPEPruning, WholeVideoSpans, with_offsets, with_pruning_processor


class QwenVLPruning(MRoPEPruning):
    def grid_of(self, modality, index, kwargs):
        merge = self.config.vision_config.spatial_merge_size
        t, h, w = (int(v) for v in kwargs[f"{modality}_grid_thw"][index])
        t_factor = 1.0
        seconds = kwargs.get("second_per_grid_ts") if modality == "video" else None
        if seconds is not None:
            tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
            t_factor = float(seconds[index]) * tokens_per_second
        return t, h // merge, w // merge, t_factor

    def full_span(self, feature, span):
        merge = self.config.vision_config.spatial_merge_size
        n = int(feature.data[f"{feature.modality}_grid_thw"].data.prod()) // merge ** 2
        return span if len(span) == n else span[:1] * n  # n placeholders (one token id)


@with_pruning_processor
class DivPruneQwen2VL(QwenVLPruning, Qwen2VLForConditionalGeneration):
    pass


@with_pruning_processor
class DivPruneQwen2_5_VL(QwenVLPruning, Qwen2_5_VLForConditionalGeneration):
    pass


class Qwen3VLPruning(WholeVideoSpans, QwenVLPruning):
    """Qwen3-VL's pruning (:class:`DivPruneQwen3VL`, :class:`DivPruneQwen3VLMoe`; vLLM's Qwen3.5 classes
    are Qwen3-VL classes too, ``qwen3_5.py``): images and videos.

    Deepstack: each row of ``embed_multimodal`` is the merged token (``out_hidden_size`` columns)
    followed by its deepstack features (one block per ``deepstack_visual_indexes`` entry), which
    the LLM adds to the hidden states of the visual tokens in its first layers. DivPrune compares
    the merged tokens (as ``divprune_ext.hf``) and keeps whole rows, so the deepstack features
    follow the same picks; the offset columns go after them.

    Images: the Qwen2-VL scheme with t = 1.

    Videos: vLLM writes each frame as a timestamp, ``<|vision_start|>``, the frame's tokens,
    ``<|vision_end|>``. DivPrune selects over all frames of a video together (as
    ``divprune_ext.hf``), so how many tokens each frame keeps is known only after the encoder,
    while the prompt is fixed before it. So, as vLLM's own video pruning (EVS) does, the prompt
    holds all ``k`` placeholders in the first frame and the replacement is filled whole: the
    plugin writes the video's rows in the layout ``divprune_ext.hf`` gives the pruned video
    (each timestamp, then its frame's kept tokens between the vision markers), the text tokens
    as the LLM's own embeddings of them (no deepstack), each row with its unpruned position.
    The LLM sees what transformers + ``divprune_ext.hf`` give it. The frames' kept counts are
    read to the host (one sync per pruned video, as EVS).

    Positions: :class:`MRoPEPruning`'s; :meth:`full_span` puts a pruned video's frames back.
    """

    def embedding_width(self) -> int:
        return self.visual_dim + self.multiscale_dim

    def selection_features(self, item):
        return item[:, :self.visual_dim]  # the merged tokens, without the deepstack columns

    def _kept(self, item, picks, modality, index, kwargs):
        if modality != "video":
            return super()._kept(item, picks, modality, index, kwargs)
        t, h, w, _ = self.grid_of(modality, index, kwargs)
        timestamps = kwargs["timestamps"][index]
        timestamps = timestamps.tolist() if isinstance(timestamps, torch.Tensor) else list(timestamps)
        picks = picks.cpu()  # the host read: the frames' counts decide the layout
        counts = torch.bincount(picks // (h * w), minlength=t).tolist()
        ids = torch.tensor(self._video_span(counts, timestamps))
        full = self._video_span([h * w] * t, timestamps)
        positions = self.vllm_positions(full, [self._video_feature(0, len(full), kwargs, index)])[0]
        is_token, was_token = ids == self.config.video_token_id, torch.tensor(full) == self.config.video_token_id
        offsets = torch.empty(len(ids), 3, dtype=torch.int64)
        offsets[is_token] = positions[:, was_token].t()[picks]
        offsets[~is_token] = positions[:, ~was_token].t()
        rows = item.new_zeros(len(ids), item.shape[1])
        rows[is_token.to(item.device)] = item.index_select(0, picks.to(item.device))
        text = ids[~is_token].to(item.device)
        rows[(~is_token).to(item.device), :self.visual_dim] = self.get_language_model().embed_input_ids(text).to(item.dtype)
        return with_offsets(rows, offsets)

    def _video_span(self, tokens_per_frame, timestamps):
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=tokens_per_frame, timestamps=timestamps, tokenizer=self._tokenizer,
            vision_start_token_id=self.config.vision_start_token_id,
            vision_end_token_id=self.config.vision_end_token_id, video_token_id=self.config.video_token_id).full

    @staticmethod
    def _video_feature(offset, length, kwargs, index):
        grid = SimpleNamespace(data=torch.as_tensor(kwargs["video_grid_thw"][index]))
        return SimpleNamespace(modality="video", data={"video_grid_thw": grid},
                               mm_position=SimpleNamespace(offset=offset, length=length))

    def full_span(self, feature, span):
        if feature.modality == "image":
            return super().full_span(feature, span)
        merge = self.config.vision_config.spatial_merge_size
        _, h, w = feature.data["video_grid_thw"].data.tolist()
        video, start = self.config.video_token_id, self.config.vision_start_token_id
        full = []
        for token in span:  # each frame's tokens, however many the pruned span holds, back to h * w
            if token != video:
                full.append(token)
                if token == start:
                    full += [video] * (h * w // merge ** 2)
        return full


@with_pruning_processor
class DivPruneQwen3VL(Qwen3VLPruning, Qwen3VLForConditionalGeneration):
    pass


@with_pruning_processor
class DivPruneQwen3VLMoe(Qwen3VLPruning, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE: vLLM's class is Qwen3-VL's with a mixture-of-experts LLM (and its own processing
    info for the MoE config); the vision tower, deepstack, processor and positions are Qwen3-VL's, and so
    is the pruning."""
