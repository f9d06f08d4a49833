"""Row-block ΔW merges: equal to the whole-tensor definitions, with exact magnitude cuts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasoup.adapters import LoraFactors
from lorasoup.merging import rowwise
from lorasoup.merging.delta import RECIPES, merge_tasks
from lorasoup.merging.ops import keep_top_magnitude
from lorasoup.merging.rowwise import magnitude_cut, merge_rowwise, row_blocks
from tests.conftest import on_gpu


def _tasks(k: int, out: int, inn: int, seed: int, *, integer: bool = False) -> list[LoraFactors]:
    """Random factors; ``integer`` ones make ΔW of small integers, full of ties at any threshold."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        draw = lambda *shape: torch.randint(-2, 3, shape, generator=g).float()  # noqa: E731
    else:
        draw = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return [LoraFactors(A=draw(3, inn), B=draw(out, 3), scale=1.0 + i) for i in range(k)]


def _merge(tasks, weights, recipe_name: str, sign_method: str, density: float, generator, **options):
    """``merge_rowwise`` with a preset's sparsification and consensus."""
    recipe = RECIPES[recipe_name]
    return merge_rowwise(
        tasks,
        weights,
        sparsify=recipe.sparsify,
        consensus=recipe.consensus,
        density=density,
        sign_method=sign_method,
        generator=generator,
        **options,
    )


def _dense(task: LoraFactors, blocks) -> torch.Tensor:
    """The task as the row blocks build it (so both sides see the same floating-point values)."""
    return torch.cat([task.delta_rows(start, stop) for start, stop in blocks])


def test_row_blocks_cover_every_row_once() -> None:
    assert row_blocks(10, 3, block_elements=7) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert row_blocks(4, 100, block_elements=7) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # at least a row
    assert row_blocks(5, 2) == [(0, 5)]


def test_delta_rows_and_entries_agree_with_the_dense_update() -> None:
    task = _tasks(1, 9, 7, seed=1)[0]
    dense = task.delta()
    assert torch.allclose(task.delta_rows(2, 6), dense[2:6], atol=1e-6)
    rows, cols = torch.tensor([0, 8, 3, 3]), torch.tensor([6, 0, 2, 2])
    assert torch.allclose(task.delta_entries(rows, cols), dense[rows, cols], atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["ties", "magnitude_prune", "linear"]),
    st.sampled_from(["total", "frequency"]),
    st.integers(1, 4),
    st.floats(0.05, 1.0),
    st.integers(1, 40),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_rowwise_merge_equals_the_whole_tensor_definition(
    recipe_name, sign_method, k, density, block_elements, integer, seed
) -> None:
    tasks = _tasks(k, 11, 6, seed, integer=integer)
    weights = torch.randn(k, generator=torch.Generator().manual_seed(seed))
    recipe = RECIPES[recipe_name]
    blocks = row_blocks(11, 6, block_elements)
    stacked = merge_tasks(
        torch.stack([_dense(t, blocks) for t in tasks]),
        weights,
        recipe,
        density=density,
        sign_method=sign_method,
        generator=torch.Generator().manual_seed(0),
    )
    generator = torch.Generator().manual_seed(0)
    merged = _merge(
        tasks, weights, recipe_name, sign_method, density, generator, block_elements=block_elements
    )
    assert torch.allclose(merged, stacked, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.01, 0.99), st.integers(1, 400), st.booleans(), st.integers(0, 2**16))
def test_sampled_magnitude_cut_trims_exactly_as_the_whole_tensor_trim(density, block, integer, seed) -> None:
    """With a sample small enough that the bracket path runs (and misses now and then on the ties of
    integer tasks), trimming row blocks keeps exactly the entries the whole-tensor trim keeps."""
    task = _tasks(1, 40, 30, seed, integer=integer)[0]
    blocks = row_blocks(40, 30, block)
    dense = _dense(task, blocks)
    k = max(1, int(density * dense.numel()))
    cut = magnitude_cut(task, k, blocks, sample_size=64)
    columns = task.in_features
    trimmed = torch.cat([rowwise.trim_(task.delta_rows(a, b), cut, a * columns) for a, b in blocks])
    assert torch.equal(trimmed, keep_top_magnitude(dense, density))
    assert int((trimmed != 0).sum()) == k or int((dense != 0).sum()) < k  # exactly k (zeros aside)


def _same_cut(a: rowwise.MagnitudeCut, b: rowwise.MagnitudeCut) -> bool:
    return torch.equal(a.threshold.cpu(), b.threshold.cpu()) and int(a.last_equal) == int(b.last_equal)


