"""The model-independent part of the vLLM plugin: the ratio, the placeholders, the selection.

A family module subclasses vLLM's model class with :class:`PruningModel` (and
:class:`MRoPEPruning` for multimodal RoPE) first in its bases and decorates it with
:func:`with_pruning_processor`; ``divprune_ext/vllm/__init__.py`` maps the architecture to it.

The ratio of a request
======================
``mm_processor_kwargs["divprune_keep_ratio"]`` (per request), else the model config's
``divprune_keep_ratio`` (``--hf-overrides``), else 1.0. :class:`PruningProcessor.apply` (the
processor entry point every request and the profile run go through, in the front-end process)
validates it (``ValueError`` naming ``divprune_keep_ratio``: a request error, the engine goes on)
and writes the effective ratio back into the kwargs, or removes the key at 1.0. vLLM hashes those
kwargs into every item's identity, so an image at two ratios has two processor-, encoder- and
prefix-cache entries and the same image at the same ratio shares them; at 1.0 the hashes are
vLLM's own. The key never reaches the Hugging Face processor.

Placeholders
============
``_get_prompt_updates`` wraps the family's replacements: an item the family would give ``n``
placeholders gets the first ``k = keep_count(n, ratio)`` of them (the placeholders of an item are
all one token id in the supported families; anything else raises ``NotImplementedError`` at a
ratio below 1 rather than pruning wrongly). The ratio reaches the model as one value per item
in a field ``divprune_<modality>_ratio`` (float64 bits carried as int64: vLLM casts floating
processor outputs to the model dtype, and ``round(n * r)`` in bf16 would give another k), present
at 1.0 too so that items of requests with and without a ratio batch together.

Selection
=========
:meth:`PruningModel.embed_multimodal` runs the family's own ``embed_multimodal`` (the encoder and
projector / merger on all ``n`` tokens: what the encoder cache budget and the profile run, made
at ratio 1.0 by :meth:`PruningProcessor.get_dummy_inputs`, account for) and then one
``select_varlen`` call over the items with ``k < n``, picks in ascending order. vLLM checks
nothing more: the rows it receives fill the item's ``k`` placeholders in order.

Encoder budget: vLLM's scheduler charges an item's placeholder count (``k``) against the encoder
compute budget (``max_num_batched_tokens`` by default), so at ratio ``r`` one step may encode up
to ``budget / r`` tokens. The README says how to bound it.
"""
import dataclasses
import numbers
from typing import Any, Dict, List, Mapping, Sequence

import torch

import divprune_ext

from . import KEY

MODALITIES = ("image", "video")


def ratio_field(modality: str) -> str:
    return f"divprune_{modality}_ratio"


