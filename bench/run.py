"""Microbenchmarks: torch.ops.divprune.select side by side with the package's
pure-torch reference and the seed snippet's loop, in one run.

    python -m bench                      # the default matrix on the GPU if there is one, else CPU
    python -m bench --quick              # under a minute on a 2-core CPU
    python -m bench --device cuda --graph --e2e
    python -m bench --shapes 1x576x4096,8x576x4096 --dtypes fp16 --ratios 0.1,0.25

Times are per call (the whole selection, distances included): CUDA events on a
GPU, perf_counter on the CPU; after warm-up, the median and 10th-90th percentile
of many runs, rotating over several inputs so caches don't flatter small cases.
Writes a table to stdout, and JSON, a markdown summary and a PNG plot to --out-dir.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys

import torch

import divprune_ext
from bench.seed_loop import seed_loop_select
from bench.summarize import markdown_summary
from bench.timing import time_us

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LLAVA_SHAPES = {  # name -> (B, M, D)
    "llava-1.5 (D=4096)": (1, 576, 4096),
    "llava-1.5 (D=1024)": (1, 576, 1024),
    "llava-next": (1, 2880, 4096),
    "video 8 frames": (1, 4608, 4096),
    "video 32 frames": (1, 18432, 4096),
    "8 images": (8, 576, 4096),
    "64 images": (64, 576, 4096),
}
IMPLEMENTATIONS = {
    "divprune_ext": lambda x, k: torch.ops.divprune.select(x, k),
    "reference": divprune_ext.reference.select,
    "seed loop": seed_loop_select,
    # Not a selection: the float32 Gram product alone, the floor of any exact CPU version.
    "gram only": lambda x, k: gram_only(x),
}
SELECTIONS = ("divprune_ext", "reference", "seed loop")


def gram_only(x):
    xf = x.float()  # converted once, as the operator does
    return xf @ xf.transpose(-2, -1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: all on the first shape, "
                                                  "fp16 on GPU / fp32 on CPU elsewhere)")
    p.add_argument("--shapes", default=None, help="comma list of BxMxD (default: the LLaVA matrix)")
    p.add_argument("--ratios", default=None, help="keep ratios (default 0.1; 0.05,0.25,0.5 on the first shape too)")
    p.add_argument("--impls", default=None, help="comma list of " + ", ".join(IMPLEMENTATIONS) +
                   " (default: all; 'gram only' on CPU only)")
    p.add_argument("--seed-max-m", type=int, default=4608, help="skip the (slow) seed loop above this M")
    p.add_argument("--graph", action="store_true", help="also time CUDA-graph replays of the graph-safe versions")
    p.add_argument("--e2e", action="store_true", help="also time a 7B LLaMA-shaped prefill with and without pruning")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per case (default 1.0)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="a small matrix and short budget (< 1 min on 2 CPU cores)")
    p.add_argument("--out-dir", default="bench/out")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not (torch.cuda.is_available() and divprune_ext.cuda_available()):
        p.error("--device cuda needs a GPU and divprune_ext built with CUDA")
    if args.impls is None:
        args.impls = ",".join(i for i in IMPLEMENTATIONS if args.device == "cpu" or i in SELECTIONS)
    args.impls = [i.strip() for i in args.impls.split(",")]
    for impl in args.impls:
        if impl not in IMPLEMENTATIONS:
            p.error(f"unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    return args


def parse_shape(text):
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"bad shape {text!r}: expected BxMxD with positive integers, e.g. 1x576x4096")
    return tuple(int(p) for p in parts)


def build_cases(args):
    """(name, (B, M, D), keep_ratio, dtype name) for every case to run."""
    gpu = args.device == "cuda"
    if args.quick:
        args.budget, args.min_reps, args.max_reps = min(args.budget, 0.3), 3, 20
        shapes = {"llava-1.5 (D=1024)": (1, 576, 1024), "4 images (D=256)": (4, 576, 256)}
        if gpu:
            shapes.update({"llava-1.5 (D=4096)": (1, 576, 4096), "video 8 frames": (1, 4608, 4096)})
    elif args.shapes:
        shapes = {s: parse_shape(s) for s in args.shapes.split(",")}
    elif gpu:
        shapes = dict(LLAVA_SHAPES)
    else:  # the CPU Gram alone takes minutes at video sizes
        shapes = {n: s for n, s in LLAVA_SHAPES.items() if s[0] * s[1] <= 4608}
    default_dtype = "fp16" if gpu else "fp32"
    dtypes = args.dtypes.split(",") if args.dtypes else None
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else None
    for d in dtypes or []:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    cases = []
    for n, (name, shape) in enumerate(shapes.items()):
        first = n == 0
        case_dtypes = dtypes or (list(DTYPES) if first and not args.quick else [default_dtype])
        case_ratios = ratios or ([0.05, 0.1, 0.25, 0.5] if first and not args.quick else [0.1])
        for dtype in case_dtypes:
            for ratio in case_ratios:
                cases.append((name, shape, ratio, dtype))
    return cases


def graph_replay(fn, x):
    """Captures fn(x) once; returns a callable that replays it (input fixed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x)  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return lambda _x: graph.replay()


def summarize(times):
    # "inclusive": percentiles stay within the measured range (the default extrapolates).
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return {"median_us": statistics.median(times), "p10_us": q[0], "p90_us": q[-1], "reps": len(times)}


