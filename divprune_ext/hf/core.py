"""The model-independent part of ``divprune_ext.hf``: selection, gathering, re-padding.

:func:`prune_inputs` asks the model family's adapter for the visual tokens as they
enter the LLM, keeps ``max(1, round(n * keep_ratio))`` of each image's / video's ``n``
tokens with ``torch.ops.divprune.select_varlen`` (one call for the whole batch), drops the others from every per-token
tensor, re-pads the batch on the side it was padded, and lets the adapter turn the
result into the keyword arguments of ``model(...)`` / ``model.generate(...)``.

Adapter contract
================
One adapter per model family, in its own module under ``divprune_ext/hf/`` that
``divprune_ext/hf/__init__.py`` imports (importing it registers it). An adapter is a
subclass of :class:`Adapter` decorated with :func:`register`::

    @register
    class MyFamily(Adapter):
        models = ("MyModelForConditionalGeneration",)  # class names served (subclasses too)
        inputs = ("pixel_values", "image_grid_thw")    # processor keys it consumes

        def visual(self, model, inputs):               # required
            ...
            return [Visual(token_id, features, modality="image"), ...]

``prune_inputs(model, input_ids, attention_mask=None, *, keep_ratio, order,
padding_side, **inputs)`` calls, in this order:

1. ``check(model)`` (optional): raise ``RuntimeError`` when the installed
   transformers cannot run this family's pruned inputs; :func:`require_encoder_outputs`
   does it for families that need ``mm_encoder_outputs`` (transformers >= 5.18).
2. ``visual(model, inputs) -> list[Visual]`` (required). ``inputs`` holds everything
   the caller passed that is not None: ``input_ids``, ``attention_mask`` (ones if not
   given), the per-token tensors of :data:`PER_TOKEN_PAD` and the adapter's own keys.
   Any other key is a ``TypeError``. ``visual`` must not need ``input_ids`` or
   ``attention_mask``: :func:`visual_features` passes them only when its caller does.
   Each :class:`Visual` is one image or one video with ``token_id`` (its placeholder
   id in ``input_ids``), ``features`` ``(n, H)``: exactly the rows the model writes
   into its ``n`` placeholders, in that order, after the projector / merger
   (selection runs on them), ``extras``: more per-token tensors ``(n, ...)`` that must
   be gathered with the same picks (Qwen3-VL's deepstack features, one per layer), and
   ``modality`` (``"image"`` or ``"video"``, for the adapter's own use). **Order:** the
   Visuals with one token id are matched to that id's placeholders in row-major order
   (row 0 left to right, then row 1, ...), ``n`` at a time, exactly as the model's
   ``masked_scatter`` fills them; Visuals of different ids may come in any order (the
   list order is kept in ``batch.kept``). The placeholders of one Visual must lie in
   one row; they need not be contiguous. The core then raises ``ValueError`` if an
   id's placeholder count differs from its Visuals' total ``n``, or a Visual spans two
   rows.
3. ``position_ids(model, inputs) -> Tensor | None`` (optional, default None), called
   after the core has checked the placeholder counts: the position ids of the
   *unpruned* prompt, which ``outputs`` finds as ``batch.positions``. None: the pruned
   prompt gets contiguous positions (the model / ``generate()`` number the kept tokens
   0..L'-1, as in the authors' code) and no ``position_ids`` is returned. A tensor
   ``(..., B, L)`` (e.g. multimodal RoPE ``(3, B, L)``): the core gathers it along the
   kept tokens, re-pads it with 0 on the padding side and returns it as ``position_ids``.
4. ``outputs(model, batch: PrunedBatch) -> dict`` (optional): the keys that carry the
   prompt. The default returns ``{"inputs_embeds": batch.inputs_embeds(model)}``; a
   family whose model needs more (e.g. pruned ``input_ids`` + ``mm_encoder_outputs``
   built from ``batch.kept``) overrides it. The core has already put in the result:
   ``attention_mask``, ``position_ids`` (step 3) and every per-token tensor of
   :data:`PER_TOKEN_PAD` the caller passed (``labels``, ``token_type_ids``,
   ``mm_token_type_ids``), all gathered and re-padded; the dict ``outputs`` returns is
   merged over them (a key mapped to None is removed).

:class:`PrunedBatch` gives ``outputs``: ``inputs`` (as in step 2), ``kept`` (one
:class:`Kept` per Visual, same order: ``.visual``, ``.picks`` (k,) indices into the
Visual's ``n`` tokens in the order the kept tokens enter the LLM, ``.features``
``(k, H)`` and ``.extras`` gathered with them), ``positions`` (step 3's tensor, unpruned,
or None), ``input_ids`` and ``attention_mask`` ``(B, L')`` of the pruned prompt (kept
placeholders stay; padding gets the model's pad id), ``gather(values, pad, batch_dim)``
for any other per-token tensor (``(..., B, L)`` by default, ``(B, L, ...)`` with
``batch_dim=0``), ``inputs_embeds(model)`` (the model's embeddings of the pruned
``input_ids`` with the kept features written into their slots: the placeholder ids must
lie in the embedding's vocabulary, as they do for models that embed their own
placeholders), and ``padding_side``.

``order="selection"``: each Visual's kept tokens occupy the same slots as with
``"original"``, filled in selection order; every gathered per-token tensor (positions
included) follows its token, so a kept token keeps its own position.

Host syncs
==========
On a GPU, :func:`prune_inputs` itself makes one host sync: it reads back one small
``(2 + ids, B)`` tensor (real tokens per row, whether each row starts with padding,
placeholders per row and id), needed to check the placeholder counts, to assign
Visuals to rows and to size the output (L' is a shape). Everything else stays on the
device: selection (``validate=False``: the model's features are finite or its output
is NaN anyway), masks, ``nonzero_static`` of known size, scatters, gathers; nothing is
copied from the host to the device (Python numbers go in as scalars; a tensor built
from a Python list would be a blocking copy). The
adapter's feature code (the model's own ``get_image_features`` etc., and e.g. a
rope-index function) makes whatever syncs the model makes there, and an adapter's own
checks add what its module lists.
"""
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F

