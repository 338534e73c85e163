"""CLIP model construction, feature helpers and saving, kept compatible with transformers 4.x and 5.x.

Only long-stable pieces of the transformers API are used: ``CLIPConfig``/``CLIPModel``,
``CLIPVisionModel``, the sub-module ``pooler_output`` and ``save_pretrained``.  In particular
``get_image_features`` is avoided because its return type changed between major versions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, write_vocab_files

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelSize:
    """Architecture hyper-parameters of one suite size."""

    image_size: int
    patch_size: int
    vision_layers: int
    vision_width: int
    vision_heads: int
    text_layers: int
    text_width: int
    text_heads: int
    projection_dim: int
    max_text_length: int = 77


def clip_config(m: ModelSize):
    """A CLIPConfig for the byte tokenizer (EOS pooling by id, not the legacy argmax)."""
    from transformers import CLIPConfig

    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=m.text_width, intermediate_size=4 * m.text_width,
        num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
        max_position_embeddings=m.max_text_length, hidden_act="quick_gelu",
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, projection_dim=m.projection_dim,
    )
    vision = dict(
        hidden_size=m.vision_width, intermediate_size=4 * m.vision_width, num_hidden_layers=m.vision_layers,
        num_attention_heads=m.vision_heads, image_size=m.image_size, patch_size=m.patch_size,
        num_channels=3, hidden_act="quick_gelu", projection_dim=m.projection_dim,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=m.projection_dim,
                      logit_scale_init_value=math.log(1 / 0.07))


def new_clip_model(m: ModelSize, seed: int):
    """Randomly initialised CLIPModel; seeded so the initial weights are reproducible."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(clip_config(m))


def image_processor(m: ModelSize):
    """Processor that maps our stored S x S RGB images to pixel_values without any rescaling."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": m.image_size}, crop_size={"height": m.image_size, "width": m.image_size},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True,
    )


def normalize_pixels(x_uint8: torch.Tensor) -> torch.Tensor:
    """N x S x S x 3 uint8 -> N x 3 x S x S float, exactly what CLIPImageProcessor does for S x S input."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x_uint8.device).view(1, 3, 1, 1)
    x = x_uint8.permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


def image_embeds(vision_module, projection: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit-norm image embeddings from a CLIP vision transformer (CLIPModel.vision_model or CLIPVisionModel)."""
    pooled = vision_module(pixel_values=pixel_values).pooler_output
    return F.normalize(projection(pooled), dim=-1)


def text_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Unit-norm text embeddings (EOS-token pooling inside the text transformer)."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


@torch.no_grad()
def zero_shot_head(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                   device: torch.device) -> torch.Tensor:
    """Class weights = normalised mean over templates of normalised text embeddings (TA protocol)."""
    model.eval()
    rows: List[torch.Tensor] = []
    for name in classnames:
        texts = [t.format(name) for t in templates]
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        emb = text_embeds(model, enc["input_ids"].to(device), enc["attention_mask"].to(device))
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows).float()


def vision_core(module):
    """The transformer inside a CLIPVisionModel.

    transformers 4.x wraps it as ``CLIPVisionModel.vision_model`` (a CLIPVisionTransformer, which
    is also what ``CLIPModel.vision_model`` is); in 5.x ``CLIPVisionModel`` holds the layers
    itself and ``CLIPModel.vision_model`` is a CLIPVisionModel.  Either way the result has the
    same state-dict keys as ``CLIPModel.vision_model``.
    """
    return getattr(module, "vision_model", module)


def vision_only(model):
    """A CLIPVisionModel holding a copy of ``model``'s vision tower (the object experts are saved as)."""
    from transformers import CLIPVisionModel

    vm = CLIPVisionModel(model.config.vision_config)
    vision_core(vm).load_state_dict(model.vision_model.state_dict(), strict=True)
    return vm


def save_pretrained_bundle(model, tokenizer, processor_image, directory: Path) -> None:
    """Write CLIPModel weights+config and a CLIPProcessor (tokenizer + image processor).

    transformers 5 saves a processor as processor_config.json + tokenizer.json only; the
    per-component files of the 4.x layout (preprocessor_config.json, vocab.json, merges.txt)
    are written as well so that any version from 4.40 on loads the bundle.
    """
    from transformers import CLIPProcessor

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    CLIPProcessor(image_processor=processor_image, tokenizer=tokenizer).save_pretrained(str(directory))
    if not (directory / "preprocessor_config.json").exists():
        processor_image.save_pretrained(str(directory))
    if not (directory / "vocab.json").exists():
        write_vocab_files(directory)


def save_vision_expert(vision_model, directory: Path) -> None:
    """Save a CLIPVisionModel in the 4.x checkpoint layout (keys prefixed ``vision_model.``).

    transformers 5 would save un-prefixed keys, which 4.x silently ignores (it re-initialises
    the weights at random); 5.x reads the prefixed layout fine, so this one works for both.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = vision_core(vision_model).state_dict()
    tensors = {f"vision_model.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    vision_model.config.architectures = ["CLIPVisionModel"]
    vision_model.config.save_pretrained(str(directory))


def model_summary(m: ModelSize, model) -> Dict[str, object]:
    """Sizes recorded in the manifest."""
    n_vision = sum(p.numel() for p in model.vision_model.parameters())
    n_text = sum(p.numel() for p in model.text_model.parameters())
    return {**asdict(m), "vision_params": n_vision, "text_params": n_text,
            "total_params": sum(p.numel() for p in model.parameters())}
