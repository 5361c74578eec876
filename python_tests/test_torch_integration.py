"""opcheck, torch.compile tracing, and CUDA graph capture."""
import pytest
import torch

import divprune_ext
from conftest import requires_cuda


@pytest.mark.parametrize("shape,k", [((30, 16), 5), ((3, 20, 7), 4), ((1, 8), 1)])
def test_opcheck_select(device, dtype, shape, k):
    x = torch.randn(shape, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.divprune.select.default, (x, k))


@pytest.mark.parametrize("shape", [(30, 16), (3, 20, 7)])
def test_opcheck_pairwise_distance(device, dtype, shape):
    x = torch.randn(shape, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.divprune.pairwise_distance.default, (x,))


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4, 576, 64)
        assert torch.ops.divprune.select(x, 57).shape == (4, 57)
        assert torch.ops.divprune.select(x, 57).dtype == torch.int64
        assert torch.ops.divprune.pairwise_distance(x).shape == (4, 576, 576)


def test_torch_compile_fullgraph(device):
    def prune_and_pool(tokens):
        kept, idx = divprune_ext.prune(tokens, keep_ratio=0.1, validate=False)
        dist = torch.ops.divprune.pairwise_distance(kept)
        return kept.sum(dim=-1), idx, dist.mean()

    tokens = torch.randn(2, 100, 32, device=device)
    compiled = torch.compile(prune_and_pool, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(tokens), prune_and_pool(tokens)):
        torch.testing.assert_close(got, expected)


@requires_cuda
def test_cuda_graph_capture_and_replay():
    static_x = torch.randn(2, 576, 1024, device="cuda", dtype=torch.float16)
    divprune_ext.select(static_x, 57, validate=False)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = divprune_ext.select(static_x, 57, validate=False)
    for seed in range(3):
        torch.manual_seed(seed)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, torch.ops.divprune.select(static_x, 57))


@requires_cuda
def test_cuda_on_second_stream_and_device_guard():
    x = torch.randn(300, 64, device="cuda")
    expected = torch.ops.divprune.select(x, 30)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = torch.ops.divprune.select(x, 30)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, expected)
