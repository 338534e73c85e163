"""A task's fit inputs as rows: a tensor (images) or a dict of equally long tensors (token ids, masks).

The training loop draws batches of rows, moves them between devices and reads the teachers' targets beside
them without caring which of the two a model family uses; these helpers are that one vocabulary.
"""

from __future__ import annotations

from typing import Dict, List, Union

import torch
from torch import Tensor

# Fit inputs of one task: a tensor (images) or a dict of equally long tensors (token ids, masks).
Inputs = Union[Tensor, Dict[str, Tensor]]


def target_logits(targets) -> Tensor:
    """The teacher logits (or labels) of a task's targets, also when features travel beside them."""
    return targets["logits"] if isinstance(targets, dict) else targets


def take(inputs: Inputs, index) -> Inputs:
    """Rows ``index`` of a tensor or of every tensor of a dict."""
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def tensors_of(inputs) -> List[Tensor]:
    """The tensors of a tensor or of a (nested) dict of tensors."""
    if isinstance(inputs, dict):
        return [t for v in inputs.values() for t in tensors_of(v)]
    return [inputs] if isinstance(inputs, Tensor) else []


def on_devices(index: Tensor, *inputs) -> Dict[torch.device, Tensor]:
    """``index`` copied once to every device that holds a tensor of ``inputs``."""
    return {d: index.to(d) for d in {t.device for x in inputs for t in tensors_of(x)}}


def take_on(inputs, index: Dict[torch.device, Tensor]):
    """Rows of a tensor or of every tensor of a (nested) dict, each with the index on its own device."""
    if isinstance(inputs, dict):
        return {k: take_on(v, index) for k, v in inputs.items()}
    return inputs[index[inputs.device]]


def num_rows(inputs: Inputs) -> int:
    if isinstance(inputs, dict):
        return len(next(iter(inputs.values())))
    return len(inputs)


# "auto" keeps the fit set on the GPU when it takes at most this share of the GPU's free memory
FIT_DATA_DEVICE_SHARE = 0.25


def nbytes(inputs) -> int:
    """Bytes held by the tensors of a tensor or of a (nested) dict of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors_of(inputs))


def keep_fit_data_on_device(setting, data_bytes: int, device: torch.device,
                            share: float = FIT_DATA_DEVICE_SHARE) -> bool:
    """Whether the fit set goes to ``device`` once (no copy per step) or stays in host memory.

    ``True`` / ``False`` decide; ``"auto"`` places it when it takes at most ``share`` of the accelerator's
    free memory, so a large budget (thousands of 224-pixel images per task: GBs) leaves room for the merge
    on a small GPU instead of running out of memory. On the CPU the data is already there.
    """
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return data_bytes <= share * free
