"""End to end: what pruning buys a 7B LLaMA-shaped prefill, and what the op costs.

The models are built from configs with random weights (no download), by default
LLaMA-7B / LLaVA-1.5-7B shapes in fp16 on the GPU (about 15 GB of GPU memory).
Visual tokens sit before a 64-token prompt, as in LLaVA. Tests run the same code
on the CPU with tiny configs (`config=`), so a GPU run never meets it untried.
"""
import statistics

import torch

import divprune_ext
from bench.timing import time_us


def _median_ms(fn, device, reps=10):
    return statistics.median(time_us(lambda _: fn(), [None], device, budget=0, min_reps=reps)) / 1e3


def llama_7b_config():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=32768)


def llava_15_7b_config():
    """LLaVA-1.5-7B's shapes: CLIP ViT-L/14 at 336 px (576 tokens), a 2-layer projector, LLaMA-7B."""
    from transformers import CLIPVisionConfig, LlavaConfig
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=llama_7b_config().to_dict(),
                       image_token_id=32000, vision_feature_layer=-2)


def _build(model_class, config, device, dtype):
    """Random weights, created directly on the device in `dtype`. Its memory goes
    back to torch's caching allocator when the caller returns, for the next model."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _skip_reason(device, config):
    if config is None and device != "cuda":
        return "it needs a GPU"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "pip install transformers"
    return None


@torch.no_grad()
def prefill_benchmark(device="cuda", visual_counts=(576, 2880, 4608), text_tokens=64, keep_ratio=0.1,
                      config=None, dtype=torch.float16, reps=10):
    """Prefill of a LLaMA-shaped model with all visual tokens vs the DivPrune-kept ones.

    Returns one dict per visual token count (None when skipped), with the op's
    time as a percentage of the pruned prefill.
    """
    reason = _skip_reason(device, config)
    if reason:
        print(f"(end-to-end prefill skipped: {reason})")
        return None
    from transformers import LlamaForCausalLM
    model = _build(LlamaForCausalLM, config or llama_7b_config(), device, dtype)
    hidden = model.config.hidden_size
    rows = []
    for n_visual in visual_counts:
        visual = torch.randn(1, n_visual, hidden, device=device, dtype=dtype)
        text = torch.randn(1, text_tokens, hidden, device=device, dtype=dtype)
        k = divprune_ext.keep_count(n_visual, keep_ratio)
        kept, _ = divprune_ext.prune(visual[0], k=k)

        def prefill(embeds):
            return lambda: model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

        full_ms = _median_ms(prefill(torch.cat([visual, text], dim=1)), device, reps)
        pruned_ms = _median_ms(prefill(torch.cat([kept[None], text], dim=1)), device, reps)
        op_ms = _median_ms(lambda: torch.ops.divprune.select(visual[0], k), device, reps=5 * reps)
        rows.append({"visual_tokens": n_visual, "text_tokens": text_tokens, "kept": k, "prefill_full_ms": full_ms,
                     "prefill_pruned_ms": pruned_ms, "select_ms": op_ms,
                     "select_pct_of_pruned_prefill": 100 * op_ms / pruned_ms})
    print(f"\nEnd to end: LLaMA-shaped prefill ({model.config.num_hidden_layers} layers, hidden {hidden}, "
          f"random weights, {str(dtype).removeprefix('torch.')}), keep {keep_ratio:g} of the visual tokens")
    print(f"{'tokens':>14}  {'full ms':>8}  {'pruned ms':>9}  {'select us':>9}  {'select % of pruned':>18}")
    for r in rows:
        print(f"{r['visual_tokens']:>6}+{r['text_tokens']:<7}  {r['prefill_full_ms']:>8.1f}  {r['prefill_pruned_ms']:>9.1f}"
              f"  {r['select_ms'] * 1e3:>9.1f}  {r['select_pct_of_pruned_prefill']:>17.2f}%")
    return rows


@torch.no_grad()
def llava_prefill_benchmark(device="cuda", keep_ratio=0.1, text_tokens=64, config=None, dtype=torch.float16,
                            reps=10):
    """LLaVA prefill (vision tower + LLM): the unmodified model vs
    divprune_ext.llava.prune_inputs + the model. Returns a dict, or None when skipped."""
    reason = _skip_reason(device, config)
    if reason:
        print(f"(LLaVA prefill skipped: {reason})")
        return None
    from transformers import LlavaForConditionalGeneration

    from divprune_ext import llava
    config = config or llava_15_7b_config()
    model = _build(LlavaForConditionalGeneration, config, device, dtype)
    vision = config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2  # the "default" strategy drops CLS
    image_token = config.image_token_id
    ids = torch.randint(1, min(image_token, config.text_config.vocab_size), (1, text_tokens + n_image), device=device)
    ids[0, 8:8 + n_image] = image_token
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)}

    full_ms = _median_ms(lambda: model(**inputs, logits_to_keep=1), device, reps)
    helper_ms = _median_ms(lambda: model(**llava.prune_inputs(model, **inputs, keep_ratio=keep_ratio),
                                         logits_to_keep=1), device, reps)
    pruned = llava.prune_inputs(model, **inputs, keep_ratio=keep_ratio)
    llm_only_ms = _median_ms(lambda: model(**pruned, logits_to_keep=1), device, reps)
    row = {"model": f"LLaVA ({config.text_config.num_hidden_layers} LLM layers, random weights, "
                    f"{str(dtype).removeprefix('torch.')})",
           "visual_tokens": n_image, "text_tokens": text_tokens, "kept": divprune_ext.keep_count(n_image, keep_ratio),
           "prefill_full_ms": full_ms, "prefill_with_helper_ms": helper_ms, "llm_prefill_pruned_ms": llm_only_ms}
    print(f"\n{row['model']} prefill, keep {keep_ratio:g} of {n_image} image tokens")
    print(f"  unmodified: {full_ms:.1f} ms   with prune_inputs: {helper_ms:.1f} ms "
          f"(LLM part alone {llm_only_ms:.1f} ms)")
    return row
