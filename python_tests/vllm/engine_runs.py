"""Runs one vLLM engine on a list of jobs and writes the results as JSON (the tests' subprocess).

``python -P engine_runs.py SPEC.json OUT.json`` (vLLM logs to stdout, so the results go to a file); the spec: ``{"path": checkpoint, "engine": {LLM kwargs},
"jobs": {name: job}}``. A job is one of

- ``{"kind": "generate", "requests": [request, ...]}``: one ``LLM.generate`` call on all of them
  (they are batched together); ``"sequential": true`` makes one call per request, in order.
  Result per request: generated ``tokens``, ``prompt`` token ids, ``cached`` prefix tokens.
- ``{"kind": "error", "requests": [...]}``: the call must fail; result: ``"Type: message"``.
- ``{"kind": "process", "requests": [...]}``: only vLLM's multimodal processor (the renderer):
  per request the items' ``hashes`` and placeholder ``lengths``.
- ``{"kind": "embeds", "request": request}``: its one image given as its features as they enter
  the LLM (``image_embeds``, computed with transformers from the same checkpoint; Qwen-VL: with
  its ``image_grid_thw``, Qwen3-VL: each row followed by its deepstack features) instead of pixels.
- ``{"kind": "dummy", "modality": m}``: the processor's profiling input for one item of ``m``:
  its placeholders' embedding counts (``lengths``) and the family's ``max`` tokens per item.

- ``{"kind": "profile"}``: the model runner's own ``profile_run`` (what sizes the KV cache on a GPU;
  the CPU runner skips it in eager mode), in each worker.
- ``{"kind": "spy"}``: what the spy (below) recorded since the last read, per worker.

A request: ``{"prompt": [parts], "ratio": r or null, "seed": s}`` (see ``harness``).

``"spy": true`` in the spec: each worker records every ``embed_multimodal`` call (its items'
ratios and unpruned token counts ``n``), every call of the family's encoder inside it (rows per
item) and every ``select_varlen`` call (lengths, k); ``out["profiled"]``: the tokens the plugin
takes as the profiled work of one call.

``"replay_positions": true`` in the spec: CUDA-graph replay semantics for the positions, on the
CPU. A replayed graph reads the buffers it captured, the runner's own, not the tensors the
model class passes; so the language model's decoder is handed the runner's position buffer
(the same number of columns) whatever ``positions`` the plugin's ``forward`` passes it. Anything
the plugin puts into a tensor of its own is lost, as it would be under a real replay.
"""
import json
import sys

import harness


def _request(path, spec):
    return harness.vllm_request(path, spec["prompt"], spec.get("ratio"), spec.get("seed", 0))


def _outputs(results):
    return [{"tokens": list(o.outputs[0].token_ids), "prompt": list(o.prompt_token_ids),
             "cached": o.num_cached_tokens or 0} for o in results]


def image_embeds(path, spec):
    """The features transformers writes into the LLM for the request's one image."""
    import torch
    model, processor = harness.hf_model(path)
    inputs = processor.image_processor(images=harness.media(spec["prompt"], spec.get("seed", 0))["image"],
                                       return_tensors="pt")
    with torch.no_grad():
        if "image_grid_thw" in inputs:  # Qwen-VL
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
            # Qwen3-VL: each row also carries its deepstack features, as vLLM's vision tower writes them
            features = torch.cat([out.pooler_output[0]] + [layer[0] for layer in
                                                           getattr(out, "deepstack_features", None) or ()], dim=1)
            return {"image_embeds": features.float(), "image_grid_thw": inputs["image_grid_thw"]}  # (n, H), (1, 3)
        extra = {}
        if "image_sizes" in inputs:  # LLaVA-NeXT / OneVision: anyres tiles + newline rows, per image
            extra["image_sizes"] = inputs["image_sizes"]
            if hasattr(model.config, "vision_aspect_ratio"):  # OneVision
                extra.update(batch_num_images=inputs.get("batch_num_images", [len(inputs["image_sizes"])]),
                             vision_aspect_ratio=model.config.vision_aspect_ratio)
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default", **extra)
    features = getattr(features, "pooler_output", features)  # one (n, H) per image, a tensor or a list
    if "num_patches" in inputs:  # InternVL: (tiles, tokens, H), the image's tiles one after the other
        return features.flatten(0, 1).unsqueeze(0).float()
    return features[0].unsqueeze(0).float()  # (1, n, H): one image


def runner_positions(runner):
    """The model runner's own M-RoPE position buffer: V1 ``mrope_positions``, V2 ``RopeState.positions``."""
    if getattr(runner, "mrope_positions", None) is not None:
        return runner.mrope_positions.gpu
    return runner.model_state.rope_state.positions