import divprune_ext

__all__ = ["Adapter", "Visual", "Kept", "PrunedBatch", "register", "prune_inputs", "visual_features",
           "supported_models", "require_encoder_outputs", "token_runs", "PER_TOKEN_PAD"]

# Per-token inputs the core gathers with the kept tokens, and the value padding gets.
PER_TOKEN_PAD = {"labels": -100, "token_type_ids": 0, "mm_token_type_ids": 0}
POSITION_PAD = 0  # what the Qwen-VL rope-index functions write at padding


@dataclass
class Visual:
    """One image or video as it enters the LLM (see the module docstring)."""
    token_id: int
    features: torch.Tensor                   # (n, H)
    extras: Tuple[torch.Tensor, ...] = ()    # (n, ...) each, gathered with the same picks
    modality: str = "image"


@dataclass
class Kept:
    """What is kept of one :class:`Visual`: ``picks`` (k,) in the order they enter the LLM."""
    visual: Visual
    picks: torch.Tensor

    @property
    def features(self) -> torch.Tensor:
        return self.visual.features[self.picks]

    @property
    def extras(self) -> Tuple[torch.Tensor, ...]:
        return tuple(extra[self.picks] for extra in self.visual.extras)


class Adapter:
    """Base class of the per-family adapters; see the module docstring for the contract."""
    models: Tuple[str, ...] = ()
    inputs: Tuple[str, ...] = ()

    def check(self, model) -> None:
        """Raise RuntimeError if the installed transformers cannot run this family pruned."""

    def visual(self, model, inputs: Dict[str, Any]) -> List[Visual]:
        raise NotImplementedError

    def position_ids(self, model, inputs: Dict[str, Any]) -> Optional[torch.Tensor]:
        return None

    def placeholders(self, model) -> Dict[int, str]:
        """Placeholder id -> the input that carries its features: the config's image (``pixel_values``)
        and video (``pixel_values_videos``) token ids. Placeholders whose input is missing are an error."""
        found = {}
        for modality, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            for name in (f"{modality}_token_id", f"{modality}_token_index"):
                value = getattr(model.config, name, None)
                if isinstance(value, int):
                    found[value] = key
                    break
        return found

    def outputs(self, model, batch: "PrunedBatch") -> Dict[str, Any]:
        return {"inputs_embeds": batch.inputs_embeds(model)}


