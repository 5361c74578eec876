"""The LLaVA family in vLLM, pruned: LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision.

vLLM's ``embed_multimodal`` returns, per item, exactly the rows that fill its placeholders, in
order: the tokens after the projector, with LLaVA-NeXT / OneVision images as base tile + unpadded
anyres tiles + one image-newline row per feature row, and videos as their frames' pooled tokens
(+ one final newline row for OneVision). The placeholders of an item are ``n`` copies of the
image (video) token. So the plugin selects on those rows, newline rows included, as
``divprune_ext.hf`` does on the tokens transformers inserts. They go into the LLM with 1-D RoPE:
the kept tokens take the pruned prompt's contiguous positions, as in ``divprune_ext.hf``.
Pre-computed ``image_embeds`` are pruned the same way. Pixtral checkpoints served by
``LlavaForConditionalGeneration`` put break tokens inside the image span: at a ratio below 1 the
processor refuses them (``NotImplementedError``).
"""
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.llava_next_video import LlavaNextVideoForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

from .core import PruningModel, with_pruning_processor


@with_pruning_processor
class DivPruneLlava(PruningModel, LlavaForConditionalGeneration):
    pass


@with_pruning_processor
class DivPruneLlavaNext(PruningModel, LlavaNextForConditionalGeneration):
    """Images only (vLLM's class serves no video)."""


@with_pruning_processor
class DivPruneLlavaNextVideo(PruningModel, LlavaNextVideoForConditionalGeneration):
    """Videos only: vLLM 0.32 serves this architecture's videos (one per prompt), not its images."""


class _FlatItems:
    """OneVision returns a video of varying frame count as ``(1, n, H)``: one ``(n, H)`` per item."""

    def embed_multimodal(self, **kwargs: object):
        return tuple(item.reshape(-1, item.shape[-1]) for item in super().embed_multimodal(**kwargs))


@with_pruning_processor
class DivPruneLlavaOnevision(PruningModel, _FlatItems, LlavaOnevisionForConditionalGeneration):
    """Images (anyres, several per prompt) and videos (pooled frames + one newline row)."""
