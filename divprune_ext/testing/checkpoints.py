"""Tiny random vision-language checkpoints that vLLM and transformers load, built locally (nothing
downloaded). The vLLM tests (python_tests/vllm), the docs test and ``bench.serving`` build theirs here.

``build(kind, directory) -> path`` writes a float32 model of ``kind`` (one of ``KINDS``) made from
a config with seeded random weights, and a working processor (image processor, a tokenizer
trained here on a few sentences, the family's special tokens and a chat template), into
``directory``. Same kind, same files: the weights come from ``torch.manual_seed(SEED)``.

Sizes: text hidden 64 with 2 heads (head_dim 32, the smallest vLLM's CPU attention takes),
2 layers; vision towers of 2 layers. LLaVA: CLIP 56x56 images in 14x14 patches -> 16 tokens an
image. Qwen-VL: 14x14 patches merged 2x2, 16 to 64 merged tokens an image (min / max_pixels),
so tall and wide images get different grids. LLaVA-NeXT / NeXT-Video / OneVision: CLIP 16x16
tiles in 4x4 patches (16 tokens a tile), anyres over 1x2, 2x1 and 2x2 tiles (36 to 88 tokens an
image with its newline rows); a video frame pools to 2x2 tokens. Qwen3-VL: 16x16 patches merged
2x2, 16 to 64 merged tokens an image, a video's pixels counted over all its frames (4 frames of
64x96: 2 frames of 2x3 tokens, each after its "<t seconds>" timestamp); deepstack from both vision
layers. Qwen3-VL-MoE: Qwen3-VL's with a mixture-of-experts MLP (4 experts of 16, 2 a token).
GLM-4.1V: Qwen2-VL's grids (its processors size images by 28 x 28 px merged tokens: 56 x 56 -> 9,
112 x 112 -> 16), video frames as image tokens with their second as digits. Gemma 3: SigLIP 56x56 images in 14x14 patches -> 16 tokens an image of any shape; with
pan-and-scan (mm_processor_kwargs ``do_pan_and_scan=True, pan_and_scan_min_crop_size=28``: the
default minimum, 256, leaves these small images uncropped) 16 more a crop, 2 or 3 crops of an image
1.2 to 4 times as wide as tall or the other way. Gemma 4: 4x4 patches pooled 2x2, at most 70 soft
tokens an image (resized to fit 280 patches: 60 for 60x90, 64 for 56x56) or video frame (each after
its "mm:ss" timestamp), per-layer inputs on, causal image attention, its placeholder ids suppressed
in generation. InternVL: 56x56 tiles in 7x7 patches,
pixel-shuffled to 16 tokens a tile, 1 to 4 tiles + a thumbnail an image; a video frame is one tile
(vLLM and transformers write "Frame<i>: " before each). Mistral 3: Pixtral 8x8 patches merged 2x2,
one token per 16x16 pixels, images of at most 96 px a side, rows ended by ``[IMG_BREAK]``.
``initializer_range`` 0.3: random weights at the default 0.02 barely look at the image, and
different images must give different greedy tokens.

The pieces are public for checkpoints of other shapes (``bench.serving``'s): :func:`tokenizer`
(a word-level tokenizer with a family's special tokens and chat template: ``*_SPECIAL``,
``*_TEMPLATE``), :func:`rename_weights` with ``RENAMES`` (the weight names vLLM loads), and
:func:`pixels` (seeded test images). torch, transformers and tokenizers are imported by the
functions that use them, so importing this module costs nothing.

Adding a kind: a function ``_<kind>() -> (model, processor)`` in ``BUILDERS``, and a rename in
``RENAMES`` when vLLM's weight loader expects other names than transformers saves (a rewrite in
``REWRITES`` when it expects other layouts: Qwen3-VL-MoE's fused experts).
"""
from __future__ import annotations  # the annotations name torch / transformers types: not evaluated

import json
import os
from typing import Callable, Dict, List, Sequence, Tuple

