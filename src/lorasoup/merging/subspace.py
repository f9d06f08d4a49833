"""Orthonormal bases of thin matrices and exact SVDs of low-rank products, without densifying.

Pure tensor functions shared by the core-space merges (``merging.core_space``) and TSV-Merge
(``merging.tsv``). Everything works in float64 (the matrices are thin: ``(n, R)`` with ``R`` a sum
of LoRA ranks) and returns float64 on the input's device; the small ``R × R`` SVDs run on the CPU
whatever the device, as ``lorasoup.lowrank.recompress`` does. Leading dimensions are a batch (the
batched core-space merge decomposes a group of same-shaped modules in one call, so one transfer to
the host and back serves the whole group). Cost ``O(n·R²)``; no ``n × n`` or ``out × in`` tensor is
ever built.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from lorasoup.lowrank import thin_qr, thin_qrs


def thin_svd(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a tall or wide ``X (*, n, m)``: ``U (*, n, p)``, ``S (*, p)``, ``Vh (*, p, m)``,
    ``p = min(n, m)``.

    Through a thin QR of the tall side (``lowrank.thin_qr``: CholeskyQR2 on a GPU, Householder on a
    CPU) and the SVD of its small triangular factor, so the large dimension is only ever multiplied,
    never decomposed densely. ``S`` is in descending order.
    """
    work = X.double()
    if work.shape[-2] < work.shape[-1]:  # wide: the SVD of Xᵀ, transposed back
        V, S, Uh = thin_svd(work.mT)
        return Uh.mT, S, V.mT
    Q, R = thin_qr(work)  # (*, n, p), (*, p, m)
    u, S, Vh = host_svd(R)  # (*, p, p), (*, p), (*, p, m)
    return Q @ u.to(work.device), S.to(work.device), Vh.to(work.device)


def host_svd(R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(R, full_matrices=False)`` on the host, a batch ``R (*, p, m)`` spread over
    torch's intra-op threads.

    One batched call runs LAPACK's small SVDs one after another on one core (a 7B adapter pair's
    core-space bases: ~320 of 64 × 64, 0.6–0.75 ms each, about half of a batched core-space merge's
    host time); chunks of the batch in threads (the SVD releases the GIL) give the same bits, ~1.7×
    faster on 2 cores and more on a GPU host's 16. Every batch of two or more is split: the batched
    merge's groups are small (a 7B pair's q/k/v modules come 15 to a group, up and down 5), and a
    thread's start (~0.1 ms) is a fraction of one SVD.
    """
    host = R.cpu()
    batch = host.shape[:-2]
    count = batch.numel()  # 1 for a single matrix
    workers = min(torch.get_num_threads(), count)
    if workers < 2:
        return torch.linalg.svd(host, full_matrices=False)
    chunks = host.reshape(count, *host.shape[-2:]).chunk(workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="lorasoup-svd") as pool:
        parts = list(pool.map(lambda chunk: torch.linalg.svd(chunk, full_matrices=False), chunks))
    u, S, Vh = (torch.cat(pieces) for pieces in zip(*parts, strict=True))
    return u.reshape(*batch, *u.shape[1:]), S.reshape(*batch, *S.shape[1:]), Vh.reshape(*batch, *Vh.shape[1:])


def column_basis(X: Tensor) -> Tensor:
    """``U (*, n, p)``: the left singular vectors of ``X (*, n, m)``, an orthonormal basis holding its
    columns."""
    return thin_svd(X)[0]


def column_bases(*Xs: Tensor) -> list[Tensor]:
    """``[column_basis(X) for X in Xs]``, bit for bit, with the small SVDs of all of them in one host
    call when every ``X (*, n_j, m)`` is tall with the same batch and ``m`` (the core space's two
    sides: ``B (G, out, R)`` and ``Aᵀ (G, in, R)``): one round trip to the host instead of one per
    ``X``, and twice the matrices to spread over the threads (``host_svd``); their thin QRs' health
    is read back in one sync too (``lowrank.thin_qrs``)."""
    shapes = {(X.shape[:-2], X.shape[-1]) for X in Xs}
    if len(shapes) != 1 or any(X.shape[-2] < X.shape[-1] for X in Xs):
        return [column_basis(X) for X in Xs]
    factored = thin_qrs(Xs)  # [(Q (*, n_j, m), R (*, m, m))]
    u, _, _ = host_svd(torch.stack([R for _, R in factored]))  # (len(Xs), *, m, m)
    return [Q @ u_j.to(Q.device) for (Q, _), u_j in zip(factored, u, strict=True)]


def product_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD of ``B @ A`` from the factors: ``B (out, r)``, ``A (r, in)`` →
    ``U (out, p)``, ``S (p,)``, ``V (in, p)`` with ``B A = U diag(S) Vᵀ``, ``p = min(out, in, r)``.

    Thin QR of ``B`` and ``Aᵀ``, then the SVD of the ``r × r`` core ``R_B R_Aᵀ``. (``V``, not ``Vᵀ``:
    the TSV merge concatenates right singular vectors as columns.)
    """
    Q_b, R_b = thin_qr(B)  # (out, p_b), (p_b, r)
    Q_a, R_a = thin_qr(A.T)  # (in, p_a), (p_a, r)
    u, S, vh = torch.linalg.svd((R_b @ R_a.T).cpu(), full_matrices=False)  # (p_b, p), (p,), (p, p_a)
    device = Q_b.device
    return Q_b @ u.to(device), S.to(device), Q_a @ vh.T.to(device)


def polar_factor(X: Tensor) -> Tensor:
    """The orthogonal polar factor of ``X (*, n, m)``: ``P Qᵀ`` where ``X = P Σ Qᵀ`` (thin SVD).

    It is the matrix with orthonormal columns (rows, if ``m > n``) nearest to ``X`` in Frobenius norm
    (the orthogonal Procrustes solution), TSV-Merge's "whitening" of concatenated singular vectors.
    Equivariant: ``polar_factor(U X) = U polar_factor(X)`` for any ``U`` with orthonormal columns,
    which is why TSV gives the same update in core space as on ``ΔW``.
    """
    P, _, Qh = thin_svd(X)
    return P @ Qh
