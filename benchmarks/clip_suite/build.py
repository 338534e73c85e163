"""Orchestration of a suite build: data -> tokenizer -> pretraining -> zero-shot -> experts -> manifest.

Layout written under ``out``::

    pretrained/            CLIPModel + CLIPProcessor (tokenizer, image processor)
    experts/<task>/        CLIPVisionModel fine-tuned on <task>
    data/<task>/<split>/   datasets.Dataset.save_to_disk (image, label); split in train/validation/test
    tasks.json             {task: {classnames, templates}}
    manifest.json          sizes, seed, versions, accuracies, timings (written last)
    summary.md             the same facts in a short human-readable page (written last)
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np

from . import render as R
from .config import BUILDER_VERSION, SuitePreset, get_preset
from .data import SPLITS, build_all_tasks, default_workers, plan_resources
from .export import save_all_task_data, summary_markdown, summary_table, tasks_json, write_json
from .pretrain_data import CAPTIONS_PER_IMAGE, build_pretrain_pool, mixture
from .tasks import TASKS, TaskSpec

ARTEFACTS = ("pretrained", "experts", "data", "tasks.json", "manifest.json", "summary.md")
# With --time-budget: seconds kept for what follows the experts (saves, zero-shot heads, the
# 8x8 cross evaluation, manifest), and the share of the training time given to pretraining.
POST_TRAINING_RESERVE_S = 30.0
PRETRAIN_SHARE = 0.6


class PhaseTimer:
    """Records wall time per named phase; the manifest reports it to plan GPU budgets."""

    def __init__(self, log: Callable[[str], None]):
        self.times: Dict[str, float] = {}
        self.log = log

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.log(f"[clip_suite] {name} ...")
        t0 = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - t0, 2)
        self.log(f"[clip_suite] {name} done in {self.times[name]:.1f}s")


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to mix builds in one folder unless asked; then remove only our own artefacts."""
    out.mkdir(parents=True, exist_ok=True)
    existing = [a for a in ARTEFACTS if (out / a).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {existing}; pass --overwrite to replace them")
    for a in existing:
        p = out / a
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def resolve_device(name: str):
    """'auto' picks CUDA when present; explicit 'cuda' fails loudly without a GPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def seed_everything(seed: int, device_type: str) -> None:
    """Seed every RNG and ask torch for deterministic kernels (warn-only: some have no such variant)."""
    import random

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = True


def library_versions() -> Dict[str, str]:
    """Versions that influence the artefacts, for the manifest."""
    import datasets
    import PIL
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}


def build_suite(out: Path, size: str = "tiny", device: str = "auto", seed: int = 0, num_tasks: int = 8,
                fashion_dir: Optional[str] = None, fonts_dir: Optional[str] = None,
                workers: Optional[int] = None, pretrain_steps: Optional[int] = None,
                expert_steps: Optional[int] = None, pretrain_pool: Optional[int] = None,
                amp: bool = True, overwrite: bool = False, time_budget: Optional[float] = None,
                log: Callable[[str], None] = print) -> Dict[str, object]:
    """Build every artefact of the suite into ``out`` and return the manifest.

    ``time_budget`` (seconds for the whole build): pretraining and fine-tuning then fit their
    step counts to the time left (measured, see ``train.StepBudget``); the manifest records
    planned and actual steps. Without it the preset's step counts run as they are.
    """
    t_start = time.perf_counter()
    out = Path(out)
    preset = get_preset(size, pretrain_steps, expert_steps, pretrain_pool)
    tasks: List[TaskSpec] = list(TASKS[:num_tasks])
    workers = workers or default_workers()
    prepare_output(out, overwrite)
    R.set_font_dir(fonts_dir)
    fonts = R.available_fonts()
    if len(fonts) < len(R.FONT_NAMES):
        log(f"[clip_suite] warning: only {len(fonts)}/{len(R.FONT_NAMES)} DejaVu fonts found; glyph images will differ")
    timer = PhaseTimer(log)
    sizes = {t.name: preset.task_split_sizes(t.name) for t in tasks}

    # Data generation forks worker processes, so it runs before torch touches the GPU.
    with timer.phase("generate task data"):
        res = plan_resources(preset.model.image_size, seed, sizes, fashion_dir, [t.name for t in tasks])
        task_data = build_all_tasks(tasks, sizes, res, seed, workers, progress=lambda n: log(f"  generated {n}"))
    with timer.phase("generate pretraining pool"):
        pool_imgs, pool_caps, pool_src, src_names = build_pretrain_pool(preset.pretrain_pool, res, seed, workers)
    with timer.phase("save datasets"):
        split_counts = save_all_task_data(tasks, task_data, out / "data", workers)
        write_json(tasks_json(tasks), out / "tasks.json")

    import torch

    from .model import (image_processor, model_summary, new_clip_model, save_pretrained_bundle,
                        save_vision_expert, vision_only, zero_shot_head)
    from .tokenizer import build_tokenizer, encode_captions
    from .train import accuracy, finetune_expert, pretrain_clip

    dev = resolve_device(device)
    seed_everything(seed, dev.type)
    if dev.type == "cpu":
        torch.set_num_threads(preset.cpu_threads or max(1, os.cpu_count() or 1))
    use_amp = amp and dev.type == "cuda"

    with timer.phase("tokenize captions"):
        tok_dir = out / "pretrained" / "_tokenizer_src"
        tok = build_tokenizer(tok_dir, preset.model.max_text_length)
        flat = [c for caps in pool_caps for c in caps]
        ids, lengths, cap_ids = encode_captions(tok, flat, preset.model.max_text_length)
        n = len(pool_caps)
        ids = ids.reshape(n, CAPTIONS_PER_IMAGE, -1)
        lengths = lengths.reshape(n, CAPTIONS_PER_IMAGE)
        n_unique = int(cap_ids.max()) + 1

    def left() -> Optional[float]:
        """Seconds of the budget not yet spent, less the reserve for the final phases."""
        if time_budget is None:
            return None
        return time_budget - (time.perf_counter() - t_start) - POST_TRAINING_RESERVE_S

    with timer.phase("pretrain CLIP"):
        model = new_clip_model(preset.model, seed)
        allowance = None if time_budget is None else max(0.0, left() * PRETRAIN_SHARE)
        pre_stats = pretrain_clip(model, pool_imgs, ids, lengths, cap_ids, preset.pretrain, dev, seed, use_amp,
                                  seconds=allowance)
        if pre_stats["steps"] < pre_stats["planned_steps"]:
            log(f"[clip_suite] time budget: pretraining ran {pre_stats['steps']}/{pre_stats['planned_steps']} steps")
        del pool_imgs, ids
    with timer.phase("save pretrained"):
        model.to("cpu")
        save_pretrained_bundle(model, tok, image_processor(preset.model), out / "pretrained")
        shutil.rmtree(tok_dir)
        model.to(dev)

    zs: Dict[str, Dict[str, float]] = {}
    heads = {}
    with timer.phase("zero-shot evaluation"):
        for t in tasks:
            heads[t.name] = zero_shot_head(model, tok, t.classnames, t.templates, dev)
            zs[t.name] = {s: accuracy(model.vision_model, model.visual_projection, heads[t.name],
                                      task_data[t.name][s], dev, use_amp) for s in ("validation", "test")}
            log(f"  zero-shot {t.name}: val={zs[t.name]['validation']:.3f} test={zs[t.name]['test']:.3f}")

    experts: Dict[str, Dict[str, object]] = {}
    scale = model.logit_scale.detach().exp().item()
    ft_cfg, ft_allowance = preset.finetune, None
    if time_budget is not None:  # the first expert measures the step time; all get its step count
        ft_allowance = max(0.0, left()) / len(tasks)
    with timer.phase("fine-tune experts"):
        for ti, t in enumerate(tasks):
            vm = vision_only(model)
            _, info = finetune_expert(vm, model.visual_projection, heads[t.name], scale, task_data[t.name]["train"],
                                      task_data[t.name]["validation"], ft_cfg, dev, seed + 100 + ti,
                                      use_amp, desc=t.name, seconds=ft_allowance if ti == 0 else None)
            if ti == 0 and ft_allowance is not None:
                ft_cfg = replace(ft_cfg, steps=int(info["steps"]))
                if ft_cfg.steps < preset.finetune.steps:
                    log(f"[clip_suite] time budget: experts run {ft_cfg.steps}/{preset.finetune.steps} steps")
            info["validation"] = accuracy(vm, model.visual_projection, heads[t.name], task_data[t.name]["validation"], dev, use_amp)
            info["test"] = accuracy(vm, model.visual_projection, heads[t.name], task_data[t.name]["test"], dev, use_amp)
            save_vision_expert(vm, out / "experts" / t.name)
            experts[t.name] = info
            log(f"  expert {t.name}: best step {info['best_step']} val={info['validation']:.3f} test={info['test']:.3f}")
            del vm

    with timer.phase("cross-task evaluation of saved experts"):
        cross = cross_evaluate(out, tasks, heads, task_data, model.visual_projection, dev, use_amp)

    rows = [{"task": t.name, "classes": t.num_classes, **split_counts[t.name],
             "zs_val": zs[t.name]["validation"], "zs_test": zs[t.name]["test"],
             "ft_val": experts[t.name]["validation"], "ft_test": experts[t.name]["test"]} for t in tasks]
    manifest = assemble_manifest(preset, seed, dev.type, use_amp, tasks, split_counts, zs, experts, cross,
                                 R.font_sources(), model_summary(preset.model, model), pre_stats,
                                 {"pool_size": len(pool_caps), "captions_per_image": CAPTIONS_PER_IMAGE,
                                  "unique_captions": n_unique, "mixture": mixture(res),
                                  "source_counts": {s: int((pool_src == i).sum()) for i, s in enumerate(src_names)}},
                                 timer.times, time.perf_counter() - t_start, time_budget, ft_cfg)
    write_json(manifest, out / "manifest.json")
    (out / "summary.md").write_text(summary_markdown(manifest, summary_table(rows)), encoding="utf-8")
    log("\n" + summary_table(rows))
    log(f"\n[clip_suite] wrote {out} in {manifest['wall_time_s']:.1f}s")
    return manifest


def cross_evaluate(out: Path, tasks: List[TaskSpec], heads: Dict[str, object], task_data, projection,
                   dev, use_amp: bool) -> Dict[str, object]:
    """Reload every saved expert from disk and score it on every task's test split.

    Reloading checks the saved weights are the fine-tuned ones; the off-diagonal entries show
    how much each expert forgets the other tasks, which is what merging has to recover.
    """
    from transformers import CLIPVisionModel

    from .train import accuracy

    matrix = []
    for t in tasks:
        vm = CLIPVisionModel.from_pretrained(str(out / "experts" / t.name)).to(dev)
        matrix.append([round(accuracy(vm, projection, heads[u.name], task_data[u.name]["test"], dev, use_amp), 4)
                       for u in tasks])
        del vm
    return {"rows_expert_cols_task": [t.name for t in tasks], "test_accuracy": matrix}


def assemble_manifest(preset: SuitePreset, seed: int, device: str, amp: bool, tasks: List[TaskSpec],
                      split_counts, zs, experts, cross, fonts, model_info, pre_stats, pool_info,
                      phase_times: Dict[str, float], wall: float, time_budget: Optional[float] = None,
                      finetune_run=None) -> Dict[str, object]:
    """All build facts in one JSON-serialisable dict."""
    per_task = {}
    for t in tasks:
        e = experts[t.name]
        per_task[t.name] = {
            "source": t.source, "analogue": t.analogue, "num_classes": t.num_classes,
            "splits": split_counts[t.name],
            "pretrain_named_classes": [t.classnames[i] for i in t.pretrain_named],
            "zero_shot": {k: round(v, 4) for k, v in zs[t.name].items()},
            "expert": {"validation": round(e["validation"], 4), "test": round(e["test"], 4),
                       "steps": e["steps"], "best_step": e["best_step"], "best_val_acc": round(e["best_val_acc"], 4),
                       "val_history": [[s, round(a, 4)] for s, a in e["val_history"]]},
        }
    avg = lambda xs: round(float(np.mean(xs)), 4) if xs else 0.0  # noqa: E731
    return {
        "builder": "benchmarks/build_clip_suite.py",
        "builder_version": BUILDER_VERSION,
        "size": preset.name,
        "seed": seed,
        "device": device,
        "bf16_autocast": amp,
        "versions": library_versions(),
        "fonts": [n for n, path in fonts.items() if path],
        "font_files": fonts,
        "splits": list(SPLITS),
        "model": model_info,
        "pretrain": {**pool_info, "config": asdict(preset.pretrain),
                     **{k: round(v, 4) if isinstance(v, float) else v for k, v in pre_stats.items()}},
        "finetune": asdict(preset.finetune),
        "finetune_steps_run": (finetune_run or preset.finetune).steps,
        "time_budget_s": time_budget,
        "tasks": per_task,
        "averages": {
            "zero_shot_test": avg([zs[t.name]["test"] for t in tasks]),
            "zero_shot_validation": avg([zs[t.name]["validation"] for t in tasks]),
            "expert_test": avg([experts[t.name]["test"] for t in tasks]),
            "expert_validation": avg([experts[t.name]["validation"] for t in tasks]),
        },
        "expert_cross_task": cross,
        "phase_seconds": phase_times,
        "wall_time_s": round(wall, 2),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
