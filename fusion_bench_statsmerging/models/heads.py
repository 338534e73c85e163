"""A per-task-head classifier: backbone without head, the frozen heads on top, and its inputs.

:class:`HeadsBackbone` maps preprocessed inputs to features (N, D); it is what every merging
method merges (task vectors are taken over the backbone only). :class:`PerTaskHeadsModel` is a
(merged) backbone carrying the frozen head of each task. :class:`ImageProcessor` and
:class:`TextProcessor` preprocess a suite's raw column (PIL images or strings) into the backbone's
input, and :func:`read_inputs` does so for dataset rows while reading that column only (labels
are never touched). The on-disk suite layout and the model pool are in
:mod:`fusion_bench_statsmerging.modelpool.heads`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..utils.inputs import Inputs

INPUT_KINDS = ("image", "text")


class HeadsBackbone(nn.Module):
    """A backbone without head: preprocessed inputs -> features (N, D).

    ``model`` is the wrapped network: without ``pooling`` (torchvision, timm, own modules) it
    maps images to features itself; with ``pooling`` it is a transformers model (token ids,
    or ``pixel_values`` for vision models) whose output is pooled (``cls``: first token,
    ``pooler``: its pooler output, ``mean``: mean over tokens/positions). Task vectors and
    the host's baselines see its parameters under the ``model.`` prefix.
    """

    def __init__(self, model: nn.Module, input_kind: str = "image", pooling: Optional[str] = None):
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}.")
        self.model = model
        self.input_kind = input_kind
        self.pooling = pooling

    def forward(self, inputs: Inputs) -> Tensor:
        if self.pooling is None:  # torchvision / timm / own modules: images -> features
            return self.model(inputs)
        if self.input_kind == "image":  # a transformers vision model (ViT, ResNet, ConvNeXt, ...)
            out = self.model(pixel_values=inputs)
        else:
            out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        if self.pooling == "pooler":
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        if self.pooling == "mean":
            if self.input_kind == "image" or "attention_mask" not in inputs:
                return hidden.flatten(2).mean(-1) if hidden.dim() == 4 else hidden.mean(1)
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return hidden[:, 0]


class PerTaskHeadsModel(nn.Module):
    """A (merged) backbone with the frozen head of every task: ``forward(inputs, task)`` gives logits."""

    def __init__(self, backbone: HeadsBackbone, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads)).requires_grad_(False)

    def forward(self, inputs: Inputs, task: str) -> Tensor:
        return self.heads[task](self.backbone(inputs))



# --------------------------------------------------------------------------- preprocessing
class ImageProcessor:
    """PIL images -> normalised (N, C, H, W) float tensor (resize, mode, mean/std), no torchvision."""

    def __init__(self, image_size: Union[int, Sequence[int]] = 224, mode: str = "RGB",
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.size = (int(size[0]), int(size[1]))  # (H, W)
        self.mode = mode
        channels = 1 if mode == "L" else 3
        self.mean = torch.tensor(mean if mean is not None else [0.0] * channels).view(-1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * channels).view(-1, 1, 1)

    def __call__(self, images: Sequence[Any]) -> Tensor:
        from PIL import Image

        out = []
        for im in images:
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im))
            im = im.convert(self.mode)
            if im.size != (self.size[1], self.size[0]):
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
            if arr.ndim == 2:
                arr = arr[..., None]
            out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
        return (torch.stack(out) - self.mean) / self.std


class TextProcessor:
    """Strings -> {"input_ids", "attention_mask"} padded to ``max_length`` (so tasks concatenate)."""

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __call__(self, texts: Sequence[str]) -> Dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def concat_inputs(parts: Sequence[Inputs]) -> Inputs:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(list(parts))


def inputs_to(inputs: Inputs, device, float_dtype: torch.dtype = torch.float32) -> Inputs:
    """Move inputs to ``device``; image tensors (stored compactly) become ``float_dtype``."""
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device=device, dtype=float_dtype)


def column_only_view(dataset, column: str):
    """A Hugging Face dataset reduced to one column before any row is read (labels never touched)."""
    if hasattr(dataset, "select_columns") and column in getattr(dataset, "column_names", []):
        return dataset.select_columns([column])
    return dataset


def _value_of(row: Any, column: str):
    if isinstance(row, (tuple, list)):
        return row[0]
    return row[column]


def read_inputs(dataset, indices: Sequence[int], column: str, processor, batch_size: int = 64,
                image_dtype: torch.dtype = torch.float16) -> Inputs:
    """Preprocess rows ``indices`` reading only ``column`` (images stored in ``image_dtype``)."""
    view = column_only_view(dataset, column)
    chunks = []
    for start in range(0, len(indices), batch_size):
        values = [_value_of(view[int(i)], column) for i in indices[start:start + batch_size]]
        out = processor(values)
        chunks.append(out.to(image_dtype) if isinstance(out, Tensor) else out)
    return concat_inputs(chunks)

