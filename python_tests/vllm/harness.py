"""What the vLLM tests share: inputs, the transformers reference, and vLLM runs in a subprocess.

A prompt is a list of parts, ``"text"`` strings and ``("image", (height, width))`` /
``("video", (frames, height, width))`` items (lists after a JSON round trip). :func:`hf_generate` runs it through the checkpoint
with transformers (+ ``divprune_ext.hf.prune_inputs`` below ratio 1.0); :func:`vllm_request`
makes the matching ``LLM.generate`` input; :func:`run_engine` runs ``engine_runs.py`` in a fresh Python
(for the unpatched engine: ``VLLM_PLUGINS=""``). Images and videos are seeded noise with a
smooth gradient, so that tall, wide and repeated items differ.
"""
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from divprune_ext.testing import pixels  # noqa: F401  (the tests' images; harness.pixels for them)

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_NEW_TOKENS = 8
# DIVPRUNE_VLLM_CUDA_GRAPHS=1 (on a GPU): vLLM's compilation and CUDA graphs instead of eager mode
ENGINE = dict(dtype="float32", enforce_eager=os.environ.get("DIVPRUNE_VLLM_CUDA_GRAPHS") != "1",
              max_model_len=1024, seed=0)


def media(prompt: List[Any], seed: int = 0) -> Dict[str, list]:
    """{"image": [PIL images], "video": [uint8 (T, H, W, 3)]} of a prompt, in order."""
    from PIL import Image
    out: Dict[str, list] = {"image": [], "video": []}
    for n, part in enumerate(prompt):
        if not isinstance(part, str):  # (kind, shape); a list after a JSON round trip
            kind, shape = part
            array = pixels(shape, seed * 100 + n)
            out[kind].append(Image.fromarray(array) if kind == "image" else array)
    return out


def messages(prompt: List[Any]) -> list:
    content = []
    for part in prompt:
        content.append({"type": "text", "text": part} if isinstance(part, str) else {"type": part[0]})
    return [{"role": "user", "content": content}]


def video_metadata(frames: np.ndarray) -> dict:
    """The metadata vLLM's offline API takes with pre-sampled frames (2 fps)."""
    count = len(frames)
    return {"fps": 2.0, "duration": count / 2.0, "total_num_frames": count, "frames_indices": list(range(count)),
            "video_backend": "opencv", "do_sample_frames": False}


def prompt_text(path: str, prompt: List[Any]) -> str:
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(path)
    return processor.apply_chat_template(messages(prompt), add_generation_prompt=True, tokenize=False)


def vllm_request(path: str, prompt: List[Any], ratio: Optional[float] = None, seed: int = 0) -> dict:
    """The ``LLM.generate`` input for ``prompt``; ``ratio`` None sends no divprune_keep_ratio."""
    items = media(prompt, seed)
    data: Dict[str, Any] = {}
    if items["image"]:
        data["image"] = items["image"] if len(items["image"]) > 1 else items["image"][0]
    if items["video"]:
        data["video"] = [(v, video_metadata(v)) for v in items["video"]]
    request = {"prompt": prompt_text(path, prompt), "multi_modal_data": data}
    if ratio is not None:
        request["mm_processor_kwargs"] = {"divprune_keep_ratio": ratio}
    return request


# Processor settings both engines get (vLLM: the engine's mm_processor_kwargs), by architecture.
# Gemma 3: pan-and-scan, so that tall and wide images get crops (the default minimum crop, 256 px,
# leaves the test checkpoint's small images whole).
PROCESSOR_KWARGS = {"Gemma3ForConditionalGeneration": {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 28}}


def architecture(path: str) -> str:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["architectures"][0]


def processor_kwargs(path: str) -> Dict[str, Any]:
    return dict(PROCESSOR_KWARGS.get(architecture(path), {}))


# The dtype both engines run in, by architecture (else ENGINE's float32): vLLM's CPU Gated-DeltaNet
# layers (Qwen3.5) run in bfloat16 only ("CPU GDN attention requires BF16").
DTYPES = {"Qwen3_5ForConditionalGeneration": "bfloat16", "Qwen3_5MoeForConditionalGeneration": "bfloat16"}


