"""The CUDA kernels, run on the CPU by the host SIMT runtime (csrc/simt/), held to the
reference: every dtype and core, split-D and unsplit, every greedy width, edge tiles,
misaligned inputs, adversarial inputs, shuffled interleavings, NaN handling, the launch
plan, select_varlen's kernels (held to select's, segment by segment), and the runtime's
own bug detectors. No GPU needed; see python_tests/simt_kernels.py.
"""
import re
import subprocess

import pytest
import torch

import simt_kernels
from helpers import INPUT_KINDS, assert_device_selection, make_input, nan_inputs
from simt_kernels import KernelError, plan, plan_varlen, run_kernels, run_varlen_kernels

# (dtype, core, the PTX version that makes the plan choose that core)
CORES = [
    pytest.param(torch.float32, "fma", 90, id="float32"),
    pytest.param(torch.float16, "tensor", 90, id="float16-tensor"),
    pytest.param(torch.float16, "fma", 75, id="float16-fma"),
    pytest.param(torch.bfloat16, "tensor", 80, id="bfloat16-tensor"),
    pytest.param(torch.bfloat16, "fma", 75, id="bfloat16-fma"),
]


@pytest.fixture(scope="module")
def runner():
    return simt_kernels.build_runner()


def check_run(x: torch.Tensor, run, k: int) -> None:
    """Every property of one run of the kernels on x (B, M, D)."""
    dist, picks = run.dist, run.picks
    finite = torch.isfinite(x).all()
    if finite:
        assert not dist.isnan().any(), "a distance was never written (still the runtime's NaN poison)"
    assert torch.equal(dist, dist.transpose(-2, -1)), "the distance matrix is not exactly symmetric"
    # Row minima over the other rows, NaN-propagating like torch.min.
    off_diagonal = dist.clone()
    off_diagonal.diagonal(0, -2, -1).fill_(float("inf"))
    expected_min = off_diagonal.min(dim=-1).values
    assert torch.equal(run.row_min.isnan(), expected_min.isnan())
    assert torch.equal(run.row_min.nan_to_num(), expected_min.nan_to_num()), "row minima differ from the matrix"
    if finite:
        assert picks.shape == (x.shape[0], k)
        assert_device_selection(x, dist, picks)