def test_a_missed_bracket_falls_back_to_the_exact_cut(monkeypatch) -> None:
    task = _tasks(1, 50, 40, seed=3)[0]
    blocks = row_blocks(50, 40, 300)
    expected = rowwise.exact_cut(task, 500, blocks)
    calls = []

    def wrong(task, k, sample_size):  # a bracket far below the true cut: too many entries above it
        calls.append(sample_size)
        zero = torch.zeros(())
        return zero, zero, 0.0

    monkeypatch.setattr(rowwise, "_bracket", wrong)
    assert not bool(rowwise.unchecked_cut(task, 500, blocks, sample_size=8).ok)
    cut = magnitude_cut(task, 500, blocks, sample_size=8)
    assert calls == [8, 8]  # sampled, missed, then the exact pass (no sample) gave the answer
    assert bool(cut.ok) and _same_cut(cut, expected)
    # merge_rowwise reads its tasks' flags together and redoes the missed cuts the same way
    monkeypatch.setattr(rowwise, "SAMPLE_SIZE", 8)
    tasks, weights = [task, _tasks(1, 50, 40, seed=4)[0]], torch.tensor([0.5, -1.0])
    merge = lambda: _merge(tasks, weights, "ties", "total", 0.25, torch.Generator(), block_elements=300)  # noqa: E731
    missed = merge()
    assert calls == [8, 8, 8, 8]  # one sampled bracket per task, both missed
    monkeypatch.undo()
    assert torch.equal(missed, merge())


def test_candidate_keys_order_by_magnitude_then_earlier_position() -> None:
    magnitude = torch.tensor([0.5, 0.25, 0.5, 0.0, 3.0])
    positions = torch.tensor([7, 2, 3, 9, 0])
    order = rowwise.candidate_keys(magnitude, positions).argsort(descending=True).tolist()
    assert order == [4, 2, 0, 1, 3]  # 3.0, then the two 0.5s (position 3 before 7), 0.25, 0.0


@pytest.mark.parametrize("consensus", ["none", "sign"])
def test_dare_blocks_are_seeded_rescaled_and_keep_about_density(consensus) -> None:
    tasks = _tasks(1, 200, 100, seed=4)
    run = lambda seed, density: merge_rowwise(  # noqa: E731
        tasks,
        torch.tensor([0.7]),
        sparsify="random",
        consensus=consensus,
        density=density,
        sign_method="total",
        generator=torch.Generator().manual_seed(seed),
        block_elements=1000,
    )
    dense = 0.7 * tasks[0].delta()
    merged = run(5, 0.3)
    assert torch.equal(merged, run(5, 0.3))
    assert not torch.equal(merged, run(6, 0.3))
    kept = merged != 0
    assert torch.allclose(merged[kept], dense[kept] / 0.3, atol=1e-5)  # survivors rescaled by 1/density
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert torch.allclose(run(5, 1.0), dense, atol=1e-5)  # density 1: nothing dropped, no rescale
    # the mask is a hash of (seed, task, position): the row blocks do not change it
    other_blocks = merge_rowwise(
        tasks,
        torch.tensor([0.7]),
        sparsify="random",
        consensus=consensus,
        density=0.3,
        sign_method="total",
        generator=torch.Generator().manual_seed(5),
        block_elements=37,
    )
    assert torch.equal(other_blocks != 0, kept)
    assert torch.allclose(other_blocks, merged, atol=1e-6)


def test_dare_hash_keeps_density_independently_per_task_and_seed() -> None:
    positions = torch.arange(200_000)
    threshold = rowwise.dare_threshold(0.25)
    keys = rowwise.dare_task_keys(torch.Generator().manual_seed(1), 2)
    first, second = (rowwise.dare_keep(positions, key, threshold) for key in keys)
    assert keys == rowwise.dare_task_keys(torch.Generator().manual_seed(1), 2)
    assert keys != rowwise.dare_task_keys(torch.Generator().manual_seed(2), 2)
    # the hash of Python ints (the keys) is the hash of tensors (the masks)
    values = [0, 1, 12345, 2**31, 2**32 - 1]
    assert rowwise.mix32(torch.tensor(values)).tolist() == [rowwise.mix32(v) for v in values]
    for mask in (first, second):
        assert abs(mask.float().mean().item() - 0.25) < 0.005
    # independent tasks: both kept about 0.25² of the time; neighbours are not correlated either
    assert abs((first & second).float().mean().item() - 0.0625) < 0.003
    assert abs((first[1:] & first[:-1]).float().mean().item() - 0.0625) < 0.003


