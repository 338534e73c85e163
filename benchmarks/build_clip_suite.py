#!/usr/bin/env python
"""Build the offline CLIP merging suite (pretrained CLIP, eight experts, eight tasks).

Examples::

    python benchmarks/build_clip_suite.py --out /tmp/clip_suite_tiny --size tiny
    python benchmarks/build_clip_suite.py --out /data/clip_suite --size full --device cuda \
        --fashion-mnist /path/to/fashion-mnist --time-budget 450
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clip_suite.config import PRESETS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; every default reproduces the documented build."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (keep it outside git)")
    p.add_argument("--size", choices=sorted(PRESETS), default="tiny", help="tiny: CPU smoke; full: one GPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", type=int, default=8, choices=range(1, 9), metavar="N", help="build the first N tasks")
    p.add_argument("--fashion-mnist", dest="fashion_dir", default=None,
                   help="folder with the four Fashion-MNIST IDX .gz files (default: search /usr/share)")
    p.add_argument("--fonts-dir", default=None, help="folder with DejaVu .ttf files (default: system, then matplotlib)")
    p.add_argument("--workers", type=int, default=None, help="data-generation processes (default: cores, max 16)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the preset's pretraining steps")
    p.add_argument("--expert-steps", type=int, default=None, help="override the preset's fine-tuning steps")
    p.add_argument("--pretrain-pool", type=int, default=None, help="override the number of pretraining images")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="fit pretraining and fine-tuning step counts into this wall time for the whole "
                        "build (measured step times; planned vs run steps go to the manifest)")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--overwrite", action="store_true", help="replace artefacts of an earlier build in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from clip_suite.build import build_suite

    build_suite(a.out, size=a.size, device=a.device, seed=a.seed, num_tasks=a.tasks, fashion_dir=a.fashion_dir,
                fonts_dir=a.fonts_dir, workers=a.workers, pretrain_steps=a.pretrain_steps,
                expert_steps=a.expert_steps, pretrain_pool=a.pretrain_pool, amp=not a.no_amp,
                overwrite=a.overwrite, time_budget=a.time_budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
