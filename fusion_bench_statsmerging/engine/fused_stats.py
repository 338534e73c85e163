"""Task-vector statistics straight from grouped task-vector buffers (a fused engine's), batched per group.

:func:`grouped_task_vector_stats` computes the same (K, L, F) tensor as
:func:`~.stats.layer_wise_statistics` on the buffers' device, without materialising one task
vector at a time; singular values come from the Gram matrices (:mod:`.spectra`). It reads plain
buffers, not the engine: the engine (:mod:`.fused`) calls it, never the reverse.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .spectra import GRAM_BATCH_BYTES, top_gram_eigenvalues
from .interference import INTERFERENCE_FEATURES, group_interference
from .stats import SCALAR_FEATURES, num_features, validate_features

# one group of same-sized tensors: each member's shape, its column in the (K, L) statistics, the task
# vectors (n, K, numel) of the n members and their pretrained weights (n, numel)
GroupBuffer = Tuple[Sequence[torch.Size], Sequence[int], Tensor, Tensor]


def _matrix_dims(shape: torch.Size) -> Tuple[int, int]:
    """(rows, cols) of :func:`~.stats.as_matrix` for a tensor of ``shape``."""
    if len(shape) <= 1:
        return 1, int(math.prod(shape))
    return int(shape[0]), int(math.prod(shape[1:]))


def _gram(tv_rows: Tensor, dims: Tuple[int, int]) -> Tensor:
    """Gram matrices (K, s, s) on the smaller side of one tensor's K task vectors, in float64."""
    rows, cols = dims
    m = tv_rows.reshape(tv_rows.shape[0], rows, cols).to(torch.float64)
    return m @ m.mT if rows <= cols else m.mT @ m


def _scalar_features(tv: Tensor, features: Sequence[str], chunk: int) -> Dict[str, Tensor]:
    """mean / variance / norm of each (tensor, expert) row in float32: (n, K) each."""
    out: Dict[str, List[Tensor]] = {f: [] for f in features if f in SCALAR_FEATURES}
    for start in range(0, tv.shape[0], chunk):
        x = tv[start:start + chunk].to(torch.float32)
        for f in out:
            if f == "mean":
                out[f].append(x.mean(dim=-1))
            elif f == "variance":
                out[f].append(x.var(dim=-1, unbiased=False))
            else:
                out[f].append(x.norm(dim=-1))
    return {f: torch.cat(v) for f, v in out.items()}


@torch.no_grad()
def grouped_task_vector_stats(groups: Iterable[GroupBuffer], num_layers: int, features: Sequence[str], rank: int,
                              info: Optional[Dict[str, int]] = None) -> Tensor:
    """The (K, L, F) tensor of :func:`~.stats.layer_wise_statistics` of the ``num_layers`` tensors in
    ``groups``, batched per group on the buffers' device.

    Scalar features are row reductions of each group buffer; the interference features come from
    :func:`~.interference.group_interference` (the per-tensor path's code). Singular values come from Gram
    matrices batched by size across groups (fc1 (3072, 768) and fc2 (768, 3072) share the
    768 x 768 Gram), solved by :func:`top_gram_eigenvalues` (``info`` receives its counts).
    """
    features = validate_features(features)
    groups = list(groups)
    device = groups[0][2].device if groups else torch.device("cpu")
    k_models = groups[0][2].shape[1] if groups else 0
    out = torch.zeros(k_models, num_layers, num_features(features, rank), dtype=torch.float32, device=device)
    columns: Dict[str, int] = {}
    col = 0
    for f in features:
        columns[f] = col
        col += rank if f == "singular_values" else 1

    interference = [columns[f] for f in features if f in INTERFERENCE_FEATURES]
    # (gram size) -> list of (coefficient column, task-vector rows (K, s), matrix dims)
    spectra: Dict[int, List[Tuple[int, Tensor, Tuple[int, int]]]] = {}
    for shapes, positions, tv, base in groups:
        chunk = max(1, (256 << 20) // max(1, tv.shape[-1] * k_models * 4))
        pos = torch.as_tensor(list(positions), dtype=torch.long, device=device)
        for f, values in _scalar_features(tv, features, chunk).items():
            out[:, pos, columns[f]] = values.t()
        if interference:  # (n, K, F') -> (K, n, F') at the group's columns
            out[:, pos[:, None], torch.tensor(interference, device=device)] = \
                group_interference(tv, base, shapes, features, rank).transpose(0, 1)
        if "singular_values" in features:
            for j, (shape, p) in enumerate(zip(shapes, positions)):
                dims = _matrix_dims(shape)
                spectra.setdefault(min(dims), []).append((p, tv[j], dims))

    if "singular_values" in features:
        sv = slice(columns["singular_values"], columns["singular_values"] + rank)
        for size, jobs in spectra.items():
            per_batch = max(1, GRAM_BATCH_BYTES // (k_models * size * size * 8))
            for start in range(0, len(jobs), per_batch):
                part = jobs[start:start + per_batch]
                grams = torch.cat([_gram(rows, dims) for _, rows, dims in part])  # (len(part) * K, s, s)
                eig = top_gram_eigenvalues(grams, rank, info).sqrt().to(torch.float32)
                eig = eig.reshape(len(part), k_models, rank)
                cols = torch.tensor([p for p, _, _ in part], device=device)
                out[:, cols, sv] = eig.transpose(0, 1)
    return out