__all__ = ["KINDS", "SEED", "INIT", "build", "tokenizer", "rename_weights", "RENAMES", "pixels",
           "LLAVA_SPECIAL", "NEXT_SPECIAL", "GEMMA_SPECIAL", "QWEN_SPECIAL",
           "LLAVA_TEMPLATE", "NEXT_TEMPLATE", "GEMMA_TEMPLATE", "QWEN_TEMPLATE", "SENTENCES"]

SEED = 0
INIT = 0.3
KINDS = ["llava", "qwen2_vl", "qwen2_5_vl", "llava_next", "llava_next_video", "llava_onevision", "gemma3",
         "qwen3_vl", "gemma4", "internvl", "mistral3", "qwen3_vl_moe", "glm4v", "qwen3_5"]
LLAVA_SIDE, LLAVA_PATCH = 56, 14
# LLaVA-NeXT / NeXT-Video / OneVision: 16x16 tiles in 4x4 patches (16 tokens a tile; a video frame
# pools to 2x2); anyres over 1x2, 2x1 and 2x2 tiles. vLLM's NeXT-Video pooler divides by
# image_size // patch_size**2, which must not be 0.
NEXT_SIDE, NEXT_PATCH = 16, 4
NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 16 * 28 * 28, 64 * 28 * 28
# Qwen3-VL: 16x16 patches merged 2x2 (32 px a merged token); its video processor counts a video's
# pixels over all its frames.
QWEN3_PATCH = 16
QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS = 16 * 32 * 32, 64 * 32 * 32
# Gemma 3: SigLIP 56x56 images in 14x14 patches, 16 tokens an image (its 4x4 patches pooled 1x1).
GEMMA_SIDE, GEMMA_PATCH, GEMMA_TOKENS = 56, 14, 16
# Gemma 4: 4x4 patches pooled 2x2, at most 70 soft tokens an image or video frame (the smallest setting;
# vLLM fixes a video frame's at 70): an image is resized to fit 280 patches, keeping its aspect ratio.
GEMMA4_PATCH, GEMMA4_POOL, GEMMA4_TOKENS = 4, 2, 70
# InternVL: 56x56 tiles in 7x7 patches pixel-shuffled 2x2: 16 tokens a tile; up to 4 tiles + a thumbnail.
INTERNVL_SIDE, INTERNVL_PATCH, INTERNVL_TOKENS, INTERNVL_TILES = 56, 7, 16, 4
# Mistral 3: Pixtral 8x8 patches merged 2x2 (16 px a token), images scaled to at most 96 px a side.
MISTRAL_PATCH, MISTRAL_LONGEST = 8, 96
SENTENCES = [
    "what is in the image ?", "describe the picture in a few words .", "the cat sat on the mat .",
    "a red ball and a blue box are on the table .", "compare the two images and the video .",
    "user assistant system : hello world , how are you today ?", "one two three four five six seven eight nine ten",
]
TIMESTAMPS = "<0.1 seconds> <2.3 seconds> <4.5 seconds> <6.7 seconds> <8.9 seconds>"  # Qwen3-VL's, before each frame
FRAMES = "Frame1: Frame2: Frame3: Frame4: Frame5: Frame6: Frame7: Frame8:"  # InternVL's, before each video frame
PAN_AND_SCAN = "Here is the original image and here are some crops to help you see better"  # Gemma 3's, with crops
LLAVA_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
NEXT_SPECIAL = LLAVA_SPECIAL + ["<video>"]
# Gemma 3's processor writes "\n\n<start_of_image>...<end_of_image>\n\n" per image and vLLM joins the
# newlines its replacement leaves next to the prompt's ("\n" + "\n\n" -> "\n\n\n") by looking the runs up in
# the vocabulary: added tokens (matched longest first), as a word-level tokenizer splits at whitespace.
# A space is a token too (as SentencePiece's): pan-and-scan crops are "...\n\n \n\n...", which vLLM would
# join into "\n\n\n\n" were the space dropped.
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                 "<end_of_image>", "<image_soft_token>", "\n", "\n\n", "\n\n\n", "\n\n\n\n", " "]
# Gemma 4: its image / video / audio tokens; a frame's "mm:ss" timestamp is 5 tokens (digits and ":" apart).
GEMMA4_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|image>", "<image|>",
                  "<|image|>", "<|video|>", "<|audio>", "<audio|>", "<|audio|>"]
