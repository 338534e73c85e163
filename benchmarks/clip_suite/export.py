"""Writing the on-disk artefacts: datasets, tasks.json, manifest.json and the summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .render import to_pil
from .tasks import TaskSpec


def save_split(images: np.ndarray, labels: np.ndarray, classnames: Sequence[str], path: Path) -> None:
    """Save one split with ``datasets`` (image: Image feature, label: ClassLabel)."""
    from datasets import ClassLabel, Dataset, Features, Image
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per split would drown the build log
    features = Features({"image": Image(), "label": ClassLabel(names=list(classnames))})
    ds = Dataset.from_dict({"image": [to_pil(im) for im in images], "label": [int(x) for x in labels]},
                           features=features)
    ds.save_to_disk(str(path))


def save_task_data(task: TaskSpec, splits: Dict[str, Tuple[np.ndarray, np.ndarray]], root: Path) -> Dict[str, int]:
    """Save all splits of a task under ``root/<task>/<split>``; returns split sizes."""
    sizes = {}
    for split, (imgs, labels) in splits.items():
        save_split(imgs, labels, task.classnames, root / task.name / split)
        sizes[split] = int(len(labels))
    return sizes


def tasks_json(tasks: Sequence[TaskSpec]) -> Dict[str, Dict[str, List[str]]]:
    """The FusionBench-facing description: class names and prompt templates, in suite order."""
    return {t.name: {"classnames": list(t.classnames), "templates": list(t.templates)} for t in tasks}


def write_json(obj: object, path: Path) -> None:
    """Pretty, stable JSON (keys in insertion order so diffs between builds are readable)."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def summary_table(rows: List[Dict[str, object]]) -> str:
    """Fixed-width table of per-task accuracies for the console."""
    head = f"{'task':<15}{'classes':>8}{'train':>7}{'val':>6}{'test':>6}{'zs_val':>8}{'zs_test':>8}{'ft_val':>8}{'ft_test':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['task']:<15}{r['classes']:>8}{r['train']:>7}{r['validation']:>6}{r['test']:>6}"
            f"{r['zs_val']:>8.3f}{r['zs_test']:>8.3f}{r['ft_val']:>8.3f}{r['ft_test']:>8.3f}"
        )
    if rows:
        mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
        lines.append("-" * len(head))
        lines.append(f"{'average':<42}{mean('zs_val'):>8.3f}{mean('zs_test'):>8.3f}{mean('ft_val'):>8.3f}{mean('ft_test'):>8.3f}")
    return "\n".join(lines)
