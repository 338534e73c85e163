"""The merging engine a method's ``merge_engine`` names, built from the pretrained model and the experts."""

from __future__ import annotations

from typing import List

from torch import nn

from ..utils.errors import UserError
from .fused import FusedLayerWiseEngine
from .merge import HostLayerWiseEngine
from .settings import ENGINES


def build_engine(name: str, pretrained: nn.Module, experts: List[nn.Module], **kwargs) -> nn.Module:
    """The reference engine wraps the host's LayerWiseMergedModel; ``fused`` is the fast one."""
    if name == "host":
        kwargs.pop("task_vector_dtype", None)
        return HostLayerWiseEngine(pretrained, experts, **kwargs)
    if name == "fused":
        return FusedLayerWiseEngine(pretrained, experts, **kwargs)
    raise UserError(f"Unknown merge_engine '{name}'; choose one of {list(ENGINES)}.")
