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
placeholders gets ``k = keep_count(n, ratio)`` of them (the placeholders of an item are all one
token id in the supported families; anything else raises ``NotImplementedError`` at a ratio below
1 rather than pruning wrongly). Where text splits an item's placeholders into runs (marked by
the family's ``is_embed``: Gemma 3's crops, Qwen3-VL's video frames), the model class says how
many each run keeps (:meth:`PruningModel.kept_per_run`) and the text stays. Families whose
items are one run refuse several. The ratio reaches the model as one value per item
in a field ``divprune_<modality>_ratio`` (float64 bits carried as int64: vLLM casts floating
processor outputs to the model dtype, and ``round(n * r)`` in bf16 would give another k), present
at 1.0 too so that items of requests with and without a ratio batch together.

Selection
=========
:meth:`PruningModel.embed_multimodal` runs the family's own ``embed_multimodal`` (the encoder and
projector / merger on all ``n`` tokens) and then one ``select_varlen`` call over the items with
``k < n`` (over their parts, :meth:`PruningModel.segments`, where runs are selected apart), picks
in ascending order. vLLM checks nothing more: the rows it receives fill the item's ``k``
placeholders in order.

Memory: what vLLM's profile run measures
========================================
vLLM sizes the KV cache from a profile run that encodes ``mm_max_items_per_batch`` items of the
largest size in one ``embed_multimodal`` call (``MultiModalBudget``). Two things would lie outside it:

- The selection's workspace (``select_varlen``: Σ n_i² float32 distances). The profile's dummy
  items come marked (:meth:`PruningProcessor.get_dummy_inputs`: ratio field ``PROFILE_RATIO``):
  their placeholders stay unpruned, and ``embed_multimodal`` runs the whole selection on them at
  the smallest ratio (the workspace depends on ``n`` only; ``k = 1`` is the quickest) and returns
  the unpruned rows, so the peak vLLM measures includes it.
- The encoder's work. The scheduler charges an item's ``k`` placeholders against the encoder budget,
  so at ratio ``r`` one step may hand ``embed_multimodal`` items of up to budget / ``r`` tokens.
  Each item's ``n`` travels with it (field ``divprune_<modality>_tokens``); a call holding pruned
  items encodes them in consecutive groups of at most the profiled tokens
  (:meth:`PruningModel.profiled_tokens`; an item larger than that alone), each group
  selected before the next is encoded: the encoder's and the selection's peaks stay those of the
  profile. Batches split with vLLM's own field definitions (the processor's
  ``_get_mm_fields_config``, ``MultiModalKwargsItems`` and ``group_and_batch_mm_kwargs``, as the
  runner batches them). Calls of unpruned items only are vLLM's own, untouched. Not bounded: the
  inputs (pixels) the runner copies to the device for all items of a step before the call
  (``docs/vllm.md``, "Memory").
"""
import dataclasses
import numbers
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Sequence

import torch

import divprune_ext

from . import KEY

MODALITIES = ("image", "video")


def ratio_field(modality: str) -> str:
    return f"divprune_{modality}_ratio"


def tokens_field(modality: str) -> str:
    """The field carrying each item's unpruned placeholder count ``n`` (the rows the encoder computes)."""
    return f"divprune_{modality}_tokens"


PROFILE = "divprune_profile"  # the processor kwarg marking the profile run's dummy items (set by the plugin only)
PROFILE_RATIO = -1.0  # their ratio field: unpruned placeholders, the selection run for its workspace only
SMALLEST_RATIO = 1e-9  # keep_count(n, SMALLEST_RATIO) == 1: the profile's selection


class _ProfileMark:
    """The value of ``PROFILE`` in the dummy inputs: an object no request can send."""

    def __repr__(self):
        return "<divprune profile>"


_PROFILE_MARK = _ProfileMark()


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
    return {k: v for k, v in kwargs.items() if k not in (KEY, PROFILE)}


