"""Exact recompression from factors equals the dense SVD truncation (Eckart–Young)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasoup.lowrank import choose_rank, dense_lowrank, recompress
from tests.conftest import on_gpu

shapes = st.tuples(st.integers(2, 24), st.integers(2, 24), st.integers(1, 12), st.integers(0, 2**16))


def _factors(out: int, inn: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inn, generator=g, dtype=torch.float64), torch.randn(
        out, r, generator=g, dtype=torch.float64
    )


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_full_rank_recompression_is_exact(shape: tuple[int, int, int, int]) -> None:
    A, B = _factors(*shape)
    low = recompress(A, B)
    assert torch.allclose(low.B @ low.A, B @ A, atol=1e-10, rtol=0)
    assert low.rank <= min(shape[:3])
    assert low.discarded_energy < 1e-20


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(1, 12))
def test_rank_k_matches_dense_truncated_svd(shape: tuple[int, int, int, int], k: int) -> None:
    A, B = _factors(*shape)
    delta = B @ A
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(k, S.numel())
    best = U[:, :keep] @ torch.diag(S[:keep]) @ Vh[:keep]
    low = recompress(A, B, rank=k)
    assert torch.allclose(low.B @ low.A, best, atol=1e-8 * max(1.0, float(S[0])), rtol=0)
    # Eckart–Young: the error is exactly the discarded singular values.
    error = float((delta - low.B @ low.A).square().sum())
    assert abs(error - float(S[keep:].square().sum())) <= 1e-8 * float(S.square().sum()) + 1e-12
    expected = float(S[keep:].square().sum() / S.square().sum())
    assert abs(low.discarded_energy - expected) < 1e-9


def test_energy_threshold_keeps_the_fewest_values() -> None:
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: cumulative 9/14, 13/14, 1
    assert choose_rank(S, None, 0.5) == 1
    assert choose_rank(S, None, 0.9) == 2
    assert choose_rank(S, None, 0.93) == 3
    assert choose_rank(S, None, 1.0) == 3
    assert choose_rank(S, 1, 1.0) == 1
    assert choose_rank(torch.zeros(3), None, 0.9) == 3  # nothing to choose from: keep all (zeros)


def test_pad_to_adds_zero_rows_only() -> None:
    A, B = _factors(6, 5, 3, 1)
    low = recompress(A, B, rank=2, pad_to=4)
    assert low.A.shape == (4, 5) and low.B.shape == (6, 4)
    assert torch.count_nonzero(low.A[2:]) == 0 and torch.count_nonzero(low.B[:, 2:]) == 0


def test_large_module_singular_values_without_densifying() -> None:
    # 4096 x 11008 at rank 64 (a 7B MLP module): ΔW would be 180 MB. The squared singular values of B A
    # are the eigenvalues of (BᵀB)(A Aᵀ), a 64 x 64 product: an independent check that needs no ΔW.
    g = torch.Generator().manual_seed(0)
    A, B = (
        torch.randn(64, 11008, generator=g, dtype=torch.float64),
        torch.randn(4096, 64, generator=g, dtype=torch.float64),
    )
    low = recompress(A, B, rank=32)
    assert low.A.shape == (32, 11008) and low.B.shape == (4096, 32)
    eig = torch.linalg.eigvals((B.T @ B) @ (A @ A.T)).real.sort(descending=True).values
    assert torch.allclose(low.singular_values.square(), eig, rtol=1e-8)
    kept = float(((low.B.T @ low.B) * (low.A @ low.A.T)).sum())  # ‖B_k A_k‖_F² = tr(BᵀB A Aᵀ)
    assert kept == pytest.approx(float(eig[:32].sum()), rel=1e-9)


def test_dense_exact_and_randomized_agree_on_a_low_rank_matrix() -> None:
    A, B = _factors(40, 30, 5, 3)
    delta = (B @ A).float()
    exact = dense_lowrank(delta, rank=5, mode="exact")
    fast = dense_lowrank(delta, rank=5, mode="randomized", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(exact.B @ exact.A, delta, atol=1e-3)
    assert torch.allclose(fast.B @ fast.A, delta, atol=1e-3)
    assert fast.discarded_energy < 1e-6 and exact.discarded_energy < 1e-6


def test_randomized_reports_the_true_residual() -> None:
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(50, 40, generator=g)
    low = dense_lowrank(delta, rank=6, mode="randomized", generator=torch.Generator().manual_seed(2))
    residual = float((delta - low.B @ low.A).square().sum() / delta.square().sum())
    assert abs(low.discarded_energy - residual) < 1e-4
    exact = dense_lowrank(delta, rank=6, mode="exact")
    assert exact.discarded_energy <= low.discarded_energy + 1e-6  # Eckart–Young is the floor


@settings(max_examples=30, deadline=None)
@given(st.integers(20, 60), st.integers(1, 12), st.floats(0.0, 6.0), st.integers(0, 2**16))
def test_orthonormal_basis_spans_the_columns(rows: int, width: int, decay: float, seed: int) -> None:
    from lorasoup.lowrank import thin_qr

    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -decay, width)  # up to 1e6 condition number
    Y = torch.randn(rows, width, generator=g) * scales
    Q = thin_qr(Y, cholesky=True)[0].float()
    assert Q.shape == Y.shape
    assert torch.allclose(Q.T @ Q, torch.eye(width), atol=1e-4)
    assert torch.allclose(Q @ (Q.T @ Y), Y, atol=1e-4 * float(Y.abs().max()))


def test_orthonormal_falls_back_on_rank_deficient_input() -> None:
    from lorasoup.lowrank import thin_qr

    g = torch.Generator().manual_seed(0)
    Y = torch.randn(30, 2, generator=g) @ torch.randn(2, 6, generator=g)  # rank 2, width 6
    Q = thin_qr(Y, cholesky=True)[0].float()
    assert torch.isfinite(Q).all()
    assert torch.allclose(Q @ (Q.T @ Y), Y, atol=1e-4)


def test_several_thin_qrs_are_each_ones_bits_with_fallback_per_matrix() -> None:
    """``thin_qrs`` (one health read back for all) gives each matrix's own ``thin_qr``: the healthy one
    keeps CholeskyQR2, the rank-deficient one alone falls back to Householder."""
    from lorasoup.lowrank import _cholesky_qr2, thin_qr, thin_qrs

    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(30, 6, generator=g)
    deficient = torch.cat([torch.randn(30, 5, generator=g), torch.zeros(30, 1)], dim=1)  # Cholesky fails
    assert not bool(_cholesky_qr2(deficient.double())[2]) and bool(_cholesky_qr2(healthy.double())[2])
    together = thin_qrs([healthy, deficient], cholesky=True)
    for X, (Q, R) in zip([healthy, deficient], together, strict=True):
        want_Q, want_R = thin_qr(X, cholesky=True)
        assert torch.equal(Q, want_Q) and torch.equal(R, want_R)
    assert torch.equal(together[0][0], _cholesky_qr2(healthy.double())[0])  # not redone by Householder
    assert torch.equal(together[1][0], torch.linalg.qr(deficient.double())[0])


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 12),
    st.integers(0, 3),
    st.booleans(),
    st.integers(0, 3),
    st.integers(0, 2**16),
)
def test_thin_qr_factors_tall_wide_and_rank_deficient_matrices(
    rows, cols, deficit, cholesky, batch, seed
) -> None:
    """Q has orthonormal columns and Q R reproduces X, whichever path (CholeskyQR2 or the Householder
    fallback for rank-deficient or wide X) produced them, for one matrix or a batch (batch 0: none;
    the batched core-space merge's CholeskyQR2 once built its identity from the batch size)."""
    from lorasoup.lowrank import thin_qr

    g = torch.Generator().manual_seed(seed)
    inner = max(1, min(rows, cols) - deficit)
    lead = (batch,) if batch else ()
    X = torch.randn(*lead, rows, inner, generator=g) @ torch.randn(*lead, inner, cols, generator=g)
    Q, R = thin_qr(X, cholesky=cholesky)  # CholeskyQR2 is what a GPU runs
    p = min(rows, cols)
    assert Q.shape == (*lead, rows, p) and R.shape == (*lead, p, cols) and Q.dtype == torch.float64
    assert torch.allclose(Q.mT @ Q, torch.eye(p, dtype=torch.float64).expand(*lead, p, p), atol=1e-10)
    assert torch.allclose(Q @ R, X.double(), atol=1e-5 * max(1.0, float(X.abs().max())))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 10), st.integers(10, 50), st.integers(0, 3), st.integers(0, 2**16))