INTERNVL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "\n"]
MISTRAL_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
NEXT_TEMPLATE = LLAVA_TEMPLATE.replace(
    "<image>\n{% elif", "<image>\n{% elif part['type'] == 'video' or part['type'] == 'video_url' %}<video>\n{% elif")
GEMMA_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
GEMMA4_TEMPLATE = GEMMA_TEMPLATE.replace("<start_of_image>", "<|image|>").replace(
    "{% elif part['type'] == 'text' %}",
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}<|video|>{% elif part['type'] == 'text' %}")
GLM_SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>",
               "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# InternVL: an image is "<IMG_CONTEXT>\n", a video "<video>\n" (its processor writes their tiles / frames)
INTERNVL_TEMPLATE = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n").replace(
    "<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")
MISTRAL_TEMPLATE = (
    "<s>{% for message in messages %}{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}[IMG]"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% endif %}{% endfor %}")
GLM_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tokenizer(special: List[str], template: str, sentences: List[str] = (), marks: bool = False,
              **roles) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer trained on SENTENCES + ``sentences``, the special tokens first (ids 0, 1, ...).
    ``marks``: punctuation marks, digits and capitalized words are words of their own, also where no space
    comes between (Qwen3-VL's frame timestamps "<1.2 seconds>": 6 tokens, as in Qwen's; Gemma 3's
    pan-and-scan text after a prompt's "?": "?Here is the original image")."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=special[0] if "<unk>" not in special else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if marks:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Split(Regex("[A-Z]"), "merged_with_next")])
    trainer = trainers.WordLevelTrainer(special_tokens=special + ["<unk>"] * ("<unk>" not in special))
    tok.train_from_iterator(SENTENCES + list(sentences), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **roles)
    fast.add_special_tokens({"additional_special_tokens": [t for t in special if t not in roles.values()]})
    return fast


def _text(vocab: int, **overrides) -> dict:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=2048,
                  initializer_range=INIT, tie_word_embeddings=False)
    return {**common, **overrides}


def _clip_llama(special: List[str], template: str, side: int, patch: int):
    """The LLaVA family's tokenizer, CLIP vision config and Llama text config."""
    import transformers
    tok = tokenizer(special, template, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=side, patch_size=patch,
                                           initializer_range=INIT, initializer_factor=1.0)
    text = transformers.LlamaConfig(**_text(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id))
    return tok, vision, text


def _llava() -> Tuple[torch.nn.Module, object]:
    import transformers
    tok, vision, text = _clip_llama(LLAVA_SPECIAL, LLAVA_TEMPLATE, LLAVA_SIDE, LLAVA_PATCH)
    config = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                                      vision_feature_select_strategy="default", initializer_range=INIT)
    model = transformers.LlavaForConditionalGeneration(config)
    image = transformers.CLIPImageProcessor(size={"shortest_edge": LLAVA_SIDE},
                                            crop_size={"height": LLAVA_SIDE, "width": LLAVA_SIDE})
    processor = transformers.LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=LLAVA_PATCH,
                                            vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                                            num_additional_image_tokens=1)
    return model, processor


