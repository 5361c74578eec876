"""Qwen3.5 (and Qwen3.5-MoE) in vLLM, pruned: images, several per prompt, and videos.

vLLM's ``Qwen3_5ForConditionalGeneration`` is a subclass of its Qwen3-VL class: the same
processor (``Qwen3VLMultiModalProcessor``: a video's frames each after its ``"<t seconds>"``
timestamp), the same vision tower (without deepstack: ``multiscale_dim`` is 0, each row of
``embed_multimodal`` is the merged token alone), the same ``get_mrope_input_positions`` and
``embed_multimodal``; its own ``embed_input_ids`` (no deepstack) and ``forward``, which hands the
positions to its hybrid LLM (Gated-DeltaNet linear-attention layers, which read no positions, and
full-attention layers with interleaved M-RoPE). So the Qwen3-VL pruning applies unchanged
(:class:`divprune_ext.vllm.qwen_vl.Qwen3VLPruning`: images as Qwen2-VL, a video's kept tokens all
in its first frame's run, positions by :class:`divprune_ext.vllm.core.MRoPEPruning`, whose in-place
add runs in ``forward`` before vLLM's). The MoE variant differs in the LLM's MLP only.

Which class: vLLM 0.32 and 0.33 serve both architectures from
``vllm/model_executor/models/qwen3_5.py``. vLLM 0.34 maps them to ``vllm.models.qwen3_5``, which
imports, on CUDA, new code (``vllm/models/qwen3_5/nvidia/model.py``: eager, fused kernels, with
*breakable* CUDA graphs on by default: the runner captures the whole ``model(...)`` call, the
plugin's ``forward`` with its add on the runner's position buffer included, and ends a segment
at each attention op) and elsewhere the 0.32 code. The plugin subclasses whatever class that
module gives on the platform, so it sits on the code vLLM would run. The new class is again a
Qwen3-VL subclass with the same ``embed_input_ids`` / ``forward`` signatures.

vLLM's CPU path runs the linear attention in bfloat16 only ("CPU GDN attention requires BF16").
"""
import importlib
import importlib.util

from .core import with_pruning_processor
from .qwen_vl import Qwen3VLPruning

# the module vLLM's registry maps the architectures to: 0.34's per-platform entry point, else the 0.32 one
_MODULE = ("vllm.models.qwen3_5" if importlib.util.find_spec("vllm.models.qwen3_5") is not None
           else "vllm.model_executor.models.qwen3_5")
_vllm = importlib.import_module(_MODULE)


@with_pruning_processor
class DivPruneQwen3_5(Qwen3VLPruning, _vllm.Qwen3_5ForConditionalGeneration):
    """Qwen3.5: :class:`Qwen3VLPruning` on vLLM's Qwen3.5 class."""


@with_pruning_processor
class DivPruneQwen3_5Moe(Qwen3VLPruning, _vllm.Qwen3_5MoeForConditionalGeneration):
    """Qwen3.5-MoE: :class:`Qwen3VLPruning` on vLLM's Qwen3.5-MoE class."""