_ADAPTERS: Dict[str, Adapter] = {}


def register(cls: Type[Adapter]) -> Type[Adapter]:
    """Class decorator: serve ``cls.models`` with an instance of ``cls``."""
    adapter = cls()
    for name in cls.models:
        if name in _ADAPTERS:
            raise ValueError(f"{name} already has an adapter: {type(_ADAPTERS[name]).__name__}")
        _ADAPTERS[name] = adapter
    return cls


def supported_models() -> Tuple[str, ...]:
    """The model class names with an adapter, sorted."""
    return tuple(sorted(_ADAPTERS))


def adapter_for(model) -> Adapter:
    """The adapter of ``model``'s class or of its nearest supported base class; else TypeError."""
    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    raise TypeError(f"divprune_ext.hf supports {', '.join(supported_models())}; got {type(model).__name__}")


def require_encoder_outputs(model, what: str) -> None:
    """RuntimeError naming the version unless ``model.forward`` takes ``mm_encoder_outputs`` (5.18+)."""
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        import transformers
        raise RuntimeError(f"{what} needs transformers >= 5.18 (pruned prompts are passed as input_ids + "
                           f"mm_encoder_outputs, which 5.18 added); installed: {transformers.__version__}")


def _pad_token_id(model) -> int:
    for config in (model.config, getattr(model.config, "text_config", None), model.generation_config):
        value = getattr(config, "pad_token_id", None)
        if isinstance(value, int):
            return value
    return 0


def _selectable(features: torch.Tensor) -> torch.Tensor:
    # The operator takes float32/16/bf16; float64 models select on float32 copies.
    return features if features.dtype in (torch.float32, torch.float16, torch.bfloat16) else features.float()


def _select(visuals: Sequence[Visual], keep_ratio: float, order: str) -> List[Kept]:
    """What each Visual keeps, picks in the order they enter the LLM: one select_varlen call over
    all of them (one per dtype and device, which a model's visuals share)."""
    picks: List[Optional[torch.Tensor]] = [None] * len(visuals)
    groups: Dict[Tuple, List[int]] = {}
    for n, v in enumerate(visuals):
        groups.setdefault((v.features.shape[1:], v.features.dtype, v.features.device), []).append(n)
    for members in groups.values():
        lengths = [visuals[n].features.shape[0] for n in members]
        packed = torch.cat([_selectable(visuals[n].features) for n in members])
        chosen = divprune_ext.select_varlen(packed, lengths, keep_ratio=keep_ratio, sorted=order == "original",
                                            validate=False)
        start = 0
        for n, length, c in zip(members, lengths, chosen.split([divprune_ext.keep_count(m, keep_ratio)
                                                                for m in lengths])):
            picks[n] = c - start  # rows of `packed` -> the Visual's own token indices
            start += length
    return [Kept(v, p) for v, p in zip(visuals, picks)]