def _llava_next(kind: str) -> Tuple[torch.nn.Module, object]:
    """LLaVA-NeXT (images), LLaVA-NeXT-Video (vLLM serves its videos only) and LLaVA-OneVision."""
    import transformers
    tok, vision, text = _clip_llama(NEXT_SPECIAL, NEXT_TEMPLATE, NEXT_SIDE, NEXT_PATCH)
    ids = dict(image_token_index=tok.convert_tokens_to_ids("<image>"))
    if kind != "llava_next":
        ids["video_token_index"] = tok.convert_tokens_to_ids("<video>")
    common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=-1,
                  vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS,
                  initializer_range=INIT, **ids)
    size = dict(size={"shortest_edge": NEXT_SIDE}, crop_size={"height": NEXT_SIDE, "width": NEXT_SIDE},
                image_grid_pinpoints=NEXT_PINPOINTS)
    tokens = dict(tokenizer=tok, chat_template=NEXT_TEMPLATE, vision_feature_select_strategy="default")
    if kind == "llava_next":
        model = transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(**common))
        processor = transformers.LlavaNextProcessor(image_processor=transformers.LlavaNextImageProcessor(**size),
                                                    patch_size=NEXT_PATCH, num_additional_image_tokens=1, **tokens)
    elif kind == "llava_next_video":
        model = transformers.LlavaNextVideoForConditionalGeneration(transformers.LlavaNextVideoConfig(**common))
        video = transformers.LlavaNextVideoVideoProcessor(size={"shortest_edge": NEXT_SIDE},
                                                          crop_size={"height": NEXT_SIDE, "width": NEXT_SIDE})
        processor = transformers.LlavaNextVideoProcessor(
            video_processor=video, image_processor=transformers.LlavaNextImageProcessor(**size),
            patch_size=NEXT_PATCH, num_additional_image_tokens=1, **tokens)
    else:
        model = transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(**common))
        image = transformers.LlavaOnevisionImageProcessor(size={"height": NEXT_SIDE, "width": NEXT_SIDE},
                                                          image_grid_pinpoints=NEXT_PINPOINTS)
        video = transformers.LlavaOnevisionVideoProcessor(size={"height": NEXT_SIDE, "width": NEXT_SIDE})
        processor = transformers.LlavaOnevisionProcessor(image_processor=image, video_processor=video,
                                                         num_image_tokens=(NEXT_SIDE // NEXT_PATCH) ** 2 + 1, **tokens)  # + CLS
    return model, processor


def _qwen(kind: str) -> Tuple[torch.nn.Module, object]:
    import transformers
    qwen3 = dict(sentences=[TIMESTAMPS], marks=True) if kind.startswith("qwen3") else {}
    tok = tokenizer(QWEN_SPECIAL, QWEN_TEMPLATE, pad_token="<|endoftext|>", eos_token="<|im_end|>", **qwen3)
    vocab = len(tok)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    # bos: the tokenizer has none; the config's default (151643) lies outside this vocabulary
    text = _text(vocab, pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 rope_parameters={"rope_type": "default", "mrope_section": [8, 4, 4], "rope_theta": 10000.0})
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=INIT)
    if kind == "qwen2_vl":
        vision.update(embed_dim=64, hidden_size=64, mlp_ratio=2)
        model = transformers.Qwen2VLForConditionalGeneration(
            transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    elif kind == "qwen2_5_vl":
        vision.update(hidden_size=64, intermediate_size=128, out_hidden_size=64, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        model = transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    else:  # Qwen3-VL: interleaved M-RoPE; both vision layers' features also enter LLM layers 0 and 1 (deepstack)
        text.update(head_dim=32)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(patch_size=QWEN3_PATCH, hidden_size=64, intermediate_size=128, out_hidden_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        if kind == "qwen3_vl_moe":  # the text MLP: 4 tiny experts, 2 a token (transformers normalizes their weights)
            text.update(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
            model = transformers.Qwen3VLMoeForConditionalGeneration(
                transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids))
        else:
            model = transformers.Qwen3VLForConditionalGeneration(
                transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids))
    patch, norm = vision["patch_size"], {}
    if kind.startswith("qwen3"):
        size = {"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": QWEN3_MAX_PIXELS}
        video = transformers.Qwen3VLVideoProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2,
                                                   do_sample_frames=False, cap_pixels_per_frame=False)
        # vLLM normalizes videos too on the device with the image processor's mean / std: those of the
        # video processor (0.5), as Qwen3-VL's own configs have them
        norm = dict(image_mean=video.image_mean, image_std=video.image_std)
    else:
        size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
        video = transformers.Qwen2VLVideoProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2,
                                                   do_sample_frames=False)
    image = transformers.Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2, **norm)
    cls = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
           "qwen3_vl": transformers.Qwen3VLProcessor, "qwen3_vl_moe": transformers.Qwen3VLProcessor}[kind]
    processor = cls(image_processor=image, tokenizer=tok, video_processor=video, chat_template=QWEN_TEMPLATE)
    return model, processor


