"""A tiny, fully offline Flan-T5-style GLUE pool for tests and demos.

Flan-T5 checkpoints, their tokenizer and GLUE live on the Hugging Face hub, which tests
cannot reach. This module builds a miniature stand-in that the host's own classes read
unchanged:

- a word-level tokenizer (``tokenizers``, saved as a ``PreTrainedTokenizerFast``; T5's special
  ids: pad 0, ``</s>`` 1, unk 2; every encoding ends with ``</s>`` like T5's);
- a randomly initialised ``T5ForConditionalGeneration`` (gated-GELU, untied ``lm_head``, like
  Flan-T5; ``shared`` is tied to both ``embed_tokens``);
- three GLUE-named tasks (``sst2``, ``cola``, ``rte``) with synthetic text in GLUE's own columns,
  so the host's prompt templates, preprocessors and text-generation task pool apply;
- one fully fine-tuned expert and one LoRA adapter (PEFT) per task, trained on the host's
  prompts with the template's label words as targets;
- the host-preprocessed datasets under ``cache/flan-t5/_load_<task>_dataset_cached``, the exact
  cache path the host's ``load_glue_dataset`` (and so ``FlanT5GLUETextGenerationTaskPool``) reads
  before it would go to the hub;
- model-pool and task-pool YAML files for the ``fusion_bench`` CLI (``-cd <root>/config``).

Layout under ``root``::

    tokenizer/  pretrained/  experts/<task>/  lora/<task>/
    data/<task>/{train,validation}          raw GLUE-style columns + ``label``
    cache/flan-t5/_load_<task>_dataset_cached
    config/modelpool/t5_fixture{,_lora}.yaml  config/taskpool/t5_fixture.yaml
    manifest.json
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

TASKS = ("sst2", "cola", "rte")
SPLITS = {"train": 64, "validation": 32}
MAX_LENGTH = 64

_NOUNS = ["cat", "dog", "bird", "child", "teacher", "farmer", "doctor", "river", "city", "garden"]
_VERBS = ["sees", "likes", "finds", "watches", "visits", "helps"]
_BARE_VERBS = ["see", "like", "find", "watch", "visit", "help"]
_GOOD = ["great", "wonderful", "lovely", "brilliant", "superb"]
_BAD = ["awful", "boring", "terrible", "dull", "horrible"]
_FILLER = ["quite", "really", "very", "rather"]


def _row(task: str, label: int, rng) -> Dict[str, object]:
    """One synthetic example in the task's GLUE columns; the label is planted in the words."""
    n1, n2 = rng.choice(_NOUNS, 2, replace=False)
    if task == "sst2":  # 0 negative, 1 positive
        adj = rng.choice(_GOOD if label == 1 else _BAD)
        return {"sentence": f"the film was {rng.choice(_FILLER)} {adj} and the {n1} too"}
    if task == "cola":  # 0 unacceptable (no subject-verb agreement), 1 acceptable
        verb = rng.choice(_VERBS if label == 1 else _BARE_VERBS)
        return {"sentence": f"the {n1} {verb} the {n2}"}
    if task == "rte":  # 0 yes (entailment), 1 no (the hypothesis negates the premise)
        verb = rng.choice(_VERBS)
        return {"sentence1": f"the {n1} {verb} the {n2}",
                "sentence2": f"the {n1} {verb} something" if label == 0 else f"the {n1} never {verb} anything"}
    raise KeyError(task)


def make_task_split(task: str, n: int, seed: int):
    import datasets

    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    rows = [_row(task, int(lab), rng) for lab in labels]
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    columns["idx"] = list(range(n))
    columns["label"] = [int(x) for x in labels]
    return datasets.Dataset.from_dict(columns)


# --------------------------------------------------------------------------- tokenizer
_WORD = re.compile(r"\w+|[^\w\s]+")


def build_tokenizer(texts: List[str], directory: Path):
    """A word-level tokenizer over ``texts`` with T5's special ids, saved for ``AutoTokenizer``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in _WORD.findall(t.lower())})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=MAX_LENGTH,
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(directory)
    return fast


def tiny_t5_config(vocab_size: int):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                    dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


# --------------------------------------------------------------------------- training
def host_preprocess(dataset_dict, task: str, tokenizer):
    """The host's ``_load_glue_dataset`` on local data: its templates, preprocessors and kwargs."""
    from fusion_bench.tasks.flan_t5_text_generation.glue_preprocessors import glue_processors
    from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates

    preprocessor = glue_processors[task](
        template=glue_prompt_templates[task], tokenizer=tokenizer,
        tokenizer_kwargs={"padding": "max_length", "truncation": True, "return_tensors": "pt"},
    )
    return dataset_dict.map(preprocessor, batched=True, remove_columns=dataset_dict["train"].column_names)


