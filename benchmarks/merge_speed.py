"""Merge-engine benchmark: the fused engine (ours) against the host's layer-wise AdaMerging step.

Not a test: one run builds random CLIP vision towers at real size (experts = pretrained + small
random updates, half of their energy in a rank-8 part like real task vectors, half noise) and
measures, per configuration:

- OURS (``FusedLayerWiseEngine``): engine build, batched statistics for the K experts
  (``grouped_task_vector_stats``), the merge alone (forward, forward+backward), and one
  training step = coefficients from a small MLP on the statistics -> merge -> ONE
  forward/backward over the K concatenated task batches (bf16 autocast on CUDA), each task's
  CE loss on its slice through a fixed random head -> Adam step on the MLP;
- HOST: layer-wise AdaMerging's step exactly as ``LayerWiseAdaMergingAlgorithm.
  test_time_adaptation`` runs it: ``LayerWiseMergedModel``, per task a forward + entropy loss
  + ``backward(retain_graph=True)``, then the Adam step and ``merge_weights()``. It runs at
  the host's default precision (fp32, ``fabric.precision: null``) and, on CUDA, also under the
  same bf16 autocast as ours.

Peak GPU memory is reset before each phase's steps (resident tensors count). Prints a markdown
table with speed-ups and memory ratios and a projection for a full 500-step merge.

    python benchmarks/merge_speed.py --model b32 --device cuda --json merge_speed.json
    python benchmarks/merge_speed.py --model tiny --device cpu --steps 2     # smoke check
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

MODELS: Dict[str, dict] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 patch_size=4, image_size=16, projection_dim=16),
    "b32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                patch_size=32, image_size=224, projection_dim=512),
    "l14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=224, projection_dim=768),
}
OURS_VARIANTS = ("fp32", "bf16", "fp32-pt", "bf16-pt", "bf16-ckpt0.33", "bf16-ckpt")
# -ckptF: checkpoint a fraction F of layers; -pt: one forward/backward per task through one merge
VARIANT = re.compile(r"^(fp32|bf16)(-ckpt(0?\.\d+|1(\.0*)?)?)?(-pt)?$")
NUM_CLASSES = 10
LOGIT_SCALE = 100.0
PERTURBATION = 1e-2  # task-vector rms relative to the weight's rms
LOW_RANK = 8


# --------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Forget earlier phases: each phase's peak counts its own resident tensors and transients."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA only (on CPU the brief's smoke run stays fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def timed(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> Dict[str, float]:
    """Per-call wall time with a device sync around each call, after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"mean_ms": 1e3 * statistics.fmean(times), "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times)}


# --------------------------------------------------------------------------- models and data
def vision_config(name: str, attn: Optional[str]):
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(**MODELS[name])
    if attn:
        config._attn_implementation = attn
    return config


def matrix_dims(shape: torch.Size) -> tuple:
    return (1, math.prod(shape)) if len(shape) <= 1 else (shape[0], math.prod(shape[1:]))


@torch.no_grad()
def perturb_(model: nn.Module, seed: int, low_rank: bool) -> None:
    """pretrained + delta: rank-8 part (decaying spectrum) + equal-energy noise, or pure noise."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        rms = p.float().square().mean().sqrt().clamp_min(1e-2)
        rows, cols = matrix_dims(p.shape)
        noise = torch.randn(p.shape, generator=gen, device=p.device)
        if low_rank and min(rows, cols) > LOW_RANK:
            s = 0.7 ** torch.arange(LOW_RANK, device=p.device, dtype=torch.float32)
            u = torch.randn(rows, LOW_RANK, generator=gen, device=p.device)
            v = torch.randn(LOW_RANK, cols, generator=gen, device=p.device)
            structured = ((u * s) @ v / s.norm()).reshape(p.shape)
            delta = (structured + noise) / math.sqrt(2)
        else:
            delta = noise
        p.add_((PERTURBATION * rms * delta).to(p.dtype))


def build_models(args, device: torch.device):
    """Pretrained tower + K experts on ``device``, identical across phases (seeded)."""
    from transformers import CLIPVisionModel

    torch.manual_seed(args.seed)
    with torch.device(device):
        pretrained = CLIPVisionModel(vision_config(args.model, args.attn))
    experts = []
    for k in range(args.experts):
        expert = copy.deepcopy(pretrained)
        perturb_(expert, args.seed + 1 + k, args.perturbation == "lowrank")
        experts.append(expert)
    return pretrained, experts


class TaskHeads(nn.Module):
    """Frozen CLIP-like zero-shot heads: shared projection, one random class-embedding set per task."""

    def __init__(self, hidden: int, proj: int, tasks: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(hidden, proj, generator=gen) / math.sqrt(hidden))
        self.register_buffer("classes", F.normalize(torch.randn(tasks, NUM_CLASSES, proj, generator=gen), dim=-1))

    def forward(self, embeds: Tensor, task: int) -> Tensor:
        image = F.normalize(embeds @ self.projection.to(embeds.dtype), dim=-1)
        return LOGIT_SCALE * image @ self.classes[task].to(image.dtype).t()


class CoefficientMLP(nn.Module):
    """Statistics (K, L, F) + relative depth -> coefficients (K, L) in (0, 1), starting near 0.3."""

    def __init__(self, in_features: int, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features + 1, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.normal_(self.body[-1].weight, std=1e-3)
        nn.init.constant_(self.body[-1].bias, math.log(0.3 / 0.7))

    def forward(self, features: Tensor) -> Tensor:
        depth = torch.linspace(0, 1, features.shape[1], device=features.device)
        x = torch.cat([features, depth.expand(*features.shape[:-1]).unsqueeze(-1)], dim=-1)
        return torch.sigmoid(self.body(x).squeeze(-1))


def entropy_loss(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """The host's AdaMerging loss (fusion_bench.method.adamerging.entropy_loss), inlined so
    importing it does not pull in the host's whole algorithm stack."""
    probs = torch.softmax(logits, dim=-1)
    return -torch.sum(probs * torch.log(probs + eps), dim=-1).mean()


