"""Adapters for Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and -MoE), GLM-4.1V and Qwen3.5 (and -MoE): images and
videos, any number per prompt.

Classes: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``
(transformers 5.17 and newer), ``Qwen3VLForConditionalGeneration`` and its mixture-of-experts
variant ``Qwen3VLMoeForConditionalGeneration`` (5.18 and newer; the same vision and multimodal
code, only the LLM's MLP differs), and ``Glm4vForConditionalGeneration`` (GLM-4.1V, which
follows Qwen2-VL's scheme; see :class:`Glm4v` for its differences), ``Qwen3_5ForConditionalGeneration``
and ``Qwen3_5MoeForConditionalGeneration`` (Qwen3.5; see :class:`Qwen3_5`).
Pass what the processor returns (``input_ids``, ``attention_mask``, ``pixel_values``,
``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``, ``mm_token_type_ids``, and
for Qwen2.5-VL ``second_per_grid_ts``)::

    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt").to(model.device)
    pruned = divprune_ext.hf.prune_inputs(model, **inputs, keep_ratio=0.1)
    out = model.generate(**pruned, max_new_tokens=64)

Selection runs on each image's / video's tokens as they enter the LLM: the output of the
vision tower's patch merger (``get_image_features`` / ``get_video_features``), one video
being all its frames together.

Positions (all three families)
------------------------------
The LLM places tokens with multimodal rotary positions (t, h, w): an image's tokens carry
their row and column in the merged patch grid, a video's tokens also their frame, and text
continues after the largest spatial extent (merged rows or columns) of the item before it,
so a video's temporal positions can run past the text that follows it. Kept tokens keep the
positions the model's own ``model.model.get_rope_index`` gives them on the *unpruned*
prompt (gathered along the kept tokens, returned as ``position_ids`` of shape (3, B, L')):
renumbering them 0..L'-1 would move the kept patches to other rows and columns and shift
all the text after them, whereas with the original positions the text after an image keeps
exactly the numbers the model gives it without pruning (pruned tokens leave gaps).
``generate()`` extends explicitly passed ``position_ids`` by the row's last position + 1 per
new token, which is what it does for the unpruned prompt too (the unpruned prompt's last
token has the same position), so decoding continues where the unpruned model would.
Without explicit positions the model would number an ``inputs_embeds`` prompt as plain text
(``generate()`` sets its rope delta to 0 then) or reuse a rope delta left by an earlier call.

The model also keeps a rope delta (``model.model.rope_deltas``), which it uses instead of
positions when it continues from a cache without them (e.g. ``generate()`` called again with
``past_key_values``). :func:`divprune_ext.hf.prune_inputs` sets it to describe the pruned
batch: per row, the unpruned prompt's largest position + 1 minus the row's pruned length,
so that a token appended after the pruned prompt gets the number the unpruned model would
give it. (This is the one piece of model state the adapter writes; the model writes it
itself on every multimodal prefill. It describes the last batch pruned.)

Qwen3-VL's deepstack
--------------------
Qwen3-VL's vision tower also outputs "deepstack" features, one (n, H) tensor per entry of
``vision_config.deepstack_visual_indexes``, which the LLM adds to the hidden states of the
visual tokens after its first decoder layers. They are gathered with the same picks and
passed, with the kept merged features, as ``mm_encoder_outputs`` next to pruned
``input_ids`` (one placeholder per kept token): a plain ``inputs_embeds`` prompt would lose
them silently. ``mm_encoder_outputs`` exists from transformers 5.18 (5.17's ``forward``
swallows it unused); on older versions :func:`prune_inputs` raises a RuntimeError naming
the version.

What ``generate()`` returns
---------------------------
Qwen2-VL, Qwen2.5-VL and Qwen3.5 get ``inputs_embeds`` (+ ``attention_mask``, ``position_ids``):
``generate()`` returns only the new tokens. Qwen3-VL gets pruned ``input_ids``
(+ ``attention_mask``, ``position_ids``, ``mm_encoder_outputs``): ``generate()`` returns the
pruned prompt followed by the new tokens (``out[:, pruned["input_ids"].shape[1]:]`` are the
new ones). ``labels`` and ``mm_token_type_ids`` come back shortened with the tokens.
Beam search and ``num_return_sequences`` work; with them ``generate()`` expands
``mm_encoder_outputs`` in place, so prune again before reusing a Qwen3-VL result in
another such call. (transformers 5.18 expands the encoder outputs of several images per
prompt in the wrong order there, for the unpruned model as for Qwen3-VL's pruned prompt;
5.24 does it right.)

Host syncs
----------
Besides the core's one read (see ``divprune_ext.hf.core``): the model's own feature code
(split sizes from the grids, the vision tower's attention windows) and rope-index function
(a Python loop over each row's token types) read from the device as the model does on every
multimodal prefill. The adapter's own check of the placeholders against the grids, before
the rope index is computed (a mismatch otherwise gives wrong positions or an unrelated
error), adds at most four small syncs per call: one read of the grids (both modalities
together), a ``nonzero`` and one read for the placeholder runs (both modalities together),
and, when ``mm_token_type_ids`` is given, one read of whether it agrees with ``input_ids``.
"""
from itertools import islice
from typing import Any, Dict, List, Sequence