def run_case(name, shape, ratio, dtype_name, args, progress):
    b, m, d = shape
    k = divprune_ext.keep_count(m, ratio)
    gen = torch.Generator(device=args.device).manual_seed(0)
    # Several inputs to rotate over: never time on one cache-resident buffer.
    copies = 4 if b * m * d * 2 * 4 < 2**31 else 2
    inputs = [torch.randn(shape, generator=gen, device=args.device).to(DTYPES[dtype_name]) for _ in range(copies)]
    if b == 1:
        inputs = [x[0] for x in inputs]
    rows = []
    picks = {}
    for impl in args.impls:
        if impl == "seed loop" and (b > 1 or m > args.seed_max_m):
            continue
        fn = IMPLEMENTATIONS[impl]
        progress(f"{name} {dtype_name} keep {ratio:g}: {impl}")
        labels = [impl]
        if args.graph and args.device == "cuda" and impl != "seed loop":
            labels.append(impl + " (graph)")
        for label in labels:
            row = {"case": name, "shape": f"{b}x{m}x{d}", "B": b, "M": m, "D": d, "k": k, "keep_ratio": ratio,
                   "dtype": dtype_name, "device": args.device, "impl": label}
            try:  # one failing implementation must not lose the others' results
                if label == impl:
                    call = lambda x, fn=fn: fn(x, k)  # noqa: E731
                    if impl in SELECTIONS:
                        picks[impl] = call(inputs[0]).cpu()
                else:
                    call = graph_replay(lambda x, fn=fn: fn(x, k), inputs[0])
                row.update(summarize(time_us(call, inputs, args.device, args.budget, args.min_reps, args.max_reps)))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"\n({label} failed on {name}: {row['error']})", file=sys.stderr)
            rows.append(row)
    reference_time = next((r["median_us"] for r in rows if r["impl"] == "reference" and "error" not in r), None)
    for row in rows:
        timed = reference_time and "error" not in row
        row["speedup_vs_reference"] = reference_time / row["median_us"] if timed else None
        base = row["impl"].removesuffix(" (graph)")
        row["same_picks_as_reference"] = (torch.equal(picks[base], picks["reference"])
                                          if "reference" in picks and base in picks else None)
    return rows


def environment(device):
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
           "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    return env


def format_table(rows):
    header = ["case", "B x M x D", "k", "dtype", "implementation", "median us", "p10-p90 us", "vs reference", "same picks"]
    lines = [header]
    for r in rows:
        speedup = f"{r['speedup_vs_reference']:.1f}x" if r["speedup_vs_reference"] else "-"
        same = {True: "yes", False: "no (near-tie)", None: "-"}[r["same_picks_as_reference"]]
        if "error" in r:
            timing = ["failed", r["error"][:40]]
        else:
            timing = [f"{r['median_us']:,.1f}", f"{r['p10_us']:,.0f}-{r['p90_us']:,.0f}"]
        lines.append([r["case"], r["shape"], str(r["k"]), r["dtype"], r["impl"], *timing, speedup, same])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return None
    timed = [r for r in rows if "error" not in r]
    chosen = [r for r in timed if r["B"] == 1 and r["D"] == 4096 and r["keep_ratio"] == 0.1]
    if not chosen:
        chosen = [r for r in timed if r["B"] == 1]
    dtype = chosen[0]["dtype"] if chosen else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in dict.fromkeys(r["impl"] for r in chosen):
        pts = sorted((r["M"], r["median_us"]) for r in chosen if r["impl"] == impl and r["dtype"] == dtype)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("visual tokens M (keep 10%)")
    ax.set_ylabel("time per call (us)")
    device = rows[0]["device"] if rows else "?"
    ax.set_title(f"DivPrune selection, B=1, {dtype}, {device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    args = parse_args(argv)
    cases = build_cases(args)
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for n, case in enumerate(cases, 1):
        def progress(what, n=n):
            bar = "#" * (20 * n // len(cases))
            print(f"\r[{bar:<20}] {n}/{len(cases)} {what[:70]:<70}", end="", file=sys.stderr, flush=True)
        rows.extend(run_case(*case, args, progress))
    print(file=sys.stderr)
    result = {"environment": environment(args.device), "results": rows}
    print(format_table(rows))
    if args.e2e:
        from bench.e2e import llava_prefill_benchmark, prefill_benchmark
        for key, benchmark in (("end_to_end", prefill_benchmark), ("llava_prefill", llava_prefill_benchmark)):
            try:  # a failure here must not lose the microbenchmark results
                result[key] = benchmark(args.device)
            except Exception as e:  # noqa: BLE001
                print(f"({key} failed: {type(e).__name__}: {e})")
                result[key] = {"error": f"{type(e).__name__}: {e}"}
    json_path = os.path.join(args.out_dir, "bench_results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {json_path}")
    summary_path = os.path.join(args.out_dir, "bench_summary.md")
    with open(summary_path, "w") as f:
        f.write(markdown_summary(result))
    print(f"wrote {summary_path}")
    if not args.no_plot:
        png = plot(rows, os.path.join(args.out_dir, "bench_time_vs_m.png"))
        if png:
            print(f"wrote {png}")
