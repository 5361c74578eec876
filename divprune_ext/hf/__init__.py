"""DivPrune for Hugging Face ``transformers`` vision-language models.

:func:`prune_inputs` takes what the model's processor returns, keeps
``max(1, round(n * keep_ratio))`` of each image's / video's ``n`` visual tokens,
selected with ``torch.ops.divprune.select`` on the tokens exactly as they enter the
LLM (after the projector / patch merger), and returns the keyword arguments for
``model(**pruned)`` and ``model.generate(**pruned, ...)``::

    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    pruned = divprune_ext.hf.prune_inputs(model, **inputs, keep_ratio=0.1)
    out = model.generate(**pruned, max_new_tokens=64)

What comes back, per family (``SUPPORTED_MODELS`` lists the classes):

- LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision (``hf/llava.py``):
  ``inputs_embeds``, contiguous positions; ``generate()`` returns only the new tokens.
- InternVL 3 / 3.5 (``hf/internvl.py``): as LLaVA; each image is all its tiles.
- Mistral 3 (``hf/mistral3.py``): as LLaVA; an image's row-break and end tokens stay.
- Gemma 3 (``hf/gemma3.py``, transformers >= 5.18): pruned ``input_ids`` +
  ``mm_encoder_outputs`` + ``token_type_ids``, contiguous positions; ``generate()``
  returns the pruned prompt followed by the new tokens.
- Gemma 4 (``hf/gemma4.py``, transformers >= 5.18): as Gemma 3, with ``mm_token_type_ids``.
- Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, GLM-4.1V, Qwen3.5 and Qwen3.5-MoE (``hf/qwen_vl.py``):
  the original multimodal RoPE positions as ``position_ids``; see that module for what each returns.

``attention_mask`` and any ``labels``, ``token_type_ids``, ``mm_token_type_ids`` passed in
come back shortened with the tokens and re-padded on the side the input was padded, so
batched left-padded generation works. Placeholder tokens without the pixels that fill them
are a ``ValueError`` (the unpruned model would read them as text). Adding a family: see
``divprune_ext.hf.core``.
"""
from . import core
from . import gemma3, gemma4, internvl, llava, mistral3, qwen_vl  # noqa: F401  (importing a family module registers its adapters)
from .core import Visual, prune_inputs, visual_features

SUPPORTED_MODELS = core.supported_models()

__all__ = ["prune_inputs", "visual_features", "Visual", "SUPPORTED_MODELS"]
