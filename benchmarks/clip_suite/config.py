"""Size presets of the suite.  ``tiny`` is a CPU smoke build, ``full`` targets one H100 (~5 min).

``small`` sits in between and exists to sanity-check learning dynamics on a CPU in tens of
minutes; its numbers are indicative only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

from .model import ModelSize
from .train import FinetuneConfig, PretrainConfig

BUILDER_VERSION = "1.0.0"


@dataclass(frozen=True)
class SuitePreset:
    """Everything that differs between sizes."""

    name: str
    model: ModelSize
    pretrain_pool: int
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    split_sizes: Dict[str, int]
    split_overrides: Dict[str, Dict[str, int]] = field(default_factory=dict)
    # Torch CPU threads; 1 for the tiny model, whose ops are too small to gain from threading
    # and which slow down badly when a busy machine makes threads wait for each other.
    cpu_threads: Optional[int] = None

    def task_split_sizes(self, task: str) -> Dict[str, int]:
        """Split sizes for one task (real sources may ask for more or fewer images)."""
        return {**self.split_sizes, **self.split_overrides.get(task, {})}


PRESETS: Dict[str, SuitePreset] = {
    "tiny": SuitePreset(
        name="tiny",
        model=ModelSize(image_size=16, patch_size=4, vision_layers=2, vision_width=32, vision_heads=2,
                        text_layers=2, text_width=32, text_heads=2, projection_dim=32),
        pretrain_pool=3000,
        pretrain=PretrainConfig(steps=150, batch_size=128, lr=2e-3, warmup=15),
        finetune=FinetuneConfig(steps=40, batch_size=64, lr=2e-3, warmup=4, eval_every=10),
        split_sizes={"train": 192, "validation": 64, "test": 128},
        cpu_threads=1,
    ),
    # Same 32 px data as `full` (so glyph tasks are legible) but 8 px patches: 16 tokens, a
    # CPU-sized model. It exists to check on a CPU that every task is learnable.
    "small": SuitePreset(
        name="small",
        model=ModelSize(image_size=32, patch_size=8, vision_layers=3, vision_width=96, vision_heads=3,
                        text_layers=2, text_width=64, text_heads=2, projection_dim=64),
        pretrain_pool=20000,
        pretrain=PretrainConfig(steps=1200, batch_size=128, lr=1.5e-3, warmup=80),
        finetune=FinetuneConfig(steps=300, batch_size=64, lr=5e-4, warmup=30, eval_every=50),
        split_sizes={"train": 1000, "validation": 200, "test": 300},
        split_overrides={"syn_fashion": {"train": 2000}},
        cpu_threads=1,
    ),
    # One H100 in about 5 minutes (see README "Time budget"): the steps are launch-bound at
    # this width, so big batches and few steps; 4k x 1024 = 26 epochs of the pool.
    "full": SuitePreset(
        name="full",
        model=ModelSize(image_size=32, patch_size=4, vision_layers=6, vision_width=256, vision_heads=4,
                        text_layers=4, text_width=256, text_heads=4, projection_dim=256),
        pretrain_pool=160000,
        pretrain=PretrainConfig(steps=4000, batch_size=1024, lr=1e-3, warmup=200),
        finetune=FinetuneConfig(steps=600, batch_size=256, lr=3e-4, warmup=30, eval_every=100),
        split_sizes={"train": 6000, "validation": 500, "test": 1000},
        split_overrides={"syn_fashion": {"train": 10000}, "syn_digits": {"train": 1000, "validation": 297, "test": 500}},
    ),
}


def get_preset(name: str, pretrain_steps: Optional[int] = None, expert_steps: Optional[int] = None,
               pretrain_pool: Optional[int] = None) -> SuitePreset:
    """A preset with optional CLI overrides of the step counts and pool size."""
    p = PRESETS[name]
    if pretrain_steps is not None:
        warm = max(1, min(p.pretrain.warmup, pretrain_steps // 10))
        p = replace(p, pretrain=replace(p.pretrain, steps=pretrain_steps, warmup=warm))
    if expert_steps is not None:
        warm = max(1, min(p.finetune.warmup, expert_steps // 10))
        every = max(1, min(p.finetune.eval_every, expert_steps))
        p = replace(p, finetune=replace(p.finetune, steps=expert_steps, warmup=warm, eval_every=every))
    if pretrain_pool is not None:
        p = replace(p, pretrain_pool=pretrain_pool)
    return p
