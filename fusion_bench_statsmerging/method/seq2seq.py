"""The Flan-T5 (seq2seq text generation) family of the coefficient-distillation trainer.

For the host's ``Seq2SeqLMPool`` pools (``Seq2SeqLMPool/flan-t5-base_glue``, the LoRA pools)
evaluated by its GLUE text-generation task pool, which scores exact matches of the generated
label words.

- **Verbaliser.** Each task's classes are the label words of the host's GLUE prompt templates
  (``fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates``), in label order,
  e.g. CoLA ``[unacceptable, acceptable]``; STS-B (a regression written as ``"{:.1f}"``) gets
  the integer part ``["0", ..., "5"]``. ``verbalizers: {task: [words]}`` overrides or adds.
- **Logits.** ``label_scoring: first_token``: the first decoder step's logits (the decoder
  starts from ``decoder_start_token_id``, as ``generate`` does) restricted to the first token
  of each label word -> (N, C). ``sequence``: the teacher-forced log-likelihood of each label
  word's tokens (no end-of-sequence token; C decoder passes). ``auto`` (default): first_token
  for every task whose label words start with distinct tokens, sequence for the others.
  The teacher (the task's expert) and the merged model produce the same restricted logits;
  the default loss is cross-entropy on the teacher's argmax.
- **Inputs.** The task's prompts on its unlabeled split, never its labels: a dataset already
  preprocessed by the host (``load_glue_dataset``: ``input_ids``/``attention_mask``/``labels``)
  is read through its ``input_ids`` and ``attention_mask`` columns only; a raw dataset (GLUE's
  text columns) through the template's fields only, formatted with the host's template (or
  ``templates: {task: "... {sentence} ..."}``). A pool that declares no dataset for the
  protocol's split falls back, for GLUE task names (``glue-cola`` or ``cola``), to the host's
  ``load_glue_dataset`` of that split (cached under ``glue_cache_dir``, shared with the task pool).
- **Models.** Experts that load as PEFT models are merged (``merge_and_unload``) first, so
  LoRA task vectors are the merged low-rank updates. T5 keeps ``shared`` and both
  ``embed_tokens`` as one module under three names; ``torch.func.functional_call`` with
  ``tie_weights`` mishandles such module aliases (it leaves a plain tensor in the module), so
  every loaded model's aliased modules are split into modules sharing the same Parameter: the
  tie is kept and the merged embedding reaches encoder, decoder (and a tied ``lm_head``).
"""

from __future__ import annotations

import copy
import logging
import string
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from fusion_bench import auto_register_config
from fusion_bench.mixins import LightningFabricMixin

from ..utils.errors import PoolError
from ..utils.inputs import Inputs, num_rows
from ..utils.splits import SPLITS
from .base import CoefficientDistillation

log = logging.getLogger(__name__)

LABEL_SCORING = ("auto", "first_token", "sequence")
TEACHER_BATCH = 32
STSB_WORDS = ["0", "1", "2", "3", "4", "5"]
# protocol split -> GLUE split name where it differs (MNLI has matched/mismatched)
GLUE_SPLITS = {"train": {}, "validation": {"mnli": "validation_matched"}, "test": {"mnli": "test_matched"}}
# The host's flan-t5 GLUE task pool scores GLUE's *validation* split (GLUE's test labels are hidden), so
# for GLUE data: test-time adaptation reads that split (the data it is scored on), and there is no
# validation split apart from the scored one for `validation_unlabeled` to read.
GLUE_SCORED_SPLIT = "validation"
ID_COLUMNS = ("input_ids", "attention_mask")


# --------------------------------------------------------------------------- GLUE definitions
def _glue_templates() -> Dict[str, dict]:
    from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates

    return glue_prompt_templates


def glue_task(name: str) -> Optional[str]:
    """``glue-cola`` or ``cola`` -> ``cola`` when the host has a template for it, else None."""
    key = name[len("glue-"):] if name.startswith("glue-") else name
    return key if key in _glue_templates() else None


