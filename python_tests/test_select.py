"""The select op against the reference, on every device, dtype and adversarial input."""
import pytest
import torch

import divprune_ext
from conftest import requires_cuda
from divprune_ext import reference
from helpers import INPUT_KINDS, assert_matches_reference, assert_max_min_greedy, make_input, nan_inputs

SHAPES = [(1, 8), (2, 3), (7, 5), (33, 17), (100, 64), (257, 129)]


def ks_for(m):
    return sorted({1, max(1, m // 10), max(1, m // 2), m})


@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("m,d", SHAPES, ids=lambda v: str(v))
def test_matches_reference(device, dtype, kind, m, d):
    x = make_input(kind, m, d, seed=m * 31 + d).to(device=device, dtype=dtype)
    for k in ks_for(m):
        assert_matches_reference(x, torch.ops.divprune.select(x, k))


@pytest.mark.parametrize("kind", ["random", "duplicates", "clusters"])
def test_llava_sized(device, dtype, kind):
    x = make_input(kind, 576, 1024, seed=5).to(device=device, dtype=dtype)
    assert_matches_reference(x, torch.ops.divprune.select(x, 57))


@pytest.mark.parametrize("m", [1023, 1025, 2049, 4100, 10000, 16500])
def test_many_tokens(device, m):
    # Past 1024 tokens a CUDA thread owns several candidates; from 16384 the CPU
    # splits each greedy step over threads.
    x = make_input("random", m, 32, seed=m).to(device)
    assert_matches_reference(x, torch.ops.divprune.select(x, max(1, m // 10)))


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_batched_equals_per_item(device, dtype, kind):
    x = make_input(kind, 90, 48, seed=3, batch=4).to(device=device, dtype=dtype)
    batched = torch.ops.divprune.select(x, 20)
    assert batched.shape == (4, 20)
    assert_matches_reference(x, batched)
    for item, picks in zip(x, batched):
        assert_max_min_greedy(divprune_ext.pairwise_distance(item), picks)


def test_select_is_the_greedy_on_its_own_distances(device, dtype):
    # Exact, with no tolerance: the device's selection replays on the device's distances.
    for kind in INPUT_KINDS:
        x = make_input(kind, 200, 96, seed=11, batch=2).to(device=device, dtype=dtype)
        picks = torch.ops.divprune.select(x, 60)
        dist = torch.ops.divprune.pairwise_distance(x)
        for d, p in zip(dist, picks):
            assert torch.equal(p.cpu(), reference.greedy_select(d.cpu(), 60))


def test_pairwise_distance_matches_reference(device, dtype):
    for kind in INPUT_KINDS:
        x = make_input(kind, 130, 70, seed=2, batch=2).to(device=device, dtype=dtype)
        got = torch.ops.divprune.pairwise_distance(x)
        assert got.dtype == torch.float32 and got.shape == (2, 130, 130)
        expected = reference.pairwise_distance(x.cpu())
        if device == "cpu":
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=2e-6)


def test_non_contiguous(device, dtype):
    base = make_input("random", 64, 150, seed=4).to(device=device, dtype=dtype)
    views = [base.t()[::2].t(),               # (64, 75), strided rows and columns
             base.t().contiguous().t(),       # column-major (64, 150)
             base.reshape(2, 32, 150).transpose(0, 1).transpose(0, 1)[:, ::3]]  # batched, strided
    for x in views:
        assert not x.is_contiguous()
        picks = torch.ops.divprune.select(x, 9)
        assert_matches_reference(x, picks)
        assert torch.equal(picks.cpu(), torch.ops.divprune.select(x.contiguous(), 9).cpu())


def test_unaligned_data_pointer(device, dtype):
    # A contiguous view 3 elements into its storage: the CUDA kernels must not use
    # 16-byte vector loads on it.
    storage = make_input("random", 1, 100 * 64 + 3, seed=6).to(device=device, dtype=dtype).flatten()
    x = storage[3:].view(100, 64)
    assert x.is_contiguous() and x.storage_offset() == 3
    picks = torch.ops.divprune.select(x, 10)
    assert_matches_reference(x, picks)
    assert torch.equal(picks, torch.ops.divprune.select(x.clone(), 10))


def test_more_items_than_one_launch_takes(device):
    # CUDA grids hold at most 65,535 items in z: larger batches take several launches.
    x = torch.randn(65_535 + 9, 3, 4, generator=torch.Generator().manual_seed(0)).to(device)
    picks = torch.ops.divprune.select(x, 2)
    dist = torch.ops.divprune.pairwise_distance(x)
    for part in (slice(0, 9), slice(65_530, None)):
        assert torch.equal(picks[part], torch.ops.divprune.select(x[part], 2))
        assert torch.equal(dist[part], torch.ops.divprune.pairwise_distance(x[part]))


def test_one_hot_ties_go_to_lowest_index(device, dtype):
    # All distances are exactly 1, so every step is a tie: 0, 1, 2, ...
    x = make_input("one_hot", 40, 64).to(device=device, dtype=dtype)
    assert torch.ops.divprune.select(x, 40).tolist() == list(range(40))


def test_duplicates_never_repicked(device):
    # Exact copies score 0 once their twin is picked; still k distinct indices.
    x = torch.randn(5, 16).repeat(4, 1).to(device)  # 20 rows, 5 distinct
    picks = torch.ops.divprune.select(x, 20).tolist()
    assert sorted(picks) == list(range(20))
    assert len({p % 5 for p in picks[:5]}) == 5  # every distinct row before any copy


def test_single_token(device, dtype):
    x = torch.randn(1, 8, dtype=dtype, device=device)
    assert torch.ops.divprune.select(x, 1).tolist() == [0]
    assert torch.ops.divprune.select(x.expand(3, 1, 8), 1).tolist() == [[0], [0], [0]]


def test_empty_batch(device):
    x = torch.randn(0, 10, 8, device=device)
    assert torch.ops.divprune.select(x, 3).shape == (0, 3)
    assert torch.ops.divprune.pairwise_distance(x).shape == (0, 10, 10)


def test_raw_op_survives_nan_and_inf(device):
    # The raw op does not check its input; it must still return k distinct indices.
    x = torch.randn(300, 32, device=device)
    x[5] = float("nan")
    x[17, 3] = float("inf")
    x[100:] = float("nan")
    for k in (1, 50, 300):
        picks = torch.ops.divprune.select(x, k).cpu()
        assert picks.shape == (k,) and len(set(picks.tolist())) == k
        assert 0 <= picks.min() and picks.max() < 300


def test_deterministic(device, dtype):
    x = make_input("clusters", 700, 256, seed=8, batch=2).to(device=device, dtype=dtype)
    first = torch.ops.divprune.select(x, 70)
    dist = torch.ops.divprune.pairwise_distance(x)
    for _ in range(3):
        assert torch.equal(torch.ops.divprune.select(x, 70), first)
        assert torch.equal(torch.ops.divprune.pairwise_distance(x), dist)


def test_checker_rejects_wrong_picks():
    # The checker above must be able to fail.
    x = make_input("random", 50, 16, seed=1)
    dist = reference.pairwise_distance(x)
    picks = reference.select(x, 10)
    assert_max_min_greedy(dist, picks)
    for bad in (picks.flip(0), torch.cat([picks[:5], picks[:5]]), torch.arange(10)):
        with pytest.raises(AssertionError):
            assert_max_min_greedy(dist, bad, tol=1e-6)


@requires_cuda
def test_nan_ranks_like_the_cpu_op(dtype):
    # The raw op doesn't check its input; both devices rank a NaN distance the same way.
    for item in nan_inputs():
        item = item.to(dtype)
        expected = torch.ops.divprune.select(item, len(item))
        assert torch.equal(torch.ops.divprune.select(item.to("cuda"), len(item)).cpu(), expected)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_batch_invariance(dtype):
    # The D reduction's order depends on D alone, not on the batch or the GPU's SM count
    # (which decide split-D): an item gives the same bits batched or alone.
    x = make_input("clusters", 300, 1000, seed=12, batch=5).to(device="cuda", dtype=dtype)
    picks, dist = torch.ops.divprune.select(x, 60), torch.ops.divprune.pairwise_distance(x)
    for i in range(len(x)):
        assert torch.equal(torch.ops.divprune.select(x[i], 60), picks[i])
        assert torch.equal(torch.ops.divprune.pairwise_distance(x[i:i + 2]), dist[i:i + 2])
