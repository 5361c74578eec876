"""Tiny randomly initialised vision-language models and processor-like prompts, on the CPU.

Each family is a :class:`Family`: ``model()`` builds the model (float64, so that batched
and one-by-one runs agree to ~1e-12 and greedy decoding can't flip on rounding), and
``row(model, images, video, seed)`` returns one prompt as the family's processor would:
``input_ids`` (1, L) with one placeholder per visual token, the pixel tensors of its
images / video, and where each visual item's placeholders are. :func:`collate`
left-pads rows into a batch, as processors do for generation. A test module imports
:func:`one_thread` to run its tiny models on one thread.
"""
import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import pytest
import torch
import transformers

import divprune_ext.hf as hf

PAD, IMAGE, VIDEO, BOI, EOI = 0, 99, 98, 97, 96
SIDE, PATCH = 28, 7  # 28x28 pixels, 7x7 patches: 16 patches per image tile
GRID = [[28, 28], [28, 56], [56, 28], [56, 56]]
SIZES = [[28, 56], [56, 56], [56, 28]]  # image sizes, cycled: different tilings and unpadding
FRAMES = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Import into a test module: tiny models run fastest on one thread (two spin-wait on each
    other on a busy machine: 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _text(**overrides):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=512, pad_token_id=PAD)
    return {**common, **overrides}


def _clip():
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=SIDE, patch_size=PATCH).to_dict()


def _siglip():
    return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=SIDE, patch_size=PATCH).to_dict()


def _finish(model):
    model.generation_config.pad_token_id = PAD
    return model.double().eval()


def build(kind: str):
    """A tiny float64 model of ``kind`` (a key of FAMILIES)."""
    torch.manual_seed(0)
    llava_common = dict(vision_config=_clip(), text_config=transformers.LlamaConfig(**_text()).to_dict(),
                        image_token_id=IMAGE, vision_feature_layer=-1)
    if kind == "llava":
        return _finish(transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**llava_common)))
    if kind == "llava_next":
        config = transformers.LlavaNextConfig(image_grid_pinpoints=GRID, **llava_common)
        return _finish(transformers.LlavaNextForConditionalGeneration(config))
    if kind == "llava_next_video":
        config = transformers.LlavaNextVideoConfig(image_grid_pinpoints=GRID, video_token_id=VIDEO,
                                                   spatial_pool_stride=2, **llava_common)
        return _finish(transformers.LlavaNextVideoForConditionalGeneration(config))
    if kind == "onevision":
        config = transformers.LlavaOnevisionConfig(
            vision_config=_siglip(), text_config=transformers.Qwen2Config(**_text()).to_dict(),
            image_token_id=IMAGE, video_token_id=VIDEO, image_grid_pinpoints=GRID)
        return _finish(transformers.LlavaOnevisionForConditionalGeneration(config))
    if kind == "gemma3":
        text = transformers.Gemma3TextConfig(**_text(head_dim=8, query_pre_attn_scalar=8, sliding_window=12,
                                                     sliding_window_pattern=2))
        config = transformers.Gemma3Config(vision_config=_siglip(), text_config=text.to_dict(), mm_tokens_per_image=16,
                                           image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)
        return _finish(transformers.Gemma3ForConditionalGeneration(config))
    raise ValueError(kind)


@dataclass
class Row:
    """One prompt: the processor's outputs for it and the (start, count) of each visual item."""
    inputs: Dict[str, torch.Tensor]
    items: List[Tuple[int, int]] = field(default_factory=list)


def _pixels(kind: str, images: int, video: bool, g: torch.Generator) -> Dict[str, torch.Tensor]:
    pixels = {}
    if images and kind in ("llava", "gemma3"):
        pixels["pixel_values"] = torch.randn(images, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
    elif images:  # anyres: (images, tiles, 3, h, w) + each image's size; a 56x56 image has 1 + 2x2 tiles
        pixels["pixel_values"] = torch.randn(images, 5, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
        pixels["image_sizes"] = torch.tensor([SIZES[n % len(SIZES)] for n in range(images)])
        if kind == "onevision":  # one image per prompt is tiled, several are not
            pixels["batch_num_images"] = torch.tensor([images])
    if video:
        pixels["pixel_values_videos"] = torch.randn(1, FRAMES, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
    return pixels


def row(model, kind: str, images: int = 1, video: bool = False, seed: int = 0) -> Row:
    """A prompt: 3 text tokens, then each image's (then the video's) placeholders followed by 2 text
    tokens; Gemma 3 wraps each image in begin / end-of-image tokens and marks it in token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    pixels = _pixels(kind, images, video, g)
    one_token = torch.zeros(1, 1, dtype=torch.long)
    counts = [(v.token_id, len(v.features)) for v in hf.visual_features(model, one_token, **pixels)]

    def text(n):
        return torch.randint(1, 90, (n,), generator=g).tolist()

    ids, items = text(3), []
    for token, count in counts:
        opening, closing = ([BOI], [EOI]) if kind == "gemma3" else ([], [])
        ids += opening
        items.append((len(ids), count))
        ids += [token] * count + closing + text(2)
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **pixels}
    if kind == "gemma3":  # the processor marks image tokens: they attend to each other both ways
        inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    return Row(inputs, items)


def collate(rows: List[Row]) -> Tuple[Dict[str, torch.Tensor], List[List[Tuple[int, int]]]]:
    """Left-pad rows into one batch; items' starts shift with the padding."""
    width = max(r.inputs["input_ids"].shape[1] for r in rows)
    batch, items = {}, []
    for key in dict.fromkeys(k for r in rows for k in r.inputs):
        parts = [r.inputs[key] for r in rows if key in r.inputs]
        if key in ("input_ids", "attention_mask", "token_type_ids"):
            pad = PAD if key == "input_ids" else 0
            parts = [torch.nn.functional.pad(p, (width - p.shape[1], 0), value=pad) for p in parts]
        elif key == "pixel_values" and parts[0].dim() == 5:  # tiles padded to the batch's maximum
            tiles = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in parts]
        batch[key] = torch.cat(parts)
    for r in rows:
        shift = width - r.inputs["input_ids"].shape[1]
        items.append([(start + shift, count) for start, count in r.items])
    return batch, items


@dataclass
class Family:
    """A family under test: its ``build`` kind and what it supports."""
    kind: str
    video: bool = False
    needs_encoder_outputs: bool = False  # generation from pruned inputs needs transformers >= 5.18


FAMILIES: Dict[str, Family] = {
    "llava": Family("llava"),
    "llava_next": Family("llava_next"),
    "llava_next_video": Family("llava_next_video", video=True),
    "onevision": Family("onevision", video=True),
    "gemma3": Family("gemma3", needs_encoder_outputs=True),
}
# mm_encoder_outputs (pre-encoded visual features) came with transformers 5.18.
HAS_ENCODER_OUTPUTS = "mm_encoder_outputs" in inspect.signature(transformers.Gemma3Model.forward).parameters


@contextlib.contextmanager
def llm_inputs(model):
    """Records the keyword arguments of each call of the LLM (the visual tokens as they enter it)."""
    calls: List[Dict] = []
    hook = model.model.language_model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs),
                                                               with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()