@pytest.mark.parametrize("dtype,core,ptx", CORES)
@pytest.mark.parametrize("m,d,kind,sms", [
    (1, 8, "random", 132),
    (2, 5, "random", 132),             # D below one stage, not a multiple of 8
    (63, 64, "duplicates", 132),       # two tensor-core stages
    (64, 300, "clusters", 132),        # split-D: two chunks, the second partial
    (65, 257, "zero_rows", 1),         # one CTA folds two chunks; an edge tile of one row
    (100, 72, "one_hot", 132),         # every distance ties
    (130, 100, "multiples", 132),
    (576, 512, "random", 132),         # LLaVA-1.5's token count
    (1000, 40, "integer_grid", 132),   # many equal distances, 16 x 16 tiles
])
def test_matches_reference(runner, dtype, core, ptx, m, d, kind, sms):
    x = make_input(kind, m, d, seed=m + d, batch=1).to(dtype)
    k = min(max(1, m // 3), 100)
    run = run_kernels(runner, x, k, sms=sms, ptx_version=ptx)
    assert run.plan["core"] == core
    check_run(x, run, k)


@pytest.mark.parametrize("dtype,core,ptx", CORES)
def test_split_and_batch_invariance(runner, dtype, core, ptx):
    # The D reduction's order depends on D alone: split-D or not (the SM count decides),
    # batched or alone, with shuffled CTAs and interleavings, every item's distances
    # and picks are the same bits.
    x = make_input("clusters", 90, 600, seed=1, batch=3).to(dtype)
    batched_split = run_kernels(runner, x, 40, sms=1000, ptx_version=ptx, seed=1)
    batched_whole = run_kernels(runner, x, 40, sms=1, ptx_version=ptx, seed=2)
    assert (batched_split.plan["splits"], batched_whole.plan["splits"]) == (3, 1)
    check_run(x, batched_split, 40)
    for i in range(3):
        alone = run_kernels(runner, x[i:i + 1], 40, sms=1000 if i % 2 else 1, ptx_version=ptx, seed=3 + i)
        for run in (batched_whole, alone):
            b = 0 if run is alone else i
            assert torch.equal(run.dist[b], batched_split.dist[i]), f"item {i}: distances differ"
            assert torch.equal(run.picks[b], batched_split.picks[i]), f"item {i}: picks differ"


@pytest.mark.parametrize("batch,d,sms,launches", [(5, 40, 132, 3), (3, 600, 1000, 2)])
def test_several_tile_launches(runner, batch, d, sms, launches):
    # Batches past one launch's grid z (65,535 items x splits) go in several launches;
    # a small grid-z cap reaches that path at B = 3..5. Same bits as one launch.
    x = make_input("random", 70, d, seed=d, batch=batch)
    capped = run_kernels(runner, x, 10, sms=sms, max_grid_z=6 if sms > 132 else 2, seed=4)
    tile_launches = [launch for launch in capped.plan["launches"] if launch["kernel"] == "distance_tile_kernel"]
    assert len(tile_launches) == launches
    whole = run_kernels(runner, x, 10, sms=sms)
    assert torch.equal(capped.dist, whole.dist) and torch.equal(capped.picks, whole.picks)
    check_run(x, capped, 10)


@pytest.mark.parametrize("dtype,core,ptx", [CORES[0], CORES[1]])
def test_split_protocol_under_stress(runner, dtype, core, ptx):
    # Split-D CTAs tell each other they are done with an atomic; shuffled schedules in
    # waves of interleaved CTAs, where some threads fall far behind, must never let the
    # last CTA read a partial tile before all its threads wrote it.
    x = make_input("random", 130, 1024, seed=2, batch=4).to(dtype)
    whole = run_kernels(runner, x, 0, sms=1, ptx_version=ptx)
    for seed in range(1, 7):
        split = run_kernels(runner, x, 0, sms=1000, ptx_version=ptx, seed=seed)
        assert split.plan["splits"] == 4
        assert torch.equal(split.dist, whole.dist), f"seed {seed}: split-D distances differ"


@pytest.mark.parametrize("m,width", [(20, 1), (50, 2), (100, 4), (200, 8), (300, 16), (600, 32), (1100, 64)])
def test_every_greedy_width(runner, m, width):
    # A 32-thread greedy block reaches every register width at small M.
    x = make_input("random", m, 8, seed=m, batch=1)
    run = run_kernels(runner, x, m // 2, max_threads=32, seed=m)
    assert (run.plan["greedy_threads"], run.plan["greedy_width"]) == (32, width)
    check_run(x, run, m // 2)


def test_greedy_block_of_1024_threads(runner):
    x = make_input("duplicates", 1025, 8, seed=4, batch=1)
    run = run_kernels(runner, x, 300, seed=9)
    assert (run.plan["greedy_threads"], run.plan["greedy_width"]) == (1024, 2)
    check_run(x, run, 300)


@pytest.mark.parametrize("dtype,core,ptx", CORES)
@pytest.mark.parametrize("d", [64, 100])
def test_misaligned_input(runner, dtype, core, ptx, d):
    # 3 elements into the buffer (and D = 100 not a multiple of 8): no 16-byte loads;
    # the runtime stops a misaligned one.
    x = make_input("random", 70, d, seed=d, batch=2).to(dtype)
    shifted = run_kernels(runner, x, 20, ptx_version=ptx, offset=3)
    check_run(x, shifted, 20)
    aligned = run_kernels(runner, x, 20, ptx_version=ptx)
    assert torch.equal(shifted.dist, aligned.dist) and torch.equal(shifted.picks, aligned.picks)


@pytest.mark.parametrize("dtype,core,ptx", CORES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_every_input_kind_batched(runner, dtype, core, ptx, kind):
    x = make_input(kind, 65, 300, seed=7, batch=2).to(dtype)
    run = run_kernels(runner, x, 65, ptx_version=ptx, seed=11)
    check_run(x, run, 65)
    if kind == "duplicates":  # exact copies score 0 after their twin: never picked twice
        assert all(len(set(p)) == 65 for p in run.picks.tolist())


@pytest.mark.parametrize("dtype,core,ptx", CORES)
def test_nan_and_inf_rank_like_the_cpu_op(runner, dtype, core, ptx):
    # The raw op doesn't check its input; NaN distances must rank the same on both devices.
    for x in nan_inputs():
        x = x.to(dtype)
        run = run_kernels(runner, x, len(x), ptx_version=ptx, seed=5)
        assert torch.equal(run.picks, torch.ops.divprune.select(x, len(x))), "CUDA kernels and CPU op disagree"


def test_ties_go_to_the_lowest_index(runner):
    x = make_input("one_hot", 40, 64)
    assert run_kernels(runner, x, 40, seed=2).picks.tolist() == list(range(40))


def test_plan_chooses_the_core_by_the_loaded_code(runner):
    # Built for sm_75 only ("7.5+PTX"), the tensor-core kernel's JIT-compiled PTX is its
    # __trap() branch: 16-bit inputs must take the FMA core there.
    for dtype in (torch.float16, torch.bfloat16):
        assert plan(runner, 1, 64, 64, dtype, ptx_version=75)["core"] == "fma"
        assert plan(runner, 1, 64, 64, dtype, ptx_version=80)["core"] == "tensor"
    assert plan(runner, 1, 64, 64, torch.float32, ptx_version=90)["core"] == "fma"


def test_plan_spreads_large_batches_over_launches(runner):
    # Grid z holds at most 65,535 items x splits; the runtime rejects larger grids.
    def tile_grids(p):
        return [launch["grid"] for launch in p["launches"] if launch["kernel"] == "distance_tile_kernel"]

    assert tile_grids(plan(runner, 70_000, 3, 4)) == [[1, 1, 65_535], [1, 1, 4_465]]
    split = plan(runner, 30_000, 3, 600, sms=100_000)
    assert split["splits"] == 3 and tile_grids(split) == [[1, 1, 65_535], [1, 1, (30_000 - 21_845) * 3]]


def test_plan_greedy_limits(runner):
    assert plan(runner, 1, 33, 4, k=1)["greedy_threads"] == 64
    assert plan(runner, 1, 65_536, 1, k=1)["greedy_width"] == 64
    assert plan(runner, 1, 65_537, 1)["greedy_width"] == 0
    with pytest.raises(KernelError, match="beyond the greedy kernel"):
        plan(runner, 1, 65_537, 1, k=1)


# ----- select_varlen's kernels ---------------------------------------------------
# Held, bit for bit, to select's kernels on each segment: distances, row minima and
# picks (plus the segment's start row); check_run holds those to the reference.


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # NaN included


def check_varlen_run(runner, x, lengths, ks, run, **device) -> None:
    """The segments of one length run through select's kernels as one batch (they are
    batch-invariant, and a run's first k picks do not depend on k), so many segments
    cost a few runs. `device`: the options of run_kernels the varlen run had."""
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    by_length = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    expected = [None] * len(lengths)
    for n, members in by_length.items():
        batch = torch.stack([x[starts[i]:starts[i] + n] for i in members])
        k = max(ks[i] for i in members)
        alone = run_kernels(runner, batch, k, **device)
        if torch.isfinite(batch).all():  # else NaN distances: only the picks are compared
            check_run(batch, alone, k)
        for b, i in enumerate(members):
            assert same_bits(run.dist[i], alone.dist[b]), f"segment {i}: distances differ from select's kernels"
            row_min = run.row_min[starts[i]:starts[i] + n]
            assert same_bits(row_min, alone.row_min[b]), f"segment {i}: row minima differ from select's kernels"
            expected[i] = alone.picks[b, :ks[i]] + starts[i]
    expected = torch.cat(expected)
    assert torch.equal(run.picks, expected), f"picks {run.picks.tolist()}, select's kernels {expected.tolist()}"


# One-row segments, edge tiles, 2 x 2 tiles, a 16 x 16 triangle among small ones.
RAGGED = [1, 64, 65, 2, 130, 1, 7, 1000, 33]


@pytest.mark.parametrize("dtype,core,ptx", CORES)
@pytest.mark.parametrize("d,sms,splits", [(40, 132, 1), (300, 1, 1), (300, 1000, 2), (600, 1000, 3)])
def test_varlen_matches_select_per_segment(runner, dtype, core, ptx, d, sms, splits):
    lengths = RAGGED if d < 300 else RAGGED[:5]
    x = make_input("clusters", sum(lengths), d, seed=d, batch=1)[0].to(dtype)
    ks = [max(1, n // (i + 2)) for i, n in enumerate(lengths)]  # a different k per segment
    run = run_varlen_kernels(runner, x, lengths, ks, sms=sms, ptx_version=ptx, seed=d)
    assert (run.plan["core"], run.plan["splits"]) == (core, splits)
    check_varlen_run(runner, x, lengths, ks, run, sms=sms, ptx_version=ptx)


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_varlen_every_input_kind(runner, kind):
    lengths = [65, 1, 40, 70]
    x = make_input(kind, sum(lengths), 72, seed=5, batch=1)[0]
    ks = [65, 1, 3, 70]  # all of most segments: every tie and duplicate is ranked
    run = run_varlen_kernels(runner, x, lengths, ks, seed=6)
    check_varlen_run(runner, x, lengths, ks, run)


@pytest.mark.parametrize("dtype,core,ptx", [CORES[0], CORES[1]])
def test_varlen_no_distance_across_segments(runner, dtype, core, ptx):
    # Neighbouring segments that hold the same rows: a distance between them would be
    # 0 and change the row minima and the picks; each copy must select like the first.
    seg = make_input("random", 70, 16, seed=3, batch=1)[0].to(dtype)
    x = torch.cat([seg, seg, seg[:5], seg])
    lengths, ks = [70, 70, 5, 70], [30, 30, 5, 30]
    run = run_varlen_kernels(runner, x, lengths, ks, ptx_version=ptx, seed=7)
    assert (run.row_min[:70] > 0).all() and torch.equal(run.row_min[70:140], run.row_min[:70])
    picks = run.picks.split(ks)
    assert torch.equal(picks[1] - 70, picks[0]) and torch.equal(picks[3] - 145, picks[0])
    check_varlen_run(runner, x, lengths, ks, run, ptx_version=ptx)


@pytest.mark.parametrize("max_threads,lengths,width", [(32, [20, 3, 100], 4), (32, [300, 1, 600], 32),
                                                       (1024, [1025, 5], 2)])
def test_varlen_greedy_width_from_the_longest_segment(runner, max_threads, lengths, width):
    # Every segment runs with the longest one's width; select's kernels, run on each
    # segment alone, use its own: the picks must not depend on it.
    x = make_input("duplicates", sum(lengths), 8, seed=sum(lengths), batch=1)[0]
    ks = [max(1, n // 2) for n in lengths]
    run = run_varlen_kernels(runner, x, lengths, ks, max_threads=max_threads, seed=2)
    assert run.plan["greedy_width"] == width
    check_varlen_run(runner, x, lengths, ks, run, max_threads=max_threads)


@pytest.mark.parametrize("dtype,core,ptx", [CORES[0], CORES[1]])
def test_varlen_misaligned_and_shuffled(runner, dtype, core, ptx):
    lengths, ks = [3, 70, 65], [2, 20, 65]
    x = make_input("random", sum(lengths), 100, seed=8, batch=1)[0].to(dtype)
    aligned = run_varlen_kernels(runner, x, lengths, ks, ptx_version=ptx)
    for seed, offset in [(1, 3), (2, 0), (3, 5)]:
        run = run_varlen_kernels(runner, x, lengths, ks, ptx_version=ptx, seed=seed, offset=offset)
        assert torch.equal(run.picks, aligned.picks)
        assert all(torch.equal(a, b) for a, b in zip(run.dist, aligned.dist))
    check_varlen_run(runner, x, lengths, ks, aligned, ptx_version=ptx)


def test_varlen_many_segments(runner):
    # 300 segments: the table takes three launches (kTableChunkValues), each stage of
    # the computation still one.
    lengths = [1 + (7 * i) % 13 for i in range(300)]
    ks = [1 + i % n for i, n in enumerate(lengths)]
    x = make_input("random", sum(lengths), 12, seed=9, batch=1)[0]
    run = run_varlen_kernels(runner, x, lengths, ks, seed=4)
    assert [launch["kernel"] for launch in run.plan["launches"]].count("segment_table_kernel") == 3
    check_varlen_run(runner, x, lengths, ks, run)


def test_varlen_nan_ranks_like_the_cpu_op(runner):
    _, ties = nan_inputs()  # NaN and Inf rows among exact ties: the same picks on every device
    x = torch.cat([ties, ties[3:20], ties])
    lengths = [40, 17, 40]
    run = run_varlen_kernels(runner, x, lengths, lengths, seed=5)
    check_varlen_run(runner, x, lengths, lengths, run)
    assert torch.equal(run.picks, torch.ops.divprune.select_varlen(x, lengths, lengths))


def test_varlen_plan_launches_and_workspace(runner):
    # The same compute launches whatever the number of segments; the tile launch covers
    # only each segment's own upper-triangular tiles (the sum n_i^2 workspace); one
    # greedy CTA per segment, sized for the longest.
    def kernels(p):
        return [(launch["kernel"], launch["grid"]) for launch in p["launches"]]

    for segments in (1, 10, 124):
        got = kernels(plan_varlen(runner, [65] * segments, [1] * segments, 64))
        assert [name for name, _ in got] == ["segment_table_kernel", "row_norms_kernel",
                                             "varlen_distance_tile_kernel", "varlen_greedy_select_kernel"]
        assert got[2][1] == [3 * segments, 1, 1] and got[3][1] == [segments, 1, 1]
    lengths = [1000, 64, 1] + [5] * 300
    p = plan_varlen(runner, lengths, [1] * len(lengths), 64)
    got = kernels(p)
    assert [name for name, _ in got].count("segment_table_kernel") == -(-4 * (len(lengths) + 1) // 500)
    assert got[-2] == ("varlen_distance_tile_kernel", [16 * 17 // 2 + 1 + 1 + 300, 1, 1])
    assert got[-1] == ("varlen_greedy_select_kernel", [len(lengths), 1, 1]) and p["greedy_threads"] == 1024
    # Split-D from the launch's total tile count: 3 small segments on 1000 SMs.
    p = plan_varlen(runner, [65, 64, 2], [1, 1, 1], 600, sms=1000)
    assert p["splits"] == 3 and kernels(p)[-2] == ("varlen_distance_tile_kernel", [5, 1, 3])
    assert plan_varlen(runner, [65_536, 3], [1, 1], 1)["greedy_width"] == 64
    with pytest.raises(KernelError, match="beyond the greedy kernel"):
        plan_varlen(runner, [3, 65_537], [1, 1], 1)


def test_varlen_checker_catches_a_wrong_run(runner):
    lengths, ks = [30, 20], [5, 6]
    x = make_input("random", 50, 16, seed=1, batch=1)[0]
    run = run_varlen_kernels(runner, x, lengths, ks)
    run.picks[5:] = run.picks[5:].flip(0)
    with pytest.raises(AssertionError):
        check_varlen_run(runner, x, lengths, ks, run)


@pytest.mark.parametrize("name,report", [
    ("divergent_barriers", r"barrier divergence: thread \(0, 0, 0\) waits at __syncthreads\(\) at .*, thread \(16"),
    ("exit_before_barrier", r"31 threads wait at __syncthreads\(\) at .* but 1 have exited \(first: thread \(5"),
    ("lanes_disagree_on_mask", "deadlock in CTA .* 16 of 32 threads have exited"),
    ("mask_leaves_out_caller", "mask 0xfffffffe leaves out the calling lane 0"),
    ("source_outside_mask", "lane 0 reads lane 16, which is not in the mask 0x0000ffff"),
    ("shuffle_against_barrier", "deadlock in CTA"),
    ("shared_out_of_bounds", "AddressSanitizer: heap-buffer-overflow"),
    ("global_out_of_bounds", "AddressSanitizer: heap-buffer-overflow"),
    ("misaligned_vector_load", "__ldg of a 16-byte type from misaligned address"),
    ("mma_in_partial_warp", "names lanes of warp 1 that do not exist"),
])
def test_runtime_stops_broken_kernels(runner, name, report):
    result = simt_kernels.self_test(runner, name)
    assert result.returncode != 0
    assert re.search(report, result.stderr), result.stderr[-3000:]


def test_runtime_poisons_shared_memory(runner):
    result = simt_kernels.self_test(runner, "read_unwritten_shared")
    values = result.stdout.split()
    assert result.returncode == 0 and values[:32] == ["1"] * 32 and all("nan" in v for v in values[32:])


def test_seeds_expose_a_missing_barrier(runner):
    outputs = {subprocess.run([runner, "--self-test", "missing_barrier", "--seed", str(seed)],
                                           capture_output=True, text=True, check=True).stdout for seed in range(4)}
    assert len(outputs) > 1, "shuffled interleavings never changed a racy kernel's output"


def test_checker_catches_a_wrong_run(runner):
    # check_run itself must be able to fail: a swapped pick, an unwritten distance.
    x = make_input("random", 50, 16, seed=1, batch=1)
    run = run_kernels(runner, x, 10)
    run.picks = run.picks.flip(-1)
    with pytest.raises(AssertionError):
        check_run(x, run, 10)
    run = run_kernels(runner, x, 10)
    run.dist[0, 3, 4] = run.dist[0, 4, 3] = float("nan")
    with pytest.raises(AssertionError):
        check_run(x, run, 10)