def check_ratio(value: Any, where: str = KEY) -> float:
    """The keep ratio as a float in (0, 1]; else ValueError naming ``where`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{where} must be a number in (0, 1], got {value!r}")
    return float(value)


def default_ratio(hf_config) -> float:
    """The server-wide ratio: ``divprune_keep_ratio`` on the model config (``--hf-overrides``), else 1.0."""
    value = getattr(hf_config, KEY, None)
    return 1.0 if value is None else check_ratio(value, f"{KEY} (model config / --hf-overrides)")


def _without_key(kwargs: Mapping[str, object]) -> Dict[str, object]:
    return {k: v for k, v in kwargs.items() if k != KEY}


def _ratio_bits(ratio: float, count: int) -> torch.Tensor:
    return torch.full((count,), ratio, dtype=torch.float64).view(torch.int64)


def ratios_from_bits(bits) -> List[float]:
    """The per-item ratios of a batched ``divprune_<modality>_ratio`` field."""
    if isinstance(bits, (list, tuple)):
        bits = torch.stack([torch.as_tensor(b) for b in bits])
    return bits.reshape(-1).cpu().view(torch.float64).tolist()


class PruningProcessor:
    """Mixin put before a family's vLLM multimodal processor class (see the module docstring)."""

    def apply(self, inputs, timing_ctx):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        given = kwargs.get(KEY)
        ratio = default_ratio(self.info.get_hf_config()) if given is None else check_ratio(given)
        if ratio < 1.0:
            evs = getattr(self.info.ctx.get_mm_config(), "video_pruning_rate", None)
            if evs:
                raise ValueError(f"{KEY}={ratio} cannot be combined with vLLM's own video pruning "
                                 f"(video_pruning_rate={evs}): use one of them")
            kwargs[KEY] = ratio
        else:
            kwargs.pop(KEY, None)
        return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        # The profile run must measure the unpruned encoder output.
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, KEY: 1.0})

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        processed = super()._apply_hf_processor_main(mm_items, _without_key(hf_kwargs))
        ratio = float(hf_kwargs.get(KEY, 1.0))
        for modality, count in mm_items.get_all_counts().items():
            if modality in MODALITIES and count:
                processed[ratio_field(modality)] = _ratio_bits(ratio, count)
        return processed

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        config = dict(super()._get_mm_fields_config(hf_inputs, _without_key(hf_processor_mm_kwargs)))
        for modality in MODALITIES:
            if ratio_field(modality) in hf_inputs:
                config[ratio_field(modality)] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return config

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, _without_key(hf_processor_mm_kwargs), out_mm_kwargs)
        ratio = float(hf_processor_mm_kwargs.get(KEY, 1.0))
        if ratio == 1.0:
            return updates
        return [self._pruned_update(update, ratio) for update in updates]

    def _pruned_update(self, update, ratio: float):
        from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

        family = type(self).__mro__[2].__name__  # the family's processor (after the mixin and this class)
        if not isinstance(update, PromptReplacement) or update.modality not in MODALITIES:
            raise NotImplementedError(f"divprune_ext: {family} updates {update.modality} prompts in a way the "
                                      f"plugin does not prune ({type(update).__name__}); use {KEY}=1.0")
        content = update.replacement

        def pruned(item_idx: int):
            full = content(item_idx) if callable(content) else content
            if isinstance(full, PromptUpdateDetails):
                if full.is_embed is not None:
                    raise NotImplementedError(f"divprune_ext: {family} places non-embedding tokens inside its "
                                              f"{update.modality} span; the plugin does not prune it "
                                              f"(use {KEY}=1.0)")
                full = full.full
            ids = list(full)
            if len(set(ids)) != 1:
                raise NotImplementedError(f"divprune_ext: {family} {update.modality} placeholders are not one "
                                          f"repeated token; the plugin does not prune them (use {KEY}=1.0)")
            return ids[:divprune_ext.keep_count(len(ids), ratio)]

        return PromptReplacement(modality=update.modality, target=update.target, replacement=pruned)


_PROCESSOR_CLASSES: Dict[type, type] = {}


def _pruning_class(cls: type) -> type:
    if cls not in _PROCESSOR_CLASSES:
        _PROCESSOR_CLASSES[cls] = type(f"DivPrune{cls.__name__}", (PruningProcessor, cls), {})
    return _PROCESSOR_CLASSES[cls]


