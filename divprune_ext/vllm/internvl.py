"""InternVL 3 / 3.5 in vLLM (``InternVLForConditionalGeneration``, the Hugging Face format), pruned:
images (several per prompt, tiled) and videos.

vLLM serves this architecture with its InternS1 model (``interns1.py``, the same in 0.32-0.34).
An image becomes ``<img>``, ``image_seq_length`` ``<IMG_CONTEXT>`` tokens per tile (its tiles, then
the thumbnail), ``</img>``: one run of placeholders, filled by ``embed_multimodal``'s rows for the
image, tile after tile. One image is one selection over all its tiles, as in
``divprune_ext.hf``; ``<img>`` / ``</img>`` stay.

Videos: vLLM writes each frame as ``Frame<i>: <img>``, ``image_seq_length`` ``<video>`` tokens,
``</img>``, the frames joined by newlines. Transformers writes the same text with the image token
instead of ``<video>`` (each frame is one tile), and ``divprune_ext.hf`` treats each frame as one
item. So the plugin selects each frame apart, ``keep_count(image_seq_length, ratio)`` tokens a
frame, and the frame text stays: the pruned prompt is the one transformers + ``divprune_ext.hf``
gives (the ``<video>`` ids take the frames' rows, as the image ids do there). Positions are 1-D:
the kept tokens take the pruned prompt's contiguous positions, as in ``divprune_ext.hf``.
Pre-computed ``image_embeds`` (one ``(n, H)`` an image, its tiles' rows) are pruned as pixels.

The original-format ``InternVLChatModel`` (vLLM's ``internvl.py``, remote-code checkpoints) is not
covered: its processor, tiling and video layout are its own and it has no test checkpoint here.
"""
from typing import List

from vllm.model_executor.models.interns1 import InternS1ForConditionalGeneration

import divprune_ext

from .core import PruningModel, with_pruning_processor


@with_pruning_processor
class DivPruneInternVL(PruningModel, InternS1ForConditionalGeneration):
    @classmethod
    def kept_per_run(cls, modality: str, lengths: List[int], ratio: float, family: str) -> List[int]:
        if modality == "video":  # one run per frame, each selected apart
            return [divprune_ext.keep_count(n, ratio) for n in lengths]
        return super().kept_per_run(modality, lengths, ratio, family)  # an image: one run, all its tiles

    def segments(self, modality: str, index: int, kwargs, rows: int) -> List[int]:
        if modality == "video":
            frames = int(kwargs["video_num_patches"][index])
            return [rows // frames] * frames
        return [rows]