def default_verbalizer(task: str) -> Optional[List[str]]:
    """The host template's label words in label order (STS-B: the score's integer part)."""
    glue = glue_task(task)
    if glue is None:
        return None
    target = _glue_templates()[glue]["target_text"]
    if isinstance(target, Mapping):
        return [target[k] for k in sorted(target, key=int)]
    return list(STSB_WORDS)


def default_template(task: str) -> Optional[str]:
    glue = glue_task(task)
    return _glue_templates()[glue]["input_text"] if glue else None


def template_fields(template: str) -> List[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def load_tokenizer(spec: Any):
    """A tokenizer from a path/name, a config with ``_target_``, or an instance."""
    from omegaconf import DictConfig

    if spec is None:
        raise PoolError("No tokenizer: the model pool has no `tokenizer` and the method's `tokenizer` is null.")
    if isinstance(spec, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec)
    if isinstance(spec, (dict, DictConfig)):
        from fusion_bench.utils import instantiate

        return instantiate(spec)
    return spec


# --------------------------------------------------------------------------- models
def split_module_aliases(model: nn.Module) -> nn.Module:
    """Give every module reachable under several names its own object, sharing the same tensors.

    T5's ``encoder.embed_tokens`` and ``decoder.embed_tokens`` *are* ``shared``. Afterwards
    they are distinct modules holding the same Parameter: parameter-level ties, which
    ``functional_call(tie_weights=True)`` handles (module-level ones it does not restore).
    """
    seen = set()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) not in seen:
            seen.add(id(module))
            continue
        clone = copy.copy(module)
        clone._parameters = dict(module._parameters)
        clone._buffers = dict(module._buffers)
        clone._modules = dict(module._modules)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, clone)
    return model


def has_tied_parameters(model: nn.Module) -> bool:
    return len(list(model.named_parameters(remove_duplicate=False))) > len(list(model.named_parameters()))


def merge_peft(model: nn.Module) -> nn.Module:
    """A PEFT model (e.g. LoRA) as the plain model with its adapters merged into the weights."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a host dependency
        return model
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model


class TaskData(torch.utils.data.Dataset):
    """A task's fitting dataset, tagged with its task name (``fit_inputs`` needs the template).

    Rows are only read through ``__getitem__`` by the ground-truth protocol's label loader;
    the label-free path reads the columns :meth:`Seq2SeqCoefficientDistillation.fit_inputs` names.
    """

    def __init__(self, dataset, task: str):
        self.dataset = dataset
        self.task = task

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


class Seq2SeqPoolView:
    """The pool as the trainer sees it: PEFT experts merged, module aliases split, datasets
    tagged with their task and, for GLUE tasks the pool gives no data for, the host's GLUE split."""

    def __init__(self, pool, fallback: Callable[[str, str], Any], check_model: Callable[[nn.Module], None]):
        self._pool = pool
        self._fallback = fallback
        self._check_model = check_model
        self.model_config = None

    def __getattr__(self, name):
        if name == "_pool":  # not yet set (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self._pool, name)

    def load_model(self, name, *args, **kwargs):
        model = split_module_aliases(merge_peft(self._pool.load_model(name, *args, **kwargs)))
        if self.model_config is None:
            self.model_config = model.config
            self._check_model(model)
        return model

    def load_pretrained_model(self, *args, **kwargs):
        name = "_pretrained_" if self._pool.has_pretrained else self._pool.model_names[0]
        return self.load_model(name, *args, **kwargs)

    def _declared(self, split: str) -> List[str]:
        return SPLITS[split].names(self._pool)

    def _names(self, split: str) -> List[str]:
        declared = self._declared(split)
        return declared + [n for n in self._pool.model_names if n not in declared and glue_task(n)]

    def _load(self, split: str, name: str):
        if name in self._declared(split):
            dataset = SPLITS[split].load(self._pool, name)
        else:
            dataset = self._fallback(name, split)
        return TaskData(dataset, name)

    train_dataset_names = property(lambda self: self._names("train"))
    val_dataset_names = property(lambda self: self._names("validation"))
    test_dataset_names = property(lambda self: self._names("test"))

    def load_train_dataset(self, name):
        return self._load("train", name)

    def load_val_dataset(self, name):
        return self._load("validation", name)

    def load_test_dataset(self, name):
        return self._load("test", name)


