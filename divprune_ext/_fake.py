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
