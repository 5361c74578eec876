"""Per-call timing shared by the microbenchmarks and the end-to-end section."""
import time

import torch


def time_us(fn, inputs, device, budget=1.0, min_reps=5, max_reps=200, warmup=2):
    """Per-call times of fn(x) in microseconds, rotating over `inputs`.

    CUDA events on a GPU (no host clock in the figure), perf_counter on the CPU.
    Runs at least `min_reps` times, then more while under `budget` seconds and
    `max_reps` runs.
    """
    for n in range(warmup):
        fn(inputs[n % len(inputs)])
    if device == "cuda":
        torch.cuda.synchronize()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < max_reps):
        x = inputs[len(times) % len(inputs)]
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e6)
    return times
