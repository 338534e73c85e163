"""A tiny CLIP suite exported to OpenCLIP layout (tests and demos of the OpenCLIP pools).

The suite built by :func:`fixtures.build_tiny_clip_suite` holds a transformers ``CLIPModel`` and
fine-tuned ``CLIPVisionModel`` experts. This module writes the same networks as OpenCLIP would save
them, so the OpenCLIP pools are exercised on files of OpenCLIP's own format with no hub access::

    openclip/model_config.json   OpenCLIP model config (``open_clip.model.CLIP(**config)`` builds it)
    openclip/pretrained.pt       the whole CLIP's state dict (``model.state_dict()``)
    openclip/experts/<task>.pt   each expert's image encoder (``model.visual.state_dict()``)

The experts are the suite's fine-tuned experts converted (their projection is the pretrained one, as in
the suite: the experts were trained through the frozen projection).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .openclip_convert import hf_clip_to_openclip, hf_vision_to_openclip
from .openclip_pool import OPENCLIP_DIR
from .suite import read_suite_tasks


def export_suite_to_openclip(suite_dir: str | Path, openclip_dir: str = OPENCLIP_DIR) -> Path:
    """Write the suite's pretrained CLIP and experts in OpenCLIP layout under ``<suite>/<openclip_dir>``."""
    from transformers import CLIPModel, CLIPVisionModel

    suite = Path(suite_dir)
    out = suite / openclip_dir
    (out / "experts").mkdir(parents=True, exist_ok=True)
    clip_model = CLIPModel.from_pretrained(suite / "pretrained").eval()
    openclip_model, config = hf_clip_to_openclip(clip_model)
    (out / "model_config.json").write_text(json.dumps(config, indent=2))
    torch.save(openclip_model.state_dict(), out / "pretrained.pt")
    projection = clip_model.visual_projection.weight.detach()
    for task in read_suite_tasks(suite):
        expert = CLIPVisionModel.from_pretrained(suite / "experts" / task)
        torch.save(hf_vision_to_openclip(expert.state_dict(), projection), out / "experts" / f"{task}.pt")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fusion_bench_statsmerging.openclip_fixtures SUITE [--build]``: export an existing suite
    (``--build`` first builds the tiny suite there)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m fusion_bench_statsmerging.openclip_fixtures SUITE_DIR [--build]", file=sys.stderr)
        return 2
    if "--build" in args:
        from .fixtures import build_tiny_clip_suite

        build_tiny_clip_suite(args[0])
    print(export_suite_to_openclip(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
