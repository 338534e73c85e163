"""The host's CLIP AdaMerging, fitted on label-free *train* (or validation) images.

The host's ``CLIPLayerWiseAdaMergingAlgorithm`` / ``CLIPTaskWiseAdaMergingAlgorithm``
minimise prediction entropy on shuffled *test* images (test-time adaptation, as in the
AdaMerging paper). To compare data-driven methods under one protocol, the subclasses here
change exactly one hook, ``get_shuffled_test_loader_iter``: it serves images of the model
pool's train split (or validation split), with the label column removed before any item is
read. Everything else (merged model, entropy loss, optimiser, steps, heads) is the host's.

    fusion_bench method=adamerging_train method.name=clip_layer_wise_adamerging \\
        modelpool=clip_suite taskpool=clip_suite
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterator, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from fusion_bench.method.adamerging.clip_layer_wise_adamerging import CLIPLayerWiseAdaMergingAlgorithm
from fusion_bench.method.adamerging.clip_task_wise_adamerging import CLIPTaskWiseAdaMergingAlgorithm
from fusion_bench.utils.data import InfiniteDataLoader

from ..utils.errors import UserError

log = logging.getLogger(__name__)

NO_LABEL = -1
"""Stands where the host's loaders put a label, so ``images, _ = batch`` keeps working."""

# protocol value -> the model pool's loader for that split; "test" is deliberately absent
# (that is the host's own AdaMerging: method=adamerging/clip).
SPLIT_LOADERS = {"train_unlabeled": "load_train_dataset", "validation_unlabeled": "load_val_dataset"}


class UnlabeledImages(Dataset):
    """Images of one split, preprocessed for CLIP; items are ``(pixel_values, NO_LABEL)``.

    A Hugging Face dataset is narrowed to its ``image`` column first, so labels are not
    even decoded. Other datasets must yield dicts with ``image`` or ``(image, label)``
    pairs; only the image is taken.
    """

    def __init__(self, dataset: Any, processor: Any):
        column_names = getattr(dataset, "column_names", None)
        if column_names is not None and "image" in column_names and hasattr(dataset, "select_columns"):
            dataset = dataset.select_columns(["image"])
        self.dataset = dataset
        self.processor = processor

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        item = self.dataset[idx]
        image = item["image"] if isinstance(item, dict) else item[0]
        if hasattr(self.processor, "image_processor") or hasattr(self.processor, "preprocess"):
            pixels = self.processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0]
        else:
            pixels = self.processor(image)
        return pixels, NO_LABEL


def unlabeled_loader_iter(algorithm, task: str, processor: Any, fabric) -> Iterator:
    """An endless shuffled loader over one task's unlabeled images of the chosen split."""
    protocol = algorithm.config.get("protocol", "train_unlabeled")
    loader_name = SPLIT_LOADERS[protocol]
    log.info("AdaMerging (%s): fitting on %s images of '%s', labels removed", protocol, loader_name, task)
    dataset = UnlabeledImages(getattr(algorithm.modelpool, loader_name)(task), processor)
    loader = DataLoader(dataset, batch_size=algorithm.config.batch_size, shuffle=True,
                        num_workers=algorithm.config.num_workers,
                        pin_memory=fabric is not None and fabric.device.type == "cuda")
    if fabric is not None:
        loader = fabric.setup_dataloaders(loader)
    return iter(InfiniteDataLoader(loader))


_TTA_HINT = " For test-time adaptation use the host's method=adamerging/clip."


def as_adamerging_config(algorithm_config: Optional[DictConfig], kwargs: dict,
                         protocols: Mapping[str, str] = SPLIT_LOADERS, hint: str = _TTA_HINT) -> DictConfig:
    """Accept both the host's ``cls(config)`` and Hydra's ``cls(**keys)`` construction, and check
    its ``protocol`` against ``protocols`` (``hint``: what to use for a protocol not offered)."""
    config = algorithm_config if algorithm_config is not None else OmegaConf.create(kwargs)
    protocol = config.get("protocol", "train_unlabeled")
    if protocol not in protocols:
        raise UserError(f"protocol must be one of {sorted(protocols)}, got '{protocol}'.{hint}")
    return config


class CLIPLayerWiseAdaMergingTrainSplit(CLIPLayerWiseAdaMergingAlgorithm):
    """Layer-wise AdaMerging on label-free train (or validation) images."""

    pool_family = "clip"  # method/hints.pool_family

    def __init__(self, algorithm_config: Optional[DictConfig] = None, **kwargs):
        super().__init__(as_adamerging_config(algorithm_config, kwargs))

    @functools.cache
    def get_shuffled_test_loader_iter(self, task: str) -> Iterator:
        return unlabeled_loader_iter(self, task, self.clip_processor, self.fabric)


class CLIPTaskWiseAdaMergingTrainSplit(CLIPTaskWiseAdaMergingAlgorithm):
    """Task-wise AdaMerging on label-free train (or validation) images."""

    pool_family = "clip"  # method/hints.pool_family

    def __init__(self, algorithm_config: Optional[DictConfig] = None, **kwargs):
        super().__init__(as_adamerging_config(algorithm_config, kwargs))

    @functools.cache
    def get_shuffled_test_loader_iter(self, task: str) -> Iterator:
        return unlabeled_loader_iter(self, task, self._clip_processor, self._fabric)


VARIANTS = {"clip_layer_wise_adamerging": CLIPLayerWiseAdaMergingTrainSplit,
            "clip_task_wise_adamerging": CLIPTaskWiseAdaMergingTrainSplit}


def clip_adamerging_unlabeled_split(name: str = "clip_layer_wise_adamerging", **config):
    """Hydra target of ``config/method/adamerging_train.yaml``: ``name`` picks the variant,
    with the same values as the host's ``method=adamerging/clip``."""
    if name not in VARIANTS:
        raise UserError(f"name must be one of {sorted(VARIANTS)}, got '{name}'")
    return VARIANTS[name](OmegaConf.create({"name": name, **config}))
