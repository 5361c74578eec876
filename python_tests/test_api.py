"""The Python layer: keep ratios, sorted indices, prune's gathering."""
import pytest
import torch

import divprune_ext
from divprune_ext import reference


@pytest.mark.parametrize("m,ratio", [(576, 0.098), (576, 0.1), (2880, 0.05), (10, 0.05), (7, 0.5), (1, 1.0), (5, 1e-9)])
def test_keep_count_uses_python_round(m, ratio):
    assert divprune_ext.keep_count(m, ratio) == max(1, round(m * ratio))


def test_keep_count_matches_authors_example():
    assert divprune_ext.keep_count(576, 0.098) == 56


def test_select_keep_ratio_and_sorted(device):
    x = torch.randn(3, 120, 16, device=device)
    picks = divprune_ext.select(x, keep_ratio=0.25)
    assert picks.shape == (3, 30)
    assert torch.equal(picks, torch.ops.divprune.select(x, 30))
    ordered = divprune_ext.select(x, keep_ratio=0.25, sorted=True)
    assert torch.equal(ordered, picks.sort(dim=-1).values)


@pytest.mark.parametrize("batched", [False, True])
def test_prune_keeps_original_order(device, batched):
    tokens = torch.randn(2, 50, 8, device=device) if batched else torch.randn(50, 8, device=device)
    kept, idx = divprune_ext.prune(tokens, keep_ratio=0.2)
    assert torch.all(idx.diff(dim=-1) > 0)
    expected = tokens[torch.arange(2, device=device)[:, None], idx] if batched else tokens[idx]
    assert torch.equal(kept, expected)
    assert torch.equal(idx, divprune_ext.select(tokens, keep_ratio=0.2, sorted=True))


def test_prune_selects_on_features(device):
    features = torch.randn(40, 32, device=device)
    tokens = torch.arange(40 * 3, device=device).reshape(40, 3)  # any dtype
    kept, idx = divprune_ext.prune(tokens, features=features, k=10)
    assert torch.equal(idx, torch.ops.divprune.select(features, 10).sort().values)
    assert torch.equal(kept, tokens[idx])


def test_reference_batched_equals_per_item():
    x = torch.randn(3, 40, 16)
    batched = reference.select(x, 7)
    per_item = torch.stack([reference.greedy_select(d, 7) for d in reference.pairwise_distance(x)])
    assert torch.equal(batched, per_item)
