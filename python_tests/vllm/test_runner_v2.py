"""The plugin's M-RoPE positions under Model Runner V2's own step code (``vllm/v1/worker/gpu/``),
without an engine: what GPUs run (0.32+) and the only runner of 0.34.

A V2 step, in its order (``GPUModelRunner.execute_model``): ``EncoderRunner.get_inputs_embeds``
calls the model's ``embed_input_ids`` and copies the result into the runner's embedding buffer;
then ``DefaultModelState.prepare_inputs`` refills the runner's position buffer
(``RopeState.positions``) from the request's prefill positions and hands the model a view of it;
then the model's ``forward``. A captured CUDA graph reads that buffer. The test runs vLLM's own
``get_inputs_embeds``, ``prepare_inputs`` and ``RopeState.get_positions`` on stand-in state; only
``RopeState.prepare_positions`` (a Triton kernel) is replaced by the same copy in torch. A pruned
image in two prefill chunks must reach the decoder, and stay in the runner's buffer, at the
positions vLLM gives the same tokens in the unpruned prompt.
"""
from types import SimpleNamespace

import torch

import divprune_ext
from divprune_ext.vllm.core import _ratio_bits
from mrope_stubs import MERGE, Stub, bare, feature
from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
from vllm.v1.worker.gpu.mm.rope import RopeState
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

TEXT, IMAGE = 1, 9


class TorchRopeState(RopeState):
    """vLLM's RopeState (its get_positions) with its Triton kernel written in torch."""

    def __init__(self, prefill_positions, max_num_tokens):
        self.num_dims = 3
        self.prefill_positions = prefill_positions  # (3, prefill length): one request
        self.positions = torch.full((3, max_num_tokens + 1), -1, dtype=torch.int64)

    def prepare_positions(self, idx_mapping, query_start_loc, prefill_lens, num_computed_tokens):
        start, end = int(num_computed_tokens[0]), int(num_computed_tokens[0]) + int(query_start_loc[1])
        self.positions[:, :end - start] = self.prefill_positions[:, start:end]


def test_v2_step_order_gives_the_decoder_the_unpruned_positions_of_the_kept_tokens():
    thw, ratio, before, after = (1, 2 * 6, 2 * 5), 0.25, 3, 4  # a 6 x 5 merged grid
    n = thw[1] * thw[2] // MERGE ** 2
    k = divprune_ext.keep_count(n, ratio)
    model = bare(Stub)
    torch.manual_seed(0)
    model.features = [torch.randn(n, 8)]
    kept, = model.embed_multimodal(image_grid_thw=torch.tensor([thw]), divprune_image_ratio=_ratio_bits(ratio, 1))
    picks = divprune_ext.select(model.features[0], k, sorted=True, validate=False)

    tokens = [TEXT] * before + [IMAGE] * k + [TEXT] * after
    prefill, _ = model.get_mrope_input_positions(tokens, [feature("image", before, k, thw)])
    full_tokens = [TEXT] * before + [IMAGE] * n + [TEXT] * after
    full, _ = Stub.vllm_positions(model, full_tokens, [feature("image", before, n, thw)])
    keep = list(range(before)) + [before + int(p) for p in picks] + list(range(before + n, len(full_tokens)))
    expected = full[:, keep]  # vLLM's positions of the kept tokens in the unpruned prompt

    rope = TorchRopeState(prefill, max_num_tokens=64)
    state = SimpleNamespace(rope_state=rope)
    encoder = SimpleNamespace(model=model, inputs_embeds=torch.zeros(64, 8))
    seen, done = [], 0
    for size in (before + k // 2, len(tokens) - before - k // 2):  # two prefill chunks
        is_mm = torch.tensor([t == IMAGE for t in tokens[done:done + size]])
        rows = kept[max(done - before, 0):max(done - before, 0) + int(is_mm.sum())]
        embeds = EncoderRunner.get_inputs_embeds(encoder, torch.tensor(tokens[done:done + size]), [rows], is_mm)
        batch = SimpleNamespace(idx_mapping=torch.tensor([0]), query_start_loc=torch.tensor([0, size]),
                                num_tokens_after_padding=size + 2)
        requests = SimpleNamespace(prefill_len=SimpleNamespace(gpu=torch.tensor([len(tokens)])),
                                   num_computed_tokens=SimpleNamespace(gpu=torch.tensor([done])))
        inputs = DefaultModelState.prepare_inputs(state, batch, requests)
        assert inputs["positions"].data_ptr() == rope.positions.data_ptr()  # a view of the runner's buffer
        decoded = model.forward(None, inputs["positions"], inputs_embeds=embeds[:size + 2])
        assert torch.equal(rope.positions[:, :size], decoded[:, :size])  # what a replayed graph reads
        seen.append(decoded[:, :size])
        done += size
    assert torch.equal(torch.cat(seen, dim=1), expected)
