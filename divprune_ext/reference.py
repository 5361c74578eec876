"""Pure-PyTorch DivPrune, written for reading. Tests and benchmarks compare the
compiled operators with it.

It follows the exact algorithm of the package:
  * rows are L2-normalised in float32 (as ``F.normalize``), distance is cosine
    distance ``1 - <xi, xj>``;
  * the first pick is the row whose minimum distance to any *other* row is largest;
  * each next pick is the unpicked row whose minimum distance to the picked set is
    largest; a row is never picked twice; ties go to the lowest index.

It assumes finite input (the public API checks that). Every step is a tensor
operation with no host sync, so it also runs on CUDA and inside a CUDA graph.
"""
import torch

__all__ = ["pairwise_distance", "greedy_select", "select"]


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Float32 cosine distances of the rows of ``x``: (M, D) -> (M, M), (B, M, D) -> (B, M, M).

    ``<xi/|xi|, xj/|xj|>`` is computed as ``<xi, xj> / |xi| / |xj|``: the same value
    as normalising first, without a normalised copy of ``x``. Norms are clamped at
    1e-12 like ``F.normalize``, so a zero row is at distance 1 from everything.
    """
    x = x.float()
    inv_norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()
    similarity = (x @ x.transpose(-2, -1)) * inv_norm * inv_norm.transpose(-2, -1)
    return 1.0 - similarity


def greedy_select(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min selection of ``k`` rows from one (M, M) distance matrix.

    Reads ``dist[i, j]`` row-wise: the first pick uses each row's minimum over
    ``j != i``, and the running minima are updated with the newest pick's row.
    """
    m = dist.shape[0]
    off_diagonal = dist.clone()
    off_diagonal.fill_diagonal_(float("inf"))
    nearest_other = off_diagonal.min(dim=1).values

    picks = torch.empty(k, dtype=torch.long, device=dist.device)
    picked = torch.zeros(m, dtype=torch.bool, device=dist.device)
    min_dist = torch.full((m,), float("inf"), device=dist.device)
    # torch.argmax returns the first maximal index: ties go to the lowest index.
    # `pick` stays a 1-element tensor: indexing with a 0-d tensor calls .item(),
    # a host sync per step that would also break CUDA graph capture.
    pick = nearest_other.argmax().view(1)
    for step in range(k):
        picks[step] = pick[0]
        picked.index_fill_(0, pick, True)
        if step + 1 == k:
            break
        min_dist = torch.minimum(min_dist, dist.index_select(0, pick)[0])
        pick = min_dist.masked_fill(picked, float("-inf")).argmax().view(1)
    return picks


def select(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` rows DivPrune keeps, in selection order: (k,) or (B, k)."""
    dist = pairwise_distance(x)
    if x.dim() == 2:
        return greedy_select(dist, k)
    return torch.stack([greedy_select(d, k) for d in dist]) if len(dist) else dist.new_empty((0, k), dtype=torch.long)
