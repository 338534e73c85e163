"""Top eigenvalues of batches of symmetric PSD Gram matrices: the singular values of task vectors.

Only the top few singular values of each task-vector matrix are needed (the learner's
``singular_values`` feature), so :func:`top_gram_eigenvalues` solves a batch of Gram matrices
with a block-Krylov Rayleigh-Ritz (:func:`krylov_top_eigenvalues`) and a residual bound when they
are large (side > :data:`EXACT_MAX_DIM`), falling back to the exact eigenvalues
(:func:`exact_top_eigenvalues`, :func:`~.stats.top_singular_values`'s method) for any matrix whose
bound is not met; small ones use the exact method directly.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

EXACT_MAX_DIM = 128  # Gram matrices up to this size: exact eigenvalues are cheap anyway
KRYLOV_MAX_DIM = 160  # largest Krylov subspace before falling back to the exact eigenvalues
KRYLOV_TOL = 1e-8  # estimated eigenvalue error, relative (sigma: half of it)
GRAM_BATCH_BYTES = 1 << 30  # Gram matrices solved together, to bound device memory


def exact_top_eigenvalues(gram: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvalues of symmetric PSD matrices, descending, clamped at 0, zero-padded."""
    eig = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)[..., :rank]
    if eig.shape[-1] < rank:
        eig = torch.cat([eig, eig.new_zeros(*eig.shape[:-1], rank - eig.shape[-1])], dim=-1)
    return eig


def _whiten(w: Tensor) -> Tensor:
    """Orthonormal columns spanning ``w``'s numerically non-null part; dropped columns are zero."""
    gram = w.mT @ w
    d, v = torch.linalg.eigh((gram + gram.mT) / 2)
    keep = d > 1e-12 * d[..., -1:].clamp_min(torch.finfo(d.dtype).tiny)
    inv = torch.where(keep, d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt(), torch.zeros_like(d))
    return w @ (v * inv.unsqueeze(-2))


def _orthonormal_block(w: Tensor, basis: Optional[Tensor]) -> Tensor:
    """Project ``w`` off ``basis`` and whiten, twice: orthogonality to working precision."""
    for _ in range(2):
        if basis is not None:
            w = w - basis @ (basis.mT @ w)
        w = _whiten(w)
    return w


def _ritz_check(basis: Tensor, images: Tensor, residual: Tensor, block: int, rank: int,
                tol: float) -> Tuple[Tensor, Tensor]:
    """Top Ritz values and whether each matrix's error estimate is within ``tol`` (on the CPU: tiny).

    With G Q = Q T + E e_last^T (full reorthogonalisation), the Ritz pair (theta, Q s) has
    residual norm r = ||E s_last||: an eigenvalue lies within r of theta, and within
    r^2 / gap when the other eigenvalues are at least ``gap`` away (Kato-Temple). The gap is
    estimated from the neighbouring Ritz values, widened by their own residuals.
    """
    t = (basis.mT @ images).cpu()
    theta, vecs = torch.linalg.eigh((t + t.mT) / 2)
    want = min(rank + 1, theta.shape[-1])
    theta, vecs = theta.flip(-1)[:, :want].clamp_min(0), vecs.flip(-1)[:, :, :want]
    last = vecs[:, -block:, :]  # (B, block, want)
    f = (residual.mT @ residual).cpu()
    res = torch.einsum("bji,bjk,bki->bi", last, f, last).clamp_min(0).sqrt()
    dist = (theta[:, :, None] - theta[:, None, :]).abs() - res[:, None, :]
    dist = dist + torch.diag_embed(torch.full_like(theta, float("inf")))  # ignore i == j
    gap = dist.min(dim=-1).values.clamp_min(0)
    err = torch.minimum(res, torch.where(gap > 0, res.square() / gap, torch.full_like(res, float("inf"))))
    floor = 1e-13 * theta[:, :1]
    ok = (err[:, :rank] <= tol * theta[:, :rank] + floor).all(dim=-1)
    return theta[:, :rank], ok


def krylov_top_eigenvalues(gram: Tensor, rank: int, max_dim: int = KRYLOV_MAX_DIM,
                           tol: float = KRYLOV_TOL) -> Tuple[Tensor, Tensor]:
    """Batched block-Krylov Rayleigh-Ritz for the top-``rank`` eigenvalues of PSD matrices.

    Returns (values (B, rank) descending, converged (B,) bool). Matrices are scaled by their
    trace; the start block is seeded, so results are reproducible. Converged matrices leave
    the batch at each check, so a few slow ones do not hold the others back.
    """
    b, n, _ = gram.shape
    block = min(32, max(8, 2 * rank))
    width = max(block, min(max_dim, n) // block * block)
    scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    g = gram / scale[:, None, None]
    gen = torch.Generator(device=gram.device).manual_seed(0)
    start = torch.randn(b, n, block, generator=gen, device=gram.device, dtype=gram.dtype)
    basis = gram.new_zeros(b, n, width)  # Q, filled block by block
    images = gram.new_zeros(b, n, width)  # G Q
    basis[..., :block] = _orthonormal_block(start, None)
    images[..., :block] = g @ basis[..., :block]
    values = torch.zeros(b, rank, dtype=gram.dtype)
    done = torch.zeros(b, dtype=torch.bool)
    active = torch.arange(b)
    m, check_at = block, 4 * block
    while True:
        q, gq = basis[..., :m], images[..., :m]
        latest = gq[..., m - block:]
        residual = latest - q @ (q.mT @ latest)  # E: the part of G Q_last outside span(Q)
        last_round = m + block > width
        if m >= check_at or last_round:
            theta, ok = _ritz_check(q, gq, residual, block, rank, tol)
            values[active[ok]], done[active[ok]] = theta[ok], True
            if last_round or bool(ok.all()):
                break
            if bool(ok.any()):
                keep = (~ok).nonzero().squeeze(-1)
                active = active[keep]
                keep = keep.to(gram.device)
                g, basis, images, residual = (x.index_select(0, keep) for x in (g, basis, images, residual))
                q, gq = basis[..., :m], images[..., :m]
            check_at = m + max(2 * block, m // 2)
        nxt = _orthonormal_block(residual, q)
        basis[..., m:m + block] = nxt
        images[..., m:m + block] = g @ nxt
        m += block
    return values.to(gram.device) * scale[:, None], done.to(gram.device)


def _count(info: Optional[Dict[str, int]], key: str, value: int) -> None:
    if info is not None:
        info[key] = info.get(key, 0) + value


def top_gram_eigenvalues(gram: Tensor, rank: int, info: Optional[Dict[str, int]] = None) -> Tensor:
    """Top-``rank`` eigenvalues of PSD Gram matrices (B, n, n): exact for small n, else Krylov + fallback.

    ``info`` (optional) counts the matrices solved ``exact`` (small), by ``krylov``, and by
    ``fallback`` (Krylov bound not met: exact eigenvalues, the slow path).
    """
    n = gram.shape[-1]
    if n <= EXACT_MAX_DIM or 4 * rank >= n:
        _count(info, "exact", gram.shape[0])
        return exact_top_eigenvalues(gram, rank)
    values, ok = krylov_top_eigenvalues(gram, rank)
    missing = (~ok).nonzero().squeeze(-1)
    _count(info, "krylov", gram.shape[0] - missing.numel())
    _count(info, "fallback", missing.numel())
    if missing.numel():
        values[missing] = exact_top_eigenvalues(gram.index_select(0, missing), rank)
    return values
