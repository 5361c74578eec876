"""Tiny randomly initialised vision-language models and processor-like prompts, on the CPU.

:func:`build` makes a tiny model of a family (``FAMILIES`` for the LLaVA family and
Gemma 3, ``QWEN_KINDS`` for Qwen-VL) in float64, so that batched and one-by-one runs agree
to ~1e-12 and greedy decoding can't flip on rounding. Prompts come as the family's
processor would write them, one placeholder per visual token: :func:`row` makes one
LLaVA / Gemma 3 prompt with its pixels and where each visual item's placeholders are,
:func:`collate` left-pads rows into a batch; :func:`qwen_batch` makes a left-padded
Qwen-VL batch from a list of items per row. :func:`right_padded` turns a batch into a
right-padded one. A test module imports :func:`one_thread` to run its tiny models on
one thread, and the checks its families share from here (:class:`HostReads`,
:func:`check_padding_sides`, ...).
"""
import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import divprune_ext.hf as hf

PAD, IMAGE, VIDEO, BOI, EOI = 0, 99, 98, 97, 96  # BOI / EOI: Gemma 3's image and Qwen's vision start / end
GLM_VIDEO_START, GLM_VIDEO_END = 95, 94
SIDE, PATCH = 28, 7  # 28x28 pixels, 7x7 patches: 16 patches per image tile
GRID = [[28, 28], [28, 56], [56, 28], [56, 56]]
SIZES = [[28, 56], [56, 56], [56, 28]]  # image sizes, cycled: different tilings and unpadding
FRAMES = 4
INTERNVL_TILE_TOKENS = 4
INTERNVL_TILES = [1, 3]  # tiles of image n, cycled (a 2-tile image + its thumbnail: 3)
QWEN_KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v"]
if hasattr(transformers, "Qwen3_5ForConditionalGeneration"):
    QWEN_KINDS += ["qwen3_5", "qwen3_5_moe"]
QWEN_PATCH = 3 * 2 * 2 * 2  # Qwen pixel values per patch: channels x temporal patch x patch x patch
# The tensors with one value per token that a batch may hold.
PER_TOKEN = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")


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
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model.double().eval()


