"""Fake (meta) kernels: output shapes for torch.compile, FakeTensor and export.

torch imports this module itself when a divprune op meets a fake tensor (the C++
schema names it), so the ops trace even before ``import divprune_ext``.
"""
import torch


def _check_rank(x: torch.Tensor, op: str) -> None:
    torch._check(x.dim() in (2, 3), lambda: f"{op}: x must have shape (M, D) or (B, M, D), got {x.dim()}-D")


@torch.library.register_fake("divprune::select")
def _select_fake(x: torch.Tensor, k: int) -> torch.Tensor:
    _check_rank(x, "divprune.select")
    torch._check(1 <= k, lambda: f"divprune.select: k must be >= 1, got k = {k}")
    torch._check(k <= x.shape[-2], lambda: f"divprune.select: k must be <= M = {x.shape[-2]}, got k = {k}")
    return x.new_empty((*x.shape[:-2], k), dtype=torch.long)


@torch.library.register_fake("divprune::pairwise_distance")
def _pairwise_distance_fake(x: torch.Tensor) -> torch.Tensor:
    _check_rank(x, "divprune.pairwise_distance")
    m = x.shape[-2]
    return x.new_empty((*x.shape[:-2], m, m), dtype=torch.float32)


@torch.library.register_fake("divprune::select_varlen")
def _select_varlen_fake(x: torch.Tensor, lengths, k) -> torch.Tensor:
    torch._check(x.dim() == 2, lambda: f"divprune.select_varlen: x must have shape (N, D), got {x.dim()}-D")
    torch._check(len(lengths) >= 1, lambda: "divprune.select_varlen: lengths is empty")
    torch._check(len(k) == len(lengths), lambda: f"divprune.select_varlen: len(k) = {len(k)}, "
                 f"len(lengths) = {len(lengths)}")
    for n, ki in zip(lengths, k):
        torch._check(n >= 1, lambda: "divprune.select_varlen: every length must be >= 1")
        torch._check(1 <= ki, lambda: "divprune.select_varlen: every k must be >= 1")
        torch._check(ki <= n, lambda: "divprune.select_varlen: every k must be <= its segment's length")
    torch._check(sum(lengths) == x.shape[0], lambda: "divprune.select_varlen: sum(lengths) != N")
    return x.new_empty((sum(k),), dtype=torch.long)
