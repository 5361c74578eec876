"""LLaVA-1.5 (``LlavaForConditionalGeneration``) in vLLM, pruned.

vLLM's ``embed_multimodal`` returns each image's tokens after the projector (or the given
``image_embeds``, which are pruned the same way); they go into the LLM with 1-D RoPE, so the kept
tokens simply take the pruned prompt's contiguous positions, as in ``divprune_ext.hf``. Pixtral
checkpoints served by the same class put break tokens inside the image span: at a ratio below 1
the processor refuses them (``NotImplementedError``).
"""
from vllm.model_executor.models.llava import LlavaForConditionalGeneration

from .core import PruningModel, with_pruning_processor


@with_pruning_processor
class DivPruneLlava(PruningModel, LlavaForConditionalGeneration):
    pass