def _qwen3_5(moe: bool = False) -> Tuple[torch.nn.Module, object]:
    """Qwen3.5 (and -MoE): Qwen3-VL's processor, tokenizer and vision tower without deepstack; the LLM
    a Gated-DeltaNet (linear attention) layer, then a full-attention layer. vLLM's CPU path runs the
    linear attention in bfloat16 only, with head dims 64 or 128: 64 here, one key head, two value heads.
    The tests run it in bfloat16 in vLLM and in transformers (``harness.DTYPES``)."""
    import torch
    import transformers
    _, processor = _qwen("qwen3_vl")  # Qwen3.5's checkpoints ship Qwen3VLProcessor
    torch.manual_seed(SEED)  # the weights do not depend on what that built
    tok = processor.tokenizer
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    # the whole head rotates (Qwen3.5's default rotates a quarter): interleaved M-RoPE over all 32 dims
    rope = {"rope_type": "default", "mrope_section": [8, 4, 4], "rope_theta": 10000.0, "mrope_interleaved": True,
            "partial_rotary_factor": 1.0}
    text = _text(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 head_dim=32, rope_parameters=rope, partial_rotary_factor=1.0,
                 layer_types=["linear_attention", "full_attention"],
                 linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=64, linear_value_head_dim=64)
    vision = dict(depth=2, num_heads=2, patch_size=QWEN3_PATCH, spatial_merge_size=2, temporal_patch_size=2,
                  hidden_size=64, intermediate_size=128, out_hidden_size=64, num_position_embeddings=64,
                  initializer_range=INIT)
    if not moe:
        model = transformers.Qwen3_5ForConditionalGeneration(
            transformers.Qwen3_5Config(text_config=text, vision_config=vision, **ids))
    else:  # the text MLP: 4 experts, 2 a token, and a shared expert
        text.update(moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
        model = transformers.Qwen3_5MoeForConditionalGeneration(
            transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, **ids))
    # Both engines run it in bfloat16: sharper attention (q / k norms scaled up) would make the greedy tokens
    # depend more on the images, but also lets bf16 rounding flip near-tied tokens between vLLM and transformers.
    return model, processor


def _gemma3() -> Tuple[torch.nn.Module, object]:
    import torch
    import transformers
    names = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    tok = tokenizer(GEMMA_SPECIAL, GEMMA_TEMPLATE, sentences=[PAN_AND_SCAN], marks=True, pad_token="<pad>",
                    bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", **names)
    ids = dict(boi_token_index=tok.convert_tokens_to_ids(names["boi_token"]),
               eoi_token_index=tok.convert_tokens_to_ids(names["eoi_token"]),
               image_token_index=tok.convert_tokens_to_ids(names["image_token"]))
    # 2 layers: one sliding-window layer (local RoPE), one global; the window is longer than the prompts.
    # Attention scaled by 4 ** -0.5 (q and k are RMS-normed): sharper, so that the image tells more.
    text = transformers.Gemma3TextConfig(**_text(len(tok), head_dim=32, query_pre_attn_scalar=4, sliding_window=512,
                                                 layer_types=["sliding_attention", "full_attention"],
                                                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id))
    vision = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=GEMMA_SIDE, patch_size=GEMMA_PATCH,
                                             vision_use_head=False)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=GEMMA_TOKENS, initializer_range=INIT,
                                       tie_word_embeddings=False, **ids)
    model = transformers.Gemma3ForConditionalGeneration(config)
    # The image projection starts at zero (the image would not matter): random, from the seeded generator.
    # Gemma scales the token embeddings by sqrt(hidden): drawn at INIT / sqrt(hidden), a token enters the
    # LLM at INIT as in the other families (at INIT it outweighs what the layers add, and the greedy
    # tokens hardly depend on the image).
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=INIT)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.mul_(text.hidden_size ** -0.5)
    image = transformers.Gemma3ImageProcessor(size={"height": GEMMA_SIDE, "width": GEMMA_SIDE})
    processor = transformers.Gemma3Processor(image_processor=image, tokenizer=tok, chat_template=GEMMA_TEMPLATE,
                                             image_seq_length=GEMMA_TOKENS)
    return model, processor


