"""The batched core-space merge (``merging.core_batched``) against the per-module one, on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasoup.adapters import LoraAdapter, LoraFactors
from lorasoup.merging import MERGE_METHODS, MergeParams
from lorasoup.merging.core_batched import BatchedCoreMerge
from lorasoup.merging.ops import keep_top_magnitude, keep_top_magnitude_each
from lorasoup.merging.run import merge_adapters, module_generator
from tests.conftest import on_gpu
from tests.merging.test_core_space import CORE_METHODS, make_factors

# (out, in, ranks of the adapters; None: absent from the module)
MODULES = [
    (24, 20, [3, 5]),
    (20, 24, [3, 5]),
    (24, 20, [3, 5]),
    (9, 30, [4, 4]),  # wide: out < ΣR
    (24, 20, [3, None]),  # adapter 1 absent: joins the other one-adapter modules
    (24, 20, [None, 3]),  # same ranks, other adapter: the same group, other weights
    (20, 24, [3, 5]),
    (30, 7, [2, 6]),  # narrow: in < ΣR
    (24, 20, [3, 5]),
]
WEIGHTS = [0.7, -0.4]


def params_for(name: str, **extra) -> MergeParams:
    return MergeParams(density=0.5 if MERGE_METHODS.get(name).uses_density else 1.0, **extra)


def module_factors(seed: int = 0) -> list[tuple[str, list[LoraFactors | None]]]:
    modules = []
    for index, (out, inn, ranks) in enumerate(MODULES):
        present = [r if r is not None else 1 for r in ranks]
        factors = make_factors(out, inn, present, seed=seed + index)
        modules.append(
            (f"m{index}", [f if r is not None else None for f, r in zip(factors, ranks, strict=True)])
        )
    return modules


def per_module(name: str, modules, weights, params: MergeParams, seed: int = 0):
    method = MERGE_METHODS.get(name)
    w = torch.tensor(weights, dtype=torch.float64)
    return [
        (path, method.merge(factors, w, params, module_generator(seed, path, torch.device("cpu"))))
        for path, factors in modules
    ]


def batched(name: str, modules, weights, params: MergeParams, seed: int = 0, **options):
    merge = MERGE_METHODS.get(name).streaming(torch.device("cpu"))  # the runner's, usable on a CPU
    for option, value in options.items():
        setattr(merge, option, value)
    w = torch.tensor(weights, dtype=torch.float64)
    done = []
    for path, factors in modules:
        done += merge.submit(path, factors, w, params, module_generator(seed, path, torch.device("cpu")))
    return done + merge.finish(), merge


def assert_same_updates(got, expected) -> None:
    assert [path for path, _ in got] == [path for path, _ in expected]  # the order submitted
    for (path, g), (_, e) in zip(got, expected, strict=True):
        assert not g.A.is_cuda and not g.B.is_cuda
        assert g.A.shape == e.A.shape and g.B.shape == e.B.shape, path  # the same ranks
        assert g.A.dtype == e.A.dtype
        reference = e.B.double() @ e.A.double()
        error = (g.B.double() @ g.A.double() - reference).norm()
        assert float(error) <= 1e-9 * max(float(reference.norm()), 1e-30), path
        if e.discarded_energy is None:
            assert g.discarded_energy is None
        else:
            assert g.discarded_energy == pytest.approx(e.discarded_energy, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", CORE_METHODS)
@pytest.mark.parametrize(
    "extra",
    [{}, {"rank": 4}, {"energy": 0.9}, {"majority_sign": "frequency"}],
    ids=["full", "rank", "energy", "freq"],
)
def test_batched_equals_per_module(name, extra) -> None:
    """Mixed shapes, wide and narrow modules, absent adapters, rank and energy: the same updates,
    ranks and discarded energies as the per-module merge, in the order submitted."""
    params = params_for(name, **extra)
    modules = module_factors()
    got, merge = batched(name, modules, WEIGHTS, params)
    assert_same_updates(got, per_module(name, modules, WEIGHTS, params))
    assert merge.stats["modules"] == len(MODULES)
    assert merge.stats["groups"] == 5  # (24, 20) ×3, (20, 24) ×2, one-adapter (24, 20) ×2, wide, narrow


@pytest.mark.parametrize("name", CORE_METHODS)
def test_weight_zero_adapters_leave_their_group(name) -> None:
    """A weight 0 removes an adapter before the bases (as per module); all weights 0: a zero update."""
    params = params_for(name)
    modules = module_factors(seed=3)
    for weights in ([1.3, 0.0], [0.0, 0.0]):
        got, _ = batched(name, modules, weights, params)
        assert_same_updates(got, per_module(name, modules, weights, params))
    assert all(float(r.B.abs().max()) == 0 for _, r in got)


@pytest.mark.parametrize("name", CORE_METHODS)
def test_a_tiny_byte_cap_gives_many_groups_and_the_same_results(name) -> None:
    params = params_for(name, rank=5)
    modules = module_factors(seed=5)
    expected = per_module(name, modules, WEIGHTS, params)
    one, merge = batched(name, modules, WEIGHTS, params, max_bytes=1)  # flushed at every submit
    assert merge.stats["groups"] == len(MODULES)
    assert_same_updates(one, expected)
    some, merge = batched(name, modules, WEIGHTS, params, max_bytes=3000)
    assert len(MODULES) > merge.stats["groups"] > 5
    assert_same_updates(some, expected)


def test_submit_returns_the_flushed_modules_in_order() -> None:
    merge = MERGE_METHODS.get("core_linear").streaming(torch.device("cpu"))
    merge.max_bytes = 6000
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    returned = []
    for path, factors in module_factors():
        returned.append([p for p, _ in merge.submit(path, factors, w, MergeParams(), torch.Generator())])
    returned.append([p for p, _ in merge.finish()])
    flat = [p for batch in returned for p in batch]
    assert flat == [path for path, _ in module_factors()]
    assert sum(1 for batch in returned[:-1] if batch) >= 2  # the cap flushed before finish


@pytest.mark.parametrize("name", ["core_dare", "core_dare_ties"])
def test_dare_draws_from_each_modules_generator(name) -> None:
    """Another seed changes the result; the same seed and path give the per-module draws whatever the
    batch (checked above): here, that the generator is the module's own, not shared in the group."""
    params = params_for(name)
    modules = [(path, f) for path, f in module_factors(seed=7) if path in ("m0", "m2", "m8")]  # one group
    got, _ = batched(name, modules, WEIGHTS, params, seed=11)
    assert_same_updates(got, per_module(name, modules, WEIGHTS, params, seed=11))
    other, _ = batched(name, modules, WEIGHTS, params, seed=12)
    assert all(
        float((a.B @ a.A - b.B @ b.A).norm()) > 1e-6 for (_, a), (_, b) in zip(got, other, strict=True)
    )


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 30),
    st.sampled_from([0.05, 0.3, 0.5, 0.99, 1.0]),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_keep_top_magnitude_each_keeps_what_keep_top_magnitude_keeps(
    count, size, density, seed, ties
) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = torch.randn(count, size, 3, generator=g, dtype=torch.float64)
    if ties:  # few distinct magnitudes, both signs: many ties at the threshold
        tensors = torch.randint(-2, 3, tensors.shape, generator=g).double()
    expected = torch.stack([keep_top_magnitude(t, density) for t in tensors])
    assert torch.equal(keep_top_magnitude_each(tensors, density), expected)


