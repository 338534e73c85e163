"""Held-out train images for label-free selection where a pool has no validation split.

The host's CLIP pools (``clip-vit-*_TA8``, ``_TALL14``, ``_TALL20``) declare train and test splits
only, yet ``select_by: validation_agreement`` and StatsMerging's start probes score the merged model on
unlabeled images the fit has not seen. For a task without a validation split a fixed random slice of
its train split is set aside: selection and the probes read only those rows, the fit images are drawn
from the rest, so the two never overlap (a selection on fitted images would favour overfitting, which
is what it is there to catch). No label is read either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from ..utils.errors import PoolError
from ..utils.splits import load_split
from .distillation import sample_indices

# offsets the run's seed, so the slice is not the fit draw's first rows
HOLDOUT_SEED_OFFSET = 104729


@dataclass(frozen=True)
class HeldOut:
    """One task's train split in two: rows the fit may draw from, and rows only selection reads."""

    fit_rows: List[int]
    held_out: List[int]

    def as_dict(self) -> Dict[str, int]:
        """What the report keeps: the slice's size and what was left to fit on."""
        return {"held_out_for_selection": len(self.held_out), "fit_candidates": len(self.fit_rows)}


def hold_out(dataset_size: int, size: int, seed: int) -> HeldOut:
    """``size`` rows of a split of ``dataset_size`` rows, drawn once from ``seed``, and the rest;
    both sorted, disjoint, together every row."""
    if not 0 < size < dataset_size:
        raise ValueError(f"cannot hold out {size} of {dataset_size} rows and keep some to fit on")
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))
    return HeldOut(fit_rows=order[size:].sort().values.tolist(), held_out=order[:size].sort().values.tolist())


def held_out_slices(train_sizes: Mapping[str, int], size: int, batch_size: int, seed: int) -> Dict[str, HeldOut]:
    """Each task's held-out slice of ``size`` train rows (its own draw per task), or one error naming
    the tasks whose train split cannot spare that many and still fill a batch to fit on."""
    short = {t: n for t, n in train_sizes.items() if n - size < batch_size}
    if short:
        raise PoolError(
            f"select_by: validation_agreement needs unlabeled images the fit does not use; the model pool has no "
            f"validation split for {sorted(train_sizes)}, so {size} train images per task (select_samples) are held "
            f"out, but the train split of {short} (sizes) cannot spare them and keep one batch ({batch_size}) to "
            "fit on. Lower method.select_samples, add `val_datasets` to the model pool, or set select_by: last.")
    return {t: hold_out(n, size, seed + HOLDOUT_SEED_OFFSET + i) for i, (t, n) in enumerate(train_sizes.items())}


def sample_rows(rows: Sequence[int], n: int, seed: int) -> List[int]:
    """``n`` of ``rows``, drawn as :func:`sample_indices` draws over ``range(len(rows))``: with every row
    of a split as ``rows`` the draw is the one a run without a held-out slice makes."""
    return [rows[i] for i in sample_indices(len(rows), n, seed)]


def selection_datasets(modelpool, names: Sequence[str], fit_datasets: Mapping[str, object], fit_split: str,
                       size: int, batch_size: int, seed: int) -> Tuple[Dict[str, object], Dict[str, HeldOut]]:
    """The datasets label-free selection scores, per task: its validation split where the pool has one, else
    its train split with the held-out slice it may read (returned beside, so the fit draws from the rest)."""
    purpose = "select_by: validation_agreement scores unlabeled images"
    own = [n for n in names if n in (modelpool.val_dataset_names or [])]
    datasets = load_split(modelpool, "validation", own, purpose, batch_size)
    others = [n for n in names if n not in own]
    train = fit_datasets if fit_split == "train" else load_split(modelpool, "train", others, purpose, batch_size)
    held_out = held_out_slices({n: len(train[n]) for n in others}, size, batch_size, seed)
    datasets.update({n: train[n] for n in others})
    return datasets, held_out