def _gemma4() -> Tuple[torch.nn.Module, object]:
    import torch
    import transformers
    names = dict(boi_token="<|image>", eoi_token="<image|>", image_token="<|image|>", boa_token="<|audio>",
                 eoa_token="<audio|>", audio_token="<|audio|>")
    tok = tokenizer(GEMMA4_SPECIAL, GEMMA4_TEMPLATE, sentences=["00:00 01:23 45:67 89:00"], marks=True,
                    pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", **names)
    ids = {f"{name[:-6]}_token_id": tok.convert_tokens_to_ids(token) for name, token in names.items()}
    ids["video_token_id"] = tok.convert_tokens_to_ids("<|video|>")
    # 2 layers: one sliding-window layer, one global (head_dim 32 both: global_head_dim); per-layer
    # inputs (hidden_size_per_layer_input) on, which Gemma 4 computes from the token ids. Causal image
    # attention (use_bidirectional_attention None, as the E2B / E4B models): vLLM's CPU backend has no
    # bidirectional spans.
    text = transformers.Gemma4TextConfig(**_text(len(tok), head_dim=32, global_head_dim=32, sliding_window=512,
                                                 layer_types=["sliding_attention", "full_attention"],
                                                 vocab_size_per_layer_input=len(tok), hidden_size_per_layer_input=8,
                                                 num_kv_shared_layers=0, pad_token_id=tok.pad_token_id,
                                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    vision = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                             patch_size=GEMMA4_PATCH, pooling_kernel_size=GEMMA4_POOL,
                                             position_embedding_size=128, default_output_length=GEMMA4_TOKENS,
                                             initializer_range=INIT)
    config = transformers.Gemma4Config(vision_config=vision.to_dict(), text_config=text.to_dict(), audio_config=None,
                                       initializer_range=INIT, tie_word_embeddings=False,
                                       **{k: v for k, v in ids.items() if k not in ("boa_token_id", "eoa_token_id")})
    model = transformers.Gemma4ForConditionalGeneration(config)
    # Never generate a placeholder id: transformers reads it back as an image / video / audio slot (embedded as
    # padding), vLLM as text. Both honour the generation config's suppress_tokens.
    model.generation_config.suppress_tokens = sorted(ids.values())
    with torch.no_grad():  # as for Gemma 3: the token embeddings are scaled by sqrt(hidden)
        model.model.language_model.embed_tokens.weight.mul_(text.hidden_size ** -0.5)
    sizes = dict(patch_size=GEMMA4_PATCH, pooling_kernel_size=GEMMA4_POOL, max_soft_tokens=GEMMA4_TOKENS)
    image = transformers.Gemma4ImageProcessor(**sizes)
    video = transformers.Gemma4VideoProcessor(**sizes, do_sample_frames=False)
    processor = transformers.Gemma4Processor(feature_extractor=transformers.Gemma4AudioFeatureExtractor(),
                                             image_processor=image, tokenizer=tok, video_processor=video,
                                             chat_template=GEMMA4_TEMPLATE, image_seq_length=GEMMA4_TOKENS)
    return model, processor


def _internvl() -> Tuple[torch.nn.Module, object]:
    import transformers
    names = dict(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                 video_token="<video>")
    tok = tokenizer(INTERNVL_SPECIAL, INTERNVL_TEMPLATE, sentences=[FRAMES], marks=True, pad_token="<|endoftext|>",
                    eos_token="<|im_end|>", **names)
    text = transformers.Qwen2Config(**_text(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
                                            eos_token_id=tok.eos_token_id))
    vision = transformers.InternVLVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=INTERNVL_SIDE,
                                               patch_size=INTERNVL_PATCH, initializer_range=INIT)
    config = transformers.InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                                         image_seq_length=INTERNVL_TOKENS, downsample_ratio=0.5,
                                         initializer_range=INIT)
    model = transformers.InternVLForConditionalGeneration(config)
    side = {"height": INTERNVL_SIDE, "width": INTERNVL_SIDE}
    image = transformers.GotOcr2ImageProcessor(size=side, crop_to_patches=True, min_patches=1,
                                               max_patches=INTERNVL_TILES)
    video = transformers.InternVLVideoProcessor(size=side)
    processor = transformers.InternVLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                               image_seq_length=INTERNVL_TOKENS, chat_template=INTERNVL_TEMPLATE)
    return model, processor