def token_runs(types: torch.Tensor) -> List[Tuple[int, int, int]]:
    """(row, value, length) of each run of one nonzero value in a (B, L) tensor, row-major: one
    ``nonzero`` and one read."""
    padded = F.pad(types, (1, 1))
    starts = (padded.diff(dim=1) != 0).nonzero()  # (row, column): a run of padded[row, column + 1] starts
    found = torch.cat([starts, padded[starts[:, 0], starts[:, 1] + 1].unsqueeze(1)], dim=1).tolist()
    return [(row, value, end - start) for (row, start, value), (next_row, end, _) in zip(found, found[1:])
            if value and next_row == row]


@dataclass
class _Layout:
    """What the core's one host read decides, before anything is selected."""
    padding_side: str
    width: int                              # L', the pruned batch's length
    placeholders: Dict[int, torch.Tensor]   # (B, L) mask of each placeholder id, in the Visuals' order


def _layout(inputs: Dict[str, Any], visuals: Sequence[Visual], keep_ratio: float,
            padding_side: Optional[str], expected: Dict[int, str]) -> _Layout:
    """Checks the placeholders against the Visuals and sizes the pruned batch: the one host read.
    ``expected``: the family's placeholder ids and the inputs that carry their features."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    placeholders = {t: input_ids == t for t in dict.fromkeys(v.token_id for v in visuals)}
    unfed = {t: key for t, key in expected.items() if t not in placeholders}
    # The one host read: real tokens per row, rows starting with padding, placeholders per row and id
    # (also of the ids no Visual feeds, which must not occur).
    counts = torch.stack([attention_mask.sum(1), attention_mask[:, 0] == 0]
                         + [mask.sum(1) for mask in placeholders.values()]
                         + [(input_ids == t).sum(1) for t in unfed]).tolist()
    for (t, key), per_row in zip(unfed.items(), counts[2 + len(placeholders):]):
        if sum(per_row):
            raise ValueError(f"input_ids holds {sum(per_row)} placeholder tokens with id {t} but no {key} "
                             f"(or it makes no features): the unpruned model would read them as text")
    counts = counts[:2 + len(placeholders)]
    real, starts_padded = counts[0], counts[1]
    lengths = list(real)
    for t, per_row in zip(placeholders, counts[2:]):
        sizes = [len(v.features) for v in visuals if v.token_id == t]
        for row, size in zip(_rows_of(t, sizes, per_row), sizes):
            lengths[row] -= size - divprune_ext.keep_count(size, keep_ratio)
    if padding_side is None:
        padding_side = "left" if any(starts_padded) else "right"
    return _Layout(padding_side, max(lengths, default=0), placeholders)


def _rows_of(token_id: int, sizes: Sequence[int], per_row: Sequence[int]) -> List[int]:
    """The row of each Visual (sizes in fill order), from the placeholder count of each row."""
    if sum(sizes) != sum(per_row):
        raise ValueError(f"{sum(per_row)} tokens with id {token_id} in input_ids but the model makes "
                         f"{sum(sizes)} visual features for them")
    rows, row, before_row, start = [], 0, 0, 0
    for n, size in enumerate(sizes):
        while row < len(per_row) and start >= before_row + per_row[row]:
            before_row += per_row[row]
            row += 1
        if start + size > before_row + per_row[row]:
            raise ValueError(f"visual item {n} with token id {token_id} ({size} tokens) spans several prompts: "
                             f"its row has {before_row + per_row[row] - start} placeholders left")
        rows.append(row)
        start += size
    return rows


def _place(inputs: Dict[str, Any], kept: Sequence[Kept], placeholders: Dict[int, torch.Tensor]):
    """Which input tokens stay and what fills them.

    Returns ``keep`` (B, L): real text tokens and the placeholders at each Visual's picks;
    ``origin`` (B*L,): the flat input token each input slot takes (itself, but a kept visual
    slot takes its item's next pick: picks in selection order fill the slots left to right);
    ``filled``: per Kept, the flat input slots its kept tokens fill, in the order they enter."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    is_placeholder = functools.reduce(torch.logical_or, placeholders.values(),
                                      torch.zeros_like(input_ids, dtype=torch.bool))
    keep = (attention_mask.bool() & ~is_placeholder).flatten()
    origin = torch.arange(input_ids.numel(), device=input_ids.device)
    filled: List[Optional[torch.Tensor]] = [None] * len(kept)
    for t, mask in placeholders.items():
        members = [n for n, k in enumerate(kept) if k.visual.token_id == t]
        sizes = [len(kept[n].visual.features) for n in members]
        slots = torch.nonzero_static(mask.flatten(), size=sum(sizes)).squeeze(1)
        for n, item_slots in zip(members, slots.split(sizes)):
            picks = kept[n].picks.to(item_slots.device)
            filled[n] = item_slots[picks.sort().values]
            keep.index_fill_(0, filled[n], True)
            origin.index_copy_(0, filled[n], item_slots[picks])
    return keep.view(input_ids.shape), origin, filled


