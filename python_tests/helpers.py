"""Shared test helpers: adversarial inputs and the greedy max-min checker."""
import torch

from divprune_ext import reference

# Float rounding differs between implementations (summation order of the Gram
# product, normalise-then-multiply vs scale-after). When two candidates' scores
# are within NEAR_TIE of each other, the tests accept either pick -- here and
# nowhere else. Everything else must match exactly.
NEAR_TIE = 1e-6
# A device whose distances differ from the reference's by up to delta is exactly
# greedy on its own distances (test_select_is_the_greedy_on_its_own_distances), so
# each of its picks scores within 2 * delta of the reference's best; delta itself
# must stay at rounding level.
MAX_DISTANCE_ERROR = 1e-5


def make_input(kind: str, m: int, d: int, seed: int = 0, batch=None) -> torch.Tensor:
    """float32 (M, D) or (B, M, D) inputs that stress the selection."""
    g = torch.Generator().manual_seed(seed)
    shape = (m, d) if batch is None else (batch, m, d)
    if kind == "random":
        return torch.randn(shape, generator=g)
    if kind == "duplicates":  # exact copies of a few rows
        pool = torch.randn((*shape[:-2], max(1, m // 4), d), generator=g)
        pick = torch.randint(0, pool.shape[-2], (m,), generator=g)
        return pool[..., pick, :]
    if kind == "multiples":  # positive multiples of a few rows: same direction, other norms
        base = make_input("duplicates", m, d, seed, batch)
        return base * torch.rand((*shape[:-1], 1), generator=g).mul(4).add(0.25)
    if kind == "clusters":  # tight clusters: many near-ties
        centers = torch.randn((*shape[:-2], 3, d), generator=g)
        which = torch.randint(0, 3, (m,), generator=g)
        return centers[..., which, :] + 1e-3 * torch.randn(shape, generator=g)
    if kind == "zero_rows":  # F.normalize maps them to 0: distance 1 to everything
        x = torch.randn(shape, generator=g)
        x[..., torch.rand(m, generator=g) < 0.3, :] = 0
        return x
    if kind == "one_hot":  # every distance is exactly 1: all ties
        x = torch.zeros(shape)
        x[..., torch.arange(m), torch.arange(m) % d] = 1.0
        return x
    if kind == "integer_grid":  # small integers: many exactly equal distances
        return torch.randint(-1, 2, shape, generator=g).float()
    raise ValueError(kind)


INPUT_KINDS = ["random", "duplicates", "multiples", "clusters", "zero_rows", "one_hot", "integer_grid"]


def nan_inputs():
    """Inputs with NaN / Inf rows, where only the ranking rules decide the picks (every
    finite distance is exactly 1): a NaN distance ranks its row last on every device."""
    small = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 1.0]])
    ties = make_input("one_hot", 40, 64)
    ties[5] = float("nan")
    ties[17, 3] = float("nan")
    ties[30, 2] = float("inf")
    return [small, ties]


def assert_max_min_greedy(dist: torch.Tensor, picks: torch.Tensor, tol: float = 0.0) -> None:
    """Replays the greedy max-min selection on `dist` (M, M) along `picks` (k,).

    Each pick must be a new index in [0, M) whose score (min distance to the
    picked set; to all other rows for the first pick) is the largest among the
    unpicked rows -- the lowest such index when tol == 0, else within tol of it.
    """
    dist = dist.detach().cpu().float()
    picks = picks.detach().cpu().tolist()
    m = dist.shape[0]
    assert len(set(picks)) == len(picks), f"repeated indices in {picks}"
    assert all(0 <= p < m for p in picks), f"index out of [0, {m}) in {picks}"
    off_diagonal = dist.clone()
    off_diagonal.fill_diagonal_(float("inf"))
    score = off_diagonal.min(dim=1).values
    picked = torch.zeros(m, dtype=torch.bool)
    min_dist = torch.full((m,), float("inf"))
    for step, p in enumerate(picks):
        candidates = score.masked_fill(picked, float("-inf"))
        best = int(candidates.argmax())
        if p != best:
            assert tol > 0 and candidates[p] >= candidates[best] - tol, (
                f"step {step}: picked {p} with score {candidates[p].item():.9g}, "
                f"but {best} scores {candidates[best].item():.9g}")
        picked[p] = True
        min_dist = torch.minimum(min_dist, dist[p])
        score = min_dist


def assert_distances_close(dist: torch.Tensor, x: torch.Tensor) -> float:
    """A device's distances (.., M, M) are within MAX_DISTANCE_ERROR of the reference's
    off the diagonal; returns their largest difference there.

    The diagonal is left out: the norm kernel and the Gram product sum |xi|^2 in
    different orders, so its error grows with D (about 6e-6 at bf16, D = 4096), and no
    pick ever reads it (a row's own distance counts neither for its first-pick score
    nor, once it is picked, for anything)."""
    expected = reference.pairwise_distance(x.cpu())
    error = (dist.cpu() - expected).abs()
    error.diagonal(0, -2, -1).zero_()
    delta = error.max().item() if error.numel() else 0.0
    assert delta <= MAX_DISTANCE_ERROR, f"distances differ from the reference by {delta}"
    return delta


def assert_device_selection(x: torch.Tensor, dist: torch.Tensor, picks: torch.Tensor) -> None:
    """A device's picks (k,) / (B, k) from its own distances `dist`: exactly the greedy
    on `dist`, and the greedy on the reference distances up to NEAR_TIE plus twice the
    device's distance error (see MAX_DISTANCE_ERROR)."""
    delta = assert_distances_close(dist, x)
    k = picks.shape[-1]
    own = dist.cpu().reshape(-1, *dist.shape[-2:])
    expected = reference.pairwise_distance(x.cpu()).reshape(own.shape)
    for d_own, d_ref, p in zip(own, expected, picks.cpu().reshape(-1, k)):
        assert_max_min_greedy(d_own, p)
        assert_max_min_greedy(d_ref, p, tol=NEAR_TIE + 2 * delta)


def assert_matches_reference(x: torch.Tensor, picks: torch.Tensor) -> None:
    """CPU results must equal the reference exactly (same float ops); CUDA results
    must satisfy assert_device_selection."""
    k = picks.shape[-1]
    if picks.device.type == "cpu":
        expected = reference.select(x, k)
        assert torch.equal(picks, expected), f"got {picks.tolist()}, reference {expected.tolist()}"
        return
    assert_device_selection(x, torch.ops.divprune.pairwise_distance(x), picks)
