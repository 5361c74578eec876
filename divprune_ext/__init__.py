"""divprune_ext: DivPrune visual-token pruning as compiled PyTorch operators.

Importing the package loads the extension, which registers
``torch.ops.divprune.select``, ``select_varlen`` and ``pairwise_distance`` for
CPU (and CUDA when built with it). The functions here validate arguments, turn a
keep ratio into a token count and gather the kept tokens.

>>> import torch, divprune_ext
>>> tokens = torch.randn(576, 4096)
>>> kept, idx = divprune_ext.prune(tokens, keep_ratio=0.1)   # 58 tokens, original order
"""
import importlib.util
import numbers
from typing import Optional, Tuple

import torch

try:
    from . import _C  # noqa: F401  (registers the operators)
except ImportError as e:
    # `from . import _C` raises a plain ImportError ("cannot import name") when there is
    # no _C file at all, so look for the file before blaming the torch build.
    if importlib.util.find_spec(f"{__name__}._C") is None:
        raise ImportError("divprune_ext's compiled extension (divprune_ext._C) is not built in this source tree. "
                          "Build it in place: python setup.py build_ext --inplace (or bash scripts/dev.sh build), "
                          "or install the package: pip install .") from e
    # The compiled extension links against one torch build (release, CPU or CUDA); the
    # loader's own message (a missing library or symbol) does not say so.
    raise ImportError(f"divprune_ext's compiled extension does not load with the installed torch "
                      f"{torch.__version__}: it was built against another torch release or build (CPU/CUDA). "
                      f"Rebuild it against this torch: pip install --no-cache-dir --force-reinstall --no-deps "
                      f"<divprune_ext sdist or source folder>. Loader error: {e}") from e
from . import _fake  # noqa: F401  (their fake kernels)
from . import reference
from ._version import __version__

__all__ = ["select", "select_varlen", "prune", "pairwise_distance", "keep_count", "reference", "cuda_available"]