def test_rowwise_merge_rejects_an_unknown_sign_method() -> None:
    with pytest.raises(ValueError, match="majority sign"):
        merge_rowwise(
            _tasks(2, 4, 4, seed=0),
            torch.ones(2),
            sparsify="magnitude",
            consensus="sign",
            density=0.5,
            sign_method="mode",  # type: ignore[arg-type]
            generator=torch.Generator(),
        )


# The fused kernels are checked against the torch path twice: compiled on a GPU (-m gpu), and run by
# Triton's interpreter on the CPU (everywhere Triton installs), with the same bodies and cases.
COMBINE_CASES = given(
    st.tuples(
        st.sampled_from(sorted(RECIPES)),
        st.sampled_from(["total", "frequency"]),
        st.integers(1, 4),
        st.floats(0.05, 1.0),
        st.integers(50, 3000),
        st.booleans(),
        st.integers(0, 2**16),
    )
)
CUT_CASES = given(
    st.tuples(st.floats(0.01, 0.99), st.integers(50, 3000), st.booleans(), st.integers(0, 2**16))
)


def _kernel_merge_is_the_torch_merge(
    device, recipe_name, sign_method, k, density, block_elements, integer, seed
):
    """The Triton combine step gives exactly what the torch ops give (same operations, same order,
    no FMA), ties at the cut (integer tasks) included."""
    tasks = [
        LoraFactors(t.A.to(device), t.B.to(device), t.scale) for t in _tasks(k, 37, 29, seed, integer=integer)
    ]
    weights = torch.randn(k, generator=torch.Generator().manual_seed(seed))

    def run(use_kernel: bool) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        options = {"block_elements": block_elements, "use_kernel": use_kernel}
        return _merge(tasks, weights, recipe_name, sign_method, density, generator, **options)

    assert torch.equal(run(True), run(False))


def _kernel_cut_is_the_torch_cut(device, density, block, integer, seed):
    """The Triton counting pass (atomics, candidates in any order) finds the torch pass's exact cut;
    with no room for the candidates its count shows the overflow, which makes the cut a miss."""
    from lorasoup.merging import fused

    original = _tasks(1, 40, 30, seed, integer=integer)[0]
    task = LoraFactors(original.A.to(device), original.B.to(device), original.scale)
    blocks = row_blocks(40, 30, block)
    k = max(1, int(density * 1200))
    kernel = magnitude_cut(task, k, blocks, sample_size=64, use_kernel=True)
    torch_cut = magnitude_cut(task, k, blocks, sample_size=64, use_kernel=False)
    assert _same_cut(kernel, torch_cut)
    # the kernel's keys are the torch pass's, in another order
    low, high = torch.tensor(0.5, device=device), torch.tensor(2.0, device=device)
    keys, counts = fused.count_and_collect(task, blocks, low, high, capacity=1200)
    torch_keys, torch_counts = rowwise._count_and_collect(task, blocks, (low, high))
    assert torch.equal(keys[keys >= 0].sort().values, torch_keys.sort().values)
    assert torch.equal(counts, torch_counts)
    # no room for the candidates: the count shows it, and the cut is a miss
    infinity = torch.tensor(float("inf"), device=device)
    keys, counts = fused.count_and_collect(task, blocks, -infinity, infinity, capacity=1)
    assert int(counts[1]) == 1200 and not bool(rowwise._cut_from_keys(keys, counts, k).ok)


@on_gpu
@settings(max_examples=40, deadline=None)
@COMBINE_CASES
def test_fused_kernel_equals_the_torch_path_bit_for_bit(case) -> None:
    from lorasoup.merging import fused

    assert fused.available(torch.device("cuda"))
    _kernel_merge_is_the_torch_merge("cuda", *case)


@on_gpu
@settings(max_examples=40, deadline=None)
@CUT_CASES
def test_gpu_counting_pass_gives_the_torch_cut(case) -> None:
    _kernel_cut_is_the_torch_cut("cuda", *case)


@settings(max_examples=25, deadline=None)
@COMBINE_CASES
def test_interpreted_kernel_equals_the_torch_path_bit_for_bit(triton_interpreter, case) -> None:
    _kernel_merge_is_the_torch_merge("cpu", *case)


@settings(max_examples=25, deadline=None)
@CUT_CASES
def test_interpreted_counting_pass_gives_the_torch_cut(triton_interpreter, case) -> None:
    _kernel_cut_is_the_torch_cut("cpu", *case)