# --------------------------------------------------------------------------- phases
def run_ours(args, variant: str, device: torch.device, images: Tensor, labels: Tensor,
             heads: TaskHeads) -> dict:
    from fusion_bench_statsmerging.engine.fused import FusedLayerWiseEngine, enable_activation_checkpointing
    from fusion_bench_statsmerging.engine.stats import (
        DEFAULT_FEATURES as FEATURES, FeatureNormalizer, layer_wise_statistics,
    )

    match = VARIANT.match(variant)
    tv_dtype = torch.bfloat16 if match.group(1) == "bf16" else None
    ckpt_fraction = (float(match.group(3) or 1.0)) if match.group(2) else 0.0
    per_task = bool(match.group(5))
    result: dict = {"engine": "ours", "variant": variant, "task_vector_dtype": str(tv_dtype or "float32"),
                    "activation_checkpointing": ckpt_fraction, "per_task_backward": per_task,
                    "autocast": "bf16" if device.type == "cuda" else "none"}
    pretrained, experts = build_models(args, device)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    engine = FusedLayerWiseEngine(pretrained, experts, task_vector_dtype=tv_dtype)
    del experts, pretrained
    gc.collect()
    sync(device)
    result["build_s"] = time.perf_counter() - start
    result["build_peak_gib"] = peak_gib(device)
    result["num_tensors"] = len(engine.param_names)
    result["num_params"] = sum(g.numel * len(g.names) for g in engine.groups)
    result["num_groups"] = len(engine.groups)

    reset_peak(device)
    info: Dict[str, int] = {}
    sync(device)
    start = time.perf_counter()
    raw = engine.layer_wise_statistics(list(FEATURES), args.rank, info)
    sync(device)
    result["stats_s"] = time.perf_counter() - start
    result["stats_solver"] = info
    result["stats_peak_gib"] = peak_gib(device)
    if args.check_stats and variant == args.ours[0]:
        sync(device)
        start = time.perf_counter()
        ref = layer_wise_statistics([engine.task_vector(0)], list(FEATURES), args.rank)
        sync(device)
        result["reference_stats_s_projected"] = (time.perf_counter() - start) * engine.num_models
        rel = ((raw[:1] - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
        result["stats_max_rel_err_vs_reference"] = rel
        result["stats_allclose_1e-4"] = bool(torch.allclose(raw[:1], ref, rtol=1e-4, atol=1e-7))

    features = FeatureNormalizer.fit(raw)(raw).float()
    mlp = CoefficientMLP(features.shape[-1]).to(device)
    engine.train()  # like the host's loop; CLIP has no dropout, and HF checkpoints only in train mode
    if ckpt_fraction:
        result["checkpointed_layers"] = enable_activation_checkpointing(engine, ckpt_fraction)

    # The merge alone: forward, and forward + backward into the coefficients.
    coef = mlp(features).detach()
    with torch.no_grad():
        result["merge_fwd"] = timed(lambda: engine.merge(coef), device, args.warmup, args.steps)
    seeds = [torch.randn_like(t) for t in engine.merge(coef).values()]

    def merge_fwd_bwd():
        c = coef.clone().requires_grad_(True)
        torch.autograd.grad(list(engine.merge(c).values()), c, grad_outputs=seeds)

    result["merge_fwd_bwd"] = timed(merge_fwd_bwd, device, args.warmup, args.steps)
    del seeds

    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    batch = args.batch

    def task_loss(t: int, embeds: Tensor) -> Tensor:
        return F.cross_entropy(heads(embeds, t).float(), labels[t])

    def step():  # what Trainer.closure_loss (engine/trainer.py) does, minus the data pipeline
        optimizer.zero_grad(set_to_none=True)
        if per_task:
            finish = engine.set_coefficients_detached(mlp(features))
            for t in range(args.experts):
                with autocast(device, True):
                    loss = task_loss(t, engine(pixel_values=images[t * batch:(t + 1) * batch])[1])
                (loss / args.experts).backward()
            finish()
        else:
            engine.set_coefficients(mlp(features))
            with autocast(device, True):
                embeds = engine(pixel_values=images)[1]
                loss = torch.stack([task_loss(t, embeds[t * batch:(t + 1) * batch])
                                    for t in range(args.experts)]).mean()
            loss.backward()
        optimizer.step()

    reset_peak(device)
    result["resident_gib"] = allocated_gib(device)
    result["step"] = timed(step, device, args.warmup, args.steps)
    result["step_peak_gib"] = peak_gib(device)
    result["projected_total_s"] = (result["build_s"] + result["stats_s"]
                                   + args.total_steps * result["step"]["mean_ms"] / 1e3)
    del engine, mlp, optimizer, features, raw
    return result


def run_host(args, precision: str, device: torch.device, images: Tensor, heads: TaskHeads) -> dict:
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

    result: dict = {"engine": "host", "variant": f"AdaMerging {precision}", "autocast": precision}
    pretrained, experts = build_models(args, device)
    num_layers = sum(1 for p in pretrained.parameters() if p.requires_grad)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    module = LayerWiseMergedModel(
        layer_wise_weight=get_layer_wise_weights(args.experts, num_layers, init_values=0.3),
        pretrained_model=pretrained, finetuned_models=experts,
        clamp_weights=False, tie_weights=True, strict=False,  # the host's clip.yaml defaults
    ).to(device)  # the host's fabric.setup moves it (merge_weight starts on the CPU)
    del experts, pretrained
    sync(device)
    result["build_s"] = time.perf_counter() - start
    result["build_peak_gib"] = peak_gib(device)
    optimizer = torch.optim.Adam([module.merge_weight], lr=1e-3)
    module.train()
    module.merge_weights()
    batch = args.batch
    use_autocast = precision == "bf16"

    def step():  # LayerWiseAdaMergingAlgorithm.test_time_adaptation, one iteration
        for t in range(args.experts):
            with autocast(device, use_autocast):
                logits = heads(module(images[t * batch:(t + 1) * batch])[1], t)
                loss = entropy_loss(logits.float())
            loss.backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        module.merge_weights()

    reset_peak(device)
    result["resident_gib"] = allocated_gib(device)
    result["step"] = timed(step, device, args.warmup, args.host_steps or args.steps)
    result["step_peak_gib"] = peak_gib(device)
    result["projected_total_s"] = result["build_s"] + args.total_steps * result["step"]["mean_ms"] / 1e3
    del module, optimizer
    return result


def guarded(name: str, fn: Callable[[], dict], device: torch.device) -> dict:
    """One phase's failure (OOM, a missing host package) is reported, not fatal to the others."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"[{name}] failed: {message}", file=sys.stderr)
        if not isinstance(exc, (ImportError, torch.cuda.OutOfMemoryError)):
            traceback.print_exc()
        return {"engine": name.split(":")[0], "variant": name.split(":", 1)[-1], "error": message}
    finally:
        reset_peak(device)


# --------------------------------------------------------------------------- report
def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(results: List[dict], args) -> str:
    host_rows = {r["variant"]: r for r in results if r["engine"] == "host" and "error" not in r}
    baseline = host_rows.get("AdaMerging fp32") or next(iter(host_rows.values()), None)
    lines = [
        f"| engine | config | build s | stats s | merge fwd / fwd+bwd ms | step ms (median) | "
        f"speed-up vs host | peak GiB | memory vs host | {args.total_steps} steps s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['variant']} | error: {r['error']} |||||||| ")
            continue
        step = r["step"]["mean_ms"]
        speedup = baseline["step"]["mean_ms"] / step if baseline else None
        mem = (r["step_peak_gib"] / baseline["step_peak_gib"]
               if baseline and r.get("step_peak_gib") and baseline.get("step_peak_gib") else None)
        merge = (f"{r['merge_fwd']['median_ms']:.2f} / {r['merge_fwd_bwd']['median_ms']:.2f}"
                 if "merge_fwd" in r else "-")
        lines.append(
            f"| {r['engine']} | {r['variant']} | {fmt(r['build_s'], '.2f')} | {fmt(r.get('stats_s'), '.2f')} | "
            f"{merge} | {step:.1f} ({r['step']['median_ms']:.1f}) | {fmt(speedup, '.1f')}x | "
            f"{fmt(r.get('step_peak_gib'), '.2f')} | {fmt(mem, '.2f')} | {fmt(r['projected_total_s'], '.0f')} |")
    return "\n".join(lines)


def summary_lines(results: List[dict]) -> List[str]:
    """The ratios the issue asks for, one line per (ours, host) pair."""
    ours = [r for r in results if r["engine"] == "ours" and "error" not in r]
    hosts = [r for r in results if r["engine"] == "host" and "error" not in r]
    out = []
    for h in hosts:
        for o in ours:
            speed = h["step"]["mean_ms"] / o["step"]["mean_ms"]
            mem = (f", memory ratio {o['step_peak_gib'] / h['step_peak_gib']:.2f}"
                   if o.get("step_peak_gib") and h.get("step_peak_gib") else "")
            out.append(f"ours {o['variant']} vs host {h['variant']}: speed-up {speed:.1f}x{mem}")
    for o in ours:
        if "stats_max_rel_err_vs_reference" in o:
            out.append(f"statistics ({o['variant']}): max rel. error vs layer_wise_statistics (expert 0) "
                       f"{o['stats_max_rel_err_vs_reference']:.2e}; reference would take "
                       f"~{o['reference_stats_s_projected']:.1f} s for all experts; solver {o['stats_solver']}")
    return out


def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": str(device)}
    try:
        from importlib.metadata import version

        env["fusion_bench"] = version("fusion_bench")
    except Exception:  # noqa: BLE001
        env["fusion_bench"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="b32")
    parser.add_argument("--experts", type=int, default=8, help="K experts = K tasks")
    parser.add_argument("--batch", type=int, default=16, help="images per task per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    parser.add_argument("--host-steps", type=int, default=None, help="timed host steps (default: --steps)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=3, help="singular values per tensor in the statistics")
    parser.add_argument("--ours", default=None,
                        help=f"comma-separated configurations: fp32|bf16 task vectors, optional -ckpt "
                             f"(activation checkpointing) or -ckpt<fraction of layers>, then optional -pt (one backward per task) (default: "
                             f"{','.join(OURS_VARIANTS)} on CUDA, fp32,bf16 on CPU); 'none' to skip")
    parser.add_argument("--host", default=None, choices=["fp32", "bf16", "both", "none"],
                        help="host AdaMerging precision(s) (default: both on CUDA, fp32 on CPU)")
    parser.add_argument("--perturbation", choices=["lowrank", "iid"], default="lowrank",
                        help="expert updates: rank-8 + noise (like real task vectors) or pure noise "
                             "(worst case for the Krylov statistics)")
    parser.add_argument("--attn", default=None, help="attn_implementation override (eager, sdpa)")
    parser.add_argument("--total-steps", type=int, default=500, help="steps of the projected full merge")
    parser.add_argument("--no-check-stats", dest="check_stats", action="store_false",
                        help="skip timing/checking the per-tensor reference statistics on expert 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write all measurements here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # "cuda" means the current device
        args.device = "cuda:0"
    cuda = device.type == "cuda"
    chosen = args.ours or (",".join(OURS_VARIANTS) if cuda else "fp32,bf16")
    args.ours = [] if chosen == "none" else [v.strip() for v in chosen.split(",") if v.strip()]
    unknown = [v for v in args.ours if not VARIANT.match(v)]
    if unknown:
        parser.error(f"unknown --ours variant(s) {unknown}; use fp32|bf16 with an optional -ckpt or "
                     f"-ckpt<fraction of layers>, then an optional -pt, e.g. {list(OURS_VARIANTS)}")
    host = args.host or ("both" if cuda else "fp32")
    args.host = {"both": ["fp32", "bf16"], "none": []}.get(host, [host])
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    size = MODELS[args.model]["image_size"]
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.experts * args.batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.experts, args.batch), generator=gen).to(device)
    heads = TaskHeads(MODELS[args.model]["hidden_size"], MODELS[args.model]["projection_dim"],
                      args.experts, args.seed).to(device)
    env = environment(device)
    print(f"# merge_speed: CLIP {args.model}, K={args.experts}, batch {args.batch}/task, "
          f"{args.steps} timed steps; {env}", flush=True)

    results = []
    for precision in args.host:
        results.append(guarded(f"host:AdaMerging {precision}",
                               lambda p=precision: run_host(args, p, device, images, heads), device))
        print(f"  host {precision}: done", flush=True)
    for variant in args.ours:
        results.append(guarded(f"ours:{variant}",
                               lambda v=variant: run_ours(args, v, device, images, labels, heads), device))
        print(f"  ours {variant}: done", flush=True)

    table = markdown(results, args)
    print()
    print(table)
    print()
    for line in summary_lines(results):
        print("- " + line)
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "environment": env, "results": results, "table": table}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
