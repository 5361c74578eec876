"""DivPrune inside vLLM: a plugin that prunes each image's / video's visual tokens per request.

Installed with the package, it is loaded by vLLM itself (entry point ``vllm.general_plugins``
-> :func:`register`) in every engine process; nothing to import. It replaces the model
classes of the supported architectures (``SUPPORTED_ARCHITECTURES``) with subclasses that
prune, through vLLM's ``ModelRegistry``::

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"divprune_keep_ratio": 0.1}'

and per request ``mm_processor_kwargs={"divprune_keep_ratio": 0.25}`` (offline
``LLM.generate`` / ``LLM.chat``) or ``extra_body={"mm_processor_kwargs": {"divprune_keep_ratio":
0.25}}`` (OpenAI client), which overrides the server-wide default. No ratio, or 1.0: vLLM runs
as without the plugin. ``VLLM_PLUGINS=""`` (or a list without ``divprune``) turns it off.

What happens to a request (``divprune_ext/vllm/core.py`` has the details): the prompt gets
``k = keep_count(n, ratio)`` placeholders per item before the encoder runs; the encoder
computes all ``n`` tokens; ``torch.ops.divprune.select_varlen`` picks ``k`` on the tokens as
they enter the LLM (the same picks as ``divprune_ext.hf``), kept in their original order.
Qwen2-VL / Qwen2.5-VL / Qwen3-VL: kept tokens keep their multimodal RoPE positions (t, h, w) and
text after an item keeps the positions it has in the unpruned prompt. Gemma 3: each pan-and-scan
crop is selected apart. InternVL: each video frame is selected apart (an image: all its tiles
together). Mistral 3: an image's rows are selected together, its row breaks stay.
Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5: kept tokens keep their multimodal RoPE positions
(t, h, w) and text after an item keeps the positions it has in the unpruned prompt. Gemma 3: each
pan-and-scan crop is selected apart.

Importing this module costs nothing; :func:`register` imports vLLM and checks its version
(``SUPPORTED_VLLM``). Under any other version it registers nothing and logs a warning naming the
supported range: vLLM runs unpatched (no pruning; a ``divprune_keep_ratio`` is not acted on), and
models the plugin does not prune are served as ever.
"""
import logging

__all__ = ["register", "KEY", "SUPPORTED_VLLM", "SUPPORTED_ARCHITECTURES"]

KEY = "divprune_keep_ratio"  # the request kwarg and the hf_config attribute (server-wide default)
SUPPORTED_VLLM = ((0, 32, 0), (0, 35, 0))  # [lowest, first unsupported): the versions tested
# architecture (the checkpoint's config.json "architectures") -> "module:class", imported lazily by vLLM
SUPPORTED_ARCHITECTURES = {
    "LlavaForConditionalGeneration": "divprune_ext.vllm.llava:DivPruneLlava",
    "LlavaNextForConditionalGeneration": "divprune_ext.vllm.llava:DivPruneLlavaNext",
    "LlavaNextVideoForConditionalGeneration": "divprune_ext.vllm.llava:DivPruneLlavaNextVideo",
    "LlavaOnevisionForConditionalGeneration": "divprune_ext.vllm.llava:DivPruneLlavaOnevision",
    "Gemma3ForConditionalGeneration": "divprune_ext.vllm.gemma3:DivPruneGemma3",
    "Qwen2VLForConditionalGeneration": "divprune_ext.vllm.qwen_vl:DivPruneQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "divprune_ext.vllm.qwen_vl:DivPruneQwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "divprune_ext.vllm.qwen_vl:DivPruneQwen3VL",
    "Gemma4ForConditionalGeneration": "divprune_ext.vllm.gemma4:DivPruneGemma4",
    "InternVLForConditionalGeneration": "divprune_ext.vllm.internvl:DivPruneInternVL",
    "Mistral3ForConditionalGeneration": "divprune_ext.vllm.mistral3:DivPruneMistral3",
    "Qwen3VLMoeForConditionalGeneration": "divprune_ext.vllm.qwen_vl:DivPruneQwen3VLMoe",
    "Glm4vForConditionalGeneration": "divprune_ext.vllm.glm4v:DivPruneGlm4v",
    "Qwen3_5ForConditionalGeneration": "divprune_ext.vllm.qwen3_5:DivPruneQwen3_5",
    "Qwen3_5MoeForConditionalGeneration": "divprune_ext.vllm.qwen3_5:DivPruneQwen3_5Moe",
}


def _release(version: str):
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts + [0] * (3 - len(parts)))


def supported_range() -> str:
    low, high = SUPPORTED_VLLM
    return f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"


def is_supported(version: str) -> bool:
    """Whether ``version`` lies in ``SUPPORTED_VLLM``: the plugin subclasses vLLM's model and
    processor classes, whose internals change between releases."""
    low, high = SUPPORTED_VLLM
    return low <= _release(version) < high


def register() -> None:
    """The ``vllm.general_plugins`` entry point: check vLLM's version, register the pruning classes
    (or, under an unsupported vLLM, nothing, with a warning)."""
    import vllm
    from vllm import ModelRegistry

    if not is_supported(vllm.__version__):
        logging.getLogger(__name__).warning(
            "divprune_ext's vLLM plugin supports vLLM %s; installed: vLLM %s. The plugin registers nothing: "
            "vLLM runs without DivPrune and ignores divprune_keep_ratio. Install a supported vLLM to prune.",
            supported_range(), vllm.__version__)
        return
    for architecture, cls in SUPPORTED_ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, cls)
