"""The loop users copy today: a plain transcription of the DivPrune seed snippet's
Python loop (index lists, a fresh sub-matrix gather and a host sync every step).
Benchmark baseline only; `divprune_ext.reference` is the careful pure-torch version."""
import torch
import torch.nn.functional as F


def seed_loop_select(x: torch.Tensor, k: int) -> torch.Tensor:
    normed = F.normalize(x.float(), dim=-1)
    dist = 1.0 - normed @ normed.T
    dist.fill_diagonal_(float("inf"))
    m = x.shape[0]
    remaining = list(range(m))
    first = remaining[int(dist.min(dim=1).values.argmax())]
    selected = [first]
    remaining.remove(first)
    while len(selected) < k:
        rem = torch.tensor(remaining, device=x.device)
        sel = torch.tensor(selected, device=x.device)
        to_selected = dist[rem][:, sel].min(dim=1).values
        chosen = remaining[int(to_selected.argmax())]
        selected.append(chosen)
        remaining.remove(chosen)
    return torch.tensor(selected, device=x.device)
