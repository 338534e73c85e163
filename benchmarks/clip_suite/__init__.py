"""Offline builder of a small CLIP model-merging suite (pretrained CLIP + eight experts + eight tasks).

See ``benchmarks/build_clip_suite.py`` for the command line and ``build.py`` for the layout.
"""

from .config import BUILDER_VERSION, PRESETS
from .tasks import TASKS

__all__ = ["BUILDER_VERSION", "PRESETS", "TASKS", "build_suite"]


def build_suite(*args, **kwargs):
    """Lazy wrapper so importing the package does not import torch/transformers."""
    from .build import build_suite as _build

    return _build(*args, **kwargs)
