"""Interference statistics: how one expert's task vector relates to the other experts' (issue 31).

The per-expert statistics of :mod:`.stats` describe each task vector alone; whether two experts
fight over a tensor is invisible to them. These features, one number per (expert, tensor),
describe it cheaply (a K x K Gram matrix, and top-r singular vectors for ``subspace_overlap``):

``cosine``
    cos(tau_k, S_k) with S_k = sum_{j != k} tau_j, both flattened: does expert k push the
    tensor the way the others do together (> 0), or against them (< 0)? It is 0 when tau_k or
    S_k is zero (one expert only, a zero task vector, or others that cancel out), since there
    is then no direction to compare.
``subspace_overlap``
    mean over the other experts j of ||U_k^T U_j||_F^2 / r, in [0, 1], with U_k the top-r left
    singular vectors of tau_k as the (out, -1) matrix of :func:`~.stats.as_matrix` and
    r = min(rank, out, in): do the experts write into the same output directions? Singular
    directions whose singular value is ~0 (below ``1e-6`` of the largest) are left out, so a
    rank-deficient or zero task vector overlaps less (a zero one: 0). A 1-D tensor (a bias, a
    norm's scale) has no such subspace (its matrix is 1 x n, whose left space is trivially
    shared), so there it is the mean over j of cos^2(tau_k, tau_j): the same formula with r = 1
    on the one *right* singular vector tau / ||tau||. 0 with one expert only.
``relative_norm``
    ||tau_k||_F / ||W_0||_F with W_0 the pretrained tensor: how far the fine-tuning moved the
    tensor relative to its own scale (the raw ``norm`` mixes scale with change). It is 0 when
    W_0 is all zeros (no scale to compare with; keeps the learner's inputs finite).

Everything is computed in float64 from the stored task vectors and returned as float32. The
functions are pure (tensors in, tensors out), so the per-tensor path (:mod:`.stats`) and the
fused engine (:mod:`.fused_stats`) call the same code and agree up to float rounding.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

INTERFERENCE_FEATURES = ("cosine", "subspace_overlap", "relative_norm")
NEEDS_PRETRAINED = ("relative_norm",)
# ||S_k||^2 at most this fraction of sum_{j != k} ||tau_j||^2: the others cancel out (up to rounding).
_ZERO = 1e-12
# A singular value at most this fraction of the largest: a null direction, not part of the subspace.
_NULL_DIRECTION = 1e-6


def task_vector_gram(task_vectors: Tensor) -> Tensor:
    """Gram matrix of K flattened task vectors, (K, ...) -> (K, K) in float64: every pairwise
    inner product, from which cosine, norms and 1-D overlaps all follow (and which sums over
    tensors, so a whole model's Gram is the sum of its tensors')."""
    flat = task_vectors.detach().reshape(task_vectors.shape[0], -1).to(torch.float64)
    return flat @ flat.T


def _safe_ratio(num: Tensor, den: Tensor, zero_below: Tensor) -> Tensor:
    """num / den, and 0 where ``den <= zero_below`` (nothing to compare with)."""
    ok = den > zero_below
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def cosine_to_others(gram: Tensor) -> Tensor:
    """cos(tau_k, sum_{j != k} tau_j) of each expert, from the Gram matrix; (K,)."""
    own = gram.diagonal()
    dot = gram.sum(dim=1) - own  # <tau_k, S_k>
    others_sq = gram.sum() - 2 * gram.sum(dim=1) + own  # ||S_k||^2
    others_scale = own.sum() - own  # sum_{j != k} ||tau_j||^2: rounding scale of ||S_k||^2
    den_sq = own * others_sq
    zero = _ZERO * own * others_scale
    return _safe_ratio(dot, den_sq.clamp_min(0).sqrt(), zero.sqrt()).clamp(-1, 1)


def _mean_over_others(pairwise: Tensor) -> Tensor:
    """Row means of a (K, K) matrix without its diagonal; 0 with one expert."""
    k = pairwise.shape[0]
    if k < 2:
        return pairwise.new_zeros(k)
    return (pairwise.sum(dim=1) - pairwise.diagonal()) / (k - 1)


def vector_overlap(gram: Tensor) -> Tensor:
    """``subspace_overlap`` of flattened (1-D) task vectors: mean over j != k of cos^2(tau_k, tau_j)."""
    own = gram.diagonal()
    scale = own[:, None] * own[None, :]
    return _mean_over_others(_safe_ratio(gram ** 2, scale, torch.zeros_like(scale)))


def left_subspaces(matrices: Tensor, rank: int) -> Tensor:
    """Top-r left singular vectors of each of K matrices, (K, m, n) -> (K, m, r), r = min(rank, m, n).

    From the eigenvectors of the smaller Gram matrix (as :func:`~.stats.top_singular_values`),
    in float64; a direction whose singular value is ~0 is a zero column (it spans nothing).
    """
    m64 = matrices.detach().to(torch.float64)
    rows, cols = m64.shape[-2:]
    r = min(rank, rows, cols)
    if rows <= cols:
        values, vectors = torch.linalg.eigh(m64 @ m64.mT)
    else:
        values, vectors = torch.linalg.eigh(m64.mT @ m64)
    values = values.flip(-1)[..., :r].clamp_min(0).sqrt()
    vectors = vectors.flip(-1)[..., :r]
    keep = values > _NULL_DIRECTION * values[..., :1]
    if rows > cols:  # u_i = M v_i / s_i
        vectors = (m64 @ vectors) / torch.where(keep, values, torch.ones_like(values))[..., None, :]
    return vectors * keep[..., None, :]


def subspace_overlap(bases: Tensor) -> Tensor:
    """Mean over j != k of ||U_k^T U_j||_F^2 / r for K bases (K, m, r) -> (K,), in [0, 1]."""
    k, m, r = bases.shape
    cross = bases.permute(1, 0, 2).reshape(m, k * r)
    pairwise = (cross.T @ cross).reshape(k, r, k, r).pow(2).sum(dim=(1, 3))
    return _mean_over_others(pairwise) / max(r, 1)


def relative_norm(gram: Tensor, pretrained_sq_norm: Tensor) -> Tensor:
    """||tau_k|| / ||W_0|| from the Gram matrix and ||W_0||^2; 0 when W_0 is zero. (K,)."""
    pretrained_sq_norm = torch.as_tensor(pretrained_sq_norm, dtype=torch.float64, device=gram.device)
    base = pretrained_sq_norm.sqrt()
    return _safe_ratio(gram.diagonal().clamp_min(0).sqrt(), base, torch.zeros_like(base))


def check_pretrained(features: Sequence[str], has_pretrained: bool) -> None:
    """Fail clearly when a feature needs the pretrained weights and the caller has none."""
    needing = [f for f in features if f in NEEDS_PRETRAINED]
    if needing and not has_pretrained:
        raise ValueError(f"The statistics {needing} divide by the pretrained weights' norm, and no pretrained "
                         "weights were given here; pass them, or leave these features out.")


def flat_interference(gram: Tensor, pretrained_sq_norm: Optional[Tensor],
                      features: Sequence[str]) -> Dict[str, Tensor]:
    """The interference features of flattened task vectors (a 1-D tensor, or a whole task vector
    in task-wise mode) from their Gram matrix: name -> (K,) float32, for the names in ``features``."""
    wanted = [f for f in features if f in INTERFERENCE_FEATURES]
    check_pretrained(wanted, pretrained_sq_norm is not None)
    compute = {"cosine": lambda: cosine_to_others(gram), "subspace_overlap": lambda: vector_overlap(gram),
               "relative_norm": lambda: relative_norm(gram, pretrained_sq_norm)}
    return {f: compute[f]().to(torch.float32) for f in wanted}


def tensor_interference(task_vectors: Union[Tensor, Sequence[Tensor]], features: Sequence[str], rank: int,
                        pretrained: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """The interference features of one parameter tensor: name -> (K,) float32.

    ``task_vectors`` are the K experts' task vectors of that tensor (a stacked (K, *shape) tensor
    or a list); ``pretrained`` its pretrained weights (needed for ``relative_norm`` only).
    """
    if not any(f in INTERFERENCE_FEATURES for f in features):
        return {}
    stack = task_vectors if isinstance(task_vectors, Tensor) else torch.stack(list(task_vectors))
    base_sq = None if pretrained is None else pretrained.detach().to(torch.float64).pow(2).sum()
    out = flat_interference(task_vector_gram(stack), base_sq, features)
    if "subspace_overlap" in out and stack.dim() > 2:  # 1-D tensors keep the vector overlap
        out["subspace_overlap"] = subspace_overlap(
            left_subspaces(stack.reshape(stack.shape[0], stack.shape[1], -1), rank)).to(torch.float32)
    return out


def interference_statistics(task_vectors: Union[Tensor, Sequence[Tensor]], features: Sequence[str], rank: int,
                            pretrained: Optional[Tensor] = None) -> Tensor:
    """(K, F') tensor of the interference features in ``features`` (in their order) for one tensor."""
    columns = tensor_interference(task_vectors, features, rank, pretrained)
    wanted = [f for f in features if f in columns]
    if not wanted:
        return torch.zeros(len(task_vectors), 0)
    return torch.stack([columns[f] for f in wanted], dim=1)


def group_interference(task_vectors: Tensor, pretrained: Tensor, shapes: Sequence[torch.Size],
                       features: Sequence[str], rank: int) -> Tensor:
    """:func:`interference_statistics` of each tensor of a fused engine's group: task vectors
    (n, K, numel) and pretrained weights (n, numel) -> (n, K, F'), one tensor at a time (so only
    one tensor's float64 copy is alive), through the very code of the per-tensor path."""
    k = task_vectors.shape[1]
    return torch.stack([
        interference_statistics(task_vectors[j].view(k, *shape), features, rank, pretrained[j].view(shape))
        for j, shape in enumerate(shapes)
    ])