def dtype(path: str) -> str:
    return DTYPES.get(architecture(path), ENGINE["dtype"])


_MODELS: Dict[str, Any] = {}


def hf_model(path: str):
    import transformers
    if path not in _MODELS:
        cls = getattr(transformers, architecture(path))
        model = cls.from_pretrained(path, dtype=getattr(torch, dtype(path))).eval()
        _MODELS[path] = (model, transformers.AutoProcessor.from_pretrained(path))
    return _MODELS[path]


def hf_inputs(path: str, prompt: List[Any], seed: int = 0) -> dict:
    from transformers.video_utils import VideoMetadata
    model, processor = hf_model(path)
    items = media(prompt, seed)
    kwargs: Dict[str, Any] = processor_kwargs(path)
    if items["image"]:
        kwargs["images"] = items["image"]
    if items["video"]:
        kwargs["videos"] = [list(v) for v in items["video"]]
        kwargs["video_metadata"] = [VideoMetadata(**{k: v for k, v in video_metadata(v).items()
                                                    if k in ("fps", "duration", "total_num_frames", "frames_indices")})
                                    for v in items["video"]]
        kwargs["do_sample_frames"] = False
    inputs = processor(text=[prompt_text(path, prompt)], return_tensors="pt", **kwargs)
    # Gemma 3: vLLM's CPU attention runs the image tokens causally (it has no bidirectional spans);
    # transformers does so without the token types that make them bidirectional.
    inputs.pop("token_type_ids", None)
    return inputs


_GENERATED: Dict[str, List[int]] = {}


def hf_generate(path: str, prompt: List[Any], ratio: float = 1.0, seed: int = 0,
                max_new_tokens: int = MAX_NEW_TOKENS) -> List[int]:
    """Greedy new tokens of transformers on ``prompt``, pruned with divprune_ext.hf below 1.0
    (computed once per checkpoint, prompt, ratio and seed: several engine variants compare with them)."""
    key = json.dumps([path, prompt, ratio, seed, max_new_tokens])
    if key not in _GENERATED:
        _GENERATED[key] = _hf_generate(path, prompt, ratio, seed, max_new_tokens)
    return list(_GENERATED[key])


@torch.no_grad()
def _hf_generate(path, prompt, ratio, seed, max_new_tokens) -> List[int]:
    import divprune_ext.hf
    model, _ = hf_model(path)
    inputs = dict(hf_inputs(path, prompt, seed))
    settings = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    if ratio == 1.0:
        out = model.generate(**inputs, **settings)
        return out[0, inputs["input_ids"].shape[1]:].tolist()
    pruned = divprune_ext.hf.prune_inputs(model, **inputs, keep_ratio=ratio)
    out = model.generate(**pruned, **settings)
    if "input_ids" in pruned:
        out = out[:, pruned["input_ids"].shape[1]:]
    return out[0].tolist()


def run_engine(spec: dict, workdir: str, *, plugins: bool = True, timeout: int = 900,
               env: Optional[Dict[str, str]] = None) -> Any:
    """Run ``engine_runs.py`` on ``spec`` in a fresh interpreter (vLLM spawns processes, and the
    plugin, once loaded, stays registered in a process); return its JSON.
    ``plugins=False``: the unpatched engine (``VLLM_PLUGINS=""``); ``env``: more environment variables."""
    import tempfile
    environment = dict(os.environ, **(env or {}))
    if not plugins:
        environment["VLLM_PLUGINS"] = ""
    environment["PYTHONPATH"] = HERE + os.pathsep + environment.get("PYTHONPATH", "")
    if spec.get("replay_positions") or spec.get("spy"):  # the hooks travel to the workers as pickled functions
        environment["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=workdir, delete=False) as f:
        json.dump(spec, f)
    result = f.name[:-len(".json")] + ".out.json"
    done = subprocess.run([sys.executable, "-P", os.path.join(HERE, "engine_runs.py"), f.name, result],
                          env=environment, capture_output=True, text=True, timeout=timeout, cwd=workdir)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM run failed ({done.returncode}):\n{done.stderr[-8000:]}")
    with open(result) as f:
        return json.load(f)