def _qwen(kind: str):
    # initializer_range=0.3: positions change the output clearly (a wrong position is a different
    # logit, not a rounding error).
    text = _text(initializer_range=0.3,
                 rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
    vision = dict(depth=2, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=BOI, vision_end_token_id=EOI)
    if kind == "qwen2_vl":
        vision.update(embed_dim=16, hidden_size=32, mlp_ratio=2)
        return transformers.Qwen2VLForConditionalGeneration(
            transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    if kind == "qwen2_5_vl":
        # tokens_per_second=2: a video's frames are 2 positions apart, so its temporal positions
        # run past the text that follows it.
        vision.update(hidden_size=16, intermediate_size=32, out_hidden_size=32, window_size=8,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        return transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    if kind == "glm4v":  # Qwen2-VL's scheme; its video frames are written with the image token
        text["rope_parameters"]["partial_rotary_factor"] = 1.0
        vision.update(hidden_size=16, out_hidden_size=32, intermediate_size=32, image_size=16)
        return transformers.Glm4vForConditionalGeneration(transformers.Glm4vConfig(
            text_config=text, vision_config=vision, image_start_token_id=BOI, image_end_token_id=EOI,
            video_start_token_id=GLM_VIDEO_START, video_end_token_id=GLM_VIDEO_END, **ids))
    text.update(head_dim=8)
    text["rope_parameters"]["mrope_interleaved"] = True
    if kind.startswith("qwen3_5"):  # Qwen3-VL's tower without deepstack; a Gated-DeltaNet layer, then full attention
        text["rope_parameters"]["partial_rotary_factor"] = 1.0  # (Qwen3.5's default: 0.25)
        text.update(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
        vision.update(hidden_size=16, intermediate_size=32, out_hidden_size=32, num_position_embeddings=64)
        if kind == "qwen3_5":
            return transformers.Qwen3_5ForConditionalGeneration(
                transformers.Qwen3_5Config(text_config=text, vision_config=vision, **ids))
        # the MoE variant: the text MLP only (4 experts, 2 a token, and a shared expert)
        text.update(moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
        config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, **ids)
        return transformers.Qwen3_5MoeForConditionalGeneration._from_config(config, experts_implementation="eager")
    vision.update(hidden_size=16, intermediate_size=32, out_hidden_size=32, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    if kind == "qwen3_vl_moe":  # the same model but the text MLP: 4 experts, 2 a token
        text.update(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
        config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)
        # the default grouped expert matmul has no float64 CPU kernel
        return transformers.Qwen3VLMoeForConditionalGeneration._from_config(config, experts_implementation="eager")
    return transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids))


def build(kind: str):
    """A tiny float64 model of ``kind`` (a key of FAMILIES or one of QWEN_KINDS)."""
    torch.manual_seed(0)
    if kind in QWEN_KINDS:
        return _finish(_qwen(kind))
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
    if kind == "internvl":  # 28x28 tiles in 7x7 patches: 16 patches, pixel-shuffled to 4 tokens a tile
        vision = transformers.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=SIDE, patch_size=PATCH)
        config = transformers.InternVLConfig(vision_config=vision.to_dict(),
                                             text_config=transformers.Qwen2Config(**_text()).to_dict(),
                                             image_token_id=IMAGE, image_seq_length=INTERNVL_TILE_TOKENS)
        return _finish(transformers.InternVLForConditionalGeneration(config))
    if kind == "mistral3":  # Pixtral tower: 7x7 patches merged 2x2, one token per 14x14 pixels
        vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, head_dim=8, image_size=2 * SIDE,
                                                  patch_size=PATCH)
        config = transformers.Mistral3Config(vision_config=vision.to_dict(),
                                             text_config=transformers.MistralConfig(**_text()).to_dict(),
                                             image_token_id=IMAGE, spatial_merge_size=2, vision_feature_layer=-1)
        return _finish(transformers.Mistral3ForConditionalGeneration(config))
    if kind == "gemma4":  # 7x7 patches pooled 2x2: a 28x56 image is 4x8 patches -> 8 tokens
        vision = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                                 patch_size=PATCH, pooling_kernel_size=2, position_embedding_size=64)
        text = transformers.Gemma4TextConfig(**_text(head_dim=8, sliding_window=12, vocab_size_per_layer_input=100,
                                                     hidden_size_per_layer_input=8, num_kv_shared_layers=0,
                                                     layer_types=["sliding_attention", "full_attention"],
                                                     use_bidirectional_attention="vision"))
        config = transformers.Gemma4Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                           audio_config=None,
                                           image_token_id=IMAGE, video_token_id=VIDEO, boi_token_id=BOI,
                                           eoi_token_id=EOI, audio_token_id=93)  # in the vocabulary: the
        # model embeds it to find audio placeholders in inputs_embeds
        return _finish(transformers.Gemma4ForConditionalGeneration(config))
    if kind == "gemma3":
        text = transformers.Gemma3TextConfig(**_text(head_dim=8, query_pre_attn_scalar=8, sliding_window=12,
                                                     sliding_window_pattern=2))
        config = transformers.Gemma3Config(vision_config=_siglip(), text_config=text.to_dict(), mm_tokens_per_image=16,
                                           image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)
        return _finish(transformers.Gemma3ForConditionalGeneration(config))
    raise ValueError(kind)


@dataclass
class Row:
    """One prompt: the processor's outputs for it and the (start, count) of each visual item: its
    ``count`` placeholders are the first ones from ``start`` on (Mistral 3 puts row breaks between)."""
    inputs: Dict[str, torch.Tensor]
    items: List[Tuple[int, int]] = field(default_factory=list)


