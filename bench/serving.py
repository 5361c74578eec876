"""Serving benchmark: vLLM's offline engine with the divprune plugin, keep ratios side by side.

    python -m bench.serving                  # a random LLaVA-1.5-shaped model, CPU settings (minutes on 2 cores)
    python -m bench.serving --quick          # smoke run: narrow layers, few repeats
    python -m bench.serving --model llava-hf/llava-1.5-7b-hf          # a real checkpoint, on a GPU
    python -m bench.serving --family qwen2_vl                         # random Qwen2-VL shape, one 1260x1260
                                                                      # image a request: 2,025 visual tokens
    python -m bench.serving --family qwen2_vl --model Qwen/Qwen2-VL-7B-Instruct   # the same images, a real one
    python -m bench.serving --sweep                                   # load sweep: ratios x concurrency 1 / 4 / 16

Run it from the repository root with the Python that has vLLM and divprune_ext installed (the
plugin loads through the installed package's entry point). The committed CPU run used
HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false.

One engine (``vllm.LLM``), and per keep ratio (``mm_processor_kwargs={"divprune_keep_ratio": r}``
on every request):

- prompt tokens of a request (the image's k = keep_count(n, r) placeholders and the text) and the
  visual tokens among them;
- KV-cache blocks a request holds, ceil((prompt + output tokens) / block size), the block size and
  block count read from the engine, and how many such requests the KV cache holds at once;
- time to first token: one request with max_tokens=1, the wall clock of ``LLM.generate`` (image
  preprocessing, encoder on all n tokens, selection, prefill, one sampled token); median of
  --ttft-reps after --warmup;
- requests/s: --batch requests of --output-tokens tokens each in one ``LLM.generate`` call;
  median of --batch-reps.

Every request has its own image (seeded noise), so no encoder-, processor- or prefix-cache entry is
reused; each repeat runs all ratios, in rotated order, so a busy machine slows them alike. Without
--model the checkpoint is built in a temporary folder (random weights, nothing downloaded): CLIP
tower at 336 px, patch 14 (576 tokens an image), a 2-layer GELU projector and a Llama LLM, widths
and layer counts below; float32, eager. Writes serving_results.json, serving_summary.md and
serving.png to --out-dir and prints the table.

--family qwen2_vl: a random Qwen2-VL-shaped checkpoint instead (the vision tower's 14x14 patches
in full attention per image, merged 2x2 into the LLM's tokens, M-RoPE positions; widths below)
and one high-resolution image a request, 1260x1260 by default: 90 x 90 patches, 2,025 merged
visual tokens, all of which the encoder computes at every ratio. The checkpoint's image processor
takes images up to --image-size unresized (its max_pixels; vLLM's profile run encodes one such
image), and --max-model-len defaults to the unpruned prompt rounded up to 1024 (at least 4096).

--sweep: instead of the table above, the load sweep of ``bench/serving_sweep.py`` (its docstring
says how it measures): per keep ratio and concurrency (--concurrency, 1,4,16), requests/s, time to
first token and end-to-end latency p50 / p99, prompt tokens, KV blocks. Writes serving_sweep.json,
serving_sweep.md and serving_sweep.png.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def _prefer_installed_divprune():
    """``python -m`` puts the working directory (the repository root) first on sys.path, where
    ``divprune_ext/`` is the source tree: its ``_C`` may be built for another torch and it carries
    no plugin entry point. When an installed divprune_ext exists (the copy vLLM loads the plugin
    from), move the root to the end of sys.path: ``bench`` still imports from it, ``divprune_ext``
    is the installed copy, here and in the engine processes vLLM spawns (they
    inherit sys.path)."""
    import importlib.machinery

    def is_root(p):
        return os.path.realpath(p or os.curdir) == ROOT

    others = [p for p in sys.path if not is_root(p)]
    if importlib.machinery.PathFinder.find_spec("divprune_ext", others) is not None:
        sys.path[:] = others + [ROOT]
        # Pythons that vLLM starts with ``-m`` from this directory (its model-registry inspection,
        # run when its cache of a model class misses) would put the source tree first again.
        os.environ.setdefault("PYTHONSAFEPATH", "1")


_prefer_installed_divprune()

RATIOS = (1.0, 0.25, 0.1)
FAMILIES = ("llava", "qwen2_vl")
IMAGE_SIDE, PATCH = 336, 14  # LLaVA-1.5: (336 / 14)^2 = 576 tokens an image
# Qwen2-VL: 14x14 patches, 2x2 of them merged into one LLM token (28x28 pixels a token).
QWEN_SIDE, QWEN_QUICK_SIDE, QWEN_PATCH, QWEN_MERGE = 1260, 448, 14, 2  # 1260: 45^2 = 2,025 tokens; 448: 256
QUESTION = "describe the picture in a few words ."
# The random checkpoints. LLaVA: CLIP-L width, LLaVA-7B's head_dim and vocabulary, few layers.
# Qwen2-VL: Qwen2-VL-2B's LLM width (1536, 12 heads of 128, 2 KV heads, MLP 8960) and vocabulary
# (untied, as 7B), a vision tower narrowed to 320 (4 heads of 80, Qwen2-VL's head_dim; MLP 4x),
# 2 + 2 layers. The full-width tower (1280) would take ~10 s an image on one CPU core.
SHAPES = {
    "llava": {
        "default": dict(vision_hidden=1024, vision_mlp=4096, vision_heads=16, vision_layers=2,
                        hidden=2048, mlp=5504, heads=16, layers=2, vocab=32064),
        "quick": dict(vision_hidden=256, vision_mlp=1024, vision_heads=4, vision_layers=1,
                      hidden=256, mlp=688, heads=4, layers=1, vocab=32064),
    },
    "qwen2_vl": {
        "default": dict(vision_hidden=320, vision_mlp=1280, vision_heads=4, vision_layers=2,
                        hidden=1536, mlp=8960, heads=12, kv_heads=2, layers=2, vocab=151936),
        "quick": dict(vision_hidden=64, vision_mlp=256, vision_heads=2, vision_layers=1,
                      hidden=256, mlp=1024, heads=4, kv_heads=2, layers=1, vocab=151936),
    },
}
# (local random model, --model) defaults of the repeat counts; Qwen2-VL's random model: fewer,
# larger requests (thousands of tokens each).
DEFAULTS = {"warmup": (1, 2), "ttft_reps": (5, 10), "batch": (8, 64), "batch_reps": (3, 3), "output_tokens": (8, 8)}
DEFAULTS_QWEN_RANDOM = {"batch": 4}
QUICK = {"warmup": 1, "ttft_reps": 2, "batch": 2, "batch_reps": 1, "output_tokens": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a real checkpoint (hub id or folder) instead of the random one of --family")
    p.add_argument("--family", choices=FAMILIES, default="llava",
                   help="llava: random LLaVA-1.5 shape, 336x336 images (576 tokens); qwen2_vl: random Qwen2-VL "
                        "shape, 1260x1260 images (2,025 tokens; --quick: 448x448, 256). With --model: only "
                        "the default image size")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma list of keep ratios in (0, 1]")
    p.add_argument("--quick", action="store_true", help="smoke run: narrow random model, few repeats")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed single requests per ratio (1; --model: 2), then one untimed batch per ratio (0: none)")
    p.add_argument("--ttft-reps", type=int, default=None, help="timed single requests per ratio (5; --model: 10)")
    p.add_argument("--batch", type=int, default=None, help="requests in the throughput batch (8; random qwen2_vl: 4; --model: 64)")
    p.add_argument("--batch-reps", type=int, default=None, help="timed batches per ratio (3)")
    p.add_argument("--output-tokens", type=int, default=None, help="tokens each batch request generates (8)")
    p.add_argument("--image-size", default=None,
                   help=f"HxW of the input images (llava: {IMAGE_SIDE}x{IMAGE_SIDE}; qwen2_vl: "
                        f"{QWEN_SIDE}x{QWEN_SIDE}, --quick {QWEN_QUICK_SIDE}x{QWEN_QUICK_SIDE})")
    p.add_argument("--dtype", default=None, help="engine dtype (random model: float32; --model: auto)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="no CUDA graphs / compilation (random model: on; --model: vLLM's default, off)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="(random llava: 1024; random qwen2_vl: the unpruned prompt rounded up to 1024, at least "
                        "4096; --model: the checkpoint's)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="more vllm.LLM arguments, VALUE parsed as JSON if it parses "
                        "(e.g. gpu_memory_utilization=0.9, tensor_parallel_size=2); repeatable")
    p.add_argument("--vision-layers", type=int, default=None, help="random model: vision tower layers (2)")
    p.add_argument("--llm-layers", type=int, default=None, help="random model: LLM layers (2)")
    p.add_argument("--llm-hidden", type=int, default=None,
                   help="random model: LLM width (llava: 2048, MLP 2.6875x, heads of 128, as LLaVA-7B; "
                        "qwen2_vl: 1536, MLP 5.83x, heads of 128, 2 KV heads, as Qwen2-VL-2B)")
    p.add_argument("--sweep", action="store_true", help="the load sweep (ratios x --concurrency) instead")
    p.add_argument("--concurrency", default="1,4,16", help="--sweep: comma list of concurrent requests")
    p.add_argument("--sweep-requests", type=int, default=2,
                   help="--sweep: requests per client in a cell (at least 8 a cell)")
    p.add_argument("--out-dir", default=os.path.join("bench", "out", "serving"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios: not a comma list of numbers: {args.ratios!r}")
    if not args.ratios or not all(0.0 < r <= 1.0 for r in args.ratios):
        p.error(f"--ratios must be numbers in (0, 1], got {args.ratios}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error(f"--concurrency: not a comma list of integers: {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1 or args.sweep_requests < 1:
        p.error("--concurrency must be integers >= 1 and --sweep-requests >= 1")
    if args.image_size is None:
        side = IMAGE_SIDE if args.family == "llava" else QWEN_QUICK_SIDE if args.quick else QWEN_SIDE
        args.image_size = f"{side}x{side}"
    try:
        args.image_size = tuple(int(v) for v in args.image_size.lower().split("x"))
        assert len(args.image_size) == 2 and min(args.image_size) > 0
    except (ValueError, AssertionError):
        p.error(f"--image-size must be HxW, got {args.image_size!r}")
    real = args.model is not None
    for key, pair in DEFAULTS.items():
        if getattr(args, key) is None:
            if args.quick:
                setattr(args, key, QUICK[key])
            elif args.family == "qwen2_vl" and not real and key in DEFAULTS_QWEN_RANDOM:
                setattr(args, key, DEFAULTS_QWEN_RANDOM[key])
            else:
                setattr(args, key, pair[real])
    if args.ttft_reps < 1 or args.batch < 1 or args.batch_reps < 1 or args.output_tokens < 1 or args.warmup < 0:
        p.error("--ttft-reps, --batch, --batch-reps and --output-tokens must be >= 1, --warmup >= 0")
    extra = {}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--engine-arg must be KEY=VALUE, got {item!r}")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    args.engine_arg = extra
    return args


# ---------------------------------------------------------------------------------------------
# The random checkpoint
# ---------------------------------------------------------------------------------------------
def model_shape(args) -> dict:
    shape = dict(SHAPES[args.family]["quick" if args.quick else "default"])
    if args.vision_layers:
        shape["vision_layers"] = args.vision_layers
    if args.llm_layers:
        shape["layers"] = args.llm_layers
    if args.llm_hidden:
        if args.llm_hidden % (64 if args.family == "llava" else 128):
            raise SystemExit(f"--llm-hidden must be a multiple of {64 if args.family == 'llava' else 128}, "
                             f"got {args.llm_hidden}")
        if args.family == "llava":
            shape.update(hidden=args.llm_hidden, mlp=int(args.llm_hidden * 2.6875) // 16 * 16,
                         heads=max(1, args.llm_hidden // 128))
        else:
            heads = args.llm_hidden // 128
            shape.update(hidden=args.llm_hidden, mlp=int(args.llm_hidden * 35 / 6) // 64 * 64, heads=heads,
                         kv_heads=2 if heads % 2 == 0 else 1)
    return shape


def qwen_grid(size) -> tuple:
    """The merged-token grid (rows, columns) the Qwen2-VL image processor gives an image of ``size``
    (HxW) when it is within min / max_pixels: each side rounded to a multiple of 28."""
    unit = QWEN_PATCH * QWEN_MERGE
    return tuple(max(1, round(v / unit)) for v in size)


def describe_shape(family: str, shape: dict, image_size) -> str:
    if family == "llava":
        return (f"random LLaVA-1.5 shape: CLIP {shape['vision_layers']} x {shape['vision_hidden']} at {IMAGE_SIDE} "
                f"px / patch {PATCH}, LLM {shape['layers']} x {shape['hidden']} (heads of "
                f"{shape['hidden'] // shape['heads']}), vocabulary {shape['vocab']:,}")
    rows, cols = qwen_grid(image_size)
    return (f"random Qwen2-VL shape: vision {shape['vision_layers']} x {shape['vision_hidden']} (heads of "
            f"{shape['vision_hidden'] // shape['vision_heads']}), patch {QWEN_PATCH} merged {QWEN_MERGE}x{QWEN_MERGE}, "
            f"{image_size[0]}x{image_size[1]} images = {rows * QWEN_MERGE} x {cols * QWEN_MERGE} patches, "
            f"{rows * cols:,} tokens; LLM {shape['layers']} x {shape['hidden']} ({shape['heads']} heads of "
            f"{shape['hidden'] // shape['heads']}, {shape['kv_heads']} KV heads), vocabulary {shape['vocab']:,}")


def build_llava(directory: str, shape: dict) -> str:
    """A random LLaVA-1.5-shaped checkpoint with its processor, saved as vLLM loads it. Tokenizer,
    chat template and weight rename are the vLLM tests' (divprune_ext.testing.checkpoints)."""
    import torch
    import transformers

    from divprune_ext.testing import checkpoints

    tok = checkpoints.tokenizer(checkpoints.LLAVA_SPECIAL, checkpoints.LLAVA_TEMPLATE, pad_token="<pad>",
                                bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vision = transformers.CLIPVisionConfig(hidden_size=shape["vision_hidden"], intermediate_size=shape["vision_mlp"],
                                           num_hidden_layers=shape["vision_layers"],
                                           num_attention_heads=shape["vision_heads"], image_size=IMAGE_SIDE,
                                           patch_size=PATCH)
    text = transformers.LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
                                    num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                    num_key_value_heads=shape["heads"], vocab_size=max(shape["vocab"], len(tok)),
                                    max_position_embeddings=4096, tie_word_embeddings=False,
                                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id)
    config = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).float().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    image = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIDE},
                                            crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    processor = transformers.LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=PATCH,
                                            vision_feature_select_strategy="default",
                                            chat_template=checkpoints.LLAVA_TEMPLATE, num_additional_image_tokens=1)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    processor.save_pretrained(directory)
    checkpoints.rename_weights(directory, checkpoints.RENAMES["llava"])  # vision_tower.vision_model.*, as vLLM loads
    return directory


