"""Runs every CUDA kernel once on small inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck python bench/sanitize_kernels.py
    compute-sanitizer --tool racecheck python bench/sanitize_kernels.py

Covers: fp32 (FMA core) and fp16/bf16 (tensor-core core), with and without the
split-D reduction (and one CTA folding several chunks), edge tiles (M, D not multiples of the tile), batches, every
greedy register width up to 4 items per thread, M = 1 and k = M; select_varlen's kernels
on ragged batches (one-row segments, split-D, a long segment among short ones).
"""
import torch

import divprune_ext

CASES = [  # (B, M, D, k)
    (1, 1, 5, 1),
    (1, 70, 3, 70),        # edge tiles, D < one stage
    (2, 130, 1000, 13),    # split-D, unaligned D
    (1, 576, 1024, 57),    # split-D, vector loads
    (3, 200, 136, 20),     # batch, no split
    (8, 576, 600, 57),     # enough tiles not to split: one CTA folds three chunks
    (1, 3000, 40, 300),    # several candidates per greedy thread
]
VARLEN_CASES = [  # (lengths, D)
    ([1, 70, 130, 3], 1000),   # split-D, edge tiles, a one-row segment
    ([576, 576, 1, 64], 136),  # no split
    ([3000, 5, 17], 40),       # every segment with the long one's greedy width
]


def main():
    assert divprune_ext.cuda_available() and torch.cuda.is_available(), "needs a GPU and the CUDA build"
    for b, m, d, k in CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(b, m, d, device="cuda").to(dtype)
            picks = torch.ops.divprune.select(x, k)
            dist = torch.ops.divprune.pairwise_distance(x)
            torch.cuda.synchronize()
            assert picks.shape == (b, k) and dist.shape == (b, m, m)
            assert all(len(set(p)) == k for p in picks.tolist()), "repeated index"
            print(f"ok B={b} M={m} D={d} k={k} {dtype}")
    for lengths, d in VARLEN_CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(sum(lengths), d, device="cuda").to(dtype)
            ks = [max(1, n // 10) for n in lengths]
            picks = torch.ops.divprune.select_varlen(x, lengths, ks)
            torch.cuda.synchronize()
            assert picks.shape == (sum(ks),) and len(set(picks.tolist())) == sum(ks), "repeated index"
            print(f"ok varlen lengths={lengths} D={d} {dtype}")


if __name__ == "__main__":
    main()
