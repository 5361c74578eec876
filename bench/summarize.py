"""A short markdown summary of a bench_results.json, for bench/results/ and the README.

    python -m bench.summarize bench/out/bench_results.json > bench/results/<machine>/summary.md

`python -m bench` also writes it next to the JSON as bench_summary.md.
"""
import json
import sys


def format_time(us):
    if us < 1e3:
        return f"{us:.1f} µs"
    if us < 1e6:
        return f"{us / 1e3:.2f} ms" if us < 1e4 else f"{us / 1e3:.1f} ms"
    return f"{us / 1e6:.2f} s"


def headline_rows(results):
    """Keep-10% cases in the dtype that most of them use (fp16 on a GPU run, fp32 on a CPU run)."""
    at_10 = [r for r in results if r["keep_ratio"] == 0.1]
    dtypes = [r["dtype"] for r in at_10]
    dtype = max(dict.fromkeys(dtypes), key=dtypes.count) if dtypes else None
    return [r for r in at_10 if r["dtype"] == dtype], dtype


def machine(env):
    if env.get("device") == "cuda":
        return f"{env.get('gpu', 'GPU')} ({env.get('sm_count', '?')} SMs), torch {env['torch']}, CUDA {env['cuda']}"
    return f"{env.get('cpu', 'CPU')} CPU, {env.get('cpu_threads', '?')} threads, torch {env['torch']}"


def cell(row):
    if row is None:
        return "—"
    return "failed" if "error" in row else format_time(row["median_us"])


def markdown_summary(result):
    env, results = result["environment"], result["results"]
    rows, dtype = headline_rows(results)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = [f"# DivPrune selection: {machine(env)}, {env['date'][:10]}", "",
             f"Median time per call, {dtype}, keep 10% (p10–p90 and every other case in bench_results.json).", "",
             "| B×M×D (k) | " + " | ".join(impls) + " | divprune_ext vs reference |",
             "| --- | " + " | ".join("---" for _ in impls) + " | --- |"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by_impl = {r["impl"]: r for r in rows if r["shape"] == shape}
        first = next(iter(by_impl.values()))
        cells = [cell(by_impl.get(i)) for i in impls]
        op = by_impl.get("divprune_ext", {})
        speedup = f"{op['speedup_vs_reference']:.1f}×" if op.get("speedup_vs_reference") else "—"
        lines.append(f"| {shape.replace('x', '×')} ({first['k']}) | " + " | ".join(cells) + f" | {speedup} |")

    differing = [r for r in results if r.get("same_picks_as_reference") is False]
    if differing:
        lines += ["", f"{len(differing)} timed case(s) picked differently from the reference (near-ties within "
                      "float rounding; the tests bound them): " +
                  ", ".join(sorted({f"{r['shape']} {r['dtype']} keep {r['keep_ratio']:g}" for r in differing}))]
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{r['impl']} on {r['shape']} {r['dtype']}: {r['error']}"
                                             for r in failed)]

    e2e = result.get("end_to_end")
    if isinstance(e2e, list) and e2e:
        lines += ["", "## End to end: 7B LLaMA-shaped prefill (random weights, fp16), keep 10% of visual tokens", "",
                  "| visual + text tokens | prefill, all tokens | prefill, pruned | select | select / pruned prefill |",
                  "| --- | --- | --- | --- | --- |"]
        for r in e2e:
            lines.append(f"| {r['visual_tokens']} + {r['text_tokens']} | {r['prefill_full_ms']:.1f} ms | "
                         f"{r['prefill_pruned_ms']:.1f} ms | {format_time(r['select_ms'] * 1e3)} | "
                         f"{r['select_pct_of_pruned_prefill']:.2f}% |")
    llava = result.get("llava_prefill")
    if isinstance(llava, dict) and "error" not in llava:
        lines += ["", f"{llava['model']}, {llava['visual_tokens']} image + {llava['text_tokens']} text tokens, "
                      f"keep {llava['kept']}: unmodified {llava['prefill_full_ms']:.1f} ms, with "
                      f"`prune_inputs` {llava['prefill_with_helper_ms']:.1f} ms (LLM part alone "
                      f"{llava['llm_prefill_pruned_ms']:.1f} ms)."]
    for key in ("end_to_end", "llava_prefill"):
        if isinstance(result.get(key), dict) and "error" in result[key]:
            lines += ["", f"{key} failed: {result[key]['error']}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m bench.summarize bench_results.json")
    with open(argv[0]) as f:
        sys.stdout.write(markdown_summary(json.load(f)))


if __name__ == "__main__":
    main()
