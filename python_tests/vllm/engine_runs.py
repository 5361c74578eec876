"""Runs one vLLM engine on a list of jobs and writes the results as JSON (the tests' subprocess).

``python -P engine_runs.py SPEC.json OUT.json`` (vLLM logs to stdout, so the results go to a file); the spec: ``{"path": checkpoint, "engine": {LLM kwargs},
"jobs": {name: job}}``. A job is one of

- ``{"kind": "generate", "requests": [request, ...]}``: one ``LLM.generate`` call on all of them
  (they are batched together); ``"sequential": true`` makes one call per request, in order.
  Result per request: generated ``tokens``, ``prompt`` token ids, ``cached`` prefix tokens.
- ``{"kind": "error", "requests": [...]}``: the call must fail; result: ``"Type: message"``.
- ``{"kind": "process", "requests": [...]}``: only vLLM's multimodal processor (the renderer):
  per request the items' ``hashes`` and placeholder ``lengths``.
- ``{"kind": "embeds", "request": request}`` (LLaVA): the image given as its projected features
  (``image_embeds``, computed with transformers from the same checkpoint) instead of pixels.

A request: ``{"prompt": [parts], "ratio": r or null, "seed": s}`` (see ``harness``).
"""
import json
import sys

import harness


def _request(path, spec):
    return harness.vllm_request(path, spec["prompt"], spec.get("ratio"), spec.get("seed", 0))


def _outputs(results):
    return [{"tokens": list(o.outputs[0].token_ids), "prompt": list(o.prompt_token_ids),
             "cached": o.num_cached_tokens or 0} for o in results]


def run(spec):
    from vllm import LLM, SamplingParams

    path = spec["path"]
    llm = LLM(model=path, **{**harness.ENGINE, **spec.get("engine", {})})
    params = SamplingParams(temperature=0, max_tokens=harness.MAX_NEW_TOKENS, ignore_eos=True)
    out = {}
    for name, job in spec["jobs"].items():
        kind = job.get("kind", "generate")
        if kind == "generate":
            requests = [_request(path, r) for r in job["requests"]]
            if job.get("sequential"):
                out[name] = [_outputs(llm.generate([r], params, use_tqdm=False))[0] for r in requests]
            else:
                out[name] = _outputs(llm.generate(requests, params, use_tqdm=False))
        elif kind == "error":
            try:
                llm.generate([_request(path, r) for r in job["requests"]], params, use_tqdm=False)
                out[name] = None
            except Exception as e:  # noqa: BLE001  (the test reads the type and message)
                out[name] = f"{type(e).__name__}: {e}"
        elif kind == "process":
            renderer = llm.llm_engine.renderer
            tokenizer = llm.get_tokenizer()
            out[name] = []
            for r in job["requests"]:
                request = _request(path, r)
                ids = tokenizer.encode(request["prompt"], add_special_tokens=False)
                mm = renderer._process_multimodal(ids, request["multi_modal_data"], None,
                                                  request.get("mm_processor_kwargs"))
                out[name].append({"hashes": {m: list(h) for m, h in mm["mm_hashes"].items()},
                                  "lengths": {m: [p.length for p in ps] for m, ps in mm["mm_placeholders"].items()}})
        elif kind == "embeds":
            import torch
            r = job["request"]
            request = _request(path, r)
            model, processor = harness.hf_model(path)
            pixels = processor.image_processor(images=harness.media(r["prompt"], r.get("seed", 0))["image"],
                                               return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                features = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                          vision_feature_select_strategy="default")
            features = getattr(features, "pooler_output", features)
            request["multi_modal_data"] = {"image": torch.stack(list(features)).float()}
            out[name] = _outputs(llm.generate([request], params, use_tqdm=False))
        else:
            raise ValueError(f"unknown job kind {kind!r}")
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        results = run(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