def _compact(keep: torch.Tensor, origin: torch.Tensor, width: int, padding_side: str):
    """``dest`` (B*L,): the flat output index (into B*W) of each input token, B*W for the dropped ones;
    ``source`` (B, W): the flat input index of each output token, -1 at padding. The kept tokens of
    row b go to columns [0, len_b) (right padding) or [W - len_b, W) (left padding)."""
    batch, device = keep.shape[0], keep.device
    column = keep.cumsum(1) - 1
    if padding_side == "left":
        column = column + (width - keep.sum(1, keepdim=True))
    row_start = torch.arange(batch, device=device)[:, None] * width
    dest = torch.where(keep, row_start + column, batch * width).flatten()  # dropped tokens go to a spare slot
    source = torch.full((batch * width + 1,), -1, device=device)
    source.scatter_(0, dest, origin)
    return dest, source[:-1].view(batch, width)


class PrunedBatch:
    """The pruned prompts: which tokens remain, where, and helpers to build the model's inputs."""

    def __init__(self, model, inputs: Dict[str, Any], kept: List[Kept], positions: Optional[torch.Tensor],
                 layout: _Layout):
        self.inputs, self.kept, self.positions, self.padding_side = inputs, kept, positions, layout.padding_side
        keep, origin, filled = _place(inputs, kept, layout.placeholders)
        dest, self._source = _compact(keep, origin, layout.width, layout.padding_side)
        # The flat output slot of each kept visual token, Kept after Kept, each in the order they enter.
        self._slots = dest[torch.cat(filled)] if kept else None
        self.attention_mask = (self._source >= 0).to(inputs["attention_mask"].dtype)
        self.input_ids = self.gather(inputs["input_ids"], _pad_token_id(model))

    def gather(self, values: torch.Tensor, pad: Any = 0, batch_dim: Optional[int] = None) -> torch.Tensor:
        """``values`` (..., B, L) (or (B, L, ...) with ``batch_dim=0``) at the kept tokens, re-padded with ``pad``."""
        bd = values.dim() - 2 if batch_dim is None else batch_dim
        shape = tuple(self.inputs["input_ids"].shape)
        if tuple(values.shape[bd:bd + 2]) != shape:
            raise ValueError(f"expected a per-token tensor with (batch, length) = {shape} at dims "
                             f"{bd}, {bd + 1}; got shape {tuple(values.shape)}")
        picked = values.flatten(bd, bd + 1).index_select(bd, self._source.clamp(min=0).flatten())
        picked = picked.unflatten(bd, self._source.shape)
        valid = (self._source >= 0).view(self._source.shape + (1,) * (values.dim() - bd - 2))
        return picked.masked_fill(~valid, pad)

    def inputs_embeds(self, model) -> torch.Tensor:
        """(B, L', H): the model's embeddings of the pruned ``input_ids``, kept visual features in their slots."""
        embeds = model.get_input_embeddings()(self.input_ids)
        if self.kept:
            features = torch.cat([k.features for k in self.kept]).to(embeds.device, embeds.dtype)
            embeds.view(-1, embeds.shape[-1]).index_copy_(0, self._slots, features)
        return embeds


