"""The one table of a model pool's data splits: how each is named in the pool's config, listed and loaded.

FusionBench's ``BaseModelPool`` spells the same three splits four ways (``train`` / ``train_datasets`` /
``train_dataset_names`` / ``load_train_dataset``, and ``validation`` / ``val_...``); code that picks a split
by name looks it up here instead of writing the table again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from .errors import PoolError


@dataclass(frozen=True)
class Split:
    name: str  # as protocols and options name it: train | validation | test
    config_key: str  # the pool's config key, e.g. ``val_datasets``
    names_attr: str  # the pool's property listing the tasks that have it, e.g. ``val_dataset_names``
    loader: str  # the pool's method that loads a task's dataset, e.g. ``load_val_dataset``

    def names(self, pool) -> List[str]:
        """The tasks the pool has this split for."""
        return list(getattr(pool, self.names_attr) or [])

    def load(self, pool, task: str) -> Any:
        return getattr(pool, self.loader)(task)

    def config(self, pool) -> Dict[str, Any]:
        """The pool's own config entries of this split (``BaseModelPool`` keeps them as ``_<config_key>``)."""
        return getattr(pool, f"_{self.config_key}")


SPLITS: Dict[str, Split] = {s.name: s for s in (
    Split("train", "train_datasets", "train_dataset_names", "load_train_dataset"),
    Split("validation", "val_datasets", "val_dataset_names", "load_val_dataset"),
    Split("test", "test_datasets", "test_dataset_names", "load_test_dataset"),
)}


def load_split(modelpool, split: str, names: List[str], purpose: str, batch_size: int) -> Dict[str, object]:
    """Each task's dataset of ``split``, or an error naming the tasks that lack it (or are too small)."""
    available = SPLITS[split].names(modelpool)
    missing = [n for n in names if n not in available]
    if missing:
        where = ""
        if hasattr(modelpool, "dataset_dir"):  # a suite on disk: name the folders it looked for
            where = " (looked for " + ", ".join(f"'{modelpool.dataset_dir(n, split)}'" for n in missing) + ")"
        raise PoolError(f"{purpose} on the {split} split, but the model pool's `{SPLITS[split].config_key}` "
                        f"has no entry for {missing}{where}. Add them, or change the method's options.")
    datasets = {}
    for name in names:
        ds = SPLITS[split].load(modelpool, name)
        if len(ds) == 0:
            raise PoolError(f"The {split} dataset of task '{name}' is empty.")
        if len(ds) < batch_size:
            raise PoolError(f"The {split} dataset of task '{name}' has {len(ds)} samples, fewer than one "
                            f"batch (batch_size={batch_size}). Lower `batch_size` or add data.")
        datasets[name] = ds
    return datasets
