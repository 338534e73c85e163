"""Weight statistics of task vectors: the input of the StatsMergeLearner.

For each expert k and parameter tensor l of its task vector tau = finetuned - pretrained we
compute mean, variance, L2 norm and the top-r singular values of tau reshaped to 2-D as
(out, -1) (conv kernels become (out, in*kh*kw); a 1-D tensor is a 1 x n matrix whose only
singular value is its norm; missing values are padded with zeros). Task-wise statistics
treat the whole task vector as one tensor (its singular values are those of the
per-tensor stack, see :func:`task_wise_statistics`).

Raw statistics span many orders of magnitude (a LayerNorm bias vs a 3072x768 MLP matrix), so
:class:`FeatureNormalizer` maps each feature through ``asinh(x / scale)`` (a signed log that
keeps the sign of the mean) and then z-scores it. Its state is saved with the learner so a
trained learner can be applied to a new pool with the same transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence

import torch
from torch import Tensor

FEATURES = ("mean", "variance", "norm", "singular_values")


def validate_features(features: Sequence[str]) -> List[str]:
    """Check a configured feature subset (the paper's ablation) and return it as a list."""
    features = list(features)
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise ValueError(
            f"Unknown or empty statistics features {unknown or features}; choose a non-empty "
            f"subset of {list(FEATURES)}."
        )
    return features


def num_features(features: Sequence[str], rank: int) -> int:
    """Width of one statistics vector: one column per scalar feature, ``rank`` for singular values."""
    return sum(rank if f == "singular_values" else 1 for f in features)


def as_matrix(tensor: Tensor) -> Tensor:
    """View a parameter as the 2-D matrix whose spectrum we summarise: (out, -1); vectors are 1 x n."""
    if tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def top_singular_values(matrix: Tensor, rank: int) -> Tensor:
    """Top-``rank`` singular values of a (batch of) matrix, zero-padded to ``rank``.

    Only the leading values are needed, so instead of a full SVD we take the eigenvalues of
    the smaller Gram matrix (min(m, n) square), in float64 for accuracy: the squared
    spectrum's small end loses precision, the top values we keep do not.
    """
    m = matrix.to(torch.float64)
    gram = m @ m.transpose(-1, -2) if m.shape[-2] <= m.shape[-1] else m.transpose(-1, -2) @ m
    eig = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()
    values = eig[..., :rank]
    if values.shape[-1] < rank:
        pad = values.new_zeros(*values.shape[:-1], rank - values.shape[-1])
        values = torch.cat([values, pad], dim=-1)
    return values.to(torch.float32)


def tensor_statistics(tensor: Tensor, features: Sequence[str], rank: int) -> Tensor:
    """Statistics vector of one task-vector tensor in the order of ``features``."""
    t = tensor.detach().to(torch.float32)
    parts: List[Tensor] = []
    for f in features:
        if f == "mean":
            parts.append(t.mean().reshape(1))
        elif f == "variance":
            parts.append(t.var(unbiased=False).reshape(1))
        elif f == "norm":
            parts.append(t.norm().reshape(1))
        else:
            parts.append(top_singular_values(as_matrix(t), rank))
    return torch.cat(parts)


def layer_wise_statistics(
    task_vectors: Sequence[Mapping[str, Tensor]], features: Sequence[str], rank: int
) -> Tensor:
    """Statistics of every (expert, tensor) pair: shape (K, L, F), tensors in mapping order."""
    rows = []
    for tv in task_vectors:
        rows.append(torch.stack([tensor_statistics(t, features, rank) for t in tv.values()]))
    return torch.stack(rows)


def task_wise_statistics(
    task_vectors: Sequence[Mapping[str, Tensor]], features: Sequence[str], rank: int
) -> Tensor:
    """Statistics of each whole task vector: shape (K, F).

    Mean, variance and norm are over all entries. For the spectrum, a whole model is not one
    matrix; we use the largest per-tensor singular values across the model, which is what
    dominates the model-level update.
    """
    rows = []
    for tv in task_vectors:
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tv.values()])
        parts: List[Tensor] = []
        for f in features:
            if f == "singular_values":
                per_tensor = torch.cat([top_singular_values(as_matrix(t), rank) for t in tv.values()])
                parts.append(per_tensor.sort(descending=True).values[:rank])
            else:
                parts.append(tensor_statistics(flat, [f], rank))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@dataclass
class FeatureNormalizer:
    """Signed-log then z-score, per feature column; fitted once on the pool being merged."""

    scale: Tensor
    center: Tensor
    spread: Tensor

    @classmethod
    def fit(cls, raw: Tensor, eps: float = 1e-12) -> "FeatureNormalizer":
        flat = raw.reshape(-1, raw.shape[-1]).to(torch.float64)
        scale = flat.abs().median(dim=0).values.clamp_min(eps)
        z = torch.asinh(flat / scale)
        spread = z.std(dim=0, unbiased=False)
        spread = torch.where(spread > 1e-6, spread, torch.ones_like(spread))
        return cls(scale.float(), z.mean(dim=0).float(), spread.float())

    def __call__(self, raw: Tensor) -> Tensor:
        z = torch.asinh(raw / self.scale.to(raw.device))
        return (z - self.center.to(raw.device)) / self.spread.to(raw.device)

    def state_dict(self) -> Dict[str, Tensor]:
        return {"scale": self.scale, "center": self.center, "spread": self.spread}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> "FeatureNormalizer":
        return cls(state["scale"], state["center"], state["spread"])