def build_qwen2_vl(directory: str, shape: dict, image_size) -> str:
    """A random Qwen2-VL-shaped checkpoint with its processor, saved as vLLM loads it. Tokenizer,
    chat template and special tokens are the vLLM tests' (divprune_ext.testing.checkpoints);
    the image processor takes images up to ``image_size`` without shrinking them (max_pixels)."""
    import torch
    import transformers

    from divprune_ext.testing import checkpoints

    tok = checkpoints.tokenizer(checkpoints.QWEN_SPECIAL, checkpoints.QWEN_TEMPLATE, pad_token="<|endoftext|>",
                                eos_token="<|im_end|>")
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    head_dim = shape["hidden"] // shape["heads"]
    # M-RoPE: the rotary half-dimension split over (t, h, w) as Qwen2-VL's [16, 24, 24] of 64
    mrope = [head_dim // 8, head_dim * 3 // 16, head_dim // 2 - head_dim // 8 - head_dim * 3 // 16]
    text = dict(hidden_size=shape["hidden"], intermediate_size=shape["mlp"], num_hidden_layers=shape["layers"],
                num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                vocab_size=max(shape["vocab"], len(tok)), max_position_embeddings=32768,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1000000.0})
    vision = dict(depth=shape["vision_layers"], embed_dim=shape["vision_hidden"], hidden_size=shape["hidden"],
                  mlp_ratio=shape["vision_mlp"] // shape["vision_hidden"], num_heads=shape["vision_heads"],
                  patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config).float().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    unit = QWEN_PATCH * QWEN_MERGE
    rows, cols = qwen_grid(image_size)
    size = {"shortest_edge": 4 * unit * unit, "longest_edge": rows * cols * unit * unit}  # min / max_pixels
    kwargs = dict(size=size, patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2)
    processor = transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**kwargs), tokenizer=tok,
        video_processor=transformers.Qwen2VLVideoProcessor(**kwargs, do_sample_frames=False),
        chat_template=checkpoints.QWEN_TEMPLATE)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    processor.save_pretrained(directory)
    return directory


