"""Tiny, fully offline per-task-head suites (CNN with BatchNorm, BERT-style text encoder) for tests.

Both are written in the layout of :mod:`fusion_bench_statsmerging.heads` and build in
seconds on a CPU. Every expert is the pretrained backbone fine-tuned on its task *together
with a new linear head* (the per-task-head protocol), so each expert carries a planted,
learnable signal that plain averaging dilutes.

- :func:`build_tiny_cnn_suite`: a 2-block conv net with BatchNorm (:class:`TinyConvNet`) on
  the 16x16 procedural image tasks of :mod:`.fixtures`. The pretrained backbone is trained
  briefly on a label-free pretext (which task an image comes from), so its BatchNorm
  statistics describe the mixture; fine-tuning then moves each expert's statistics towards
  its own task's images.
- :func:`build_tiny_text_suite`: a randomly initialised tiny ``BertModel`` with a locally
  built word-level tokenizer on three keyword tasks (sentiment, topic, question).

``python -m fusion_bench_statsmerging.heads_fixtures DIR [--text]`` builds one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .heads import FORMAT, HeadsBackbone, save_backbone, save_expert

SPLITS = {"train": 96, "validation": 32, "test": 64}
IMAGE_TASKS = ["tiny_colors", "tiny_stripes", "tiny_quadrant"]
IMAGE_MEAN, IMAGE_STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


# --------------------------------------------------------------------------- CNN
class TinyConvNet(nn.Module):
    """conv-BN-ReLU-pool x len(widths), global average pool: images (N, C, H, W) -> features (N, widths[-1])."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (8, 16)):
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


def _image_tensor(ds) -> torch.Tensor:
    from .heads import ImageProcessor

    return ImageProcessor(16, "RGB", IMAGE_MEAN, IMAGE_STD)(list(ds["image"]))


