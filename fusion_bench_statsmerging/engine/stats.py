"""Weight statistics of task vectors: the input of the StatsMergeLearner.

For each expert k and parameter tensor l of its task vector tau = finetuned - pretrained we
compute mean, variance, L2 norm and the top-r singular values of tau reshaped to 2-D as
(out, -1) (conv kernels become (out, in*kh*kw); a 1-D tensor is a 1 x n matrix whose only
singular value is its norm; missing values are padded with zeros). Task-wise statistics
treat the whole task vector as one tensor (its singular values are those of the
per-tensor stack, see :func:`task_wise_statistics`).

Optional features (off by default, see :mod:`.interference`) relate an expert to the *other*
experts' task vectors of the same tensor (``cosine``, ``subspace_overlap``) or to the
pretrained weights (``relative_norm``), so a row is no longer a function of one task vector
alone: :func:`layer_wise_statistics` computes each tensor for all K experts at once.

Raw statistics span many orders of magnitude (a LayerNorm bias vs a 3072x768 MLP matrix), so
:class:`FeatureNormalizer` maps each feature through ``asinh(x / scale)`` (a signed log that
keeps the sign of the mean) and then z-scores it. Its state is saved with the learner so a
trained learner can be applied to a new pool with the same transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .interference import (
    INTERFERENCE_FEATURES, check_pretrained, flat_interference, task_vector_gram, tensor_interference,
)

SCALAR_FEATURES = ("mean", "variance", "norm")
# Features of one task vector alone; the default, and what every earlier run and saved learner used.
DEFAULT_FEATURES = SCALAR_FEATURES + ("singular_values",)
FEATURES = DEFAULT_FEATURES + INTERFERENCE_FEATURES


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


def _expert_feature(t: Tensor, feature: str, rank: int) -> Tensor:
    """One feature of one task-vector tensor (float32): 1 column, ``rank`` for singular values."""
    if feature == "mean":
        return t.mean().reshape(1)
    if feature == "variance":
        return t.var(unbiased=False).reshape(1)
    if feature == "norm":
        return t.norm().reshape(1)
    if feature == "singular_values":
        return top_singular_values(as_matrix(t), rank)
    raise ValueError(f"'{feature}' is not a statistic of one task vector alone (it compares experts or needs the "
                     "pretrained weights): compute it with layer_wise_statistics or task_wise_statistics.")


def tensor_statistics(tensor: Tensor, features: Sequence[str], rank: int) -> Tensor:
    """Statistics vector of one task-vector tensor in the order of ``features`` (per-expert features only)."""
    t = tensor.detach().to(torch.float32)
    return torch.cat([_expert_feature(t, f, rank) for f in features])


def _in_order(columns: Mapping[str, Tensor], features: Sequence[str]) -> Tensor:
    """(K, F) from each feature's (K, width) or (K,) columns, in the order of ``features``."""
    return torch.cat([columns[f].reshape(columns[f].shape[0], -1) for f in features], dim=1)


def parameter_statistics(task_vectors: Sequence[Tensor], features: Sequence[str], rank: int,
                         pretrained: Optional[Tensor] = None) -> Tensor:
    """Statistics of one parameter tensor for all K experts: (K, F).

    All experts at once because the interference features compare them; ``pretrained`` (that
    tensor's pretrained weights) is needed by ``relative_norm`` only.
    """
    columns: Dict[str, Tensor] = dict(tensor_interference(task_vectors, features, rank, pretrained))
    for f in features:
        if f not in columns:
            columns[f] = torch.stack([_expert_feature(t.detach().to(torch.float32), f, rank) for t in task_vectors])
    return _in_order(columns, features)


def layer_wise_statistics(
    task_vectors: Sequence[Mapping[str, Tensor]], features: Sequence[str], rank: int,
    pretrained: Optional[Mapping[str, Tensor]] = None,
) -> Tensor:
    """Statistics of every (expert, tensor) pair: shape (K, L, F), tensors in mapping order.

    ``pretrained`` (name -> pretrained tensor) is needed by ``relative_norm`` only.
    """
    features = validate_features(features)
    check_pretrained(features, pretrained is not None)
    layers = [
        parameter_statistics([tv[name] for tv in task_vectors], features, rank,
                             None if pretrained is None else pretrained[name])
        for name in task_vectors[0]
    ]
    return torch.stack(layers, dim=1)


def _whole_interference(task_vectors: Sequence[Mapping[str, Tensor]], features: Sequence[str],
                        pretrained: Optional[Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    """Interference features of whole flattened task vectors, from the sum of the tensors' Gram
    matrices (one tensor at a time, so no K whole-model copies are held)."""
    if not any(f in INTERFERENCE_FEATURES for f in features):
        return {}
    check_pretrained(features, pretrained is not None)
    names = list(task_vectors[0])
    gram = sum(task_vector_gram(torch.stack([tv[n].detach() for tv in task_vectors])) for n in names)
    base_sq = None if pretrained is None else sum(pretrained[n].detach().to(torch.float64).pow(2).sum() for n in names)
    return flat_interference(gram, base_sq, features)


def _whole_expert_columns(tv: Mapping[str, Tensor], features: Sequence[str], rank: int) -> Dict[str, Tensor]:
    """Per-expert features of one whole task vector (flattened once): name -> (width,)."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tv.values()])
    out: Dict[str, Tensor] = {}
    for f in features:
        if f == "singular_values":
            per_tensor = torch.cat([top_singular_values(as_matrix(t), rank) for t in tv.values()])
            out[f] = per_tensor.sort(descending=True).values[:rank]
        else:
            out[f] = _expert_feature(flat, f, rank)
    return out


def task_wise_statistics(
    task_vectors: Sequence[Mapping[str, Tensor]], features: Sequence[str], rank: int,
    pretrained: Optional[Mapping[str, Tensor]] = None,
) -> Tensor:
    """Statistics of each whole task vector: shape (K, F).

    Mean, variance and norm are over all entries. For the spectrum, a whole model is not one
    matrix; we use the largest per-tensor singular values across the model, which is what
    dominates the model-level update. The interference features treat each whole task vector
    as one flattened (1-D) tensor (see :mod:`.interference`).
    """
    features = validate_features(features)
    columns = _whole_interference(task_vectors, features, pretrained)
    own = [f for f in features if f not in columns]
    rows = [_whole_expert_columns(tv, own, rank) for tv in task_vectors]
    for f in own:
        columns[f] = torch.stack([row[f] for row in rows])
    return _in_order(columns, features)


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