def with_pruning_processor(model_cls):
    """Class decorator: ``model_cls`` gets its parent's processor, info and dummy inputs, the processor
    with :class:`PruningProcessor` mixed in (whatever class the parent's factory builds)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    parent = model_cls._processor_factory  # inherited from the family's class

    def build(info, dummy_inputs, **kwargs):
        processor = parent.processor(info, dummy_inputs, **kwargs)  # the factory picks the class
        pruning = object.__new__(_pruning_class(type(processor)))
        pruning.__dict__.update(processor.__dict__)  # the same state, built by the family's __init__
        return pruning

    return MULTIMODAL_REGISTRY.register_processor(build, info=parent.info, dummy_inputs=parent.dummy_inputs)(model_cls)


def check_model_config(vllm_config) -> None:
    """At engine start: a valid server-wide ratio, and no encoder CUDA graph (it bypasses
    ``embed_multimodal``, where the selection runs)."""
    default_ratio(vllm_config.model_config.hf_config)
    compilation = getattr(vllm_config, "compilation_config", None)
    if getattr(compilation, "cudagraph_mm_encoder", False):
        raise ValueError("divprune_ext: the encoder CUDA graph (compilation_config.cudagraph_mm_encoder) runs the "
                         "vision encoder without embed_multimodal, where DivPrune selects; turn it off")


class PruningModel:
    """Mixin put first in a family's model class: DivPrune on ``embed_multimodal``'s output."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        check_model_config(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def embed_multimodal(self, **kwargs: object):
        fields = {m: kwargs.pop(ratio_field(m)) for m in MODALITIES if ratio_field(m) in kwargs}
        outputs = super().embed_multimodal(**kwargs)
        if not fields:
            return outputs
        if len(fields) > 1:
            raise NotImplementedError("divprune_ext: one embed_multimodal call with images and videos together; "
                                      "vLLM's runner groups items by modality")
        (modality, bits), = fields.items()
        ratios = ratios_from_bits(bits)
        items = list(outputs)
        if len(items) != len(ratios):
            raise RuntimeError(f"divprune_ext: {len(items)} {modality} outputs for {len(ratios)} ratios")
        return tuple(self._prune(items, ratios, modality, kwargs))

    def _prune(self, items: List[torch.Tensor], ratios: Sequence[float], modality: str, kwargs) -> List[torch.Tensor]:
        counts = [divprune_ext.keep_count(len(item), r) for item, r in zip(items, ratios)]
        pruned = [i for i, (item, k) in enumerate(zip(items, counts)) if k < len(item)]
        if not pruned:
            return items
        lengths, keep = [len(items[i]) for i in pruned], [counts[i] for i in pruned]
        packed = torch.cat([items[i] for i in pruned])
        picks = divprune_ext.select_varlen(packed, lengths, keep, sorted=True, validate=False)
        start = 0
        for i, local in zip(pruned, picks.split(keep)):
            local = local - start  # rows of `packed` -> the item's own token indices
            start += len(items[i])
            items[i] = self._kept(items[i], local, modality, i, kwargs)
        return items

    def _kept(self, item: torch.Tensor, picks: torch.Tensor, modality: str, index: int, kwargs) -> torch.Tensor:
        """What an item's ``k`` placeholders receive: its rows at ``picks`` (ascending)."""
        return item.index_select(0, picks.to(item.device))


# ---------------------------------------------------------------------------------------------
# Multimodal RoPE (Qwen-VL): kept tokens keep their (t, h, w) positions
# ---------------------------------------------------------------------------------------------
def grid_positions(t: int, h: int, w: int, t_factor: float):
    """(3, t*h*w) int64 offsets (t, h, w) of an item's tokens from its first position, in token
    order, as vLLM's Qwen-VL ``get_mrope_input_positions`` lays them out (t scaled by
    ``t_factor`` and truncated, in float64)."""
    import numpy as np

    grid = np.indices((t, h, w))
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    return grid.reshape(3, -1)


# Each kept row of a pruned item carries (t, h, w, 0) as int32 bits: 16 bytes, whole columns in
# float32 (4), bf16 / fp16 (8) and float64 (2).
OFFSET_INTS = 4


