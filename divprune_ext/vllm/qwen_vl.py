"""Qwen2-VL and Qwen2.5-VL in vLLM, pruned: images, several per prompt, and videos.

Selection runs on each item's output of the vision tower's patch merger (a video: all its frames
together), as in ``divprune_ext.hf``. Positions: :class:`divprune_ext.vllm.core.MRoPEPruning`; the
grid of an item comes from the same fields vLLM's ``iter_mm_grid_thw`` reads (``*_grid_thw``
merged by ``spatial_merge_size``; a video's time axis scaled by ``second_per_grid_ts`` x
``vision_config.tokens_per_second``), so both sides agree on every offset.
"""
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

from .core import MRoPEPruning, with_pruning_processor


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


@with_pruning_processor
class DivPruneQwen2VL(QwenVLPruning, Qwen2VLForConditionalGeneration):
    pass


@with_pruning_processor
class DivPruneQwen2_5_VL(QwenVLPruning, Qwen2_5_VLForConditionalGeneration):
    pass