def _ratio_bits(ratio: float, count: int) -> torch.Tensor:
    return torch.full((count,), ratio, dtype=torch.float64).view(torch.int64)


def ints_of(field) -> List[int]:
    """The per-item values of a batched integer field (a tensor, or a list of them)."""
    if isinstance(field, (list, tuple)):
        return [int(v) for v in field]
    return field.reshape(-1).tolist()


def ratios_from_bits(bits) -> List[float]:
    """The per-item ratios of a batched ``divprune_<modality>_ratio`` field."""
    if isinstance(bits, (list, tuple)):
        bits = torch.stack([torch.as_tensor(b) for b in bits])
    return bits.reshape(-1).cpu().view(torch.float64).tolist()


class PruningProcessor:
    """Mixin put before a family's vLLM multimodal processor class (see the module docstring)."""

    def apply(self, inputs, timing_ctx):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        profile = kwargs.pop(PROFILE, None)
        if profile is not None and profile is not _PROFILE_MARK:
            raise ValueError(f"{PROFILE} is set by divprune_ext for vLLM's memory profile; a request cannot set it")
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
        if profile is not None:
            kwargs = {**_without_key(kwargs), PROFILE: True}  # unpruned placeholders; hashable
        return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        # The profile run: unpruned items (the encoder output vLLM must measure), marked so that the
        # model also runs the selection on them (its workspace; module docstring, "Memory").
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs,
                                                                   PROFILE: _PROFILE_MARK})

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        processed = super()._apply_hf_processor_main(mm_items, _without_key(hf_kwargs))
        ratio = PROFILE_RATIO if hf_kwargs.get(PROFILE) else float(hf_kwargs.get(KEY, 1.0))
        tokens = self._tokens_per_item(mm_items, processed, _without_key(hf_kwargs))
        for modality, count in mm_items.get_all_counts().items():
            if modality in MODALITIES and count:
                processed[ratio_field(modality)] = _ratio_bits(ratio, count)
                if len(tokens.get(modality, ())) == count:
                    processed[tokens_field(modality)] = torch.tensor(tokens[modality], dtype=torch.int64)
        return processed

    def _tokens_per_item(self, mm_items, processed, hf_kwargs) -> Dict[str, List[int]]:
        """Each item's unpruned placeholder (embedding) count ``n``, from the family's own prompt updates."""
        from vllm.multimodal.inputs import MultiModalKwargsItems
        from vllm.multimodal.processing import PromptReplacement

        items = MultiModalKwargsItems.from_hf_inputs(processed, super()._get_mm_fields_config(processed, hf_kwargs))
        counts = mm_items.get_all_counts()
        tokens = {}
        for update in super()._get_prompt_updates(mm_items, hf_kwargs, items):
            if isinstance(update, PromptReplacement) and update.modality in MODALITIES:
                tokens[update.modality] = [sum(_replacement(update.replacement, i)[2])
                                           for i in range(counts.get(update.modality, 0))]
        return tokens

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        config = dict(super()._get_mm_fields_config(hf_inputs, _without_key(hf_processor_mm_kwargs)))
        for modality in MODALITIES:
            for field in (ratio_field(modality), tokens_field(modality)):
                if field in hf_inputs:
                    config[field] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return config

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, _without_key(hf_processor_mm_kwargs), out_mm_kwargs)
        ratio = float(hf_processor_mm_kwargs.get(KEY, 1.0))
        if ratio == 1.0:
            return updates
        return [self._pruned_update(update, ratio) for update in updates]

    def _pruned_update(self, update, ratio: float):
        from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

        family = self._family_name()
        if not isinstance(update, PromptReplacement) or update.modality not in MODALITIES:
            raise NotImplementedError(f"divprune_ext: {family} updates {update.modality} prompts in a way the "
                                      f"plugin does not prune ({type(update).__name__}); use {KEY}=1.0")
        content, modality = update.replacement, update.modality

        def pruned(item_idx: int):
            full, ids, embed = _replacement(content, item_idx)
            details = isinstance(full, PromptUpdateDetails)
            placeholder = {t for t, e in zip(ids, embed) if e}
            if len(placeholder) != 1:
                raise NotImplementedError(f"divprune_ext: {family} {modality} placeholders are not one repeated "
                                          f"token; the plugin does not prune them (use {KEY}=1.0)")
            token, runs = placeholder.pop(), embed_runs(embed)
            kept = self.kept_per_run(modality, [length for _, length in runs], ratio)
            if kept == [length for _, length in runs]:
                return full  # nothing pruned (k == n): the family's own replacement
            out, cursor = [], 0
            for (start, length), k in zip(runs, kept):  # each run becomes k placeholders, the rest stays
                out += ids[cursor:start] + [token] * k
                cursor = start + length
            out += ids[cursor:]
            if self._divprune_model.embeds_whole_span(modality):
                return PromptUpdateDetails.from_seq(out)  # the model fills every token of the replacement
            return PromptUpdateDetails.select_token_id(out, token) if details else out

        return PromptReplacement(modality=modality, target=update.target, replacement=pruned)

    def _family_name(self) -> str:
        mro = type(self).__mro__
        return mro[mro.index(PruningProcessor) + 1].__name__  # the family's processor (after the mixin)

    def kept_per_run(self, modality: str, lengths: List[int], ratio: float) -> List[int]:
        return self._divprune_model.kept_per_run(modality, lengths, ratio, self._family_name())