def replay_positions(worker):
    """(Runs in each worker, through ``collective_rpc``.) The decoder reads the runner's position buffer."""
    runner = worker.model_runner
    buffer = runner_positions(runner)
    decoder = runner.get_model().get_language_model().model

    forward = decoder.forward

    def replayed(*args, **kwargs):  # an instance attribute: vLLM's compile wrapper calls self.forward
        if "positions" in kwargs:
            kwargs["positions"] = buffer[:, :kwargs["positions"].shape[-1]]
        else:
            args = (args[0], buffer[:, :args[1].shape[-1]], *args[2:])
        return forward(*args, **kwargs)

    decoder.forward = replayed
    return type(decoder).__name__


def spy(worker):
    """(Runs in each worker, through ``collective_rpc``.) Install the recorder of ``"spy": true``."""
    import divprune_ext
    from divprune_ext.vllm.core import ints_of, ratios_from_bits, ratio_field, tokens_field

    model = worker.model_runner.get_model()
    log = worker.divprune_spy = {"calls": [], "encoded": [], "selected": []}
    embed, encode, select = model.embed_multimodal, model._encode, divprune_ext.select_varlen

    def embedded(**kwargs):  # instance attributes: the runner and the plugin look them up on the model
        for m in ("image", "video"):
            if ratio_field(m) in kwargs:
                log["calls"].append({"modality": m, "ratios": ratios_from_bits(kwargs[ratio_field(m)]),
                                     "tokens": ints_of(kwargs[tokens_field(m)]) if tokens_field(m) in kwargs else None})
        return embed(**kwargs)

    def encoded(modality, ratios, kwargs):
        out = encode(modality, ratios, kwargs)
        log["encoded"].append({"modality": modality, "rows": [len(x) for x in out]})
        return out

    def selected(x, lengths, k=None, **kwargs):
        log["selected"].append({"lengths": list(lengths), "k": list(k)})
        return select(x, lengths, k, **kwargs)

    model.embed_multimodal, model._encode, divprune_ext.select_varlen = embedded, encoded, selected
    return model.profiled_tokens()


def read_spy(worker):
    log = dict(worker.divprune_spy)
    for key in worker.divprune_spy:
        worker.divprune_spy[key] = []
    return log


def profile(worker):
    worker.model_runner.profile_run()


def run(spec):
    from vllm import LLM, SamplingParams

    path = spec["path"]
    settings = harness.processor_kwargs(path)  # the family's processor settings, as transformers gets them
    llm = LLM(model=path, **{**harness.ENGINE, "dtype": harness.dtype(path),
                             **({"mm_processor_kwargs": settings} if settings else {}), **spec.get("engine", {})})
    params = SamplingParams(temperature=0, max_tokens=harness.MAX_NEW_TOKENS, ignore_eos=True)
    out = {}
    if spec.get("replay_positions"):
        out["replay_positions"] = llm.collective_rpc(replay_positions)
    if spec.get("spy"):
        out["profiled"] = llm.collective_rpc(spy)[0]
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
            request = _request(path, job["request"])
            request["multi_modal_data"] = {"image": image_embeds(path, job["request"])}
            out[name] = _outputs(llm.generate([request], params, use_tqdm=False))
        elif kind == "dummy":
            processor = llm.llm_engine.renderer.mm_processor
            mm = processor.get_dummy_mm_inputs({job["modality"]: 1})
            info, modality = processor.info, job["modality"]
            if hasattr(info, f"get_max_{modality}_tokens"):
                most = getattr(info, f"get_max_{modality}_tokens")()
            elif hasattr(info, "get_num_crops"):  # Gemma 3: its largest image (pan-and-scan crops included)
                size = info.get_image_size_with_most_features()
                most = info.get_num_image_tokens(image_width=size.width, image_height=size.height,
                                                 processor=info.get_hf_processor(), mm_kwargs={})
            elif hasattr(info, "_compute_num_soft_tokens"):  # Gemma 4: its dummy image's soft tokens
                image = processor.dummy_inputs.get_dummy_mm_data(llm.llm_engine.model_config.max_model_len,
                                                                 {modality: 1})[modality][0]
                most = info._compute_num_soft_tokens(*image.size)
            elif modality == "video":  # LLaVA-NeXT-Video: its largest frames, as many as the dummy video has
                size = info.get_image_size_with_most_features()
                frames = info.get_num_frames_with_most_features(llm.llm_engine.model_config.max_model_len, {modality: 1})
                most = info.get_num_video_tokens(image_width=size.width, image_height=size.height, num_frames=frames)
            else:  # Mistral 3: its largest image's [IMG] tokens
                size = info.get_image_size_with_most_features()
                most = info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            out[name] = {"lengths": [p.get_num_embeds() for p in mm["mm_placeholders"][modality]], "max": most}
        elif kind == "profile":
            llm.collective_rpc(profile)
            out[name] = True
        elif kind == "spy":
            out[name] = llm.collective_rpc(read_spy)
        else:
            raise ValueError(f"unknown job kind {kind!r}")
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        results = run(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