def build(args, directory: str) -> str:
    if args.family == "llava":
        return build_llava(os.path.join(directory, "llava"), model_shape(args))
    return build_qwen2_vl(os.path.join(directory, "qwen2_vl"), model_shape(args), args.image_size)


# ---------------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------------
def load() -> list:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def check_plugin():
    from importlib.metadata import entry_points

    if not any(ep.value.startswith("divprune_ext") for ep in entry_points(group="vllm.general_plugins")):
        raise SystemExit("the divprune_ext vLLM plugin is not installed in this Python: install the package "
                         "(pip install '.[vllm]'; an in-place build has no entry point)")


def prompt_text(path: str) -> str:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"USER: <image>\n{QUESTION} ASSISTANT:"  # LLaVA-1.5's format


class Requests:
    """Requests at a ratio, each with an image never used before."""

    def __init__(self, text: str, size):
        self.text, self.size, self.seed = text, size, 0

    def __call__(self, ratio: float, count: int) -> list:
        from PIL import Image

        from divprune_ext.testing.checkpoints import pixels

        out = []
        for _ in range(count):
            self.seed += 1
            image = Image.fromarray(pixels(self.size, self.seed))
            out.append({"prompt": self.text, "multi_modal_data": {"image": image},
                        "mm_processor_kwargs": {"divprune_keep_ratio": ratio}})
        return out


