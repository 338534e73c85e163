"""End-to-end cost of full merges at real CLIP size, through the CLI, each with its own schedule.

Not a test. Builds, under ``--out``, a suite directory in the layout ``clip_suite`` reads
(``pretrained/``, ``experts/<task>/``, ``data/<task>/<split>``, ``tasks.json``) with a randomly
initialised CLIP of real size (ViT-B/32 vision tower and a 12-layer text tower) and K experts
(pretrained + a rank-8 update plus noise per tensor, like ``merge_speed.py``), and per task
``--fit-images`` unlabeled train images (random colour blocks; their content does not change
the cost) and test images, but, like the host's TA8/TALL pools, no validation split unless
``--with-validation``: a configuration that selects then holds out a slice of train. Then runs, for
each variant, the unchanged CLI::

    fusion_bench method=<the variant's config> modelpool=clip_suite taskpool=dummy [variant overrides]

``--schedule real`` (default) runs each configuration as a user gets it: its own data share, epochs,
start probes and selection (the paper's StatsMerging: 500 epochs over 1 % of each train split;
StatsMerging-R: two 300-step probes, then 3000 SAM steps on up to 4000 images per task). Before the
runs it prints each one's planned steps. ``--schedule fixed`` is the old engine benchmark: every variant
with ``method.data_fraction=1.0 method.max_samples_per_task=<fit-images> method.max_steps=<steps>``.

It reads the method's own JSON report: total seconds inside the method (model loading, zero-shot
heads, teacher targets, task vectors, statistics, start probes, training, merge), the per-phase times and
the steps of each phase. The process wall time (Python start-up and imports included) is reported beside it.

    python benchmarks/end_to_end.py --out /tmp/e2e --model b32 --experts 8 --fit-images 1600 --variants default,residual
    python benchmarks/end_to_end.py --out /tmp/e2e_tiny --model tiny --experts 3 --fit-images 200   # CPU smoke
    python benchmarks/end_to_end.py --out /tmp/e2e --model b32 --experts 8 --schedule fixed --steps 500
    python benchmarks/end_to_end.py --out /tmp/e2e --model b32 --experts 8 --variants default,ddp2   # 1 vs 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT))

from merge_speed import MODELS  # noqa: E402

# The real ViT-B/32 CLIP text tower; "tiny" keeps the test fast.
TEXT = {"tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        "b32": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        "l14": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)}
# variant -> overrides; a variant whose first override names a method runs that config, else
# method=statsmerging (e.g. the recommended StatsMerging-R: 3000 steps on up to 4000 images per task, SAM,
# label-free selection on 256 held-out images per task, two starts probed 300 steps each)
VARIANTS = {"default": [], "fp32": ["method.autocast=null"], "bf16": ["method.autocast=bf16"],
            "bf16-tv": ["method.autocast=bf16", "method.task_vector_dtype=bfloat16"],
            "residual": ["method=statsmerging_residual"], "plusplus": ["method=statsmerging_plusplus"],
            "samerging": ["method=samerging"],
            # issue 16's scaling figure: the same merge data-parallel over two devices (global batch unchanged)
            "ddp2": ["fabric.devices=2", "fabric.strategy=ddp"]}
SCHEDULES = ("real", "fixed")
VALIDATION_IMAGES = 256
# where the training loop's wall time went (the method report's "loop", engine/profiling.LoopClock)
LOOP_BUCKETS = ("steps", "first step", "profiled steps", "profiler", "logging", "selection", "checkpoints")
NUM_CLASSES = 10
TEMPLATES = ["a photo of a {}.", "an image of a {}."]


def clip_config(model: str):
    from transformers import CLIPConfig

    vocab = 2 * 256 + 2
    vision = {k: v for k, v in MODELS[model].items() if k != "projection_dim"}
    text = dict(vocab_size=vocab, max_position_embeddings=48, bos_token_id=vocab - 2,
                eos_token_id=vocab - 1, pad_token_id=vocab - 1, **TEXT[model])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=MODELS[model]["projection_dim"])


def save_pretrained(root: Path, model: str, seed: int) -> "torch.nn.Module":
    """A random CLIP of the chosen size with a byte-level tokenizer and a matching image processor."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from fusion_bench_statsmerging.fixtures.clip import write_byte_tokenizer

    torch.manual_seed(seed)
    clip = CLIPModel(clip_config(model))
    out = root / "pretrained"
    tok_dir = root / "_tokenizer"
    write_byte_tokenizer(tok_dir)
    size = MODELS[model]["image_size"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=48))
    processor.save_pretrained(out)
    clip.save_pretrained(out)
    return clip