def cuda_available() -> bool:
    """True when the extension was built with its CUDA kernels (a GPU may still be absent)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("divprune::select", "CUDA")


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """Tokens kept out of ``num_tokens``: ``max(1, round(num_tokens * keep_ratio))``.

    Python's ``round`` (half to even), as in the authors' code: 576 x 0.098 -> 56.
    """
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
        raise TypeError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if not (0.0 < keep_ratio <= 1.0):  # also rejects NaN
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return max(1, round(num_tokens * keep_ratio))


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (M, D) or (B, M, D), got shape {tuple(x.shape)}")


def _check_finite(x: torch.Tensor, name: str) -> None:
    # One float32 pass over x, like the kernels' own norms: a NaN/Inf entry, or a row
    # whose squared norm overflows float32 (|row| > ~1.8e19), makes the norm non-finite
    # and every distance of that row NaN.
    bad_rows = ~torch.isfinite(torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32))
    if bad_rows.any():
        where = bad_rows.nonzero()[0].tolist()
        position = f"row {where[-1]}" + (f" of batch item {where[0]}" if x.dim() == 3 else "")
        if torch.isfinite(x[tuple(where)]).all():
            raise ValueError(f"{name} has a row whose L2 norm overflows float32 (first at {position}); scale the "
                             "features down: the selection depends only on their directions")
        raise ValueError(f"{name} contains NaN or Inf (first at {position}); "
                         "pass validate=False to skip this check")


def _resolve_k(x: torch.Tensor, k: Optional[int], keep_ratio: Optional[float]) -> int:
    if (k is None) == (keep_ratio is None):
        raise ValueError("give exactly one of k and keep_ratio")
    if keep_ratio is not None:
        return keep_count(x.shape[-2], keep_ratio)
    if isinstance(k, bool) or not isinstance(k, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"k must be an int, got {k!r}")
    if not 1 <= k <= x.shape[-2]:
        raise ValueError(f"k must be in [1, M] = [1, {x.shape[-2]}], got k = {k}")
    return int(k)


def select(x: torch.Tensor, k: Optional[int] = None, *, keep_ratio: Optional[float] = None,
           sorted: bool = False, validate: bool = True) -> torch.Tensor:
    """Indices of the tokens DivPrune keeps.

    Args:
        x: features of shape (M, D) or (B, M, D), float32/float16/bfloat16, on CPU or CUDA.
        k: how many tokens to keep per item, 1 <= k <= M.
        keep_ratio: alternatively, the fraction to keep: ``k = max(1, round(M * keep_ratio))``.
        sorted: return the indices in ascending (original token) order instead of selection order.
        validate: check for NaN/Inf, and for rows too large for float32 norms, first.
            The check reads a flag back to the host;
            pass False inside a CUDA graph or when the input is known to be finite.

    Returns:
        int64 indices of shape (k,) or (B, k), distinct within each item.
    """
    _check_tensor(x, "x")
    k = _resolve_k(x, k, keep_ratio)
    if validate:
        _check_finite(x, "x")
    indices = torch.ops.divprune.select(x, k)
    return indices.sort(dim=-1).values if sorted else indices


def _int_list(values, name: str):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a list of ints, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"{name} must be a list of ints, got {list(values)!r}")
    return list(values)


def select_varlen(x: torch.Tensor, lengths, k=None, *, keep_ratio: Optional[float] = None,
                  sorted: bool = False, validate: bool = True) -> torch.Tensor:
    """:func:`select` for a batch of segments of different sizes, in one call.

    Args:
        x: (N, D), the segments' rows one after another (packed, like FlashAttention's varlen).
        lengths: the segments' row counts n_i, ``sum(lengths) == N``.
        k: tokens to keep per segment: a list (one per segment) or one int for all; or
        keep_ratio: ``k_i = keep_count(n_i, keep_ratio)``.
        sorted: each segment's picks in ascending order instead of selection order.
        validate: as in :func:`select`.

    Returns:
        int64 (sum k_i,): each segment's picks in turn, as rows of x (its local picks plus
        its start row). Equals ``torch.cat([select(x_i, k_i) + start_i, ...])`` bit for bit;
        ``x.index_select(0, result)`` is the packed pruned tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), the segments packed, got shape {tuple(x.shape)}")
    lengths = _int_list(lengths, "lengths")
    if not lengths:
        raise ValueError("lengths is empty; give one length per segment")
    bad = [(i, n) for i, n in enumerate(lengths) if n < 1]
    if bad:
        raise ValueError(f"lengths must be >= 1, got lengths[{bad[0][0]}] = {bad[0][1]} (lengths = {lengths})")
    if sum(lengths) != x.shape[0]:
        raise ValueError(f"sum(lengths) = {sum(lengths)} but x has N = {x.shape[0]} rows (lengths = {lengths})")
    if (k is None) == (keep_ratio is None):
        raise ValueError("give exactly one of k and keep_ratio")
    if keep_ratio is not None:
        ks = [keep_count(n, keep_ratio) for n in lengths]
    else:
        ks = [k] * len(lengths) if isinstance(k, (numbers.Integral, torch.SymInt)) and not isinstance(k, bool) \
            else _int_list(k, "k")
        if not ks:
            raise ValueError("k is empty; give one k per segment (or one int for all)")
        if len(ks) != len(lengths):
            raise ValueError(f"k must have one entry per segment: len(k) = {len(ks)}, len(lengths) = {len(lengths)}")
        for i, (ki, n) in enumerate(zip(ks, lengths)):
            if not 1 <= ki <= n:
                raise ValueError(f"k[{i}] must be in [1, lengths[{i}]] = [1, {n}], got k[{i}] = {ki}")
    if validate:
        _check_finite(x, "x")
    indices = torch.ops.divprune.select_varlen(x, lengths, ks)
    if not sorted:
        return indices
    # Segment i's rows all lie below segment i + 1's, so one sort orders each segment in place.
    return indices.sort().values


def pairwise_distance(x: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Float32 cosine-distance matrix ``1 - <xi, xj>`` of L2-normalised rows: (M, M) or (B, M, M)."""
    _check_tensor(x, "x")
    if validate:
        _check_finite(x, "x")
    return torch.ops.divprune.pairwise_distance(x)


def prune(tokens: torch.Tensor, keep_ratio: Optional[float] = None, features: Optional[torch.Tensor] = None,
          *, k: Optional[int] = None, validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep a diverse subset of ``tokens``, in their original order.

    Args:
        tokens: (M, D) or (B, M, D) tokens to prune (any dtype).
        keep_ratio: fraction of tokens to keep, in (0, 1]; or give ``k`` instead.
        features: what the selection looks at, (M, F) or (B, M, F) on the same device;
            defaults to ``tokens`` (the authors select on the projected visual tokens).
        k: number of tokens to keep, instead of ``keep_ratio``.
        validate: check ``features`` for NaN/Inf first (see :func:`select`).

    Returns:
        ``(kept, indices)``: kept tokens (k, D) / (B, k, D) and their ascending indices (k,) / (B, k).
    """
    _check_tensor(tokens, "tokens")
    features = tokens if features is None else features
    _check_tensor(features, "features")
    if features.shape[:-1] != tokens.shape[:-1]:
        raise ValueError(f"features must have the token shape {tuple(tokens.shape[:-1])} before the feature "
                         f"dimension, got {tuple(features.shape)}")
    if features.device != tokens.device:
        raise ValueError(f"features are on {features.device} but tokens on {tokens.device}")
    indices = select(features, k, keep_ratio=keep_ratio, sorted=True, validate=validate)
    kept = tokens.gather(-2, indices.unsqueeze(-1).expand(*indices.shape, tokens.shape[-1]))
    return kept, indices
