"""A tiny, fully offline CLIP model pool for tests and the README demo.

Real CLIP checkpoints live on the Hugging Face hub, which tests cannot reach. This
module builds a miniature stand-in with the same file layout: a ``CLIPModel`` with a
hand-written byte-level tokenizer, a few procedurally generated image tasks saved with
``datasets.save_to_disk``, and one ``CLIPVisionModel`` expert per task fine-tuned with
the task's frozen zero-shot head (the Task Arithmetic protocol). Each expert therefore
carries a planted, learnable signal, so a merge that keeps more of each task vector
measurably beats plain averaging.

Layout written under ``root`` (the same one :class:`CLIPSuiteModelPool` reads)::

    pretrained/            CLIPModel + CLIPProcessor
    experts/<task>/        CLIPVisionModel
    data/<task>/<split>/   datasets with ``image`` and ``label`` columns
    tasks.json             class names and prompt templates per task
    manifest.json          what was built and the accuracies measured
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SIZE = 16
SPLITS = {"train": 96, "validation": 32, "test": 64}
TEMPLATES = ["a photo of {}.", "an image of {}.", "{}"]


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> Dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (re-derived, it is a fixed rule)."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_byte_tokenizer(directory: Path) -> None:
    """Write a merge-free byte-level CLIP vocabulary: every byte is a token, so any text encodes."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")