def test_registered_as_streaming_for_every_core_method() -> None:
    for name in CORE_METHODS:
        assert isinstance(MERGE_METHODS.get(name).streaming(torch.device("cpu")), BatchedCoreMerge)


def check_runner_streams(name: str, device: str, rank: int | None = 5) -> None:
    """``merge_adapters`` through the method's streaming merge gives the per-module merge's updates on
    the same device (the same generators, so DARE's draws too) and, but for DARE, on the CPU.
    ``rank=None``: no recompression, so each group goes to the host in one copy (on CUDA, one that
    is waited for once per flush)."""
    modules = module_factors(seed=9)
    adapters = [
        LoraAdapter(
            name=f"a{i}",
            source="test",
            modules={
                path: LoraFactors(f[i].A.float(), f[i].B.float(), f[i].scale)
                for path, f in modules
                if f[i] is not None
            },
            base_model=None,
        )
        for i in range(2)
    ]
    method = MERGE_METHODS.get(name)
    params = params_for(name, rank=rank)
    paths = [path for path, _ in modules]

    def run(entry, on: str):
        return merge_adapters(adapters, WEIGHTS, entry, params, modules=paths, seed=3, device=on)

    got, facts = run(method, device)
    assert list(got) == paths
    references = [run(dataclasses.replace(method, streaming=None), device)]
    if not method.random and device != "cpu":
        references.append(run(method, "cpu"))
    for expected, expected_facts in references:
        assert [f["rank"] for f in facts.values()] == [f["rank"] for f in expected_facts.values()]
        for path in paths:
            reference = expected[path].delta(torch.float64)
            error = (got[path].delta(torch.float64) - reference).norm()
            assert float(error) <= 1e-5 * float(reference.norm()), path