def _pixels(kind: str, images: int, video: bool, g: torch.Generator) -> Dict[str, torch.Tensor]:
    pixels = {}
    if images and kind in ("llava", "gemma3"):
        pixels["pixel_values"] = torch.randn(images, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
    elif images and kind == "gemma4":  # flattened 7x7 patches, padded to the largest image; (-1, -1) at padding
        most = (2 * SIDE // PATCH) ** 2
        pixels["pixel_values"] = torch.zeros(images, most, 3 * PATCH * PATCH, dtype=torch.float64)
        pixels["image_position_ids"] = torch.full((images, most, 2), -1, dtype=torch.long)
        for n in range(images):
            h, w = (side // PATCH for side in SIZES[n % len(SIZES)])  # 28 px: 4 patches
            grid = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1).reshape(-1, 2)
            pixels["image_position_ids"][n, :len(grid)] = grid
            pixels["pixel_values"][n, :len(grid)] = torch.randn(len(grid), 3 * PATCH * PATCH, generator=g,
                                                                dtype=torch.float64)
    elif images and kind == "mistral3":  # (images, 3, H, W) padded to the largest + each image's size
        pixels["pixel_values"] = torch.randn(images, 3, 2 * SIDE, 2 * SIDE, generator=g, dtype=torch.float64)
        pixels["image_sizes"] = torch.tensor([SIZES[n % len(SIZES)] for n in range(images)])
    elif images and kind == "internvl":  # every image's tiles, image after image
        tiles = sum(INTERNVL_TILES[n % len(INTERNVL_TILES)] for n in range(images))
        pixels["pixel_values"] = torch.randn(tiles, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
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
    tokens; Gemma 3 and InternVL wrap each image in begin / end-of-image tokens, Gemma 3 marks it in
    token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    pixels = _pixels(kind, images, video, g)
    if kind == "internvl":  # its images are found in input_ids: counted here as its processor counts them
        counts = [(IMAGE, INTERNVL_TILES[n % len(INTERNVL_TILES)] * INTERNVL_TILE_TOKENS) for n in range(images)]
    else:
        counts = [(v.token_id, len(v.features)) for v in hf.visual_features(model, **pixels)]

    def text(n):
        return torch.randint(1, 90, (n,), generator=g).tolist()

    ids, items = text(3), []
    for n, (token, count) in enumerate(counts):
        opening, closing = ([BOI], [EOI]) if kind in ("gemma3", "gemma4", "internvl") else ([], [])
        ids += opening
        items.append((len(ids), count))
        if kind == "mistral3" and token == IMAGE:  # rows of [IMG], then [IMG_BREAK] (BOI); [IMG_END] (EOI) last
            columns = pixels["image_sizes"][n, 1].item() // (2 * PATCH)
            for r in range(count // columns):
                ids += [token] * columns + [BOI if r < count // columns - 1 else EOI]
            ids += text(2)
            continue
        ids += [token] * count + closing + text(2)
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **pixels}
    if kind == "gemma3":  # the processor marks image tokens: they attend to each other both ways
        inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    if kind == "gemma4":  # 1 at image tokens: each run attends to itself both ways
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    return Row(inputs, items)


def collate(rows: List[Row]) -> Tuple[Dict[str, torch.Tensor], List[List[Tuple[int, int]]]]:
    """Left-pad rows into one batch; items' starts shift with the padding."""
    width = max(r.inputs["input_ids"].shape[1] for r in rows)
    batch, items = {}, []
    for key in dict.fromkeys(k for r in rows for k in r.inputs):
        parts = [r.inputs[key] for r in rows if key in r.inputs]
        if key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
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


def qwen_token_types(input_ids: torch.Tensor) -> torch.Tensor:
    """mm_token_type_ids as the Qwen-VL processors write it: 1 at image tokens, 2 at video tokens."""
    return (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()


def qwen_batch(model, rows: Sequence[Sequence[tuple]], seeds: Optional[Sequence[int]] = None):
    """A left-padded Qwen-VL batch as the processor would return it: row i holds the items rows[i],
    each a patch grid before the 2x2 merge: ("image", h, w) or ("video", t, h, w). Each row's text and
    pixels come from its own seed (default: its index), so a row built alone with the same seed is
    the same prompt with the same pixels. Qwen3-VL, Qwen3.5 and GLM-4.1V write each video frame as its own
    placeholder run after a timestamp (GLM-4.1V with the image token), the others a video as one run."""
    seeds = list(range(len(rows))) if seeds is None else seeds
    name = type(model).__name__
    frames_apart = name.startswith(("Qwen3VL", "Glm4v", "Qwen3_5"))
    video_token = IMAGE if name.startswith("Glm4v") else VIDEO  # GLM-4.1V's frames use the image token
    prompts, types, pixels, grids = [], [], {"image": [], "video": []}, {"image": [], "video": []}
    for items, seed in zip(rows, seeds):
        g = torch.Generator().manual_seed(seed)
        ids, kinds = [], []

        def add(tokens, kind=0):
            ids.extend(tokens)
            kinds.extend([kind] * len(tokens))

        def text(n):
            add(torch.randint(3, 80, (n,), generator=g).tolist())

        text(3)
        for item in items:
            t, h, w = (1,) + item[1:] if item[0] == "image" else item[1:]
            pixels[item[0]].append(torch.randn(t * h * w, QWEN_PATCH, generator=g, dtype=torch.float64))
            grids[item[0]].append([t, h, w])
            if item[0] == "image":
                add([BOI]), add([IMAGE] * (h * w // 4), 1), add([EOI])
            elif frames_apart:
                for _ in range(t):
                    text(1), add([BOI]), add([video_token] * (h * w // 4), 2), add([EOI])
            else:
                add([BOI]), add([VIDEO] * (t * h * w // 4), 2), add([EOI])
            text(2)
        prompts.append(ids)
        types.append(kinds)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    inputs = {"input_ids": input_ids,
              "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
              "mm_token_type_ids": torch.tensor([[0] * (width - len(k)) + k for k in types], dtype=torch.int32)}
    if pixels["image"]:
        inputs.update(pixel_values=torch.cat(pixels["image"]), image_grid_thw=torch.tensor(grids["image"]))
    if pixels["video"]:
        inputs.update(pixel_values_videos=torch.cat(pixels["video"]), video_grid_thw=torch.tensor(grids["video"]))
        if isinstance(model, transformers.Qwen2_5_VLForConditionalGeneration):
            inputs["second_per_grid_ts"] = torch.ones(len(grids["video"]))
    return inputs


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
    "internvl": Family("internvl"),
    "mistral3": Family("mistral3"),
}
if hasattr(transformers, "Gemma4ForConditionalGeneration"):
    FAMILIES["gemma4"] = Family("gemma4", needs_encoder_outputs=True)
# mm_encoder_outputs (pre-encoded visual features; Gemma 3 and Qwen3-VL need it) came with transformers 5.18.
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


def new_tokens(pruned, generated):
    """generate() returns only the new tokens for inputs_embeds, the pruned prompt + new ones for input_ids."""
    return generated[:, pruned["input_ids"].shape[1]:] if "input_ids" in pruned else generated


def with_positions(pruned):
    """``pruned`` with positions counted from each row's first real token, as generate() counts them,
    where the family returns none (the rotary angles are float32: other absolute positions round
    differently, so batches padded differently are compared with these)."""
    if "position_ids" in pruned:
        return pruned
    return dict(pruned, position_ids=(pruned["attention_mask"].cumsum(1) - 1).clamp(min=0))


class HostReads(TorchDispatchMode):
    """Counts what makes a GPU wait: tensor-to-Python reads, data-dependent shapes, and tensors
    built from Python data (``torch.tensor(list, device=...)`` is a blocking host-to-device copy;
    0-dim ones are left out: indexing makes them on the CPU for scalar values)."""
    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default}
    FROM_PYTHON = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = 0
        tolist = torch.Tensor.tolist

        def counted(tensor):
            self.reads += 1
            return tolist(tensor)
        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indices = args[1] if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default) else ()
        self.reads += func in self.SYNCING or any(i is not None and i.dtype == torch.bool for i in indices)
        self.reads += func in self.FROM_PYTHON and args[0].dim() > 0
        return func(*args, **(kwargs or {}))


def right_padded(inputs):
    """The left-padded batch with each row's real tokens moved to the front."""
    shifts = (inputs["attention_mask"] == 0).sum(1).tolist()
    return dict(inputs, **{key: torch.stack([values.roll(-shift) for values, shift in zip(inputs[key], shifts)])
                           for key in PER_TOKEN if key in inputs})


def _real_tokens(key, values, mask):
    """The values of a (B, L, ...) tensor (position_ids: (3, B, L)) at the real tokens, row after row."""
    return values[:, mask] if key == "position_ids" else values[mask]


def _pruned(model, inputs, **settings):
    """prune_inputs' result, and the rope delta it leaves on the model (Qwen-VL) or None."""
    pruned = hf.prune_inputs(model, **inputs, **settings)
    deltas = getattr(model.model, "rope_deltas", None)
    return pruned, None if deltas is None else deltas.clone()


def across_batches_atol(model) -> float:
    """How closely the logits of one prompt agree between batches padded differently: ~1e-12 in float64,
    but Qwen3.5's Gated-DeltaNet layers compute in float32 in transformers (its torch implementation
    casts to float32, in chunks that padding shifts): ~1e-5 there, for the unpruned model too."""
    return 5e-4 if type(model).__name__.startswith("Qwen3_5") else 1e-12


def check_padding_sides(model, inputs, **settings):
    """prune_inputs on the right-padded batch (padding side detected), and with padding_side given
    against the padding of its input, gives each row the real tokens, per-token outputs (labels
    included), rope delta and logits of the left-padded batch pruned, padded on the side
    detected / asked for."""
    reference, reference_deltas = _pruned(model, inputs, **settings)
    reference_mask = reference["attention_mask"].bool()
    reference_logits = model(**with_positions(reference)).logits[reference_mask]
    per_token = {k for k, v in reference.items() if isinstance(v, torch.Tensor)}
    lengths, columns = reference_mask.sum(1, keepdim=True), torch.arange(reference_mask.shape[1])
    right = right_padded(inputs)
    for given, padding_side, side in ((right, None, "right"), (inputs, "right", "right"), (right, "left", "left")):
        pruned, deltas = _pruned(model, given, padding_side=padding_side, **settings)
        mask = pruned["attention_mask"].bool()
        assert torch.equal(mask, columns < lengths if side == "right" else columns >= len(columns) - lengths)
        assert per_token == {k for k, v in pruned.items() if isinstance(v, torch.Tensor)}
        for key in per_token:
            assert torch.equal(_real_tokens(key, pruned[key], mask), _real_tokens(key, reference[key], reference_mask))
        assert (deltas is None and reference_deltas is None) or torch.equal(deltas, reference_deltas)
        logits = model(**with_positions(pruned)).logits[mask]
        torch.testing.assert_close(logits, reference_logits, rtol=0, atol=across_batches_atol(model))