# --------------------------------------------------------------------------- tasks
def _colors(label: int, rng: np.random.Generator) -> np.ndarray:
    palette = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [220, 220, 30]], float)
    img = palette[label] + rng.normal(0, 40, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return img


def _stripes(label: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    phase = rng.integers(0, 4)
    pattern = [(y + phase) // 2 % 2, (x + phase) // 2 % 2, (x + y + phase) // 2 % 2,
               ((x // 4) + (y // 4) + phase) % 2][label]
    gray = 60 + 140 * pattern + rng.normal(0, 25, pattern.shape)
    return np.repeat(gray[..., None], 3, axis=2)


def _quadrant(label: int, rng: np.random.Generator) -> np.ndarray:
    img = rng.normal(50, 20, (IMAGE_SIZE, IMAGE_SIZE, 3))
    h = IMAGE_SIZE // 2
    r0, c0 = (label // 2) * h, (label % 2) * h
    img[r0 + 1 : r0 + h - 1, c0 + 1 : c0 + h - 1] += 170
    return img


TASKS: Dict[str, tuple[List[str], Callable[[int, np.random.Generator], np.ndarray]]] = {
    "tiny_colors": (["red", "green", "blue", "yellow"], _colors),
    "tiny_stripes": (["horizontal stripes", "vertical stripes", "diagonal stripes", "checkers"], _stripes),
    "tiny_quadrant": (["top left", "top right", "bottom left", "bottom right"], _quadrant),
}


def make_task_split(task: str, n: int, seed: int):
    """Generate ``n`` labelled images of ``task`` as a ``datasets.Dataset`` (balanced labels)."""
    import datasets

    classnames, draw = TASKS[task]
    rng = np.random.default_rng(seed)
    labels = [i % len(classnames) for i in range(n)]
    rng.shuffle(labels)
    images = [Image.fromarray(np.clip(draw(lab, rng), 0, 255).astype(np.uint8)) for lab in labels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=classnames)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


# --------------------------------------------------------------------------- model
def tiny_clip_config(image_size: int = IMAGE_SIZE):
    from transformers import CLIPConfig

    vocab_size = 2 * 256 + 2
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=48,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=4),
        projection_dim=16,
    )


def save_pretrained_clip(directory: Path, seed: int = 0) -> None:
    """A randomly initialised tiny ``CLIPModel`` with its processor, saved like a hub checkpoint."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config())
    directory.mkdir(parents=True, exist_ok=True)
    tok_dir = directory / "_tokenizer_src"
    write_byte_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                              model_max_length=48)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    model.save_pretrained(directory)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()


@torch.no_grad()
def zero_shot_head(clip_model, processor, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Class embeddings averaged over templates and normalised: the frozen head of a task."""
    rows = []
    for name in classnames:
        texts = [t.format(name) for t in templates]
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        emb = clip_model.get_text_features(**tokens)
        emb = F.normalize(emb, dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


def _pixel_values(processor, dataset) -> torch.Tensor:
    return processor(images=list(dataset["image"]), return_tensors="pt")["pixel_values"]


def _logits(vision_model, projection, head, scale, pixels) -> torch.Tensor:
    emb = projection(vision_model(pixel_values=pixels)[1])
    return scale * F.normalize(emb, dim=-1) @ head.t()


def fit_to_head(vision, clip_model, processor, head, train, steps: int, lr: float, seed: int):
    """Train ``vision``'s trainable parameters (all of them, or only LoRA factors) on one task through the
    task's frozen zero-shot head: cross-entropy on the train split's labels, AdamW, batches of 32."""
    projection = clip_model.visual_projection.requires_grad_(False)
    scale = clip_model.logit_scale.exp().detach()
    pixels, labels = _pixel_values(processor, train), torch.tensor(train["label"])
    opt = torch.optim.AdamW([p for p in vision.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (32,), generator=gen)
        loss = F.cross_entropy(_logits(vision, projection, head, scale, pixels[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vision.eval()


def finetune_expert(clip_model, processor, head, train, steps: int, lr: float, seed: int):
    """Fine-tune a copy of the vision tower on one task with the task's frozen zero-shot head."""
    import copy

    torch.manual_seed(seed)
    vision = copy.deepcopy(clip_model.vision_model).train()
    return fit_to_head(vision, clip_model, processor, head, train, steps, lr, seed)


@torch.no_grad()
def accuracy(vision, clip_model, processor, head, dataset) -> float:
    """Zero-shot-head accuracy of a vision tower on a labelled split (evaluation only)."""
    logits = _logits(vision, clip_model.visual_projection, head, clip_model.logit_scale.exp(),
                     _pixel_values(processor, dataset))
    return float((logits.argmax(-1) == torch.tensor(dataset["label"])).float().mean())


def build_tiny_clip_suite(root: str | Path, seed: int = 0, steps: int = 60, lr: float = 3e-3) -> Path:
    """Build the whole tiny suite under ``root`` (seconds on a laptop CPU) and return its path."""
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

    root = Path(root)
    start = time.time()
    save_pretrained_clip(root / "pretrained", seed=seed)
    clip_model = CLIPModel.from_pretrained(root / "pretrained").eval()
    processor = CLIPProcessor.from_pretrained(root / "pretrained")
    manifest = {"kind": "tiny_clip_fixture", "seed": seed, "tasks": {}}
    (root / "tasks.json").write_text(json.dumps(
        {task: {"classnames": names, "templates": TEMPLATES} for task, (names, _) in TASKS.items()},
        indent=2))
    for t_idx, task in enumerate(TASKS):
        splits = {s: make_task_split(task, n, seed * 1000 + t_idx * 10 + i)
                  for i, (s, n) in enumerate(SPLITS.items())}
        for split, ds in splits.items():
            ds.save_to_disk(str(root / "data" / task / split))
        head = zero_shot_head(clip_model, processor, TASKS[task][0], TEMPLATES)
        vision = finetune_expert(clip_model, processor, head, splits["train"], steps, lr, seed + t_idx)
        expert = CLIPVisionModel(clip_model.config.vision_config)
        expert.vision_model.load_state_dict(vision.state_dict())
        expert.save_pretrained(root / "experts" / task)
        manifest["tasks"][task] = {
            "pretrained_test_accuracy": accuracy(clip_model.vision_model, clip_model, processor, head, splits["test"]),
            "expert_test_accuracy": accuracy(vision, clip_model, processor, head, splits["test"]),
        }
    manifest["build_seconds"] = round(time.time() - start, 2)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