def _mistral3() -> Tuple[torch.nn.Module, object]:
    import transformers
    tok = tokenizer(MISTRAL_SPECIAL, MISTRAL_TEMPLATE, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                    unk_token="<unk>")
    text = transformers.MistralConfig(**_text(len(tok), head_dim=32, pad_token_id=tok.pad_token_id,
                                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    vision = transformers.PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=2, head_dim=32, image_size=MISTRAL_LONGEST,
                                              patch_size=MISTRAL_PATCH, initializer_range=INIT)
    config = transformers.Mistral3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                         image_token_id=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
                                         vision_feature_layer=-1, initializer_range=INIT)
    model = transformers.Mistral3ForConditionalGeneration(config)
    image = transformers.PixtralImageProcessor(size={"longest_edge": MISTRAL_LONGEST}, patch_size=MISTRAL_PATCH)
    processor = transformers.PixtralProcessor(image_processor=image, tokenizer=tok, patch_size=MISTRAL_PATCH,
                                              spatial_merge_size=2, chat_template=MISTRAL_TEMPLATE)
    return model, processor


def _glm4v() -> Tuple[torch.nn.Module, object]:
    """GLM-4.1V: Qwen2-VL's grids (14x14 patches merged 2x2, 16 to 64 merged tokens an image); a video's
    frames are written with the image token, each frame <|begin_of_image|> tokens <|end_of_image|> and its
    second as digits, all between <|begin_of_video|> and <|end_of_video|>."""
    import transformers
    tok = tokenizer(GLM_SPECIAL, GLM_TEMPLATE, sentences=[TIMESTAMPS], marks=True, pad_token="<|endoftext|>",
                    eos_token="<|user|>")  # TIMESTAMPS: the digits of its frames' seconds
    names = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
             "video_start_token_id", "video_end_token_id")
    tokens = ("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
              "<|end_of_video|>")
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in zip(names, tokens)}
    text = _text(len(tok), pad_token_id=tok.pad_token_id,
                 rope_parameters={"rope_type": "default", "mrope_section": [8, 4, 4], "rope_theta": 10000.0,
                                  "partial_rotary_factor": 1.0})
    text.pop("tie_word_embeddings")
    vision = dict(depth=2, num_heads=2, hidden_size=64, intermediate_size=128, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=112, initializer_range=INIT)
    config = transformers.Glm4vConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    model = transformers.Glm4vForConditionalGeneration(config)
    size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
    image = transformers.Glm4vImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video = transformers.Glm4vVideoProcessor(size=size, max_image_size={"longest_edge": QWEN_MAX_PIXELS}, patch_size=14,
                                             merge_size=2, temporal_patch_size=2, do_sample_frames=False)
    processor = transformers.Glm4vProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                            chat_template=GLM_TEMPLATE)
    return model, processor