import torch

from .core import Adapter, Visual, register, require_encoder_outputs, token_runs

_TYPE = {"image": 1, "video": 2}  # mm_token_type_ids, as the processors write them
_KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


def _per_item(values, sizes: Sequence[int]) -> List[torch.Tensor]:
    """One tensor per item: the model returns a tuple per item, or (5.17's deepstack) one concatenation."""
    if isinstance(values, torch.Tensor):
        return list(torch.split(values, list(sizes)))
    return list(values)


class _QwenVL(Adapter):
    inputs = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    frames_apart = False  # Qwen3-VL writes each video frame as its own run (a timestamp between frames)

    def visual(self, model, inputs: Dict[str, Any]) -> List[Visual]:
        found = []
        for modality, (pixels, _) in _KEYS.items():
            if pixels not in inputs:
                continue
            out = getattr(model.model, f"get_{modality}_features")(inputs[pixels], self._grid(inputs, modality),
                                                                   return_dict=True)
            features = list(out.pooler_output)  # one (n, H) per item: the model splits them by its grid
            deepstack = [_per_item(layer, [len(f) for f in features])
                         for layer in getattr(out, "deepstack_features", None) or ()]  # Qwen3-VL
            token = self._placeholder_id(model, modality)
            found += [Visual(token, f, tuple(layer[i] for layer in deepstack), modality)
                      for i, f in enumerate(features)]
        return found

    def position_ids(self, model, inputs: Dict[str, Any]) -> torch.Tensor:
        types = self._token_types(model, inputs)
        self._check_placeholders(model, inputs, types)
        rope = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
        positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=types,
                                                  attention_mask=inputs["attention_mask"], **rope)
        return positions

    def outputs(self, model, batch) -> Dict[str, Any]:
        self._set_rope_deltas(model, batch)
        return super().outputs(model, batch)

    def _placeholder_id(self, model, modality: str) -> int:
        return getattr(model.config, f"{modality}_token_id")

    def _grid(self, inputs, modality: str) -> torch.Tensor:
        pixels, grid_key = _KEYS[modality]
        if grid_key not in inputs:
            raise ValueError(f"{pixels} needs {grid_key} (the processor returns both)")
        return inputs[grid_key]

    def _token_types(self, model, inputs) -> torch.Tensor:
        """mm_token_type_ids as given (checked against the placeholder ids) or as the processor makes it."""
        input_ids = inputs["input_ids"]
        expected = torch.zeros_like(input_ids, dtype=torch.int32)
        for modality, value in _TYPE.items():
            expected.masked_fill_(input_ids == getattr(model.config, f"{modality}_token_id"), value)
        given = inputs.get("mm_token_type_ids")
        if given is None:
            return expected
        if given.shape != input_ids.shape:
            raise ValueError(f"mm_token_type_ids must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(given.shape)}")
        real = inputs["attention_mask"].bool()
        if bool(((given != expected) & real).any()):
            raise ValueError(f"mm_token_type_ids must be 1 exactly at the image tokens (id {model.config.image_token_id})"
                             f" and 2 at the video tokens (id {model.config.video_token_id}) of input_ids")
        return given

    def _check_placeholders(self, model, inputs, types: torch.Tensor) -> None:
        """Each image's / video's placeholder run(s) must have the length its grid gives, in prompt order."""
        merge = model.config.vision_config.spatial_merge_size
        grids = {m: self._grid(inputs, m) for m, (pixels, _) in _KEYS.items() if pixels in inputs}
        read = iter(torch.cat(list(grids.values())).tolist() if grids else [])  # one read for both modalities
        items = {modality: list(islice(read, len(grid))) for modality, grid in grids.items()}
        runs = token_runs(types.masked_fill(~inputs["attention_mask"].bool(), 0))
        for modality, value in _TYPE.items():
            token, grid_key = self._placeholder_id(model, modality), _KEYS[modality][1]
            thw = items.get(modality, [])
            expected = []  # (item, tokens) per run, in fill order
            for n, (t, h, w) in enumerate(thw):
                if modality == "video" and self.frames_apart:
                    expected += [(n, h * w // merge ** 2)] * t
                else:
                    expected.append((n, t * h * w // merge ** 2))
            found = [(row, length) for row, kind, length in runs if kind == value]
            if len(found) != len(expected):
                raise ValueError(f"input_ids has {len(found)} runs of {modality} tokens (id {token}) but "
                                 f"{grid_key} makes {len(expected)}"
                                 + (" (one per frame)" if modality == "video" and self.frames_apart else ""))
            for (row, length), (n, size) in zip(found, expected):
                if length != size:
                    raise ValueError(f"{modality} {n} ({grid_key} {thw[n]}) makes {size} tokens per run "
                                     f"but its placeholder run in row {row} has {length} tokens with id {token}")

    def _set_rope_deltas(self, model, batch) -> None:
        real = batch.inputs["attention_mask"].bool()
        top = batch.positions.masked_fill(~real, 0).amax(dim=(0, 2))  # largest position of each unpruned row
        model.model.rope_deltas = (top + 1 - batch.attention_mask.sum(1).to(top.dtype)).unsqueeze(1)


@register
class Qwen2VL(_QwenVL):
    models = ("Qwen2VLForConditionalGeneration",)


@register
class Qwen2_5_VL(_QwenVL):
    models = ("Qwen2_5_VLForConditionalGeneration",)
    inputs = _QwenVL.inputs + ("second_per_grid_ts",)


@register
class Qwen3VL(_QwenVL):
    models = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")  # MoE: the text MLP only
    frames_apart = True

    def check(self, model):
        require_encoder_outputs(model, "Qwen3-VL (its deepstack features must follow the kept tokens)")

    def outputs(self, model, batch):
        self._set_rope_deltas(model, batch)
        encoded = {}
        for modality in _TYPE:
            kept = [k for k in batch.kept if k.visual.modality == modality]
            if kept:
                per_item = [k.extras for k in kept]  # each: one (k, H) tensor per deepstack layer
                encoded[modality] = _deepstack_output(pooler_output=tuple(k.features for k in kept),
                                                      deepstack_features=[tuple(layer) for layer in zip(*per_item)])
        return {"input_ids": batch.input_ids, "mm_encoder_outputs": encoded or None}


def _deepstack_output(**fields):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
    return BaseModelOutputWithDeepstackFeatures(**fields)


@register
class Glm4v(_QwenVL):
    """GLM-4.1V (``Glm4vForConditionalGeneration``): Qwen2-VL's scheme, with two differences.

    - A video's frames are written with the *image* token (each frame ``<|begin_of_image|>``, its
      tokens, ``<|end_of_image|>``, then its timestamp); only ``mm_token_type_ids`` (1 image, 2
      video) tells them apart, so it is required, and the Visuals are put in prompt order from
      its runs (one more ``nonzero`` and read) because images and videos share one placeholder id.
    - Its rope index (``get_rope_index``) places each frame as its own image after the text before
      it; the kept tokens keep those positions, as for the other Qwen-style families.
    """
    models = ("Glm4vForConditionalGeneration",)
    frames_apart = True

    def placeholders(self, model):
        return {model.config.image_token_id: "pixel_values or pixel_values_videos"}

    def _placeholder_id(self, model, modality):
        return model.config.image_token_id  # videos too

    def visual(self, model, inputs):
        found = super().visual(model, inputs)
        types = inputs.get("mm_token_type_ids")
        if types is None or not any(v.modality == "video" for v in found):
            return found
        if "attention_mask" in inputs:
            types = types.masked_fill(~inputs["attention_mask"].bool(), 0)
        frames = iter(inputs["video_grid_thw"][:, 0].tolist())
        queues = {m: iter([v for v in found if v.modality == m]) for m in _TYPE}
        ordered, skip = [], 0
        for _, kind, _ in token_runs(types.int()):  # prompt order; a video is one run per frame
            if kind == _TYPE["video"] and skip:
                skip -= 1
                continue
            item = next(queues["image" if kind == _TYPE["image"] else "video"], None)
            if item is not None:
                ordered.append(item)
                skip = next(frames, 1) - 1 if kind == _TYPE["video"] else 0
        # placeholders that do not match the grids: the checks after this say which
        return ordered + [v for v in found if not any(v is o for o in ordered)]

    def _token_types(self, model, inputs):
        given = inputs.get("mm_token_type_ids")
        if given is None and not bool((inputs["input_ids"] == model.config.image_token_id).any()):
            return torch.zeros_like(inputs["input_ids"], dtype=torch.int32)  # a text prompt
        if given is None:
            raise ValueError("GLM-4.1V needs mm_token_type_ids (its processor returns it): its videos' frames use the "
                             "image token, so only the token types tell images from videos")
        if given.shape != inputs["input_ids"].shape:
            raise ValueError(f"mm_token_type_ids must have the shape of input_ids {tuple(inputs['input_ids'].shape)}, "
                             f"got {tuple(given.shape)}")
        real = inputs["attention_mask"].bool()
        if bool((((given != 0) != (inputs["input_ids"] == model.config.image_token_id)) & real).any()):
            raise ValueError(f"mm_token_type_ids must be 1 or 2 exactly at the image tokens (id "
                             f"{model.config.image_token_id}) of input_ids")
        return given


@register
class Qwen3_5(_QwenVL):
    """Qwen3.5 (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``): natively
    multimodal, its vision tower Qwen3-VL's without deepstack.

    - Prompts and positions are Qwen3-VL's: each video frame is its own placeholder run after its
      timestamp, and the rope index (``get_rope_index``, the same as Qwen3-VL's) places each frame as
      a one-frame grid after the text before it.
    - The LLM interleaves Gated-DeltaNet (linear attention) layers with full-attention layers; only
      the latter read positions. A linear-attention layer reads the tokens in order, so a kept
      token's place in the pruned sequence matters there, while its position is the original.
    - No deepstack: the kept merged features go in as ``inputs_embeds``, as for Qwen2-VL (no
      ``mm_encoder_outputs``, so no minimum transformers version beyond the one that has the class).
      ``generate()`` builds 4-row positions itself (a text row for the masks, then (t, h, w)); the
      adapter returns the three (t, h, w) rows, which the LLM takes as they are (with an attention
      mask the text row is not needed).
    The MoE variant differs in the LLM's MLP only.
    """
    models = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    frames_apart = True