def test_svd_of_a_wide_matrix_through_its_gram_matches_the_dense_svd(width, n, deficit, seed) -> None:
    from lorasoup.lowrank import _svd_of_wide

    g = torch.Generator().manual_seed(seed)
    inner = max(1, width - deficit)
    Y = torch.randn(width, inner, generator=g) @ torch.randn(inner, n, generator=g)
    U, S, Vh = _svd_of_wide(Y)
    expected = torch.linalg.svdvals(Y.double())
    assert torch.allclose(S, expected, atol=1e-6 * float(expected[0]))
    assert torch.allclose(U @ torch.diag(S) @ Vh, Y.double(), atol=1e-5 * float(expected[0]))
    live = 1e-6 * S[0] < S
    assert torch.allclose(Vh[live] @ Vh[live].T, torch.eye(int(live.sum()), dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("deficient", [False, True])
@pytest.mark.parametrize("unhealthy", [False, True])
def test_randomized_svd_by_cholesky_qr_matches_householder(deficient, unhealthy, monkeypatch) -> None:
    """What a GPU runs (CholeskyQR2, its health read once) gives the CPU's result, and so does the
    Householder redo that an unhealthy CholeskyQR2 pass triggers."""
    from lorasoup import lowrank
    from lorasoup.lowrank import _randomized_svd

    if unhealthy:
        real = lowrank._cholesky_qr2
        monkeypatch.setattr(lowrank, "_cholesky_qr2", lambda X: (*real(X)[:2], torch.tensor(False)))

    g = torch.Generator().manual_seed(3)
    inner = 5 if deficient else 60
    M = torch.randn(70, inner, generator=g) @ torch.randn(inner, 50, generator=g)
    run = lambda cholesky: _randomized_svd(M, 20, 2, torch.Generator().manual_seed(0), cholesky=cholesky)  # noqa: E731
    U1, S1, Vh1 = run(True)
    U2, S2, Vh2 = run(False)
    assert torch.allclose(S1, S2, atol=1e-4 * float(S2[0]))
    live = 1e-3 * S2[0] < S2
    approx = lambda U, S, Vh: (U[:, live] * S[live]) @ Vh[live]  # noqa: E731
    assert torch.allclose(approx(U1, S1, Vh1), approx(U2, S2, Vh2), atol=1e-3 * float(S2[0]))


def test_tf32_scope_restores_the_process_setting() -> None:
    from lorasoup.lowrank import _tf32_matmuls

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with _tf32_matmuls(True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError), _tf32_matmuls(True):
        raise RuntimeError("an error inside the block")
    assert matmul.fp32_precision == before
    with _tf32_matmuls(False):
        assert matmul.fp32_precision == before


@on_gpu
def test_tf32_range_finder_keeps_the_energy_and_reports_it_exactly() -> None:
    """TF32 only steers the subspace: the energy kept moves by far less than the method's own gap,
    and the reported residual is still the true one of the returned factors."""
    before = torch.backends.cuda.matmul.fp32_precision
    g = torch.Generator().manual_seed(0)
    spectrum = 0.97 ** torch.arange(384.0)
    U = torch.linalg.qr(torch.randn(1024, 384, generator=g))[0]
    V = torch.linalg.qr(torch.randn(512, 384, generator=g))[0]
    delta = ((U * spectrum) @ V.T).float().cuda()
    runs = {}
    for tf32 in (True, False):
        generator = torch.Generator(device="cuda").manual_seed(1)
        low = dense_lowrank(delta, rank=32, mode="randomized", generator=generator, tf32=tf32)
        residual = (
            delta.double() - low.B.double() @ low.A.double()
        ).square().sum() / delta.double().square().sum()
        assert abs(float(residual) - low.discarded_energy) < 1e-5
        runs[tf32] = low.discarded_energy
    assert abs(runs[True] - runs[False]) < 1e-5
    assert torch.backends.cuda.matmul.fp32_precision == before  # the process's setting is untouched