def timed(llm, requests, params):
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def rotated(items, n):
    n %= len(items)
    return list(items[n:]) + list(items[:n])


def say(message: str):
    print(f"[serving {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def default_max_model_len(args):
    if args.model is not None:
        return None
    if args.family == "llava":
        return 1024
    rows, cols = qwen_grid(args.image_size)
    return max(4096, -(-(rows * cols + 64 + args.output_tokens) // 1024) * 1024)


def engine_kwargs(args) -> dict:
    real = args.model is not None
    limits = {"image": 1} if args.family == "llava" else {"image": 1, "video": 0}  # no video profile run
    kwargs = dict(dtype=args.dtype or ("auto" if real else "float32"), seed=0, limit_mm_per_prompt=limits)
    eager = args.enforce_eager if args.enforce_eager is not None else (None if real else True)
    if eager is not None:
        kwargs["enforce_eager"] = eager
    max_len = args.max_model_len or default_max_model_len(args)
    if max_len:
        kwargs["max_model_len"] = max_len
    kwargs.update(args.engine_arg)
    return kwargs


def measure(args, path: str) -> dict:
    from vllm import LLM

    kwargs = engine_kwargs(args)
    say(f"starting vLLM on {args.model or 'the random checkpoint'} ({kwargs})")
    t0 = time.perf_counter()
    llm = LLM(model=path, **kwargs)
    startup_s = time.perf_counter() - t0
    try:
        return _measure(args, llm, kwargs, startup_s)
    finally:
        # Stop the engine processes now: left to the interpreter's exit, they can keep it waiting forever.
        llm.llm_engine.engine_core.shutdown()


def _measure(args, llm, kwargs, startup_s) -> dict:
    import divprune_ext
    from vllm import SamplingParams

    config = llm.llm_engine.vllm_config
    cache = config.cache_config
    hf_config = config.model_config.hf_config
    image_token = getattr(hf_config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(hf_config, "image_token_index", None)
    make = Requests(prompt_text(config.model_config.model), args.image_size)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    batch = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    ratios = args.ratios
    rows = {r: {"keep_ratio": r, "ttft_s": [], "batch_s": []} for r in ratios}

    def record(ratio, outputs, tokens):
        row = rows[ratio]
        for out in outputs:
            prompt = len(out.prompt_token_ids)
            visual = sum(t == image_token for t in out.prompt_token_ids) if image_token is not None else None
            if row.setdefault("prompt_tokens", prompt) != prompt or row.setdefault("visual_tokens", visual) != visual:
                raise RuntimeError(f"ratio {ratio}: requests of different prompt lengths ({row['prompt_tokens']}, "
                                   f"{prompt}): the benchmark's requests should all have the same shape")
            if len(out.outputs[0].token_ids) != tokens:
                raise RuntimeError(f"ratio {ratio}: {len(out.outputs[0].token_ids)} output tokens, expected {tokens}")

    loads = {"start": load()}
    say(f"engine up in {startup_s:.0f} s; warm-up ({args.warmup} single requests and one batch per ratio)")
    for _ in range(args.warmup):
        for r in ratios:
            record(r, timed(llm, make(r, 1), first)[1], 1)
    for r in ratios if args.warmup else ():
        record(r, timed(llm, make(r, args.batch), batch)[1], args.output_tokens)
    loads["after_warmup"] = load()
    for rep in range(args.ttft_reps):
        for r in rotated(ratios, rep):
            seconds, outputs = timed(llm, make(r, 1), first)
            record(r, outputs, 1)
            rows[r]["ttft_s"].append(seconds)
        say(f"time to first token {rep + 1}/{args.ttft_reps}: " +
            ", ".join(f"{r}: {rows[r]['ttft_s'][-1] * 1e3:,.0f} ms" for r in ratios))
    loads["after_ttft"] = load()
    for rep in range(args.batch_reps):
        for r in rotated(ratios, rep):
            seconds, outputs = timed(llm, make(r, args.batch), batch)
            record(r, outputs, args.output_tokens)
            rows[r]["batch_s"].append(seconds)
        say(f"batch {rep + 1}/{args.batch_reps} ({args.batch} x {args.output_tokens} tokens): " +
            ", ".join(f"{r}: {rows[r]['batch_s'][-1]:,.1f} s" for r in ratios))
    loads["end"] = load()

    full = rows.get(1.0)
    for r, row in rows.items():
        row["kv_blocks_per_request"] = math.ceil((row["prompt_tokens"] + args.output_tokens) / cache.block_size)
        row["requests_in_kv_cache"] = (cache.num_gpu_blocks // row["kv_blocks_per_request"]
                                       if cache.num_gpu_blocks else None)
        row["ttft_ms_median"] = statistics.median(row["ttft_s"]) * 1e3
        row["batch_s_median"] = statistics.median(row["batch_s"])
        row["requests_per_s"] = args.batch / row["batch_s_median"]
        row["output_tokens_per_s"] = args.batch * args.output_tokens / row["batch_s_median"]
        if full is not None and full.get("visual_tokens") is not None:
            row["expected_visual_tokens"] = divprune_ext.keep_count(full["visual_tokens"], r)
    result = {
        "environment": environment(args),
        "model": {"path": args.model or {"llava": "random LLaVA-1.5 shape (built locally)",
                                         "qwen2_vl": "random Qwen2-VL shape (built locally)"}[args.family],
                  "family": args.family,
                  "shape": None if args.model else model_shape(args),
                  "architecture": (getattr(hf_config, "architectures", None) or [None])[0]},
        "engine": {**{k: v for k, v in kwargs.items()}, "startup_s": round(startup_s, 1),
                   "block_size": cache.block_size, "num_kv_blocks": cache.num_gpu_blocks,
                   "enable_prefix_caching": cache.enable_prefix_caching,
                   "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                   "max_num_seqs": config.scheduler_config.max_num_seqs},
        "settings": {"ratios": ratios, "warmup": args.warmup, "ttft_reps": args.ttft_reps, "batch": args.batch,
                     "batch_reps": args.batch_reps, "output_tokens": args.output_tokens,
                     "image_size": list(args.image_size), "prompt": make.text, "quick": args.quick},
        "load_1_5_15": loads,
        "results": [rows[r] for r in ratios],
    }
    return result


def environment(args) -> dict:
    import torch
    import transformers
    import vllm

    import divprune_ext

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({os.cpu_count()} cores{', ' + cpu_name() if cpu_name() else ''})"
    keys = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS",
            "VLLM_PLUGINS")
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
            "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
            "transformers": transformers.__version__,
            "divprune_ext": getattr(divprune_ext, "__version__", "?"),
            "env": {k: os.environ[k] for k in keys if k in os.environ}}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def check_pruned(result: dict):
    """The plugin must have pruned: fewer visual tokens below 1.0, exactly keep_count(n, r)."""
    wrong = [r for r in result["results"] if "expected_visual_tokens" in r
             and r["visual_tokens"] != r["expected_visual_tokens"]]
    if wrong:
        raise SystemExit("the prompts were not pruned as expected (is the divprune plugin loaded? VLLM_PLUGINS?): " +
                         ", ".join(f"ratio {r['keep_ratio']}: {r['visual_tokens']} visual tokens, expected "
                                   f"{r['expected_visual_tokens']}" for r in wrong))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 100 else f"{value:,.1f} ms"


def markdown(result: dict) -> str:
    rows, s, e = result["results"], result["settings"], result["engine"]
    full = next((r for r in rows if r["keep_ratio"] == 1.0), None)
    env, model = result["environment"], result["model"]
    shape = model["shape"]
    if shape:
        what = describe_shape(model.get("family", "llava"), shape, s["image_size"])
    else:
        what = model["path"]
    loads = result["load_1_5_15"]
    lines = [
        f"vLLM {env['vllm']} serving, {what}; {env['device']}, dtype {e['dtype']}, "
        f"{'eager' if e.get('enforce_eager') else 'CUDA graphs / compile as vLLM defaults'}; {env['date']}. "
        f"Load average (1 min) {loads['start'][0] if loads['start'] else '?'} at start, "
        f"{loads['end'][0] if loads['end'] else '?'} at the end.",
        "",
        f"| keep ratio | visual tokens | prompt tokens | KV blocks / request (block {e['block_size']}) | "
        f"requests the KV cache holds ({e['num_kv_blocks']} blocks) | time to first token | "
        f"requests/s ({s['batch']} × {s['output_tokens']} tokens) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ttft, rps = _ms(r["ttft_ms_median"]), f"{r['requests_per_s']:,.2f}"
        if full is not None and r is not full:
            ttft += f" ({full['ttft_ms_median'] / r['ttft_ms_median']:.1f}× less)"
            rps += f" ({r['requests_per_s'] / full['requests_per_s']:.1f}×)"
        lines.append(f"| {r['keep_ratio']:g} | {r['visual_tokens']} | {r['prompt_tokens']} | "
                     f"{r['kv_blocks_per_request']} | {r['requests_in_kv_cache']} | {ttft} | {rps} |")
    lines += ["", f"Time to first token: median of {s['ttft_reps']} single requests (max_tokens=1) per ratio after "
                  f"{s['warmup']} warm-up request(s) and a warm-up batch; requests/s: median of {s['batch_reps']} "
                  f"batches; every request its own {s['image_size'][0]}x{s['image_size'][1]} image; ratios "
                  f"interleaved. Engine start-up {e['startup_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot drawing to files, or None (saying so) where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return None
    return plt


def plot(result: dict, path: str):
    plt = pyplot()
    if plt is None:
        return None
    rows, s, e = result["results"], result["settings"], result["engine"]
    labels = [f"{r['keep_ratio']:g}" for r in rows]
    panels = [("prompt tokens", [r["prompt_tokens"] for r in rows], "{:,.0f}"),
              (f"KV blocks / request (block {e['block_size']})", [r["kv_blocks_per_request"] for r in rows], "{:,.0f}"),
              ("time to first token (ms)", [r["ttft_ms_median"] for r in rows], "{:,.0f}"),
              (f"requests/s ({s['batch']} × {s['output_tokens']} tokens)", [r["requests_per_s"] for r in rows],
               "{:,.2f}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, values, fmt) in zip(axes, panels):
        bars = ax.bar(labels, values, color=colors[:len(values)])
        for bar, v in zip(bars, values):
            ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("keep ratio")
        ax.margins(y=0.15)
    if not result["model"]["shape"]:
        name = result["model"]["path"]
    elif result["model"].get("family", "llava") == "llava":
        name = "random LLaVA-1.5 shape (576 tokens an image)"
    else:
        name = (f"random Qwen2-VL shape ({s['image_size'][0]}x{s['image_size'][1]} images, "
                f"{max(r['visual_tokens'] for r in rows):,} tokens)")
    fig.suptitle(f"DivPrune in vLLM {result['environment']['vllm']}: {name}, {result['environment']['device']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the table
    check_plugin()
    os.makedirs(args.out_dir, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="divprune-serving-") as tmp:
        if args.model:
            path = args.model
        else:
            say(f"building the random {args.family} checkpoint ({model_shape(args)})")
            path = build(args, tmp)
        if args.sweep:
            return run_sweep(args, path, started)
        result = measure(args, path)
    result["run_s"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(args.out_dir, "serving_results.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(args.out_dir, "serving_summary.md"), "w") as f:
        f.write(table)
    print(table)
    written = ["serving_results.json", "serving_summary.md"]
    if not args.no_plot and plot(result, os.path.join(args.out_dir, "serving.png")):
        written.append("serving.png")
    print(f"wrote {', '.join(written)} to {args.out_dir} ({result['run_s']:.0f} s in all)")
    check_pruned(result)


def run_sweep(args, path: str, started: float):
    from bench import serving_sweep

    kwargs = engine_kwargs(args)
    say(f"load sweep on {args.model or 'the random checkpoint'} ({kwargs}), concurrency {args.concurrency}")
    make = Requests(prompt_text(path), args.image_size)
    rows, engine = serving_sweep.sweep(args, path, kwargs, make, say)
    result = {"environment": environment(args),
              "model": {"path": args.model or f"random {args.family} shape (built locally)", "family": args.family,
                        "shape": None if args.model else model_shape(args)},
              "engine": {**kwargs, **engine},
              "settings": {"ratios": args.ratios, "concurrency": args.concurrency, "output_tokens": args.output_tokens,
                           "requests_per_client": args.sweep_requests, "image_size": list(args.image_size)},
              "sweep": rows, "run_s": round(time.perf_counter() - started, 1)}
    with open(os.path.join(args.out_dir, "serving_sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = serving_sweep.markdown(result)
    with open(os.path.join(args.out_dir, "serving_sweep.md"), "w") as f:
        f.write(table)
    print(table)
    written = ["serving_sweep.json", "serving_sweep.md"]
    if not args.no_plot and serving_sweep.plot(result, os.path.join(args.out_dir, "serving_sweep.png")):
        written.append("serving_sweep.png")
    print(f"wrote {', '.join(written)} to {args.out_dir} ({result['run_s']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
