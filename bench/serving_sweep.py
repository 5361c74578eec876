"""The load sweep of ``python -m bench.serving --sweep``: keep ratios x concurrency under a closed loop.

One asynchronous engine (``AsyncLLM``, the engine ``vllm serve`` runs, without the HTTP server and its
JSON / tokenizer work, which would add the same cost at every ratio and measure the front-end more
than the plugin) and, per cell (ratio, concurrency), ``concurrency`` clients that each send their
next request as soon as their last one finished (a closed loop: at most ``concurrency`` requests in
the engine at once), until the cell's requests are done. Every request has its own image, so no
cache entry is reused. Per cell: requests/s (requests over the cell's wall time), time to first
token and end-to-end latency (p50, p99: nearest rank) from the client's send, prompt tokens and KV
blocks a request holds. Cells run concurrency by concurrency, the ratios of each in rotated order
(a busy machine slows them alike).
"""
import asyncio
import math
import statistics
import time
import uuid

CONCURRENCY = (1, 4, 16)


def percentile(values, q: float) -> float:
    """Nearest-rank percentile (p99 of fewer than 100 values is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def cell_requests(concurrency: int, per_client: int) -> int:
    return max(8, concurrency * per_client)


async def _cell(engine, make, ratio, concurrency, count, params):
    pending = make(ratio, count)
    ttft, e2e, prompts = [], [], []

    async def client():
        while pending:
            request = pending.pop()
            sent, first = time.perf_counter(), None
            async for out in engine.generate(request, params, request_id=uuid.uuid4().hex):
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.perf_counter()
            done = time.perf_counter()
            ttft.append(first - sent)
            e2e.append(done - sent)
            prompts.append(len(out.prompt_token_ids))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, ttft, e2e, prompts


def sweep(args, path: str, engine_kwargs: dict, make_requests, say) -> dict:
    """Run the sweep on the checkpoint at ``path``; return the rows (one per cell) and the engine facts."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    async def run():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=path, **engine_kwargs))
        try:
            config = engine.vllm_config
            block = config.cache_config.block_size
            params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
            say(f"sweep: warm-up ({len(args.ratios)} requests)")
            for r in args.ratios:
                await _cell(engine, make_requests, r, 1, 1, params)
            rows = []
            for n, concurrency in enumerate(args.concurrency):
                for ratio in args.ratios[n % len(args.ratios):] + args.ratios[:n % len(args.ratios)]:
                    count = cell_requests(concurrency, args.sweep_requests)
                    wall, ttft, e2e, prompts = await _cell(engine, make_requests, ratio, concurrency, count, params)
                    if len(set(prompts)) != 1:
                        raise RuntimeError(f"ratio {ratio}: prompts of different lengths {sorted(set(prompts))}")
                    row = {"keep_ratio": ratio, "concurrency": concurrency, "requests": count,
                           "wall_s": round(wall, 3), "requests_per_s": count / wall,
                           "ttft_ms_p50": percentile(ttft, 50) * 1e3, "ttft_ms_p99": percentile(ttft, 99) * 1e3,
                           "e2e_ms_p50": percentile(e2e, 50) * 1e3, "e2e_ms_p99": percentile(e2e, 99) * 1e3,
                           "ttft_ms_mean": statistics.fmean(ttft) * 1e3, "prompt_tokens": prompts[0],
                           "kv_blocks_per_request": math.ceil((prompts[0] + args.output_tokens) / block)}
                    rows.append(row)
                    say(f"sweep: ratio {ratio:g}, concurrency {concurrency}: {row['requests_per_s']:.2f} req/s, "
                        f"TTFT p50 {row['ttft_ms_p50']:,.0f} ms p99 {row['ttft_ms_p99']:,.0f} ms")
            engine_facts = {"block_size": block, "num_kv_blocks": config.cache_config.num_gpu_blocks,
                            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                            "max_num_seqs": config.scheduler_config.max_num_seqs}
            return rows, engine_facts
        finally:
            engine.shutdown()

    return asyncio.run(run())


def markdown(result: dict) -> str:
    env, s, e = result["environment"], result["settings"], result["engine"]
    lines = [f"vLLM {env['vllm']} load sweep ({result['model']['path']}); {env['device']}; {env['date']}. "
             f"Closed loop, {s['output_tokens']} output tokens a request, KV block {e['block_size']}, "
             f"max_num_batched_tokens {e['max_num_batched_tokens']}.", "",
             "| concurrency | keep ratio | prompt tokens | KV blocks / request | requests/s | TTFT p50 | TTFT p99 | "
             "end-to-end p50 | end-to-end p99 | requests |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(result["sweep"], key=lambda r: (r["concurrency"], -r["keep_ratio"])):
        lines.append(f"| {r['concurrency']} | {r['keep_ratio']:g} | {r['prompt_tokens']} | {r['kv_blocks_per_request']} | "
                     f"{r['requests_per_s']:.2f} | {r['ttft_ms_p50']:,.0f} ms | {r['ttft_ms_p99']:,.0f} ms | "
                     f"{r['e2e_ms_p50']:,.0f} ms | {r['e2e_ms_p99']:,.0f} ms | {r['requests']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str):
    from bench.serving import pyplot

    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import ScalarFormatter

    rows = result["sweep"]
    ratios = sorted({r["keep_ratio"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, ratio in zip(colors, ratios):
        mine = sorted((r for r in rows if r["keep_ratio"] == ratio), key=lambda r: r["concurrency"])
        x = [r["concurrency"] for r in mine]
        axes[0].plot(x, [r["ttft_ms_p50"] for r in mine], "o-", color=color, label=f"{ratio:g} p50")
        axes[0].plot(x, [r["ttft_ms_p99"] for r in mine], "s--", color=color, label=f"{ratio:g} p99")
        axes[1].plot(x, [r["requests_per_s"] for r in mine], "o-", color=color, label=f"keep {ratio:g}")
    for ax, title in zip(axes, ("time to first token (ms)", "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in rows}))
        ax.get_xaxis().set_major_formatter(ScalarFormatter())
        ax.set_xlabel("concurrent requests")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"DivPrune in vLLM {result['environment']['vllm']}: load sweep, {result['model']['path']}, "
                 f"{result['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
