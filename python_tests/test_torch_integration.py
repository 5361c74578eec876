"""opcheck, torch.compile tracing, no host syncs, and CUDA graph capture."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import divprune_ext
from conftest import requires_cuda
from divprune_ext import reference


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


class HostSyncCounter(TorchDispatchMode):
    """Counts tensor-to-Python-scalar reads (.item(), int(t), 0-d tensor indices):
    on a GPU each is a host sync, and each breaks CUDA graph capture."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


GRAPH_SAFE = {
    "op": lambda x: torch.ops.divprune.select(x, 9),
    "select": lambda x: divprune_ext.select(x, keep_ratio=0.25, validate=False),
    "prune": lambda x: divprune_ext.prune(x, keep_ratio=0.25, validate=False),
    "reference": lambda x: reference.select(x, 9),
}


@pytest.mark.parametrize("name", GRAPH_SAFE)
@pytest.mark.parametrize("batched", [False, True])
def test_no_host_syncs(device, name, batched):
    x = torch.randn((2, 36, 8) if batched else (36, 8), device=device)
    with HostSyncCounter() as counter:
        GRAPH_SAFE[name](x)
    assert counter.syncs == 0, f"{name} reads {counter.syncs} tensor values on the host"


def test_validation_is_the_only_host_sync():
    with HostSyncCounter() as counter:
        divprune_ext.select(torch.randn(36, 8), 9)
    assert counter.syncs == 1


@requires_cuda
@pytest.mark.parametrize("name", GRAPH_SAFE)
def test_cuda_graph_capture_and_replay(name):
    fn = GRAPH_SAFE[name]
    static_x = torch.randn(2, 576, 1024, device="cuda", dtype=torch.float16)
    fn(static_x)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
    for seed in range(3):
        torch.manual_seed(seed)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(as_tuple(static_out), as_tuple(fn(static_x)), strict=True):
            assert torch.equal(got, want)


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
