"""select_varlen over packed segments: equal, bit for bit, to a loop of select; its
errors; opcheck, torch.compile with dynamic lengths, no host syncs; on a GPU, CUDA graph
capture and a launch count independent of the number of segments; the import messages."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import divprune_ext
from conftest import DTYPES, requires_cuda
from helpers import INPUT_KINDS, make_input
from test_torch_integration import HostSyncCounter


def loop_of_select(x, lengths, ks):
    parts, start = [], 0
    for n, k in zip(lengths, ks):
        parts.append(torch.ops.divprune.select(x[start:start + n], k) + start)
        start += n
    return torch.cat(parts)


def packed(kind, lengths, d, seed):
    return torch.cat([make_input(kind, n, d, seed=seed + i) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("lengths", [[1], [1, 1, 1], [7, 1, 33, 2], [64] * 9, [100, 3, 257]], ids=str)
def test_equals_a_loop_of_select(device, dtype, kind, lengths):
    x = packed(kind, lengths, 24, seed=len(lengths)).to(device=device, dtype=dtype)
    for ks in ([1] * len(lengths), [max(1, n // 3) for n in lengths], list(lengths)):
        got = torch.ops.divprune.select_varlen(x, lengths, ks)
        assert got.dtype == torch.long and got.shape == (sum(ks),)
        assert torch.equal(got, loop_of_select(x, lengths, ks))


def test_many_segments_and_the_python_api(device):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (300,), generator=g).tolist()
    x = torch.randn(sum(lengths), 16, generator=g).to(device)
    ks = [divprune_ext.keep_count(n, 0.25) for n in lengths]
    expected = loop_of_select(x, lengths, ks)
    assert torch.equal(divprune_ext.select_varlen(x, lengths, keep_ratio=0.25), expected)
    assert torch.equal(divprune_ext.select_varlen(x, lengths, ks), expected)
    one_k = divprune_ext.select_varlen(x, lengths, 1)
    assert torch.equal(one_k, loop_of_select(x, lengths, [1] * len(lengths)))
    in_order = divprune_ext.select_varlen(x, lengths, ks, sorted=True)
    assert torch.equal(in_order, torch.cat([p.sort().values for p in expected.split(ks)]))


def test_duplicates_across_segments_stay_apart(device):
    # Segment 1 is a copy of segment 0: no distance across segments may leak in.
    a = make_input("random", 20, 8, seed=1)
    x = torch.cat([a, a, a[:5]]).to(device)
    got = divprune_ext.select_varlen(x, [20, 20, 5], [20, 20, 5])
    alone = torch.ops.divprune.select(a.to(device), 20)
    assert torch.equal(got[:20], alone) and torch.equal(got[20:40], alone + 20)
    assert sorted(got[40:].tolist()) == list(range(40, 45))


@pytest.mark.parametrize("call,message", [
    (lambda x: divprune_ext.select_varlen(x, [3, 4], [1, 1]), r"sum\(lengths\) = 7 but x has N = 6"),
    (lambda x: divprune_ext.select_varlen(x, [6, 0], [1, 1]), r"lengths\[1\] = 0"),
    (lambda x: divprune_ext.select_varlen(x, [7, -1], [1, 1]), r"lengths\[1\] = -1"),
    (lambda x: divprune_ext.select_varlen(x, [3, 3], [1]), r"len\(k\) = 1, len\(lengths\) = 2"),
    (lambda x: divprune_ext.select_varlen(x, [3, 3], [1, 4]), r"k\[1\] must be in \[1, lengths\[1\]\] = \[1, 3\], got k\[1\] = 4"),
    (lambda x: divprune_ext.select_varlen(x, [3, 3], [0, 1]), r"k\[0\] .* got k\[0\] = 0"),
    (lambda x: divprune_ext.select_varlen(x, [3, 3], keep_ratio=1.5), r"keep_ratio must be in \(0, 1\], got 1.5"),
    (lambda x: divprune_ext.select_varlen(x, [3, 3], keep_ratio=0.0), r"keep_ratio must be in \(0, 1\], got 0.0"),
    (lambda x: divprune_ext.select_varlen(x, [], []), "lengths is empty"),
    (lambda x: divprune_ext.select_varlen(x, [6], []), "k is empty"),
    (lambda x: divprune_ext.select_varlen(x.unsqueeze(0), [6], [1]), r"shape \(N, D\)"),
    # The raw operator checks the same things, naming the values.
    (lambda x: torch.ops.divprune.select_varlen(x, [3, 4], [1, 1]), r"sum\(lengths\) = 7 but x has N = 6"),
    (lambda x: torch.ops.divprune.select_varlen(x, [6, 0], [1, 1]), r"lengths\[1\] = 0"),
    (lambda x: torch.ops.divprune.select_varlen(x, [3, 3], [1]), r"len\(k\) = 1, len\(lengths\) = 2"),
    (lambda x: torch.ops.divprune.select_varlen(x, [3, 3], [1, 4]), r"got k\[1\] = 4"),
    (lambda x: torch.ops.divprune.select_varlen(x, [], []), "lengths is empty"),
])
def test_bad_input_is_named(device, call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(6, 4, device=device))


@pytest.mark.parametrize("lengths,ks", [([5, 1, 12], [2, 1, 12]), ([30], [4])])
def test_opcheck(device, dtype, lengths, ks):
    x = torch.randn(sum(lengths), 9, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.divprune.select_varlen.default, (x, lengths, ks))


def test_torch_compile_with_dynamic_lengths(device):
    def prune_packed(x, lengths):
        idx = divprune_ext.select_varlen(x, lengths, keep_ratio=0.5, validate=False)
        return x.index_select(0, idx).sum(-1), idx

    compiled = torch.compile(prune_packed, fullgraph=True, dynamic=True, backend="aot_eager")
    for lengths in ([10, 6], [3, 20, 9], [8, 8]):
        x = torch.randn(sum(lengths), 12, device=device)
        for got, expected in zip(compiled(x, lengths), prune_packed(x, lengths)):
            torch.testing.assert_close(got, expected)


def test_no_host_syncs_and_no_autograd(device):
    x = torch.randn(50, 8, device=device, requires_grad=True)
    with HostSyncCounter() as counter:
        idx = divprune_ext.select_varlen(x, [20, 30], [4, 6], validate=False)
    assert counter.syncs == 0
    assert not idx.requires_grad and idx.grad_fn is None


# Ragged CUDA batches: a long segment among short ones (every segment runs with its greedy
# width), 300 segments (the table in three launches), few tiles over many features (split-D).
CUDA_BATCHES = {
    "long among short": ([4097, 1, 64, 65, 1100, 7, 576], 256),
    "300 segments": ([1 + (7 * i) % 40 for i in range(300)], 64),
    "split-D": ([65, 3, 64], 1000),
}


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", CUDA_BATCHES)
def test_cuda_equals_a_loop_of_select(dtype, batch):
    lengths, d = CUDA_BATCHES[batch]
    x = packed("clusters", lengths, d, seed=3).to(device="cuda", dtype=dtype)
    for ks in ([max(1, n // 10) for n in lengths], list(lengths)):
        assert torch.equal(torch.ops.divprune.select_varlen(x, lengths, ks), loop_of_select(x, lengths, ks))


@requires_cuda
def test_cuda_graph_capture_and_replay():
    lengths = [576, 100, 1, 2000, 33]
    fn = lambda x: divprune_ext.select_varlen(x, lengths, keep_ratio=0.1, validate=False)  # noqa: E731
    static_x = torch.randn(sum(lengths), 512, device="cuda", dtype=torch.float16)
    fn(static_x)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    ks = [divprune_ext.keep_count(n, 0.1) for n in lengths]
    for seed in range(3):
        torch.manual_seed(seed)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, loop_of_select(static_x, lengths, ks))


@requires_cuda
def test_cuda_makes_no_host_sync():
    x = torch.randn(700, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        divprune_ext.select_varlen(x, [600, 1, 99], [60, 1, 10], validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _divprune_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "divprune" in e.name]


@requires_cuda
def test_cuda_launches_do_not_grow_with_the_segments():
    # The segment table, row norms, distance tiles, greedy: 4 launches for 2 segments as
    # for 100 (the table takes one more launch per ~125 segments).
    def launches(segments):
        x = torch.randn(20 * segments, 32, device="cuda")
        return _divprune_kernels(lambda: torch.ops.divprune.select_varlen(x, [20] * segments, [3] * segments))

    few, many = launches(2), launches(100)
    assert len(few) == len(many) == 4, (few, many)


def _import_in(tmp, package_dir):
    return subprocess.run([sys.executable, "-c", "import divprune_ext"], cwd=tmp, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp)))


def test_import_says_when_the_extension_is_not_built(tmp_path):
    source = os.path.dirname(divprune_ext.__file__)
    shutil.copytree(source, tmp_path / "divprune_ext", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    result = _import_in(tmp_path, tmp_path / "divprune_ext")
    assert result.returncode != 0
    assert "is not built" in result.stderr and "build_ext --inplace" in result.stderr, result.stderr[-2000:]
    assert "another torch release" not in result.stderr


def test_import_names_an_abi_mismatch(tmp_path):
    # A _C that exists but does not load (here: a file that is no shared library).
    source = os.path.dirname(divprune_ext.__file__)
    shutil.copytree(source, tmp_path / "divprune_ext", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    suffix = os.path.basename(divprune_ext._C.__file__).split("_C", 1)[1]
    (tmp_path / "divprune_ext" / f"_C{suffix}").write_bytes(b"not a shared library")
    result = _import_in(tmp_path, tmp_path / "divprune_ext")
    assert result.returncode != 0
    assert "built against another torch release" in result.stderr, result.stderr[-2000:]
    assert "is not built" not in result.stderr
