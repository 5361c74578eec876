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


def llama_7b_config():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=32768)


def _build(model_class, config, device="cuda", dtype=torch.float16):
    """Random weights, created directly on the device in `dtype`."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def build_llama_7b(device="cuda"):
    from transformers import LlamaForCausalLM
    return _build(LlamaForCausalLM, llama_7b_config(), device)


def build_llava_15_7b(device="cuda"):
    """LLaVA-1.5-7B's shapes: CLIP ViT-L/14 at 336 px (576 tokens), a 2-layer projector, LLaMA-7B."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=llama_7b_config().to_dict(),
                         image_token_id=32000, vision_feature_layer=-2)
    return _build(LlavaForConditionalGeneration, config, device)


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


@torch.no_grad()
def llava_prefill_benchmark(device="cuda", keep_ratio=0.1, text_tokens=64):
    """LLaVA-1.5-7B-shaped prefill: the unmodified model vs divprune_ext.llava.prune_inputs + the model."""
    if device != "cuda":
        return None
    try:
        from divprune_ext import llava
        model = build_llava_15_7b()
    except ImportError:
        print("(LLaVA prefill skipped: pip install transformers)")
        return None
    image_token = model.config.image_token_id
    ids = torch.randint(1, 32000, (1, text_tokens + 576), device=device)
    ids[0, 8:8 + 576] = image_token
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, 336, 336, device=device, dtype=torch.float16)}

    full_ms = _median_ms(lambda: model(**inputs, logits_to_keep=1))
    helper_ms = _median_ms(lambda: model(**llava.prune_inputs(model, **inputs, keep_ratio=keep_ratio),
                                         logits_to_keep=1))
    pruned = llava.prune_inputs(model, **inputs, keep_ratio=keep_ratio)
    llm_only_ms = _median_ms(lambda: model(**pruned, logits_to_keep=1))
    row = {"model": "LLaVA-1.5-7B shapes (random weights, fp16)", "visual_tokens": 576, "text_tokens": text_tokens,
           "kept": divprune_ext.keep_count(576, keep_ratio), "prefill_full_ms": full_ms,
           "prefill_with_helper_ms": helper_ms, "llm_prefill_pruned_ms": llm_only_ms}
    print("\nLLaVA-1.5-7B-shaped prefill (vision tower + LLM), keep 10% of 576 image tokens")
    print(f"  unmodified: {full_ms:.1f} ms   with prune_inputs: {helper_ms:.1f} ms "
          f"(LLM part alone {llm_only_ms:.1f} ms)")
    del model
    torch.cuda.empty_cache()
    return row
