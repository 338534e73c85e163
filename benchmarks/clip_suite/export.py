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


# Forked savers read their (images, labels, classnames, path) job from here, copy-on-write.
_SAVE_JOBS: List[Tuple[np.ndarray, np.ndarray, Sequence[str], Path]] = []


def _save_job(i: int) -> None:
    save_split(*_SAVE_JOBS[i])


def save_all_task_data(tasks: Sequence[TaskSpec], data: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]],
                       root: Path, workers: int = 1) -> Dict[str, Dict[str, int]]:
    """Save every split of every task under ``root/<task>/<split>`` (PNG encoding dominates, so
    splits are written by forked workers); returns task -> split -> size."""
    import multiprocessing as mp

    jobs = [(imgs, labels, t.classnames, root / t.name / split)
            for t in tasks for split, (imgs, labels) in data[t.name].items()]
    _SAVE_JOBS[:] = jobs
    try:
        if workers > 1 and len(jobs) > 1 and "fork" in mp.get_all_start_methods():
            with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                pool.map(_save_job, range(len(jobs)), chunksize=1)
        else:
            for i in range(len(jobs)):
                _save_job(i)
    finally:
        _SAVE_JOBS.clear()
    return {t.name: {split: int(len(labels)) for split, (_, labels) in data[t.name].items()} for t in tasks}


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


def summary_markdown(manifest: Dict[str, object], table: str) -> str:
    """``summary.md``: the build in one short page (the numbers come from the manifest)."""
    m = manifest
    pre, ft, av = m["pretrain"], m["finetune"], m["averages"]
    model = m["model"]
    budget = m.get("time_budget_s")
    lines = [
        f"# CLIP suite: size `{m['size']}`, seed {m['seed']}",
        "",
        f"- built by `{m['builder']}` v{m['builder_version']} on {m['device']}"
        f"{' (bf16 autocast)' if m['bf16_autocast'] else ''} in {m['wall_time_s']:.0f} s"
        + (f" (time budget {budget:.0f} s)" if budget else ""),
        f"- model: image {model['image_size']} px / patch {model['patch_size']}, vision "
        f"{model['vision_layers']} x {model['vision_width']}, text {model['text_layers']} x {model['text_width']}, "
        f"{model['total_params']:,} parameters",
        f"- pretraining: {pre['pool_size']:,} images, {pre['steps']}/{pre['planned_steps']} steps x "
        f"{pre['config']['batch_size']}, final batch loss {pre['final_loss']:.3f}, "
        f"batch retrieval accuracy {pre['final_batch_acc']:.2f}",
        f"- experts: {m['finetune_steps_run']}/{ft['steps']} steps x {ft['batch_size']}, frozen zero-shot head, "
        "best-on-validation checkpoint",
        f"- averages (test): zero-shot {100 * av['zero_shot_test']:.1f}%, experts {100 * av['expert_test']:.1f}%",
        "- phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in m["phase_seconds"].items()),
        "",
        "Accuracies are fractions of each task's labelled validation / test split.",
        "",
        "```",
        table,
        "```",
    ]
    return "\n".join(lines) + "\n"
