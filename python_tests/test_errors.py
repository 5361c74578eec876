"""Bad input gets a clear error that names the argument and the value."""
import pytest
import torch

import divprune_ext


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), ()])
def test_wrong_rank(device, shape):
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match=r"x must have shape \(M, D\) or \(B, M, D\)"):
        divprune_ext.select(x, 1)
    with pytest.raises(ValueError, match=r"x must have shape \(M, D\) or \(B, M, D\), got a \d-D"):
        torch.ops.divprune.select(x, 1)
    with pytest.raises(ValueError, match="x must have shape"):
        torch.ops.divprune.pairwise_distance(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float64])
def test_unsupported_dtype(device, dtype):
    x = torch.ones(4, 3, device=device).to(dtype)
    for call in (lambda: divprune_ext.select(x, 2, validate=False), lambda: torch.ops.divprune.select(x, 2),
                 lambda: torch.ops.divprune.pairwise_distance(x)):
        with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got"):
            call()


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (2, 0, 4), (2, 4, 0)])
def test_empty_input(device, shape):
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match="x is empty"):
        torch.ops.divprune.select(x, 1)
    with pytest.raises(ValueError, match="x is empty"):
        torch.ops.divprune.pairwise_distance(x)


@pytest.mark.parametrize("k", [0, -1, 11, 1000])
def test_k_out_of_range(device, k):
    x = torch.randn(10, 4, device=device)
    with pytest.raises(ValueError, match=rf"k must be in \[1, M\] = \[1, 10\], got k = {k}"):
        divprune_ext.select(x, k)
    with pytest.raises(ValueError, match=rf"k must be in \[1, M\] = \[1, 10\], got k = {k}"):
        torch.ops.divprune.select(x, k)


@pytest.mark.parametrize("k", [True, 2.0, "3", None])
def test_k_wrong_type(k):
    x = torch.randn(10, 4)
    error = ValueError if k is None else TypeError
    with pytest.raises(error, match="k"):
        divprune_ext.select(x, k)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.01, 2, float("nan"), float("inf")])
def test_keep_ratio_out_of_range(ratio):
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got"):
        divprune_ext.select(x, keep_ratio=ratio)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        divprune_ext.prune(x, keep_ratio=ratio)


@pytest.mark.parametrize("ratio", [True, "0.1", None])
def test_keep_ratio_wrong_type(ratio):
    with pytest.raises(TypeError, match="keep_ratio must be a number"):
        divprune_ext.keep_count(10, ratio)


def test_k_and_keep_ratio_exclusive():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="exactly one of k and keep_ratio"):
        divprune_ext.select(x, 3, keep_ratio=0.5)
    with pytest.raises(ValueError, match="exactly one of k and keep_ratio"):
        divprune_ext.select(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(device, bad):
    x = torch.randn(2, 10, 4, device=device)
    x[1, 7, 2] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(first at row 7 of batch item 1\)"):
        divprune_ext.select(x, 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        divprune_ext.prune(x, keep_ratio=0.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        divprune_ext.pairwise_distance(x)
    picks = divprune_ext.select(x, 3, validate=False)  # skipped check: distinct indices all the same
    assert all(len(set(p)) == 3 for p in picks.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_norm_overflow_raises(device, dtype):
    # Finite entries whose squared norm exceeds float32's range: every distance of
    # the row would be NaN.
    x = torch.randn(3, 8, device=device).to(dtype)
    x[1] = 1e20
    with pytest.raises(ValueError, match=r"x has a row whose L2 norm overflows float32 \(first at row 1\)"):
        divprune_ext.select(x, 2)
    x[1] = 1e18  # squared norm 8e36: fine
    assert divprune_ext.select(x, 3).shape == (3,)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        divprune_ext.select([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor"):
        divprune_ext.prune(None, 0.5)


def test_prune_feature_shape_mismatch():
    with pytest.raises(ValueError, match=r"features must have the token shape \(10,\)"):
        divprune_ext.prune(torch.randn(10, 4), 0.5, features=torch.randn(9, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_prune_device_mismatch():
    with pytest.raises(ValueError, match="features are on cuda:0 but tokens on cpu"):
        divprune_ext.prune(torch.randn(10, 4), 0.5, features=torch.randn(10, 4, device="cuda"))
