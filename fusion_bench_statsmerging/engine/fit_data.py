"""What a coefficient-distillation run fits on: the fit set, the selection set and the batch stream.

:func:`prepare_fit_data` picks each task's unlabeled inputs (a seeded sample of the protocol's split),
preprocesses them and caches the experts' targets (their logits, and features for ``feature_weight``;
human labels only under a ground-truth protocol); with ``select_by: validation_agreement`` also the
unlabeled validation images the label-free selection scores. :class:`FitData` holds both and draws the
endless, seeded batch stream, sharded over DDP ranks (:meth:`FitData.batches`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterator, List, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils.inputs import Inputs, keep_fit_data_on_device, nbytes, num_rows, on_devices, take, take_on
from . import distributed
from .distillation import load_labels, num_fit_samples
from .holdout import HeldOut, sample_rows
from .selection import SELECTION_IMAGES
from .settings import TrainingSettings

if TYPE_CHECKING:
    from .trainer import Family

log = logging.getLogger(__name__)

SCORING_ROWS = 256  # fit images per task that label-free scores read when no validation images are loaded
SELECTION_SEED_OFFSET = 7919  # the selection sample's seed, apart from the fit sample's


@dataclass
class FitData:
    inputs: Dict[str, Inputs]
    targets: Dict[str, object]
    info: Dict[str, dict] = field(default_factory=dict)  # per task: split, samples, dataset size (the report's)
    indices: Dict[str, List[int]] = field(default_factory=dict)  # dataset rows of the fit set (checkpoints keep them)
    selection: Optional[tuple] = None  # (inputs, targets) the label-free selection scores
    first_pass: Dict[str, List[int]] = field(default_factory=dict)  # rows this rank drew in its first pass

    def rows(self) -> Dict[str, int]:
        return {t: num_rows(p) for t, p in self.inputs.items()}

    def scoring_images(self) -> tuple:
        """Images (with the experts' targets) that label-free scores read, and where they come from: the
        unlabeled validation images of ``select_by: validation_agreement``, else the first fit images."""
        if self.selection is not None:
            return self.selection, SELECTION_IMAGES
        first = slice(0, SCORING_ROWS)
        return (({t: take(p, first) for t, p in self.inputs.items()},
                 {t: take(v, first) for t, v in self.targets.items()}),
                f"train split (unlabeled): the first {SCORING_ROWS} fit images per task")

    def place(self, setting, fabric, label: str) -> None:
        """Keep the fit set on the fabric's device when ``fit_data_on_device`` says so (no copy per step)."""
        size = nbytes(self.inputs) + nbytes(self.targets)
        if keep_fit_data_on_device(setting, size, fabric.device):
            self.inputs = {t: fabric.to_device(p) for t, p in self.inputs.items()}
            self.targets = {t: fabric.to_device(v) for t, v in self.targets.items()}
        elif fabric.device.type != "cpu":
            log.info("%s: the fit set (%.1f GB) stays in host memory (fit_data_on_device=%s); each step copies "
                     "its batch", label, size / 1e9, setting)

    def batches(self, batch_size: int, seed: int, fabric) -> Iterator[Dict[str, tuple]]:
        """Endless per-task shuffled batches, reproducible from the seed. Under DDP every rank draws the same
        global batch and keeps its rows ``rank::world`` (all rows in one process); the fit-set rows it kept
        during its first pass over each task are noted in ``first_pass`` (a reshuffle starts the next pass,
        after which every rank sees every row again).

        Each permutation is copied to the data's device once per pass, so drawing a batch of data kept on the
        GPU copies nothing from the host: a per-step host-to-device index copy would wait for the GPU and stop
        the host from queueing the next step while the current one runs."""
        pixels, targets = self.inputs, self.targets
        gen = torch.Generator().manual_seed(seed)
        order = {t: torch.randperm(num_rows(p), generator=gen) for t, p in pixels.items()}
        placed = {t: on_devices(order[t], pixels[t], targets[t]) for t in pixels}
        pos = {t: 0 for t in pixels}
        mine = distributed.batch_rows(fabric)
        self.first_pass = {t: [] for t in pixels}
        reshuffled = set()
        while True:
            batch = {}
            for t in pixels:
                if pos[t] + batch_size > len(order[t]):
                    order[t], pos[t] = torch.randperm(num_rows(pixels[t]), generator=gen), 0
                    placed[t] = on_devices(order[t], pixels[t], targets[t])
                    reshuffled.add(t)
                rows = slice(pos[t], pos[t] + batch_size)
                if t not in reshuffled:
                    self.first_pass[t].extend(order[t][rows][mine].tolist())
                pos[t] += batch_size
                index = {d: o[rows][mine] for d, o in placed[t].items()}
                batch[t] = (take_on(pixels[t], index), take_on(targets[t], index))
            yield batch

    def shards(self, fabric) -> Dict[str, object]:
        """Under DDP: the world size and, per task, the dataset indices each rank trained on in its first pass
        over the fit set (disjoint shares that together cover the rows of that pass). A collective."""
        return {"world_size": distributed.world_size(fabric),
                "first_pass_rows_by_rank": distributed.rows_by_rank(self.first_pass, self.indices, fabric)}


def labelled_inputs(family: "Family", task: str, dataset, indices: List[int], expert: nn.Module, device,
                    ground_truth: bool = False, feature_weight: float = 0.0) -> tuple:
    """The inputs at ``indices`` and their targets: the expert's logits (human labels only under a
    ground-truth protocol), with its features too when ``feature_weight`` asks for them."""
    inputs = family.fit_inputs(dataset, indices)
    if ground_truth:
        return inputs, load_labels(dataset, indices)
    teacher = expert.to(device).eval()
    with torch.no_grad():
        logits = family.teacher_targets(teacher, task, inputs)
        if float(feature_weight) > 0:
            logits = {"logits": logits, "features": family.teacher_features(teacher, task, inputs).float().cpu()}
    teacher.cpu()
    return inputs, logits


def prepare_fit_data(family: "Family", settings: TrainingSettings, datasets: Dict[str, object],
                     experts: Dict[str, nn.Module], device, selection_datasets: Optional[Dict[str, object]] = None,
                     split: Optional[str] = None, ground_truth: bool = False,
                     held_out: Optional[Mapping[str, HeldOut]] = None) -> FitData:
    """Pick each task's unlabeled inputs, preprocess them and cache the teachers' outputs; the same for the
    selection images when ``selection_datasets`` are given (always teacher targets: selection reads no label).
    ``held_out``: a task's train rows kept for selection (a pool without a validation split): the fit never
    draws them, selection draws only them."""
    s, held_out = settings, held_out or {}
    min_samples = s.min_samples_per_task or s.batch_size
    fit = FitData({}, {})
    for t_idx, (task, ds) in enumerate(tqdm(datasets.items(), "Teacher targets")):
        held = held_out.get(task) if split == "train" else None
        rows = held.fit_rows if held else range(len(ds))  # never the rows selection reads
        n = num_fit_samples(len(rows), s.data_fraction, min_samples, s.max_samples_per_task)
        idx = sample_rows(rows, n, s.seed + t_idx)
        fit.indices[task] = idx
        fit.inputs[task], fit.targets[task] = labelled_inputs(family, task, ds, idx, experts[task], device,
                                                              ground_truth, s.feature_weight)
        fit.info[task] = {"split": split, "num_samples": n, "dataset_size": len(ds),
                          **(held.as_dict() if held else {})}
    if s.select_by == "validation_agreement" and selection_datasets:
        inputs, targets = {}, {}
        for t_idx, (task, ds) in enumerate(selection_datasets.items()):
            held = held_out.get(task)
            rows = held.held_out if held else range(len(ds))
            idx = sample_rows(rows, min(int(s.select_samples), len(rows)), s.seed + SELECTION_SEED_OFFSET + t_idx)
            inputs[task], targets[task] = labelled_inputs(family, task, ds, idx, experts[task], device)
        fit.selection = (inputs, targets)
    return fit
