"""End to end: what pruning buys a 7B LLaMA-shaped prefill, and what the op costs.

The model is built from a config with random weights (no download), in fp16 on
the GPU. Visual tokens are random embeddings placed before a 64-token prompt,
as in LLaVA. Needs `transformers` and about 15 GB of GPU memory.
"""
import statistics

import torch

import divprune_ext


def _median_ms(fn, reps=10, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def build_llama_7b(device="cuda", dtype=torch.float16):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=32768)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


@torch.no_grad()
def prefill_benchmark(device="cuda", visual_counts=(576, 2880, 4608), text_tokens=64, keep_ratio=0.1):
    if device != "cuda":
        print("(end-to-end prefill skipped: it needs a GPU)")
        return None
    try:
        model = build_llama_7b()
    except ImportError:
        print("(end-to-end prefill skipped: pip install transformers)")
        return None
    hidden = model.config.hidden_size
    rows = []
    for n_visual in visual_counts:
        visual = torch.randn(1, n_visual, hidden, device=device, dtype=torch.float16)
        text = torch.randn(1, text_tokens, hidden, device=device, dtype=torch.float16)
        full = torch.cat([visual, text], dim=1)
        k = divprune_ext.keep_count(n_visual, keep_ratio)
        _, idx = divprune_ext.prune(visual[0], k=k, validate=False)
        pruned = torch.cat([visual[:, idx], text], dim=1)

        def prefill(embeds):
            return lambda: model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

        full_ms = _median_ms(prefill(full))
        pruned_ms = _median_ms(prefill(pruned))
        op_ms = _median_ms(lambda: torch.ops.divprune.select(visual[0], k), reps=50)
        rows.append({"visual_tokens": n_visual, "text_tokens": text_tokens, "kept": k, "prefill_full_ms": full_ms,
                     "prefill_pruned_ms": pruned_ms, "select_ms": op_ms,
                     "select_pct_of_pruned_prefill": 100 * op_ms / pruned_ms})
    print("\nEnd to end: 7B LLaMA-shaped prefill (random weights, fp16), keep 10% of visual tokens")
    print(f"{'tokens':>14}  {'full ms':>8}  {'pruned ms':>9}  {'select us':>9}  {'select % of pruned':>18}")
    for r in rows:
        print(f"{r['visual_tokens']:>6}+{r['text_tokens']:<7}  {r['prefill_full_ms']:>8.1f}  {r['prefill_pruned_ms']:>9.1f}"
              f"  {r['select_ms'] * 1e3:>9.1f}  {r['select_pct_of_pruned_prefill']:>17.2f}%")
    del model
    torch.cuda.empty_cache()
    return rows