BUILDERS: Dict[str, Callable[[], Tuple[torch.nn.Module, object]]] = {
    "llava": _llava,
    "qwen2_vl": lambda: _qwen("qwen2_vl"),
    "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"),
    "llava_next": lambda: _llava_next("llava_next"),
    "llava_next_video": lambda: _llava_next("llava_next_video"),
    "llava_onevision": lambda: _llava_next("llava_onevision"),
    "gemma3": _gemma3,
    "qwen3_vl": lambda: _qwen("qwen3_vl"),
    "gemma4": _gemma4,
    "internvl": _internvl,
    "mistral3": _mistral3,
    "qwen3_vl_moe": lambda: _qwen("qwen3_vl_moe"),
    "glm4v": _glm4v,
    "qwen3_5": _qwen3_5,
}


def vision_model_prefix(name: str) -> str:
    """vLLM's CLIP (Gemma 3: SigLIP) tower holds its weights under vision_tower.vision_model.*, as the
    original checkpoints do; transformers 5.19 saves them as vision_tower.* (older: model.vision_tower.*)."""
    for prefix in ("vision_tower.", "model.vision_tower."):
        if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + name[len(prefix):]
    return name


RENAMES: Dict[str, Callable[[str], str]] = {kind: vision_model_prefix for kind in
                                            ("llava", "llava_next", "llava_next_video", "llava_onevision", "gemma3")}


def experts_transposed(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL-MoE's fused experts as the original checkpoints store them and vLLM loads them:
    ``gate_up_proj`` (experts, hidden, 2 x intermediate), ``down_proj`` (experts, intermediate, hidden);
    transformers holds and saves them transposed."""
    if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
        return tensor.transpose(1, 2)
    return tensor


# (name, tensor) -> the tensor vLLM loads, where it differs from what transformers saves
REWRITES: Dict[str, Callable[[str, torch.Tensor], torch.Tensor]] = {"qwen3_vl_moe": experts_transposed}


def rename_weights(directory: str, rename: Callable[[str], str],
                   rewrite: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, tensor: tensor) -> None:
    """Rename the weights of the safetensors checkpoint in ``directory`` (files and index) in place;
    ``rewrite(name, tensor)``: each tensor's new value (by its old name)."""
    from safetensors.torch import load_file, save_file
    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    for f in files:
        path = os.path.join(directory, f)
        tensors = load_file(path)
        save_file({rename(k): rewrite(k, v).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            data = json.load(fh)
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        with open(index, "w") as fh:
            json.dump(data, fh)


def build(kind: str, directory: str) -> str:
    """Write the tiny ``kind`` checkpoint and its processor into ``directory``; return its path."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(BUILDERS)}")
    import torch

    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(SEED)
    model, processor = BUILDERS[kind]()
    model = model.float().eval()
    model.generation_config.eos_token_id = None  # generate() runs to max_new_tokens (vLLM: ignore_eos)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    if kind in RENAMES or kind in REWRITES:
        rename_weights(directory, RENAMES.get(kind, lambda name: name), REWRITES.get(kind, lambda name, tensor: tensor))
    return directory


def pixels(shape: Sequence[int], seed: int):
    """uint8 numpy array (..., H, W, 3): seeded noise over a colour gradient that depends on the seed,
    so that tall, wide and repeated images differ (``PIL.Image.fromarray`` makes an image of it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    *lead, h, w = shape
    ramp = np.linspace(0, 1, h)[:, None, None] * rng.uniform(0, 255, 3) + np.linspace(0, 1, w)[None, :, None] * 60
    noise = rng.integers(0, 120, size=(*lead, h, w, 3))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)