class MRoPEPruning(PruningModel):
    """:class:`PruningModel` for families with multimodal RoPE (``SupportsMRoPE``).

    vLLM computes a request's positions once, before the encoder runs
    (``get_mrope_input_positions``, from the prompt and the items' grids), so the picks are not
    known there. vLLM's own post-encoder hook (``recompute_mrope_positions``) is switched on only by
    the GPU runner, for its video pruning. Instead:

    - ``get_mrope_input_positions`` lays out the *unpruned* scheme: an item with ``k < n``
      placeholders gives all of them the item's first position (t = h = w = start), the text after
      it starts where it starts without pruning (start + largest offset + 1), and the decode delta
      continues from the unpruned prompt's largest position. Items with ``k == n`` get their full
      grid, exactly as vLLM.
    - ``embed_multimodal`` appends to each kept row of a pruned item its exact (t, h, w) offset as
      int32 bits in extra columns (``OFFSET_INTS``) (``view``: exact in any dtype; float columns would round
      positions above 256 in bf16). The rows travel through the encoder cache and chunking with
      their offsets.
    - ``embed_input_ids`` (called by the runner right before ``forward``, in the same step) strips
      the columns before merging and keeps the offsets with the multimodal mask; ``forward`` adds
      them to the positions of those tokens (out of place: the runner's buffer is not touched).
      Each row carries its own offset, so chunked prefill and several items in one chunk need
      nothing more.
    """
    _divprune_offsets = None

    def __init__(self, *, vllm_config, prefix: str = ""):
        # Only the first pipeline stage embeds the prompt, so later stages would never see the
        # offsets and would rotate the kept tokens by their item's start position alone.
        stages = getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1)
        if stages > 1:
            raise ValueError(f"divprune_ext: {type(self).__name__} with pipeline parallelism ({stages} stages) is "
                             "not supported: the kept tokens' positions reach the first stage only")
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def grid_of(self, modality: str, index: int, kwargs) -> tuple:
        """(t, h, w, t_factor) of item ``index`` in the LLM's merged grid, from embed_multimodal's kwargs."""
        raise NotImplementedError

    def _kept(self, item, picks, modality, index, kwargs):
        kept = super()._kept(item, picks, modality, index, kwargs)
        # The picks' (t, h, w), computed where they are (no device-to-host read): token j of a
        # (t, h, w) grid sits at frame j // (h w), row (j // w) % h, column j % w; the frame is
        # scaled in float64 and truncated, as grid_positions does.
        _, h, w, t_factor = self.grid_of(modality, index, kwargs)
        picks = picks.to(kept.device)
        frame = picks // (h * w)
        if t_factor != 1.0:
            frame = (frame.double() * t_factor).long()
        offsets = torch.zeros(len(picks), OFFSET_INTS, dtype=torch.int32, device=kept.device)
        offsets[:, 0], offsets[:, 1], offsets[:, 2] = frame, (picks // w) % h, picks % w
        return torch.cat([kept, offsets.view(kept.dtype)], dim=1)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        import numpy as np

        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        placeholders = [f.mm_position.length for f in features]
        pieces, text_start, next_position, top = [], 0, 0, -1
        for k, (offset, t, h, w, t_factor) in zip(placeholders, self.iter_mm_grid_thw(features)):
            text = offset - text_start
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            start = next_position + text
            grid = grid_positions(t, h, w, t_factor)
            if k == grid.shape[1]:
                pieces.append(grid + start)
            elif k < grid.shape[1]:
                pieces.append(np.full((3, k), start, dtype=np.int64))
            else:
                raise RuntimeError(f"divprune_ext: {k} placeholders for an item of {grid.shape[1]} tokens")
            next_position = start + int(grid.max()) + 1
            top = next_position - 1
            text_start = offset + k
        text = len(input_tokens) - text_start
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        if text:
            top = next_position + text - 1
        positions = np.concatenate(pieces, axis=1).astype(np.int64)
        return torch.from_numpy(positions), top + 1 - len(input_tokens)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self._divprune_offsets = None
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            hidden = self.config.text_config.hidden_size
            stripped, offsets, carried = [], [], False
            for embeds in multimodal_embeddings:
                if embeds.shape[-1] == hidden:
                    stripped.append(embeds)
                    offsets.append(torch.zeros(len(embeds), 3, dtype=torch.int32, device=embeds.device))
                else:
                    carried = True
                    part = embeds[:, :hidden]
                    if hasattr(embeds, "modality"):
                        part.modality = embeds.modality
                    stripped.append(part)
                    offsets.append(embeds[:, hidden:].contiguous().view(torch.int32)[:, :3])
            if carried:
                self._divprune_offsets = (torch.cat(offsets), is_multimodal)
            multimodal_embeddings = stripped
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        carried, self._divprune_offsets = self._divprune_offsets, None
        if carried is not None and inputs_embeds is not None:
            offsets, is_multimodal = carried
            rows = is_multimodal.nonzero().squeeze(1).to(positions.device)
            if len(rows) != len(offsets):
                raise RuntimeError(f"divprune_ext: {len(offsets)} position offsets for {len(rows)} multimodal tokens")
            positions = positions.index_add(1, rows, offsets.t().to(positions.device, positions.dtype))
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
