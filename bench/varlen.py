"""The varlen table: select_varlen vs a loop of select vs the padded batched call on ragged batches.

    python3 -m bench.varlen [--device cpu|cuda] [--dim 1024] [--quick]

The padded call pads every item to the longest with zero rows and selects with the batched
op: padded rows take part in the distances, so it is wrong for DivPrune; it is timed only
as the cost a correct varlen call must beat. keep 10%, float32 (CPU) / float16 (CUDA).
"""
import argparse
import statistics

import torch

import divprune_ext
from bench.timing import time_us

# name -> segment lengths
BATCHES = {
    "64 x 576": [576] * 64,
    "8 Qwen images, 256-4096": [256, 4096, 1024, 576, 2304, 729, 3136, 1600],
    "2 videos of 10k + 30 small images": [10_000, 10_000] + [256 + 32 * i for i in range(30)],
}
QUICK = {"16 x 64 ragged": [64, 17, 100, 3, 64, 80, 1, 33, 64, 90, 12, 64, 50, 7, 64, 128]}


def loop_of_select(x, lengths, ks):
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
    return torch.cat([torch.ops.divprune.select(x.narrow(0, s, n), k) + s for s, n, k in zip(starts, lengths, ks)])


def padded(x, lengths, ks):
    width, parts, start = max(lengths), [], 0
    for n in lengths:
        parts.append(torch.nn.functional.pad(x[start:start + n], (0, 0, 0, width - n)))
        start += n
    return torch.ops.divprune.select(torch.stack(parts), max(ks))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.varlen", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="one small ragged batch (seconds)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds per implementation and batch")
    args = p.parse_args(argv)
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    print(f"| batch (D = {args.dim}, {args.device}) | select_varlen | loop of select | padded batch (wrong) | loop / varlen |")
    print("| --- | --- | --- | --- | --- |")
    for name, lengths in (QUICK if args.quick else BATCHES).items():
        x = torch.randn(sum(lengths), args.dim, device=args.device, dtype=dtype)
        ks = [divprune_ext.keep_count(n, 0.1) for n in lengths]
        assert torch.equal(divprune_ext.select_varlen(x, lengths, ks, validate=False), loop_of_select(x, lengths, ks))
        fns = {"varlen": lambda x: torch.ops.divprune.select_varlen(x, lengths, ks),
               "loop": lambda x: loop_of_select(x, lengths, ks), "padded": lambda x: padded(x, lengths, ks)}
        if len(lengths) * max(lengths) ** 2 * 4 > 2 << 30:  # the padded (B, M, M) matrix past 2 GiB
            del fns["padded"]
        ms = {key: statistics.median(time_us(fn, [x], args.device, budget=args.budget, min_reps=3, warmup=1)) / 1e3
              for key, fn in fns.items()}
        ms.setdefault("padded", float("nan"))
        print(f"| {name} | {ms['varlen']:,.1f} ms | {ms['loop']:,.1f} ms | {ms['padded']:,.1f} ms | "
              f"{ms['loop'] / ms['varlen']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
