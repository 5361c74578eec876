"""CUDA-only limits: the largest supported M, and clear errors past it."""
import pytest
import torch

from conftest import requires_cuda
from divprune_ext import reference

pytestmark = requires_cuda


def test_largest_register_path():
    # 65,536 tokens: every thread of the greedy kernel owns 64 candidates, and a pick's
    # row offset pick * M passes 2^31 (int32 would wrap). Peak: two 17 GB matrices.
    m = 65_536
    x = torch.randn(m, 8, device="cuda")
    picks = torch.ops.divprune.select(x, 40)
    assert int(picks.max()) * m >= 2**31
    dist = torch.ops.divprune.pairwise_distance(x)
    assert torch.equal(picks, reference.greedy_select(dist, 40))
    del dist


def test_too_many_tokens():
    x = torch.randn(65_537, 1, device="cuda")
    with pytest.raises(ValueError, match="at most 65536 tokens per item, got M = 65537"):
        torch.ops.divprune.select(x, 1)


def test_pairwise_distance_has_no_token_limit():
    # Only the greedy kernel needs M <= 65,536; the distance kernels take any M.
    x = torch.randn(65_600, 2, device="cuda")
    dist = torch.ops.divprune.pairwise_distance(x)
    assert dist.shape == (65_600, 65_600)
    unit = torch.nn.functional.normalize(x)
    for row in (0, 65_599):
        torch.testing.assert_close(dist[row], 1 - unit @ unit[row], rtol=0, atol=1e-5)
    del dist


def test_out_of_memory_names_the_bytes():
    x = torch.randn(64, 65_536, 1, device="cuda")
    need = 64 * 65_536 * 65_536 * 4
    with pytest.raises(torch.OutOfMemoryError, match=f"needs {need} bytes"):
        torch.ops.divprune.select(x, 1)


def test_empty_batch_past_the_greedy_limit():
    # Nothing to select: both devices return (0, k), whatever M.
    for device in ("cpu", "cuda"):
        x = torch.empty(0, 70_000, 4, device=device)
        assert torch.ops.divprune.select(x, 1).shape == (0, 1)