# --------------------------------------------------------------------------- batches
def trim_padding(inputs: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Drop the trailing columns that are padding in every row."""
    mask = inputs["attention_mask"]
    length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return {k: v[:, :length] for k, v in inputs.items()}


def pad_cat(parts: Sequence[Dict[str, Tensor]], pad_id: int) -> Dict[str, Tensor]:
    """Concatenate token batches of different lengths, right-padding to the longest."""
    length = max(p["input_ids"].shape[1] for p in parts)
    out = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0)):
        out[key] = torch.cat([nn.functional.pad(p[key], (0, length - p[key].shape[1]), value=fill) for p in parts])
    return out


# --------------------------------------------------------------------------- trainer
@auto_register_config
class Seq2SeqCoefficientDistillation(LightningFabricMixin, CoefficientDistillation):
    """Coefficient distillation on seq2seq LM pools (Flan-T5 on GLUE), scored on label words."""

    pool_family = "seq2seq"

    def __init__(
        self,
        label_scoring: str = "auto",
        verbalizers: Optional[Dict[str, List[str]]] = None,
        templates: Optional[Dict[str, str]] = None,
        max_input_length: int = 512,
        glue_cache_dir: Optional[str] = "outputs/cache",
        tokenizer: Any = None,
        **kwargs,
    ):
        if label_scoring not in LABEL_SCORING:
            raise ValueError(f"Unknown label_scoring '{label_scoring}'; choose one of {list(LABEL_SCORING)}.")
        if int(max_input_length) < 1:
            raise ValueError(f"max_input_length must be >= 1, got {max_input_length}.")
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ setup
    def run(self, modelpool):
        spec = self.tokenizer if self.tokenizer is not None else getattr(modelpool, "_tokenizer", None)
        self._tok = load_tokenizer(spec)  # the host's Seq2SeqLMPool.load_tokenizer is broken in 0.2.33
        return super().run(Seq2SeqPoolView(modelpool, self._glue_dataset, self._check_model))

    def _check_model(self, model: nn.Module) -> None:
        if self.merge_engine == "host" and has_tied_parameters(model):
            raise PoolError(
                "merge_engine: host cannot merge tied parameters (T5's shared embedding): the host's "
                "LayerWiseMergedModel passes the unmerged aliases to functional_call, which then fails "
                "(tie_weights: true) or runs encoder and decoder on the pretrained embedding (false). "
                "Use merge_engine: fused."
            )

    def _glue_dataset(self, name: str, split: str):
        """The host's preprocessed GLUE split for a task the pool declares no data for."""
        from fusion_bench.tasks.flan_t5_text_generation.glue_load_dataset import load_glue_dataset

        glue = glue_task(name)
        if split == "validation":
            raise PoolError(
                f"protocol 'validation_unlabeled' on GLUE task '{name}': GLUE's validation split is the one the "
                "flan-t5 GLUE task pool scores, so fitting on it would be test-time adaptation reported as "
                "label-free validation. Use `method.protocol=test_time_adaptation` to fit on the scored split "
                "knowingly, `train_unlabeled`, or declare a separate `val_datasets` in the model pool.")
        source = GLUE_SCORED_SPLIT if split == "test" else split
        glue_split = GLUE_SPLITS[source].get(glue, source)
        log.info("Task '%s': the model pool declares no %s data; using the host's GLUE '%s' split of '%s' "
                 "(load_glue_dataset, cache %s).", name, split, glue_split, glue, self.glue_cache_dir)
        if split == "test":
            log.warning("test-time adaptation on GLUE fits on its '%s' split: the one the flan-t5 GLUE task pool "
                        "scores (GLUE's test split is unlabeled and never scored).", glue_split)
        return load_glue_dataset(glue, self._tok, cache_dir=self.glue_cache_dir, split=glue_split)

    def check_pool(self, modelpool) -> Dict[str, object]:
        self._build_verbalizers(list(modelpool.model_names))  # fails on unknown tasks before any model loads
        datasets = super().check_pool(modelpool)
        if self._protocol.ground_truth:
            datasets = {t: TaskData(self._with_class_labels(t, ds.dataset), t) for t, ds in datasets.items()}
        return datasets

    def _build_verbalizers(self, tasks: List[str]) -> None:
        """Label words, their token ids and the scoring of each task, checked before any model loads."""
        custom = dict(self.verbalizers or {})
        self._words, self._label_ids, self._scoring = {}, {}, {}
        for task in tasks:
            words = list(custom.get(task) or default_verbalizer(task) or [])
            if len(words) < 2:
                raise PoolError(
                    f"Task '{task}' has no label words: it is not a GLUE task the host has a template for. "
                    f"Add `method.verbalizers.{task}: [word_0, word_1, ...]` (the words the expert generates, "
                    "in label order)."
                )
            ids = [list(self._tok(w, add_special_tokens=False)["input_ids"]) for w in words]
            if any(not i for i in ids):
                raise PoolError(f"Task '{task}': a label word of {words} tokenizes to nothing.")
            first_ok = len({i[0] for i in ids}) == len(ids)
            scoring = self.label_scoring if self.label_scoring != "auto" else (
                "first_token" if first_ok else "sequence")
            if scoring == "first_token" and not first_ok:
                raise PoolError(f"Task '{task}': the label words {words} share a first token; use "
                                "`label_scoring: sequence` (or auto).")
            if scoring == "sequence" and any(a != b and a == b[:len(a)] for a in ids for b in ids):
                raise PoolError(f"Task '{task}': one label word of {words} is a token prefix of another; "
                                "change the verbaliser.")
            if self.label_scoring == "auto" and scoring == "sequence":
                log.info("Task '%s': label words %s share a first token; scoring their full token sequences.",
                         task, words)
            self._words[task], self._label_ids[task], self._scoring[task] = words, ids, scoring

    def _with_class_labels(self, task: str, dataset):
        """Ground-truth protocol only: a ``label`` column (class index) for host-preprocessed data."""
        columns = getattr(dataset, "column_names", None) or []
        if "label" in columns or "labels" not in columns:
            return dataset
        words, tok = self._words[task], self._tok

        def to_class(text: str) -> int:
            text = text.strip()
            if text in words:
                return words.index(text)
            if words == STSB_WORDS:
                return min(5, max(0, int(float(text))))
            raise PoolError(f"Task '{task}': the label '{text}' is none of the label words {words}.")

        def add(batch):
            ids = [[t for t in row if t >= 0] for row in batch["labels"]]
            return {"label": [to_class(s) for s in tok.batch_decode(ids, skip_special_tokens=True)]}

        return dataset.map(add, batched=True)

    # ------------------------------------------------------------------ family hooks
    def setup_task_heads(self, task_names: List[str]) -> None:
        config = self.modelpool.model_config
        start = getattr(config, "decoder_start_token_id", None)
        self._start_id = int(start if start is not None else config.pad_token_id)
        self._pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else config.pad_token_id)
        if set(task_names) - set(self._words):
            self._build_verbalizers(task_names)
        self._prepared_engine = None

    def fit_inputs(self, dataset: TaskData, indices: List[int]) -> Inputs:
        task, data = dataset.task, dataset.dataset
        columns = getattr(data, "column_names", None)
        if columns is None:  # a torch dataset of dicts: look at the keys, not the values
            columns = list(data[indices[0]].keys())
        if all(c in columns for c in ID_COLUMNS):
            rows = self._read(data, indices, list(ID_COLUMNS))
            inputs = {k: torch.as_tensor(rows[k], dtype=torch.long) for k in ID_COLUMNS}
        else:
            template = (self.templates or {}).get(task) or default_template(task)
            if template is None:
                raise PoolError(f"Task '{task}': its dataset has no `input_ids` and no prompt template is known. "
                                f"Add `method.templates.{task}: '... {{text_column}} ...'`.")
            fields = template_fields(template)
            missing = [f for f in fields if f not in columns]
            if missing:
                raise PoolError(f"Task '{task}': the dataset lacks the template's fields {missing} (has {columns}).")
            rows = self._read(data, indices, fields)
            prompts = [template.format(**{f: rows[f][i] for f in fields}) for i in range(len(indices))]
            encoded = self._tok(prompts, truncation=True, max_length=int(self.max_input_length), padding=True,
                                return_tensors="pt")
            inputs = {k: encoded[k].long() for k in ID_COLUMNS}
        return trim_padding(inputs)

    @staticmethod
    def _read(data, indices: List[int], fields: List[str]) -> Dict[str, list]:
        """Only ``fields`` of the chosen rows (a Hugging Face dataset is narrowed to them first)."""
        if hasattr(data, "select_columns"):
            return data.select_columns(fields)[list(indices)]
        rows = [data[i] for i in indices]
        return {f: [r[f] for r in rows] for f in fields}

    def teacher_targets(self, expert: nn.Module, task: str, inputs: Inputs) -> Tensor:
        expert.eval()
        return torch.cat([self.label_scores(expert, {k: v[s:s + TEACHER_BATCH] for k, v in inputs.items()}, task)
                          .float().cpu() for s in range(0, num_rows(inputs), TEACHER_BATCH)])

    def merged_logits(self, engine: nn.Module, inputs: Dict[str, Inputs]) -> Dict[str, Tensor]:
        if self._prepared_engine is not engine:
            self._no_dropout(engine)
            self._prepared_engine = engine
        first = [t for t in inputs if self._scoring[t] == "first_token"]
        out = {t: self.label_scores(engine, x, t) for t, x in inputs.items() if t not in first}
        if first:  # one forward for these tasks: they share the merged weights and the first decoder step
            logits = self._first_step_logits(engine, pad_cat([inputs[t] for t in first], self._pad_id))
            start = 0
            for task in first:
                n = num_rows(inputs[task])
                out[task] = logits[start:start + n, [i[0] for i in self._label_ids[task]]]
                start += n
        return {t: out[t] for t in inputs}

    def _no_dropout(self, engine: nn.Module) -> None:
        """No dropout while fitting coefficients (the teachers ran in eval mode too). With
        activation checkpointing, which Hugging Face models only do in training mode, the model
        stays in training mode with every dropout module switched to eval."""
        if not self.activation_checkpointing:
            engine.eval()
            return
        engine.train()
        for module in engine.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()

    # ------------------------------------------------------------------ scoring
    def _first_step_logits(self, model, inputs: Dict[str, Tensor]) -> Tensor:
        device = self.fabric.device
        inputs = trim_padding({k: v.to(device) for k, v in inputs.items()})
        start = torch.full((len(inputs["input_ids"]), 1), self._start_id, dtype=torch.long, device=device)
        return model(**inputs, decoder_input_ids=start).logits[:, 0]

    def label_scores(self, model, inputs: Dict[str, Tensor], task: str) -> Tensor:
        """(N, C) scores of the task's label words: first-step logits, or word log-likelihoods."""
        if self._scoring[task] == "first_token":
            return self._first_step_logits(model, inputs)[:, [i[0] for i in self._label_ids[task]]]
        device = self.fabric.device
        inputs = trim_padding({k: v.to(device) for k, v in inputs.items()})
        ids = self._label_ids[task]
        n, c, length = len(inputs["input_ids"]), len(ids), max(len(i) for i in ids)
        words = torch.full((c, length), self._pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(c, length, device=device)
        for j, i in enumerate(ids):
            words[j, :len(i)] = torch.tensor(i, device=device)
            valid[j, :len(i)] = 1
        decoder_in = torch.cat([torch.full((c, 1), self._start_id, dtype=torch.long, device=device), words[:, :-1]], 1)
        logits = model(input_ids=inputs["input_ids"].repeat_interleave(c, 0),
                       attention_mask=inputs["attention_mask"].repeat_interleave(c, 0),
                       decoder_input_ids=decoder_in.repeat(n, 1)).logits
        token_lp = logits.float().log_softmax(-1).gather(-1, words.repeat(n, 1)[..., None])[..., 0]
        return (token_lp * valid.repeat(n, 1)).sum(-1).view(n, c)