def finetune(model, train, steps: int, lr: float, seed: int, batch_size: int = 16):
    """Teacher-forced fine-tuning on the host-preprocessed train split (labels: -100 on padding)."""
    torch.manual_seed(seed)
    ids = torch.tensor(train["input_ids"])
    mask = torch.tensor(train["attention_mask"])
    labels = torch.tensor(train["labels"])
    keep_in = int(mask.sum(1).max())
    keep_out = int((labels != -100).sum(1).max())
    ids, mask, labels = ids[:, :keep_in], mask[:, :keep_in], labels[:, :keep_out]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(ids), (batch_size,), generator=gen)
        loss = model(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def generation_accuracy(model, dataset, tokenizer) -> float:
    """The host's exact-match metric (greedy generation vs. the label words)."""
    from fusion_bench.tasks.flan_t5_text_generation.glue_evaluation import evaluate_accuracy
    from transformers import default_data_collator

    loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=default_data_collator)
    return evaluate_accuracy(model, loader, tokenizer)


# --------------------------------------------------------------------------- configs
def _write_configs(root: Path) -> None:
    def model(path):
        return {"_target_": "transformers.AutoModelForSeq2SeqLM.from_pretrained",
                "pretrained_model_name_or_path": str(path)}

    datasets = {
        split_key: {f"glue-{t}": {"_target_": "datasets.load_from_disk",
                                  "dataset_path": str(root / "data" / t / split)} for t in TASKS}
        for split_key, split in (("train_datasets", "train"), ("val_datasets", "validation"))
    }
    common = {"_target_": "fusion_bench.modelpool.Seq2SeqLMPool", "_recursive_": False,
              "tokenizer": {"_target_": "transformers.AutoTokenizer.from_pretrained",
                            "pretrained_model_name_or_path": str(root / "tokenizer")},
              **datasets}
    full = {**common, "models": {"_pretrained_": model(root / "pretrained"),
                                 **{f"glue-{t}": model(root / "experts" / t) for t in TASKS}}}
    lora = {**common, "models": {"_pretrained_": model(root / "pretrained"), **{
        f"glue-{t}": {"_target_": "fusion_bench.modelpool.seq2seq_lm.modelpool.load_lora_model",
                      "base_model_path": str(root / "pretrained"), "peft_model_path": str(root / "lora" / t)}
        for t in TASKS}}}
    taskpool = {"type": "FlanT5GLUETextGenerationTaskPool", "name": "t5_fixture",
                "tasks": [{"name": t, "dataset": {"name": t, "split": "validation"}} for t in TASKS],
                "tokenizer": str(root / "tokenizer"), "cache_dir": str(root / "cache"),
                "batch_size": 32, "num_workers": 0, "fast_dev_run": False}
    for group, name, cfg in [("modelpool", "t5_fixture", full), ("modelpool", "t5_fixture_lora", lora),
                             ("taskpool", "t5_fixture", taskpool)]:
        path = root / "config" / group / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run with ``n`` intra-op threads (tiny models only lose from more, badly so on busy cores)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_tiny_t5_pool(root: str | Path, seed: int = 0, steps: int = 60, lr: float = 1e-2,
                       lora_steps: int = 60, lora_lr: float = 2e-2, num_threads: Optional[int] = 1) -> Path:
    """Build the whole fixture under ``root`` (seconds on a laptop CPU) and return its path."""
    with torch_threads(num_threads):
        return _build(Path(root), seed, steps, lr, lora_steps, lora_lr)


def _build(root: Path, seed: int, steps: int, lr: float, lora_steps: int, lora_lr: float) -> Path:
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration

    from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates

    start = time.time()
    raw = {t: datasets.DatasetDict({s: make_task_split(t, n, seed * 1000 + i * 10 + j)
                                    for j, (s, n) in enumerate(SPLITS.items())})
           for i, t in enumerate(TASKS)}
    texts = [json.dumps(glue_prompt_templates[t]) for t in TASKS]
    texts += [str(v) for dd in raw.values() for ds in dd.values() for col in ds.column_names
              if col not in ("label", "idx") for v in ds[col]]
    tokenizer = build_tokenizer(texts, root / "tokenizer")
    torch.manual_seed(seed)
    pretrained = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer)))
    pretrained.save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    manifest = {"kind": "tiny_t5_glue_fixture", "seed": seed, "tasks": {}}
    for i, task in enumerate(TASKS):
        for split, ds in raw[task].items():
            ds.save_to_disk(str(root / "data" / task / split))
        processed = host_preprocess(raw[task], task, tokenizer)
        processed.save_to_disk(str(root / "cache" / "flan-t5" / f"_load_{task}_dataset_cached"))
        expert = finetune(T5ForConditionalGeneration.from_pretrained(root / "pretrained"),
                          processed["train"], steps, lr, seed + i)
        expert.save_pretrained(root / "experts" / task)
        base = T5ForConditionalGeneration.from_pretrained(root / "pretrained")
        lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.0))
        lora = finetune(lora, processed["train"], lora_steps, lora_lr, seed + 100 + i)
        lora.save_pretrained(root / "lora" / task)
        manifest["tasks"][task] = {
            "pretrained_validation_accuracy": generation_accuracy(pretrained, processed["validation"], tokenizer),
            "expert_validation_accuracy": generation_accuracy(expert, processed["validation"], tokenizer),
            "lora_validation_accuracy": generation_accuracy(lora.merge_and_unload(), processed["validation"],
                                                            tokenizer),
        }
    _write_configs(root)
    manifest["build_seconds"] = round(time.time() - start, 2)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
