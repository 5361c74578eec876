"""GLM-4.1V in vLLM, pruned: images, several per prompt, and videos.

vLLM's ``Glm4vForConditionalGeneration`` (``glm4_1v.py``) follows Qwen2-VL: 14x14 patches merged
2x2 by the vision tower, one output per image or video (a video: all its frames), multimodal RoPE.
Its own layout differs in two places, which the plugin follows:

- A video's frames are written with the *image* token: ``<|begin_of_video|>``, then per frame
  ``<|begin_of_image|>``, its tokens, ``<|end_of_image|>`` and its second as text, then
  ``<|end_of_video|>`` (the whole span is the replacement; its placeholders are the frames' runs).
- Positions (``get_mrope_input_positions``) place each run of placeholders (read from the item's
  ``is_embed`` ranges) as an image of its own after the text before it: a frame's tokens at
  (s, s + row, s + column), and the text after a run continues after its largest position.

Images are one run: ``k`` placeholders, the picks and their (0, row, column) offsets as for Qwen2-VL.

Videos: DivPrune selects over all frames of a video together (as ``divprune_ext.hf``), so each
frame's kept count is known only after the encoder. As for Qwen3-VL's videos (and vLLM's own EVS)
the prompt holds all ``k`` placeholders in the first frame's run and the model fills the whole
replacement: the markers, each frame's kept tokens and its timestamp, in the layout
``divprune_ext.hf`` gives the pruned video, the text tokens as the LLM's own embeddings of them,
each row with its unpruned position. The text of a video's replacement (its timestamps come from
the video's metadata, which the model never sees) reaches the model as a field of the processor's
outputs (:class:`VideoText`). The frames' kept counts are read to the host (one sync per pruned
video).
"""
from types import SimpleNamespace

import torch
from vllm.model_executor.models.glm4_1v import Glm4vForConditionalGeneration

from .core import WholeVideoSpans, with_offsets, with_pruning_processor
from .qwen_vl import QwenVLPruning

TEXT_FIELD = "divprune_video_text"  # per video: its replacement without the frames' placeholders


class VideoText:
    """Processor mixin: each video's replacement as vLLM writes it, less its placeholders (the
    markers and timestamps, ``TEXT_FIELD``), for the model to lay out a pruned video."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if mm_items.get_all_counts().get("video", 0) and "video_grid_thw" in processed:
            token = self.info.get_hf_config().image_token_id
            timestamps = processed.get("timestamps")  # vLLM 0.34 keeps them; as its own replacement does
            texts = []
            for index, grid in enumerate(processed["video_grid_thw"]):
                if timestamps is not None:
                    full = self.info._placeholder_from_timestamps(timestamps[index], grid)
                else:
                    video, metadata = mm_items["video"][index]
                    full = self.info._construct_video_placeholder(video, metadata, grid)
                texts.append(torch.tensor([t for t in full if t != token], dtype=torch.int64))
            processed[TEXT_FIELD] = texts
        return processed

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if TEXT_FIELD in hf_inputs:
            config[TEXT_FIELD] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return config


@with_pruning_processor
class DivPruneGlm4v(WholeVideoSpans, QwenVLPruning, Glm4vForConditionalGeneration):
    """GLM-4.1V: images and videos (see the module docstring)."""

    processor_mixin = VideoText

    def vllm_positions(self, input_tokens, mm_features):
        # vLLM's GLM positions read each item's runs of placeholders (is_embed): give them from the tokens
        from vllm.multimodal.inputs import PlaceholderRange

        tokens = torch.tensor(list(input_tokens))
        features = []
        for f in mm_features:
            offset, length = f.mm_position.offset, f.mm_position.length
            is_embed = tokens[offset:offset + length] == self.config.image_token_id
            features.append(SimpleNamespace(modality=f.modality, data=f.data,
                                            mm_position=PlaceholderRange(offset, length, is_embed=is_embed)))
        return super().vllm_positions(input_tokens, features)

    def _kept(self, item, picks, modality, index, kwargs):
        if modality != "video":
            return super()._kept(item, picks, modality, index, kwargs)
        t, h, w, _ = self.grid_of(modality, index, kwargs)
        text = kwargs[TEXT_FIELD][index].tolist()
        picks = picks.cpu()  # the host read: the frames' counts decide the layout
        counts = torch.bincount(picks // (h * w), minlength=t).tolist()
        ids = torch.tensor(self._video_span(text, counts))
        full = self._video_span(text, [h * w] * t)
        grid = SimpleNamespace(data=torch.as_tensor(kwargs["video_grid_thw"][index]))
        feature = SimpleNamespace(modality="video", data={"video_grid_thw": grid},
                                  mm_position=SimpleNamespace(offset=0, length=len(full)))
        positions = self.vllm_positions(full, [feature])[0]
        token = self.config.image_token_id
        is_token, was_token = ids == token, torch.tensor(full) == token
        offsets = torch.empty(len(ids), 3, dtype=torch.int64)
        offsets[is_token] = positions[:, was_token].t()[picks]
        offsets[~is_token] = positions[:, ~was_token].t()
        rows = item.new_zeros(len(ids), item.shape[1])
        rows[is_token.to(item.device)] = item.index_select(0, picks.to(item.device))
        words = ids[~is_token].to(item.device)
        rows[(~is_token).to(item.device)] = self.get_language_model().embed_input_ids(words).to(item.dtype)
        return with_offsets(rows, offsets)

    def _video_span(self, text, tokens_per_frame):
        """A video's replacement: its text with each frame's placeholders after its <|begin_of_image|>."""
        start, frames, span = self.config.image_start_token_id, iter(tokens_per_frame), []
        for word in text:
            span.append(word)
            if word == start:
                span += [self.config.image_token_id] * next(frames)
        return span

    def full_span(self, feature, span):
        if feature.modality == "image":
            return super().full_span(feature, span)
        merge = self.config.vision_config.spatial_merge_size
        _, h, w = feature.data["video_grid_thw"].data.tolist()
        text = [t for t in span if t != self.config.image_token_id]  # each frame's tokens, however many, back to h * w
        return self._video_span(text, [h * w // merge ** 2] * text.count(self.config.image_start_token_id))