def _given(adapter: Adapter, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """The inputs that are not None; TypeError for a key the family does not take."""
    given = {k: v for k, v in inputs.items() if v is not None}
    unknown = sorted(set(given) - {"input_ids", "attention_mask"} - set(PER_TOKEN_PAD) - set(adapter.inputs))
    if unknown:
        raise TypeError(f"{type(adapter).__name__} takes {', '.join(adapter.inputs + tuple(PER_TOKEN_PAD))}; "
                        f"got unexpected {', '.join(unknown)}")
    return given


def visual_features(model, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                    **inputs) -> List[Visual]:
    """The :class:`Visual` list ``prune_inputs`` selects on: each image's / video's tokens as they enter
    the LLM. Takes the processor's visual inputs; ``input_ids`` / ``attention_mask`` may be left out."""
    adapter = adapter_for(model)
    inputs = _given(adapter, {"input_ids": input_ids, "attention_mask": attention_mask, **inputs})
    with torch.no_grad():
        return adapter.visual(model, inputs)


@torch.no_grad()
def prune_inputs(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 keep_ratio: float = 0.1, order: str = "original", padding_side: Optional[str] = None,
                 **inputs) -> Dict[str, Any]:
    """Prune each image's / video's visual tokens before the LLM's first layer.

    Args:
        model: a supported model (``divprune_ext.hf.SUPPORTED_MODELS``).
        input_ids, attention_mask, **inputs: what the model's processor returns (plus
            ``labels`` if any).
        keep_ratio: fraction of each image's / video's tokens to keep, in (0, 1].
        order: ``"original"`` (kept tokens in their original order, like the authors'
            released code) or ``"selection"`` (in selection order).
        padding_side: ``"left"`` or ``"right"``; default: left if any row starts with padding.

    Returns:
        keyword arguments for ``model(**pruned)`` and ``model.generate(**pruned, ...)``;
        which keys depends on the family (see ``divprune_ext.hf``).

    Raises:
        TypeError: unsupported model class (the message lists the supported ones), or an
            input the family does not take.
        ValueError: keep_ratio outside (0, 1], unknown order / padding_side, input_ids not
            2-D, placeholder tokens that do not match the visual features.
        RuntimeError: the installed transformers cannot run this family pruned.

    Host syncs: one read of a small (2 + placeholder ids, B) tensor, to check the
    placeholder counts, assign images / videos to rows and size the pruned batch (its
    width is a shape); plus whatever the model's own feature code reads and the
    adapter's own checks (see the module docstring). Selection and gathering stay on
    the device, and nothing is copied from the host to the device.
    """
    adapter = adapter_for(model)
    divprune_ext.keep_count(1, keep_ratio)  # validates keep_ratio
    if order not in ("original", "selection"):
        raise ValueError(f"order must be 'original' or 'selection', got {order!r}")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must have shape (batch, length), got {shape}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs = _given(adapter, {"input_ids": input_ids, "attention_mask": attention_mask, **inputs})
    adapter.check(model)
    visuals = adapter.visual(model, inputs)
    layout = _layout(inputs, visuals, keep_ratio, padding_side, adapter.placeholders(model))  # the host read
    positions = adapter.position_ids(model, inputs)
    batch = PrunedBatch(model, inputs, _select(visuals, keep_ratio, order), positions, layout)

    result: Dict[str, Any] = {"attention_mask": batch.attention_mask}
    for key, pad in PER_TOKEN_PAD.items():
        if key in inputs:
            result[key] = batch.gather(inputs[key], pad)
    if positions is not None:
        result["position_ids"] = batch.gather(positions, POSITION_PAD)
    result.update(adapter.outputs(model, batch))
    return {key: value for key, value in result.items() if value is not None}