def _replacement(content, item_idx: int):
    """A family's replacement for item ``item_idx``: (as the family gives it, its token ids, which of
    them take embeddings)."""
    from vllm.multimodal.processing import PromptUpdateDetails

    full = content(item_idx) if callable(content) else content
    details = isinstance(full, PromptUpdateDetails)
    ids = list(full.full) if details else list(full)
    embed = full.is_embed(ids).tolist() if details and full.is_embed is not None else [True] * len(ids)
    return full, ids, embed


def embed_runs(embed: Sequence[bool]) -> List[tuple]:
    """(start, length) of each maximal run of True in ``embed``."""
    runs, start = [], None
    for i, e in enumerate(list(embed) + [False]):
        if e and start is None:
            start = i
        elif not e and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


_PROCESSOR_CLASSES: Dict[tuple, type] = {}


def _pruning_class(cls: type, family_mixin: type = None) -> type:
    """``cls`` with :class:`PruningProcessor` (and the model class's ``processor_mixin`` before it) mixed in."""
    if (cls, family_mixin) not in _PROCESSOR_CLASSES:
        bases = (PruningProcessor, cls) if family_mixin is None else (family_mixin, PruningProcessor, cls)
        _PROCESSOR_CLASSES[cls, family_mixin] = type(f"DivPrune{cls.__name__}", bases, {})
    return _PROCESSOR_CLASSES[cls, family_mixin]