@torch.no_grad()
def save_experts(root: Path, clip, tasks: List[str], seed: int, scale: float = 0.01) -> None:
    """Experts = pretrained + (rank-8 update + noise) per tensor, as real task vectors look."""
    from transformers import CLIPVisionModel

    gen = torch.Generator().manual_seed(seed + 1)
    base = {k: v.clone() for k, v in clip.vision_model.state_dict().items()}
    for task in tasks:
        expert = CLIPVisionModel(clip.config.vision_config)
        state = {}
        for name, w in base.items():
            if not w.is_floating_point():
                state[name] = w
                continue
            noise = torch.randn(w.shape, generator=gen)
            if w.dim() == 2:
                r = min(8, *w.shape)
                low = torch.randn(w.shape[0], r, generator=gen) @ torch.randn(r, w.shape[1], generator=gen) / r**0.5
                noise = (noise + low) / 2**0.5
            state[name] = w + scale * w.abs().mean().clamp_min(1e-3) * noise
        expert.vision_model.load_state_dict(state)
        expert.save_pretrained(root / "experts" / task)


def save_data(root: Path, tasks: List[str], size: int, n_train: int, seed: int, validation: bool = False) -> None:
    """Random colour-block images (content is irrelevant to cost); a few test images keep pools valid.
    No validation split unless asked, as in the host's CLIP pools."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = [f"class {i}" for i in range(NUM_CLASSES)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for task in tasks:
        splits = {"train": n_train, **({"validation": VALIDATION_IMAGES} if validation else {}), "test": 16}
        for split, n in splits.items():
            blocks = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
            images = [Image.fromarray(np.kron(b, np.ones((size // 4, size // 4, 1), np.uint8))) for b in blocks]
            ds = datasets.Dataset.from_dict({"image": images, "label": [i % NUM_CLASSES for i in range(n)]},
                                            features=features)
            ds.save_to_disk(str(root / "data" / task / split))
    (root / "tasks.json").write_text(json.dumps(
        {t: {"classnames": names, "templates": TEMPLATES} for t in tasks}, indent=2))


def build_suite(root: Path, model: str, experts: int, fit_images: int, seed: int, validation: bool = False) -> float:
    start = time.perf_counter()
    tasks = [f"e2e_task{i}" for i in range(experts)]
    clip = save_pretrained(root, model, seed)
    save_experts(root, clip, tasks, seed)
    save_data(root, tasks, MODELS[model]["image_size"], fit_images, seed, validation)
    return time.perf_counter() - start


def method_and_overrides(overrides: List[str], schedule: str, steps: int, fit_images: int) -> tuple:
    """The variant's ``method=`` (statsmerging unless it names one) and its overrides; under the fixed
    schedule with the old engine budget (every train image, ``steps`` steps) added."""
    method, rest = (overrides[0], overrides[1:]) if overrides and overrides[0].startswith("method=") else (
        "method=statsmerging", list(overrides))
    budget = (["method.data_fraction=1.0", f"method.max_samples_per_task={fit_images}", f"method.max_steps={steps}"]
              if schedule == "fixed" else [])
    return method, [*budget, *rest]


def planned_steps(method: str, overrides: List[str], train_images: int, experts: int, validation: bool) -> Dict[str, int]:
    """The steps a configuration will run on the suite, per phase, from its composed config: the fit-set
    draw and schedule the method resolves (``num_fit_samples``, ``resolve_schedule``), the train rows a
    selecting configuration holds out where there is no validation split, and its ``planned_steps``."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fusion_bench_statsmerging.engine.distillation import num_fit_samples
    from fusion_bench_statsmerging.engine.schedule import resolve_schedule

    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        cfg = compose(overrides=[f"+{method}", *[o for o in overrides if o.startswith("method.")]]).method
    algorithm = instantiate(cfg)
    held = int(algorithm.select_samples) if algorithm.select_by == "validation_agreement" and not validation else 0
    fit = num_fit_samples(train_images - held, algorithm.data_fraction,
                          algorithm.min_samples_per_task or algorithm.batch_size, algorithm.max_samples_per_task)
    algorithm._schedule = resolve_schedule({i: fit for i in range(experts)}, algorithm.batch_size, algorithm.max_steps,
                                           algorithm.max_epochs, algorithm.lr_step_size, algorithm.lr_step_epochs)
    return {"fit_images_per_task": fit, **algorithm.planned_steps()}


