"""Task-vector statistics of a LoRA update computed from its factors, without forming the update.

A LoRA adapter changes a weight W (out x in) by dW = s * B @ A with B (out x r), A (r x in) and
r << min(out, in). StatsMerging's features (:func:`stats.tensor_statistics`: mean, variance, L2
norm, top singular values) of dW follow from the factors in O((out + in) r^2) work and memory
instead of O(out * in) for dW plus its spectrum:

* sum(dW) = s * (1^T B)(A 1): column sums of B against row sums of A;
* ||dW||_F^2 = s^2 * sum((B^T B) * (A A^T)): two r x r Gram matrices;
* mean and (population) variance follow from the sum and the sum of squares;
* with B = Q_B R_B and A^T = Q_A R_A (thin QR), dW = Q_B (s R_B R_A^T) Q_A^T with orthonormal
  Q_B, Q_A, so the singular values of dW are those of the r x r core s R_B R_A^T.

Everything is done in float64 (the variance is a difference of two sums) and returned as float32,
in the order of ``features``, so a row is interchangeable with the dense statistics of dW.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .stats import DEFAULT_FEATURES, validate_features


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """The dense update s * B @ A (for checks and for merging; the statistics below never form it)."""
    return scaling * (lora_b.to(torch.float64) @ lora_a.to(torch.float64))


def _check_factors(lora_a: Tensor, lora_b: Tensor) -> None:
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"LoRA factors must be B (out x r) and A (r x in) with the same r; got B {tuple(lora_b.shape)}, "
            f"A {tuple(lora_a.shape)} (convolutional LoRA layers are not supported)."
        )


def lora_sum_and_square_sum(lora_a: Tensor, lora_b: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """sum(dW) and ||dW||_F^2 from the factors: (1^T B)(A 1) and the r x r Gram product, times s and s^2."""
    a, b = lora_a.to(torch.float64), lora_b.to(torch.float64)
    total = scaling * (b.sum(0) @ a.sum(1))
    square = scaling ** 2 * ((b.T @ b) * (a @ a.T)).sum()
    return total, square


def lora_singular_values(lora_a: Tensor, lora_b: Tensor, scaling: float, rank: int) -> Tensor:
    """Top-``rank`` singular values of s * B @ A from the small core s R_B R_A^T, zero-padded to ``rank``."""
    _, r_b = torch.linalg.qr(lora_b.to(torch.float64))
    _, r_a = torch.linalg.qr(lora_a.to(torch.float64).T)
    values = torch.linalg.svdvals(abs(scaling) * (r_b @ r_a.T))[:rank]
    if values.shape[0] < rank:
        values = torch.cat([values, values.new_zeros(rank - values.shape[0])])
    return values


def lora_factor_statistics(
    lora_a: Tensor, lora_b: Tensor, scaling: float, features: Sequence[str], rank: int
) -> Tensor:
    """Statistics vector of dW = s * B @ A in the order of ``features``, equal to
    ``tensor_statistics(lora_delta(...), features, rank)`` without forming dW."""
    _check_factors(lora_a, lora_b)
    features = validate_features(features)
    pooled = [f for f in features if f not in DEFAULT_FEATURES]
    if pooled:
        raise ValueError(f"{pooled} compare experts or need the pretrained weights; one adapter's factors "
                         f"give only {list(DEFAULT_FEATURES)}.")
    count = lora_b.shape[0] * lora_a.shape[1]
    total, square = lora_sum_and_square_sum(lora_a, lora_b, scaling)
    mean = total / count
    parts: List[Tensor] = []
    for f in features:
        if f == "mean":
            parts.append(mean.reshape(1))
        elif f == "variance":
            parts.append((square / count - mean ** 2).clamp_min(0).reshape(1))
        elif f == "norm":
            parts.append(square.sqrt().reshape(1))
        else:
            parts.append(lora_singular_values(lora_a, lora_b, scaling, rank))
    return torch.cat(parts).to(torch.float32)