def with_pruning_processor(model_cls):
    """Class decorator: ``model_cls`` gets its parent's processor, info and dummy inputs, the processor
    with :class:`PruningProcessor` mixed in (whatever class the parent's factory builds)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    parent = model_cls._processor_factory  # inherited from the family's class

    def build(info, dummy_inputs, **kwargs):
        processor = parent.processor(info, dummy_inputs, **kwargs)  # the factory picks the class
        pruning = object.__new__(_pruning_class(type(processor), model_cls.processor_mixin))
        pruning.__dict__.update(processor.__dict__)  # the same state, built by the family's __init__
        pruning._divprune_model = model_cls  # its kept_per_run: how many placeholders each run keeps
        return pruning

    return MULTIMODAL_REGISTRY.register_processor(build, info=parent.info, dummy_inputs=parent.dummy_inputs)(model_cls)


def check_model_config(vllm_config) -> None:
    """At engine start: a valid server-wide ratio, no encoder CUDA graph (it bypasses
    ``embed_multimodal``, where DivPrune selects), no LoRA on the vision tower (vLLM would map its
    adapters' tokens from the ``k`` placeholders while the tower runs on all ``n``)."""
    default_ratio(vllm_config.model_config.hf_config)
    compilation = getattr(vllm_config, "compilation_config", None)
    if getattr(compilation, "cudagraph_mm_encoder", False):
        raise ValueError("divprune_ext: the encoder CUDA graph (compilation_config.cudagraph_mm_encoder) runs the "
                         "vision encoder without embed_multimodal, where DivPrune selects; turn it off")
    if getattr(getattr(vllm_config, "lora_config", None), "enable_tower_connector_lora", False):
        raise ValueError("divprune_ext: LoRA on the vision tower and connector (enable_tower_connector_lora) is not "
                         "supported: vLLM counts its tokens from the pruned placeholders; turn it off")


class PruningModel:
    """Mixin put first in a family's model class: DivPrune on ``embed_multimodal``'s output."""

    # a class mixed into the family's processor before PruningProcessor (fields the family's model needs)
    processor_mixin = None

    def __init__(self, *, vllm_config, prefix: str = ""):
        check_model_config(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._divprune_config = vllm_config
        self._divprune_budget = None  # vLLM's MultiModalBudget, made when first needed (it builds a processor)

    def embed_multimodal(self, **kwargs: object):
        ratio_bits = {m: kwargs.pop(ratio_field(m)) for m in MODALITIES if ratio_field(m) in kwargs}
        tokens = {m: kwargs.pop(tokens_field(m)) for m in MODALITIES if tokens_field(m) in kwargs}
        if not ratio_bits:
            return super().embed_multimodal(**kwargs)
        if len(ratio_bits) > 1:
            raise NotImplementedError("divprune_ext: one embed_multimodal call with images and videos together; "
                                      "vLLM's runner groups items by modality")
        (modality, bits), = ratio_bits.items()
        ratios = ratios_from_bits(bits)
        if PROFILE_RATIO in ratios:  # the profile run: unpruned rows, the selection's workspace measured
            items = self._encode(modality, ratios, kwargs)
            self._prune(list(items), [SMALLEST_RATIO] * len(ratios), modality, kwargs)
            self.profiled_tokens()  # vLLM's budget made at start-up, not on the first large call
            return items
        groups = [(0, len(ratios))]
        if min(ratios) < 1.0 and modality in tokens:  # calls of unpruned items only are vLLM's own
            groups = encoder_groups(ints_of(tokens[modality]), self.profiled_tokens())
        if len(groups) == 1:
            return tuple(self._prune(list(self._encode(modality, ratios, kwargs)), ratios, modality, kwargs))
        # More than the profile encoded in one call (the scheduler charged k, not n): consecutive groups,
        # each encoded and selected before the next, so that no more than the profiled work is alive at once.
        out = []
        for (start, end), batch in zip(groups, self._sub_batches(modality, kwargs, groups)):
            items = list(self._encode(modality, ratios[start:end], batch))
            out += self._prune(items, ratios[start:end], modality, batch)
        return tuple(out)

    def _encode(self, modality: str, ratios: List[float], kwargs):
        """The family's ``embed_multimodal`` on ``kwargs`` (its items' ratios: ``ratios``): per item, its rows."""
        outputs = super().embed_multimodal(**kwargs)
        if len(outputs) != len(ratios):
            raise RuntimeError(f"divprune_ext: {len(outputs)} {modality} outputs for {len(ratios)} ratios")
        return outputs

    def mm_budget(self):
        """vLLM's own ``MultiModalBudget`` of this engine: what the profile run encodes, and the processor."""
        if self._divprune_budget is None:
            from vllm.multimodal import MULTIMODAL_REGISTRY
            from vllm.multimodal.encoder_budget import MultiModalBudget
            self._divprune_budget = MultiModalBudget(self._divprune_config, MULTIMODAL_REGISTRY, enable_cache=False)
        return self._divprune_budget

    def profiled_tokens(self) -> int:
        """The tokens the profile run encodes in one call: ``mm_max_items_per_batch`` items of the
        modality with the most tokens per item (the one vLLM profiles), ``mm_max_toks_per_item``
        each; 0 where it encodes none (no limit then). The limit for items of every modality: a
        group of at most that many tokens, none above the largest profiled item, has at most the
        profiled Σ n² too."""
        budget = self.mm_budget()
        if not budget.mm_max_toks_per_item:
            return 0
        modality = budget.get_modality_with_max_tokens()
        return budget.mm_max_items_per_batch.get(modality, 0) * budget.mm_max_toks_per_item[modality]

    def _sub_batches(self, modality: str, kwargs, groups):
        """``kwargs`` (one batch of ``modality`` items) as one batch per group of items, split and
        re-batched by vLLM's own field definitions, as its runner batches them."""
        from vllm.multimodal.inputs import MultiModalKwargsItems
        from vllm.multimodal.utils import group_and_batch_mm_kwargs

        config = self.mm_budget().processor._get_mm_fields_config(kwargs, {})
        unknown = sorted(set(kwargs) - set(config))
        if unknown:  # they would be lost (or wrong) in the groups
            raise RuntimeError(f"divprune_ext: cannot split a {modality} batch with arguments {unknown}, which are "
                               "no multimodal fields of the processor")
        items = MultiModalKwargsItems.from_hf_inputs(kwargs, config)[modality]
        for start, end in groups:
            (_, count, batch), = group_and_batch_mm_kwargs([(modality, item) for item in items[start:end]])
            if count != end - start:
                raise RuntimeError(f"divprune_ext: {modality} items {start}..{end} re-batched as {count}")
            yield batch

    @classmethod
    def kept_per_run(cls, modality: str, lengths: List[int], ratio: float, family: str) -> List[int]:
        """How many placeholders each run of one item's placeholders keeps (in the processor,
        before the encoder). An item is one run here: ``keep_count(n, ratio)``. A family whose
        items have several runs (split by text: Gemma 3's pan-and-scan crops) overrides this and
        :meth:`segments` together; others refuse them rather than place rows wrongly (Pixtral's
        row breaks)."""
        if len(lengths) != 1:
            raise NotImplementedError(f"divprune_ext: {family} splits each {modality}'s placeholders into "
                                      f"{len(lengths)} runs; the plugin does not prune them (use {KEY}=1.0)")
        return [divprune_ext.keep_count(lengths[0], ratio)]

    @classmethod
    def embeds_whole_span(cls, modality: str) -> bool:
        """Whether a pruned item's rows fill its whole replacement (text tokens too: the family's
        ``_kept`` writes their embeddings), not only its placeholders."""
        return False

    def segments(self, modality: str, index: int, kwargs, rows: int) -> List[int]:
        """The lengths of the parts of item ``index`` (``rows`` rows) selected apart, in prompt
        order: one part per run of placeholders that :meth:`kept_per_run` prunes apart."""
        return [rows]

    def selection_features(self, item: torch.Tensor) -> torch.Tensor:
        """The columns of an item's rows DivPrune compares: all (the tokens as they enter the LLM)."""
        return item

    def _prune(self, items: List[torch.Tensor], ratios: Sequence[float], modality: str, kwargs) -> List[torch.Tensor]:
        lengths, keep, pruned = [], [], []  # segments of the pruned items, in order; (item, its kept count)
        for i, (item, ratio) in enumerate(zip(items, ratios)):
            parts = self.segments(modality, i, kwargs, len(item))
            if sum(parts) != len(item):
                raise RuntimeError(f"divprune_ext: {modality} {i} has {len(item)} rows, its parts {parts}")
            counts = self.kept_per_run(modality, parts, ratio, type(self).__name__)
            if sum(counts) < len(item):
                lengths += parts
                keep += counts
                pruned.append((i, sum(counts)))
        if not pruned:
            return items
        packed = torch.cat([self.selection_features(items[i]) for i, _ in pruned])
        picks = divprune_ext.select_varlen(packed, lengths, keep, sorted=True, validate=False)
        start = 0
        for (i, _), local in zip(pruned, picks.split([k for _, k in pruned])):
            local = local - start  # rows of `packed` -> the item's own token indices (ascending)
            start += len(items[i])
            items[i] = self._kept(items[i], local, modality, i, kwargs)
        return items

    def _kept(self, item: torch.Tensor, picks: torch.Tensor, modality: str, index: int, kwargs) -> torch.Tensor:
        """What an item's ``k`` placeholders receive: its rows at ``picks`` (ascending)."""
        return item.index_select(0, picks.to(item.device))


def kept_in_first_run(lengths: List[int], ratio: float) -> List[int]:
    """One selection over all the runs of an item (``keep_count`` of their sum), every kept placeholder
    in the first run (how many each run keeps is known only after the encoder); as they are if
    nothing is pruned."""
    k = divprune_ext.keep_count(sum(lengths), ratio)
    return list(lengths) if k == sum(lengths) else [k] + [0] * (len(lengths) - 1)


class WholeVideoSpans:
    """Mixin put before :class:`PruningModel` (or its subclass) in a family whose videos are frames
    split by text (timestamps, markers) and selected together: a pruned video's placeholders all sit in
    its first frame's run and the model fills its whole replacement (the family's ``_kept`` writes the
    layout, text rows included), as vLLM's own video pruning does."""

    @classmethod
    def kept_per_run(cls, modality, lengths, ratio, family):
        if modality == "video":
            return kept_in_first_run(lengths, ratio)
        return super().kept_per_run(modality, lengths, ratio, family)

    @classmethod
    def embeds_whole_span(cls, modality):
        return modality == "video"


def encoder_groups(tokens: Sequence[int], limit: int) -> List[tuple]:
    """Consecutive ``(start, end)`` groups of items (``tokens``: each item's ``n``) of at most
    ``limit`` tokens each; an item larger than ``limit`` is a group alone; ``limit`` 0: one group."""
    groups, start, total = [], 0, 0
    for i, n in enumerate(tokens):
        if limit and i > start and total + n > limit:
            groups.append((start, i))
            start, total = i, 0
        total += n
    groups.append((start, len(tokens)))
    return groups


# ---------------------------------------------------------------------------------------------
# Multimodal RoPE (Qwen-VL): kept tokens keep their (t, h, w) positions
# ---------------------------------------------------------------------------------------------
# Each kept row of a pruned item carries (t, h, w, 0) as int32 bits: 16 bytes, whole columns in
# float32 (4), bf16 / fp16 (8) and float64 (2).
OFFSET_INTS = 4


def with_offsets(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``rows`` with each row's (t, h, w) offset (``offsets``: (rows, 3) integers) appended as
    int32 bits in ``OFFSET_INTS`` extra columns."""
    bits = torch.zeros(len(rows), OFFSET_INTS, dtype=torch.int32, device=rows.device)
    bits[:, :3] = offsets.to(rows.device)
    return torch.cat([rows, bits.view(rows.dtype)], dim=1)


class MRoPEPruning(PruningModel):
    """:class:`PruningModel` for families with multimodal RoPE (``SupportsMRoPE``).

    vLLM computes a request's positions once, before the encoder runs
    (``get_mrope_input_positions``, from the prompt and the items' grids), so the picks are not
    known there. vLLM's own post-encoder hook (``recompute_mrope_positions``, which writes into
    the runner's per-request positions) is switched on only with vLLM's video pruning
    (``video_pruning_rate > 0``) and never on the V1 CPU runner. Instead:

    - ``get_mrope_input_positions`` runs vLLM's own on the *unpruned* prompt (each pruned item put
      back to its full replacement, :meth:`full_span`) and gives every placeholder of a pruned
      item that item's first position, every other token its unpruned position; the decode delta
      continues from the unpruned prompt. Items with ``k == n`` get vLLM's positions as they are.
    - ``embed_multimodal`` appends to each kept row of a pruned item its exact (t, h, w) offset as
      int32 bits in extra columns (``OFFSET_INTS``) (``view``: exact in any dtype; float columns would round
      positions above 256 in bf16). The rows travel through the encoder cache and chunking with
      their offsets.
    - ``embed_input_ids`` (called by the runner every step, eagerly, before the forward pass: V1
      ``_preprocess``, V2 ``EncoderRunner.get_inputs_embeds``) strips the columns before merging
      and scatters the offsets to their tokens in a buffer of the model's own, allocated once
      (``position_offsets``: (3, max_num_batched_tokens), zero where a token has none).
    - ``forward`` adds that buffer to ``positions`` **in place**, then zeroes it. ``positions`` is
      the runner's own buffer (V1 ``mrope_positions``, V2 ``RopeState.positions``), refilled by the
      runner every step; both tensors live as long as the model, so a captured CUDA graph (piecewise,
      full or breakable) that holds the add reads and writes the same memory on replay, and the
      decoder reads the corrected positions from the buffer it captured. No host sync: the
      scatter is a cumulative sum and a gather.
    Each row carries its own offset, so chunked prefill and several items in one chunk need nothing
    more. Refused at engine start: pipeline parallelism (later stages never see the offsets) and
    micro-batching (``forward`` runs once per micro-batch on a slice of the positions).
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        refuse_position_breaking_config(type(self).__name__, vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        tokens = vllm_config.scheduler_config.max_num_batched_tokens  # the most tokens one step runs
        # a buffer, so that it follows the model to its device; not in the state dict
        self.register_buffer("position_offsets", torch.zeros(3, tokens, dtype=torch.int64), persistent=False)

    def embedding_width(self) -> int:
        """Columns of ``embed_multimodal``'s rows without offsets (the LLM's hidden size here)."""
        return self.config.text_config.hidden_size

    def grid_of(self, modality: str, index: int, kwargs) -> tuple:
        """(t, h, w, t_factor) of item ``index`` in the LLM's merged grid, from embed_multimodal's kwargs."""
        raise NotImplementedError

    def _kept(self, item, picks, modality, index, kwargs):
        kept = super()._kept(item, picks, modality, index, kwargs)
        # The picks' (t, h, w), computed where they are (no device-to-host read): token j of a
        # (t, h, w) grid sits at frame j // (h w), row (j // w) % h, column j % w; the frame is
        # scaled in float64 and truncated, as vLLM's Qwen2-VL / 2.5-VL scale it.
        _, h, w, t_factor = self.grid_of(modality, index, kwargs)
        picks = picks.to(kept.device)
        frame = picks // (h * w)
        if t_factor != 1.0:
            frame = (frame.double() * t_factor).long()
        return with_offsets(kept, torch.stack([frame, (picks // w) % h, picks % w], dim=1))

    def full_span(self, feature, span: List[int]) -> List[int]:
        """The replacement of ``feature`` as vLLM writes it unpruned, given its (maybe pruned) ``span``."""
        raise NotImplementedError

    def vllm_positions(self, input_tokens, mm_features):
        """vLLM's own ``get_mrope_input_positions`` of the family (for an unpruned prompt)."""
        return super().get_mrope_input_positions(input_tokens, mm_features)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        input_tokens = list(input_tokens)
        tokens, features, index, cursor = [], [], [], 0  # the unpruned prompt; for each token, its index there
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = feature.mm_position.offset, feature.mm_position.length
            index += range(len(tokens), len(tokens) + offset - cursor)  # the text before it
            tokens += input_tokens[cursor:offset]
            full = self.full_span(feature, input_tokens[offset:offset + length])
            if length > len(full):
                raise RuntimeError(f"divprune_ext: {length} placeholders for an item of {len(full)} tokens")
            features.append(SimpleNamespace(modality=feature.modality, data=feature.data,
                                            mm_position=SimpleNamespace(offset=len(tokens), length=len(full))))
            # a pruned item: all its placeholders at its first position (its rows carry their offsets)
            index += range(len(tokens), len(tokens) + length) if len(full) == length else [len(tokens)] * length
            tokens += full
            cursor = offset + length
        index += range(len(tokens), len(tokens) + len(input_tokens) - cursor)
        tokens += input_tokens[cursor:]
        positions, delta = self.vllm_positions(tokens, features)
        # decoding continues where the unpruned prompt's would: the same next position
        return positions[:, index], delta + len(tokens) - len(input_tokens)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        offsets = self.position_offsets
        offsets.zero_()
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            hidden = self.embedding_width()
            stripped, per_row, carried = [], [], False
            for embeds in multimodal_embeddings:
                if embeds.shape[-1] == hidden:
                    stripped.append(embeds)
                    per_row.append(torch.zeros(len(embeds), 3, dtype=torch.int32, device=embeds.device))
                else:
                    carried = True
                    part = embeds[:, :hidden]
                    if hasattr(embeds, "modality"):
                        part.modality = embeds.modality
                    stripped.append(part)
                    per_row.append(embeds[:, hidden:].contiguous().view(torch.int32)[:, :3])
            if carried:
                scatter_offsets(offsets, torch.cat(per_row), is_multimodal)
            multimodal_embeddings = stripped
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if positions.dim() == 2:  # (3, tokens): M-RoPE (a text-only model config would give 1-D)
            tokens = positions.shape[1]
            if tokens > self.position_offsets.shape[1]:
                raise RuntimeError(f"divprune_ext: {tokens} positions in one forward pass, more than the "
                                   f"{self.position_offsets.shape[1]} (max_num_batched_tokens) it was built for")
            positions.add_(self.position_offsets[:, :tokens])  # the runner's buffer, in place
            self.position_offsets.zero_()
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


def scatter_offsets(out: torch.Tensor, per_row: torch.Tensor, is_multimodal: torch.Tensor) -> None:
    """``out[:, i]`` = the offset of the multimodal row that fills token ``i`` (``per_row`` in
    token order, one per True of ``is_multimodal``), 0 at text tokens; on the device, no host sync."""
    tokens = len(is_multimodal)
    if tokens > out.shape[1]:
        raise RuntimeError(f"divprune_ext: {tokens} tokens in one step, more than the {out.shape[1]} "
                           "(max_num_batched_tokens) the position offsets were allocated for")
    mask = is_multimodal.to(out.device)
    row = (mask.cumsum(0) - 1).clamp_(min=0)  # token -> the multimodal row it takes
    gathered = per_row.to(out.device, out.dtype).index_select(0, row)
    out[:, :tokens] = (gathered * mask.unsqueeze(1)).t()


def refuse_position_breaking_config(model: str, vllm_config) -> None:
    """ValueError at engine start for configurations in which the kept tokens' positions cannot
    reach the language model (see :class:`MRoPEPruning`)."""
    parallel = getattr(vllm_config, "parallel_config", None)
    stages = getattr(parallel, "pipeline_parallel_size", 1)
    if stages > 1:
        raise ValueError(f"divprune_ext: {model} with pipeline parallelism ({stages} stages) is not supported: "
                         "the kept tokens' positions reach the first stage only")
    if getattr(parallel, "use_ubatching", False):
        raise ValueError(f"divprune_ext: {model} with micro-batching (enable_dbo / ubatch_size) is not supported: "
                         "the kept tokens' positions are added once per step, not per micro-batch")