def run_variant(root: Path, name: str, overrides: List[str], steps: int, fit_images: int, profile: int = 0,
                schedule: str = "real") -> Dict:
    """One CLI run; returns the method's report with the process wall time added (and, with ``profile``,
    the method's profile of that many steps: wall ms per step, device-busy ms, blocking calls per step)."""
    run_dir = root / "runs" / name
    method, overrides = method_and_overrides(overrides, schedule, steps, fit_images)
    cmd = [sys.executable, "-m", "fusion_bench.scripts.cli", method, "modelpool=clip_suite", "taskpool=dummy",
           f"method.artifact_dir={run_dir}", f"path.log_dir={run_dir}", *overrides,
           *([f"method.profile_steps={profile}"] if profile else [])]
    env = {**os.environ, "STATSMERGING_SUITE_DIR": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - start
    report_path = run_dir / "statsmerging_report.json"
    if proc.returncode != 0 or not report_path.is_file():
        return {"variant": name, "error": proc.stderr[-3000:], "process_wall_s": wall, "command": " ".join(cmd)}
    report = json.loads(report_path.read_text())
    # every optimisation step of the run (start probes and training), and the time of the phases running them
    planned = report.get("planned_steps") or {"training": report.get("schedule", {}).get("max_steps", steps)}
    done = sum(planned.values())
    phases = report.get("phase_seconds", {})
    stepping = phases.get("training", 0.0) + phases.get("start probe", 0.0)
    return {"variant": name, "overrides": overrides, "process_wall_s": round(wall, 2),
            "method_seconds": report["seconds"], "phase_seconds": phases, "planned_steps": planned,
            "schedule": report.get("schedule", {}), "fit_data": next(iter(report.get("fit_data", {}).values()), {}),
            "steps": done, "ms_per_step": round(1000 * stepping / done, 2) if stepping and done else None,
            "final_loss": report["final_loss"], "command": " ".join(cmd),
            "world_size": report.get("distributed", {}).get("world_size", 1),
            **({"loop": report["loop"]} if "loop" in report else {}),
            **({"profile": report["profile"]} if "profile" in report else {})}


def steps_cell(result: Dict) -> str:
    """All the run's optimisation steps, and per phase where it has more than one (``3600 (600 + 3000)``)."""
    planned = result.get("planned_steps") or {}
    parts = " + ".join(str(n) for n in planned.values())
    return f"{result['steps']} ({parts})" if len(planned) > 1 else str(result["steps"])


def markdown(results: List[Dict], meta: Dict) -> str:
    # "start probe": StatsMerging-R's two starts (absent, "-", where a configuration has one start)
    phases = ["load models", "task heads", "teacher targets", "task vectors", "start probe", "coefficient module",
              "training"]
    budget = (f"{meta['steps']} steps each" if meta["schedule"] == "fixed"
              else "each configuration's own schedule (steps: start probes + training)")
    lines = [f"K={meta['experts']} experts, model {meta['model']}, {meta['fit_images']} train images/task"
             f"{'' if meta.get('validation') else ' (no validation split)'}, {budget}, device {meta['device']}", "",
             "| variant | method total (s) | " + " | ".join(phases) + " | steps | ms/step | steady ms/step "
             "| loop seconds (steps / first step / profiled / profiler / logging / selection / checkpoints) | process wall (s) |",
             "|---" * (len(phases) + 7) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'].strip().splitlines()[-1][:80]} |")
            continue
        cells = [f"{r['phase_seconds'][p]:.1f}" if p in r["phase_seconds"] else "-" for p in phases]
        loop = r.get("loop", {})
        split = " / ".join(f"{loop.get('seconds', {}).get(k, 0.0):.1f}" for k in LOOP_BUCKETS)
        lines.append(f"| {r['variant']} | {r['method_seconds']:.1f} | " + " | ".join(cells)
                     + f" | {steps_cell(r)} | {r['ms_per_step']} | {loop.get('ms_per_step_steady')} | {split} "
                     f"| {r['process_wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="scratch folder for the suite and runs (GBs at b32)")
    p.add_argument("--model", choices=sorted(MODELS), default="b32")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--fit-images", type=int, default=300,
                   help="unlabeled train images per task in the suite (each configuration draws its own share)")
    p.add_argument("--schedule", choices=SCHEDULES, default="real",
                   help="real: each configuration's own epochs, probes and selection; fixed: --steps steps on every "
                        "train image (the engine benchmark of earlier tables)")
    p.add_argument("--steps", type=int, default=500, help="steps of every variant under --schedule fixed")
    p.add_argument("--plan-only", action="store_true", help="print each variant's planned steps and stop (no build)")
    p.add_argument("--with-validation", action="store_true",
                   help=f"give each task a validation split ({VALIDATION_IMAGES} images); default: none, as TA8")
    p.add_argument("--variants", default="default,bf16", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--profile", type=int, default=0,
                   help="profile that many training steps of each run (method.profile_steps); profile.txt per run")
    a = p.parse_args(argv)
    if a.profile < 0:  # checked here, before the suite is built, not by the method after it
        p.error(f"--profile must be >= 0 (0: no profile), got {a.profile}")
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    variants = a.variants.split(",")
    plans = {v: planned_steps(*method_and_overrides(VARIANTS[v], a.schedule, a.steps, a.fit_images), a.fit_images,
                              a.experts, a.with_validation) for v in variants}
    for v, plan in plans.items():  # before anything is built: what each run will take
        print(f"{v}: planned {json.dumps(plan)}", flush=True)
    if a.plan_only:
        return 0
    build_s = build_suite(a.out, a.model, a.experts, a.fit_images, a.seed, a.with_validation)
    print(f"suite built in {build_s:.1f}s", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    meta = {"model": a.model, "experts": a.experts, "fit_images": a.fit_images, "steps": a.steps,
            "schedule": a.schedule, "validation": a.with_validation, "planned": plans,
            "device": device, "torch": torch.__version__, "build_seconds": round(build_s, 1)}
    print(markdown([], meta), flush=True)  # the table's heading; a row follows as each variant finishes
    results = []
    for v in variants:
        results.append(run_variant(a.out, v, VARIANTS[v], a.steps, a.fit_images, a.profile, a.schedule))
        print(markdown(results[-1:], meta).splitlines()[-1], flush=True)
        if a.json:  # after every variant: a run cut short (a lease's time limit) keeps the finished ones
            a.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    for r in results:
        if "profile" in r:
            print(r["variant"], "profile:", json.dumps(r["profile"]))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