def _train(backbone: nn.Module, head: nn.Module, inputs, labels: torch.Tensor, steps: int, lr: float,
           seed: int, batch: int = 32) -> None:
    """Fine-tune backbone and head jointly (train mode: BatchNorm statistics follow the task)."""
    torch.manual_seed(seed)
    backbone.train()
    head.train()
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = {k: v[idx] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[idx]
        loss = F.cross_entropy(head(backbone(x)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval()
    head.eval()


@torch.no_grad()
def _accuracy(backbone, head, inputs, labels) -> float:
    backbone.eval()
    return float((head(backbone(inputs)).argmax(-1) == labels).float().mean())


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU they lose a lot (spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_expert(directory: Path, backbone: HeadsBackbone, dim: int, num_classes: int, train, test, steps: int,
                  lr: float, seed: int, index: int) -> Dict[str, float]:
    """Fine-tune a copy of ``backbone`` with a new head on ``train``; save both; test accuracies."""
    expert = copy.deepcopy(backbone)
    torch.manual_seed(seed + 100 + index)
    head = nn.Linear(dim, num_classes)
    _train(expert, head, *train, steps, lr, seed + index)
    save_expert(expert, head, directory)
    return {"expert_test_accuracy": _accuracy(expert, head, *test),
            "pretrained_with_expert_head_test_accuracy": _accuracy(backbone, head, *test)}


def _write_common(root: Path, spec: dict, tasks: Dict[str, List[str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "suite.json").write_text(json.dumps({"format": FORMAT, **spec}, indent=2))
    (root / "tasks.json").write_text(json.dumps({t: {"classnames": c} for t, c in tasks.items()}, indent=2))


def build_tiny_cnn_suite(root: str | Path, seed: int = 0, steps: int = 60, lr: float = 3e-3,
                         pretrain_steps: int = 40) -> Path:
    """The tiny CNN suite (BatchNorm) under ``root``; returns its path."""
    with one_thread():
        return _build_tiny_cnn_suite(root, seed=seed, steps=steps, lr=lr, pretrain_steps=pretrain_steps)


def _build_tiny_cnn_suite(root: str | Path, seed: int = 0, steps: int = 60, lr: float = 3e-3,
                         pretrain_steps: int = 40) -> Path:
    """Body of :func:`build_tiny_cnn_suite`."""
    from .fixtures import TASKS, make_task_split

    root = Path(root)
    start = time.time()
    spec = {
        "input": "image",
        "backbone": {"kind": "module", "target": "fusion_bench_statsmerging.heads_fixtures:TinyConvNet",
                     "kwargs": {"in_channels": 3, "widths": [8, 16]}},
        "preprocessing": {"image_size": 16, "mode": "RGB", "mean": IMAGE_MEAN, "std": IMAGE_STD},
    }
    _write_common(root, spec, {t: TASKS[t][0] for t in IMAGE_TASKS})
    splits = {t: {s: make_task_split(t, n, seed * 1000 + i * 10 + j) for j, (s, n) in enumerate(SPLITS.items())}
              for i, t in enumerate(IMAGE_TASKS)}
    for t, by_split in splits.items():
        for s, ds in by_split.items():
            ds.save_to_disk(str(root / "data" / t / s))

    # "pretraining": which task an image comes from, on fresh images (no task label is used)
    torch.manual_seed(seed)
    backbone = HeadsBackbone(TinyConvNet(3, (8, 16)), "image")
    pretext = [_image_tensor(make_task_split(t, 64, seed * 1000 + 500 + i)) for i, t in enumerate(IMAGE_TASKS)]
    domain = torch.cat([torch.full((len(x),), i) for i, x in enumerate(pretext)])
    _train(backbone, nn.Linear(16, len(IMAGE_TASKS)), torch.cat(pretext), domain, pretrain_steps, lr, seed)
    save_backbone(backbone, root / "pretrained")

    manifest = {"kind": "tiny_cnn_heads_fixture", "seed": seed, "tasks": {}}
    for i, t in enumerate(IMAGE_TASKS):
        train, test = splits[t]["train"], splits[t]["test"]
        x, y = _image_tensor(train), torch.tensor(train["label"])
        xt, yt = _image_tensor(test), torch.tensor(test["label"])
        manifest["tasks"][t] = _write_expert(root / "experts" / t, backbone, 16, len(TASKS[t][0]), (x, y), (xt, yt),
                                             steps, lr, seed, i)
    manifest["build_seconds"] = round(time.time() - start, 2)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


# --------------------------------------------------------------------------- text
FILLER = ["the", "a", "this", "that", "is", "was", "it", "very", "really", "and", "of", "to", "in", "my", "we",
          "they", "today", "here"]
TEXT_TASKS: Dict[str, Dict[str, List[str]]] = {
    "tiny_sentiment": {"positive": ["good", "great", "love", "happy", "nice", "excellent"],
                       "negative": ["bad", "awful", "hate", "sad", "poor", "terrible"]},
    "tiny_topic": {"sports": ["ball", "goal", "team", "match"], "food": ["pizza", "bread", "soup", "cheese"],
                   "tech": ["laptop", "code", "robot", "chip"], "weather": ["rain", "snow", "sunny", "wind"]},
    "tiny_question": {"statement": ["i", "you", "she", "he"], "question": ["what", "why", "how", "where"]},
}
MAX_LENGTH = 16
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def text_vocab() -> Dict[str, int]:
    words = list(SPECIAL) + FILLER
    for classes in TEXT_TASKS.values():
        for ws in classes.values():
            words += [w for w in ws if w not in words]
    return {w: i for i, w in enumerate(words)}


def write_word_tokenizer(directory: Path):
    """A word-level BERT-style tokenizer ([CLS] ... [SEP]) built locally with ``tokenizers``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = text_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LENGTH)
    fast.save_pretrained(str(directory))
    return fast


def _sentence(task: str, label: int, rng: np.random.Generator) -> str:
    classes = list(TEXT_TASKS[task].values())
    other = [w for t, cl in TEXT_TASKS.items() if t != task for ws in cl.values() for w in ws]
    words = list(rng.choice(FILLER, size=rng.integers(3, 6)))
    words += list(rng.choice(other, size=2))  # words of the other tasks: interference
    if task == "tiny_question":  # the signal is the first word
        return " ".join([str(rng.choice(classes[label]))] + words)
    words += list(rng.choice(classes[label], size=2))
    rng.shuffle(words)
    return " ".join(words)


def make_text_split(task: str, n: int, seed: int):
    import datasets

    names = list(TEXT_TASKS[task])
    rng = np.random.default_rng(seed)
    labels = [i % len(names) for i in range(n)]
    rng.shuffle(labels)
    texts = [_sentence(task, lab, rng) for lab in labels]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def tiny_bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=MAX_LENGTH, type_vocab_size=1)


def build_tiny_text_suite(root: str | Path, seed: int = 0, steps: int = 120, lr: float = 3e-3) -> Path:
    """The tiny BERT-style text suite under ``root``; returns its path."""
    with one_thread():
        return _build_tiny_text_suite(root, seed=seed, steps=steps, lr=lr)


def _build_tiny_text_suite(root: str | Path, seed: int = 0, steps: int = 120, lr: float = 3e-3) -> Path:
    """Body of :func:`build_tiny_text_suite`."""
    from transformers import BertModel

    from .heads import TextProcessor

    root = Path(root)
    start = time.time()
    spec = {"input": "text", "backbone": {"kind": "transformers", "pooling": "pooler"},
            "preprocessing": {"max_length": MAX_LENGTH}}
    _write_common(root, spec, {t: list(c) for t, c in TEXT_TASKS.items()})
    tokenizer = write_word_tokenizer(root / "tokenizer")
    processor = TextProcessor(tokenizer, MAX_LENGTH)
    torch.manual_seed(seed)
    bert = BertModel(tiny_bert_config(len(text_vocab()))).eval()
    bert.save_pretrained(str(root / "pretrained"))
    backbone = HeadsBackbone(bert, "text", "pooler")
    manifest = {"kind": "tiny_text_heads_fixture", "seed": seed, "tasks": {}}
    for i, t in enumerate(TEXT_TASKS):
        by_split = {s: make_text_split(t, n, seed * 1000 + i * 10 + j) for j, (s, n) in enumerate(SPLITS.items())}
        for s, ds in by_split.items():
            ds.save_to_disk(str(root / "data" / t / s))
        x, y = processor(by_split["train"]["text"]), torch.tensor(by_split["train"]["label"])
        xt, yt = processor(by_split["test"]["text"]), torch.tensor(by_split["test"]["label"])
        manifest["tasks"][t] = _write_expert(root / "experts" / t, backbone, 32, len(TEXT_TASKS[t]), (x, y), (xt, yt),
                                             steps, lr, seed, i)
    manifest["build_seconds"] = round(time.time() - start, 2)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--text", action="store_true", help="build the BERT-style text suite (default: CNN)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build = build_tiny_text_suite if args.text else build_tiny_cnn_suite
    root = build(args.directory, seed=args.seed)
    print(json.dumps(json.loads((root / "manifest.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
