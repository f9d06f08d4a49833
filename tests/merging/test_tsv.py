"""TSV-Merge from the factors and in core space against a dense implementation of the paper's steps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasoup.merging import subspace
from lorasoup.merging.subspace import polar_factor, product_svd
from tests.merging.test_core_space import make_factors, merged_update, shapes, weight_lists


def dense_tsv(factors, weights, density: float) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al. 2025) on dense ΔW_i: SVD, keep ⌊density·r_i⌋, whiten U and V, recombine."""
    Us, Ss, Vs = [], [], []
    for f, w in zip(factors, weights, strict=True):
        U, S, Vh = torch.linalg.svd(f.delta(torch.float64), full_matrices=False)
        k = max(1, int(density * f.rank))
        Us.append(U[:, :k])
        Ss.append(w * S[:k])
        Vs.append(Vh[:k].T)
    U, V = torch.cat(Us, 1), torch.cat(Vs, 1)

    def whiten(X: torch.Tensor) -> torch.Tensor:
        P, _, Qh = torch.linalg.svd(X, full_matrices=False)
        return P @ Qh

    return whiten(U) @ torch.diag(torch.cat(Ss)) @ whiten(V).T


def generic(factors) -> bool:
    """Distinct singular values in every ΔW_i, so which triplets are kept is well defined."""
    for f in factors:
        S = torch.linalg.svdvals(f.delta(torch.float64))
        if S.numel() > 1 and float((S[:-1] - S[1:]).min()) < 1e-6 * float(S[0]):
            return False
    return True


@pytest.mark.parametrize("name", ["tsv", "core_tsv"])
@settings(max_examples=30, deadline=None)
@given(shape=shapes, weights=weight_lists, density=st.sampled_from([0.34, 0.5, 1.0]))
def test_tsv_equals_the_dense_definition(name, shape, weights, density) -> None:
    out, inn, ranks, seed = shape
    factors = make_factors(out, inn, ranks, seed)
    if not generic(factors):
        return
    w = weights[: len(ranks)]
    expected = dense_tsv(factors, w, density)
    got = merged_update(name, factors, w, density=density)
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=1e-8)


def test_tsv_keeps_the_rank_it_says() -> None:
    factors = make_factors(20, 16, [4, 6], seed=3)
    from lorasoup.merging import MERGE_METHODS, MergeParams

    result = MERGE_METHODS.get("tsv").merge(
        factors, torch.tensor([1.0, 1.0]), MergeParams(density=0.5), torch.Generator()
    )
    assert result.A.shape[0] == 2 + 3
    assert result.discarded_energy is None


def test_whitened_bases_are_orthonormal_and_tasks_decorrelated() -> None:
    """Whitening makes the concatenated singular vectors orthonormal: the tasks' merged directions no
    longer overlap (the interference TSV removes)."""
    factors = make_factors(30, 25, [3, 3], seed=8)
    U = torch.cat([product_svd(f.B, f.scale * f.A)[0] for f in factors], 1)
    assert (U.T @ U - torch.eye(6, dtype=U.dtype)).abs().max() > 1e-2  # overlapping before
    whitened = polar_factor(U)
    torch.testing.assert_close(whitened.T @ whitened, torch.eye(6, dtype=U.dtype), atol=1e-12, rtol=0)


def test_product_svd_is_the_svd_of_the_product() -> None:
    f = make_factors(12, 9, [4], seed=1)[0]
    U, S, V = product_svd(f.B, f.A)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, f.B @ f.A, atol=1e-12, rtol=0)
    torch.testing.assert_close(S, torch.linalg.svdvals(f.B @ f.A)[:4], atol=1e-12, rtol=0)


def test_one_task_at_full_density_is_that_task() -> None:
    factors = make_factors(9, 7, [3], seed=6)
    torch.testing.assert_close(
        merged_update("tsv", factors, [0.7], density=1.0),
        0.7 * factors[0].delta(torch.float64),
        atol=1e-12,
        rtol=0,
    )


@pytest.mark.parametrize("batch", [(), (5,), (40,), (3, 17)])
def test_host_svd_in_threads_gives_the_one_call_bits(batch, monkeypatch) -> None:
    """The batch's small SVDs split over threads (``subspace.host_svd``): the same bits as one batched
    ``torch.linalg.svd`` call, whatever the batch's shape, and the split really happens."""
    torch.manual_seed(0)
    R = torch.randn(*batch, 12, 9, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    started = []
    real = subspace.ThreadPoolExecutor
    monkeypatch.setattr(subspace, "ThreadPoolExecutor", lambda n, **kw: started.append(n) or real(n, **kw))
    try:
        ours = subspace.host_svd(R)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(ours, torch.linalg.svd(R, full_matrices=False), strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
    count = R[..., 0, 0].numel()
    assert started == ([min(4, count)] if count >= 2 else [])


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(6, 30),
    st.integers(6, 30),
    st.integers(1, 5),
    st.integers(0, 2),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_both_sides_bases_in_one_host_call_are_each_sides_bits(
    batch, out, width, rank, deficit, cholesky, seed
):
    """``column_bases(B, Aᵀ)`` (the core space's two sides, their small SVDs in one host call) gives
    exactly ``column_basis`` of each, on the CholeskyQR2 path a GPU takes and on Householder, and
    falls back to one call per side when the shapes do not stack (a wide side)."""
    g = torch.Generator().manual_seed(seed)
    inner = max(1, rank - deficit)  # rank-deficient stacks too
    B = torch.randn(batch, out, inner, generator=g) @ torch.randn(batch, inner, rank, generator=g)
    At = torch.randn(batch, width, rank, generator=g)
    with pytest.MonkeyPatch.context() as patch:
        real, real_many = subspace.thin_qr, subspace.thin_qrs
        patch.setattr(subspace, "thin_qr", lambda X: real(X, cholesky=cholesky))
        patch.setattr(subspace, "thin_qrs", lambda Xs: real_many(Xs, cholesky=cholesky))
        together = subspace.column_bases(B, At)
        apart = [subspace.column_basis(B), subspace.column_basis(At)]
        for got, want in zip(together, apart, strict=True):
            assert torch.equal(got, want)
        wide = torch.randn(batch, 2, 9, generator=g)  # n < m: no stacking
        for got, want in zip(
            subspace.column_bases(B, wide),
            [subspace.column_basis(B), subspace.column_basis(wide)],
            strict=True,
        ):
            assert torch.equal(got, want)