@on_gpu
@pytest.mark.parametrize("rank", [5, None])
@pytest.mark.parametrize("name", CORE_METHODS)
def test_runner_on_cuda_equals_per_module(name, rank) -> None:
    """``merge_adapters`` on CUDA takes the batched path: its updates are the per-module merge's on
    CUDA (the same CUDA generators, so DARE's draws too) and, but for DARE, on the CPU; without a
    rank, read from the host copies that land after the merge returned its groups."""
    check_runner_streams(name, "cuda", rank)


@pytest.mark.parametrize("rank", [5, None])
@pytest.mark.parametrize("name", [*CORE_METHODS, "ties", "dare_ties"])
def test_runner_streaming_path_on_the_cpu_equals_per_module(name, rank, monkeypatch) -> None:
    """The runner's streaming branch (taken on CUDA only) run on the CPU: the submit / finish order,
    the groups and the copies back give the per-module updates (a CUDA-only path's bugs show here)."""
    from lorasoup.merging import run as runner

    taken: list[object] = []

    def everywhere(method, target):
        merge = method.streaming(target) if method.streaming is not None else None
        taken.append(merge)
        return merge

    monkeypatch.setattr(runner, "streaming_merge", everywhere)
    check_runner_streams(name, "cpu", rank)
    assert taken[0] is not None and taken[1] is None  # streamed, then the per-module reference


def test_a_flush_lands_in_one_host_buffer_per_dtype() -> None:
    """The copy to the host packs every group of a flush into one buffer per dtype (one pinned
    allocation on CUDA instead of one per group and side): the same values and shapes, in order."""
    from lorasoup.merging.core_batched import into_host_buffers

    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 4, 5, generator=g),
        torch.randn(3, 7, 4, generator=g).to(torch.bfloat16),
        torch.randn(2, 4, 9, generator=g),
        torch.randn(2, 6, 4, generator=g).to(torch.bfloat16),
    ]
    landed = into_host_buffers(tensors, lambda dtype, numel: torch.empty(numel, dtype=dtype))
    assert [t.shape for t in landed] == [t.shape for t in tensors]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(landed, tensors, strict=True))
    storages = {t.dtype: t.untyped_storage().data_ptr() for t in landed}
    assert all(t.untyped_storage().data_ptr() == storages[t.dtype] for t in landed)
    assert len(storages) == 2 and landed[0].untyped_storage().nbytes() == 4 * (60 + 72)
