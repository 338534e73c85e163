"""Model pool and task pool for a CLIP suite saved on disk (offline benchmarks and test fixtures).

A suite directory holds ``pretrained/`` (a full ``CLIPModel``), ``experts/<task>/``
(``CLIPVisionModel``), ``data/<task>/<split>/`` (``datasets.save_to_disk``) and
``tasks.json`` (class names and prompt templates). These classes are thin: they turn the
directory into the host's ``CLIPVisionModelPool`` / ``CLIPVisionModelTaskPool`` arguments
and register the task names with the host's template factory, so every method in the run
(ours or the host's) can build zero-shot heads for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.taskpool import CLIPVisionModelTaskPool
from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

from ..utils.errors import UserError
from ..utils.preflight import check_loaded_model, check_model_files, check_splits


class SuiteError(UserError):
    """A suite directory that cannot be used, with what is missing."""


def _format_template(template: str):
    return lambda c: template.format(c)


def read_suite_tasks(suite_dir: str | os.PathLike) -> Dict[str, dict]:
    """Read ``tasks.json`` of a suite; fail with the path when the suite is not there."""
    path = Path(suite_dir) / "tasks.json"
    if not path.is_file():
        raise SuiteError(
            f"No suite at '{suite_dir}': '{path}' is missing. Build one (e.g. "
            "`python -m fusion_bench_statsmerging.fixtures.demo --build-only --out DIR`, then use DIR/suite) or "
            "point `suite_dir` / $STATSMERGING_SUITE_DIR at it."
        )
    return json.loads(path.read_text())


def register_suite_tasks(tasks: Dict[str, dict]) -> None:
    """Teach the host's CLIP template factory the suite's class names and templates.

    The host's own ``register_dataset`` cannot take a plain class-name list (0.2.33
    stores its templates under a misspelt key), so the mapping entry is written directly
    in the documented ``{'classnames': ..., 'templates': ...}`` form it reads.
    """
    for name, info in tasks.items():
        CLIPTemplateFactory._dataset_mapping[name] = {
            "classnames": list(info["classnames"]),
            "templates": [_format_template(t) for t in info["templates"]],
        }


def split_dir(suite: Path, task: str, split: str) -> Path:
    """Where a suite keeps one task's split (``datasets.save_to_disk`` folder)."""
    return Path(suite) / "data" / task / split


def _dataset_configs(suite: Path, tasks: Sequence[str], split: str) -> Optional[DictConfig]:
    present = [t for t in tasks if split_dir(suite, t, split).is_dir()]
    if not present:
        return None
    return OmegaConf.create({
        t: {"_target_": "datasets.load_from_disk", "dataset_path": str(suite / "data" / t / split)}
        for t in present
    })


def _select(all_tasks: List[str], tasks: Optional[Sequence[str]]) -> List[str]:
    """The chosen tasks (null: all of them); an empty or unknown choice names the valid tasks, since
    merging every expert, or fewer, is not what the user asked for."""
    if tasks is None:
        return all_tasks
    if isinstance(tasks, str) or not len(tasks):
        raise SuiteError(f"tasks={tasks if isinstance(tasks, str) else list(tasks)} selects no list of tasks; "
                         f"give a list of some of {all_tasks}, or null for all.")
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        raise SuiteError(f"Tasks {unknown} are not in the suite; it has {all_tasks}.")
    return list(tasks)


class CLIPSuiteModelPool(CLIPVisionModelPool):
    """The host's CLIP vision model pool, filled in from a suite directory."""

    def __init__(self, suite_dir: str, tasks: Optional[Sequence[str]] = None,
                 experts: Optional[Dict[str, str]] = None, pretrained: Optional[str] = None, **kwargs):
        suite = Path(suite_dir)
        info = read_suite_tasks(suite)
        register_suite_tasks(info)
        names = _select(list(info), tasks)
        models = {"_pretrained_": str(pretrained or suite / "pretrained")}  # another CLIPModel: the OpenCLIP export
        models.update({t: str(suite / "experts" / t) for t in names})
        models.update(dict(experts or {}))  # swap in other expert directories by task
        super().__init__(
            OmegaConf.create(models),
            processor=str(suite / "pretrained"),
            train_datasets=_dataset_configs(suite, names, "train"),
            val_datasets=_dataset_configs(suite, names, "validation"),
            test_datasets=_dataset_configs(suite, names, "test"),
            **kwargs,
        )
        self.suite_dir = str(suite)

    def dataset_dir(self, task: str, split: str) -> Path:
        """The folder a task's split is read from (named in errors about a missing split)."""
        return split_dir(Path(self.suite_dir), task, split)

    def load_model(self, model_name_or_config, *args, **kwargs):
        """The host's loader, made strict: a tensor missing from the checkpoint or a NaN weight is an
        error naming model and tensor, for every method run on this pool (the host's too); a weight file
        cut short, one naming model and file before anything reads it."""
        if isinstance(model_name_or_config, str):
            check_model_files(self, [model_name_or_config])
        model = super().load_model(model_name_or_config, *args, **kwargs)
        if isinstance(model_name_or_config, str):
            check_loaded_model(model, model_name_or_config, pretrained=model_name_or_config == "_pretrained_")
        return model


class CLIPSuiteTaskPool(CLIPVisionModelTaskPool):
    """The host's CLIP classification task pool over a suite's test splits."""

    def __init__(self, suite_dir: str, tasks: Optional[Sequence[str]] = None,
                 split: str = "test", pretrained: Optional[str] = None, **kwargs):
        suite = Path(suite_dir)
        info = read_suite_tasks(suite)
        register_suite_tasks(info)
        names = _select(list(info), tasks)
        check_splits(names, split, {t: split_dir(suite, t, split) for t in names}, f"task pool of suite '{suite}'")
        base = str(pretrained or suite / "pretrained")  # the CLIPModel whose zero-shot heads score
        kwargs.setdefault("dataloader_kwargs", {"batch_size": 128, "num_workers": 0, "shuffle": False})
        super().__init__(
            _dataset_configs(suite, names, split),
            processor=base,
            clip_model=base,
            **kwargs,
        )
        self.suite_dir = str(suite)
