"""A model pool of peft LoRA adapters over one CLIP vision model, handed out as dense experts.

Each task's expert is a LoRA adapter (``peft``'s ``save_pretrained`` folder) on the suite's
pretrained CLIP vision tower. Its task vector is the adapters' low-rank update s * B @ A on the
weights they target, zero elsewhere. Merging methods (ours and the host's data-free ones) expect a
pool of dense ``CLIPVisionModel`` experts, so :class:`CLIPLoRAModelPool` merges each adapter into a
fresh copy of the pretrained model (``merge_and_unload``) when an expert is loaded: every method runs
on it unchanged, and the merged model is a plain dense ``CLIPVisionModel``.

The factors stay available (:meth:`CLIPLoRAModelPool.lora_factors`), so the task vectors'
statistics can be read from them without forming s * B @ A (:mod:`..engine.lora_stats`).

Suite layout: the one :class:`CLIPSuiteModelPool` reads (``pretrained/``, ``tasks.json``,
``data/``) plus ``lora/<task>/`` (``adapter_config.json`` + ``adapter_model.safetensors``);
``experts/`` is not read. ``adapters: {task: folder}`` points single tasks elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..engine.lora_stats import lora_delta, lora_factor_statistics
from ..utils.preflight import check_loaded_model
from .clip_suite import CLIPSuiteModelPool, SuiteError, _select, read_suite_tasks

LORA_DIR = "lora"
ADAPTER_CONFIG = "adapter_config.json"
BASE_PREFIX = "base_model.model."
TRANSFORMER_CHILDREN = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")  # CLIPVisionTransformer


@dataclass(frozen=True)
class LoRAFactors:
    """One adapted weight's update s * B @ A: B (out x r), A (r x in), s = lora_alpha / r (or alpha / sqrt(r))."""

    lora_a: Tensor
    lora_b: Tensor
    scaling: float

    def delta(self) -> Tensor:
        """The dense update (float64): only for checks and small weights."""
        return lora_delta(self.lora_a, self.lora_b, self.scaling)


def lora_factors_of(peft_model: nn.Module, prefix: str = "") -> Dict[str, LoRAFactors]:
    """The factors of every LoRA layer of a ``PeftModel``, keyed by the name of the base model's weight
    they update, with ``prefix`` in front (as in the merged ``CLIPVisionModel``'s ``state_dict``). DoRA and
    other non-B@A variants are refused: their update is not s * B @ A."""
    from peft.tuners.lora import LoraLayer

    factors: Dict[str, LoRAFactors] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if module.use_dora.get(adapter, False) or not isinstance(module.lora_A[adapter], nn.Linear):
                raise SuiteError(f"LoRA layer '{name}' is not a plain linear B @ A adapter (DoRA or convolutional); "
                                 "the LoRA pool supports linear LoRA only.")
            key = prefix + name.removeprefix(BASE_PREFIX) + ".weight"
            factors[key] = LoRAFactors(module.lora_A[adapter].weight.detach().clone(),
                                       module.lora_B[adapter].weight.detach().clone(),
                                       float(module.scaling[adapter]))
    return factors


def saved_lora_tensors(adapter: str) -> Dict[str, Tensor]:
    """The LoRA factors saved in an adapter folder (``adapter_model.safetensors`` or ``.bin``), by saved name."""
    folder = Path(adapter)
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
    else:
        tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    return {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}


def vision_weight_name(saved_key: str) -> Optional[str]:
    """The ``CLIPVisionModel`` weight a saved LoRA tensor updates, or None outside the vision tower.

    Adapters are saved from a ``CLIPModel`` or ``CLIPVisionModel`` (``base_model.model.vision_model.…``)
    or, as FusionBench's own CLIP LoRA checkpoints, from the bare ``CLIPVisionTransformer``
    (``base_model.model.encoder.…``); both name the same weights."""
    name = saved_key.removeprefix(BASE_PREFIX)
    name = name.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
    if name.startswith("vision_model."):
        return name
    if name.startswith(TRANSFORMER_CHILDREN):
        return "vision_model." + name
    return None


def attach_adapter(base: nn.Module, adapter: str, label: str) -> Tuple[nn.Module, Dict[str, LoRAFactors]]:
    """Load ``adapter`` onto a ``CLIPVisionModel`` (or its bare transformer, as the adapter was saved) and
    return the peft model and the factors, checked equal to the saved ones: peft silently leaves B at zero
    for a tensor whose name does not match, which would make the expert the pretrained model."""
    from peft import PeftModel

    saved = saved_lora_tensors(adapter)
    names = {k: vision_weight_name(k) for k in saved}
    names = {k: n for k, n in names.items() if n is not None}
    if not names:
        raise SuiteError(f"The adapter of '{label}' ('{adapter}') has no LoRA tensor on the CLIP vision tower.")
    on_transformer = not any(k.startswith(BASE_PREFIX + "vision_model.") for k in names)
    peft_model = PeftModel.from_pretrained(base.vision_model if on_transformer else base, adapter)
    factors = lora_factors_of(peft_model, prefix="vision_model." if on_transformer else "")
    for key, name in names.items():
        loaded = factors.get(name)
        value = None if loaded is None else (loaded.lora_a if ".lora_A." in key else loaded.lora_b)
        if value is None or not torch.equal(value, saved[key].to(value.dtype)):
            raise SuiteError(f"The adapter of '{label}' ('{adapter}'): tensor '{key}' was not loaded onto "
                             f"'{name}'; was it saved from another model?")
    return peft_model, factors


def load_lora_expert(pretrained: str, adapter: str, label: str, **kwargs) -> Tuple[nn.Module, Dict[str, LoRAFactors]]:
    """A dense ``CLIPVisionModel`` = pretrained + each adapted weight's s * B @ A, and the factors.

    The base is checked as the pretrained checkpoint (a full CLIP may hold the text tower too), the merged
    model for finite weights (a NaN factor would otherwise be merged silently).
    """
    from transformers import CLIPVisionModel

    base = CLIPVisionModel.from_pretrained(pretrained, **kwargs)
    peft_model, factors = attach_adapter(base, adapter, label)
    merged = peft_model.merge_and_unload()
    if merged is not base:  # the adapter sat on the bare transformer
        base.vision_model = merged
    return check_loaded_model(base, label, pretrained=True), factors


def adapter_dirs(suite: Path, tasks: Sequence[str], lora_dir: str,
                 adapters: Optional[Dict[str, str]]) -> Dict[str, str]:
    """Each task's adapter folder: ``<suite>/<lora_dir>/<task>``, or the one given in ``adapters``.
    Local folders only (download hub adapters first: the offline checks know model repos, not adapters);
    a missing one is an error naming it, before any model is loaded."""
    given = {t: str(a) for t, a in dict(adapters or {}).items() if t in tasks}
    found = {t: given.get(t, str(suite / lora_dir / t)) for t in tasks}
    for task, path in found.items():
        local = Path(path)
        if not (local / ADAPTER_CONFIG).is_file():
            raise SuiteError(
                f"No LoRA adapter for task '{task}': '{local / ADAPTER_CONFIG}' is missing. Save one there with "
                "peft's `save_pretrained`, point `adapters.{task}` at it, or build the tiny ones with "
                "`fusion_bench_statsmerging.fixtures.lora.build_tiny_lora_experts(SUITE)`.")
    return found


class CLIPLoRAModelPool(CLIPSuiteModelPool):
    """A CLIP suite whose experts are peft LoRA adapters, loaded as dense ``CLIPVisionModel`` experts."""

    def __init__(self, suite_dir: str, tasks: Optional[Sequence[str]] = None, lora_dir: str = LORA_DIR,
                 adapters: Optional[Dict[str, str]] = None, **kwargs):
        suite = Path(suite_dir)
        names = _select(list(read_suite_tasks(suite)), tasks)
        self._adapters = adapter_dirs(suite, names, lora_dir, adapters)
        super().__init__(suite_dir, tasks=tasks, experts=self._adapters, **kwargs)
        self.lora_dir = lora_dir

    @property
    def adapters(self) -> Dict[str, str]:
        """Task -> adapter folder."""
        return dict(self._adapters)

    def _pretrained_path(self) -> str:
        return str(self._models["_pretrained_"])

    def load_model(self, model_name_or_config, *args, **kwargs):
        """Experts: pretrained with the task's adapter merged in (dense); anything else: the suite pool's loader."""
        if isinstance(model_name_or_config, str) and model_name_or_config in self._adapters:
            model, _ = load_lora_expert(self._pretrained_path(), self._adapters[model_name_or_config],
                                        model_name_or_config, **kwargs)
            return model
        return super().load_model(model_name_or_config, *args, **kwargs)

    def lora_factors(self, task: str) -> Dict[str, LoRAFactors]:
        """The task's LoRA factors, keyed by the dense expert's weight name they update."""
        from transformers import CLIPVisionModel

        base = CLIPVisionModel.from_pretrained(self._pretrained_path())
        return attach_adapter(base, self._adapters[task], task)[1]

    def factor_statistics(self, task: str, features: Sequence[str], rank: int) -> Dict[str, Tensor]:
        """StatsMerging's statistics of the task vector on each adapted weight, from the factors
        (the other weights' task vector is zero)."""
        return {name: lora_factor_statistics(f.lora_a, f.lora_b, f.scaling, features, rank)
                for name, f in self.lora_factors(task).items()}


__all__ = ["CLIPLoRAModelPool", "LoRAFactors", "adapter_dirs", "attach_adapter", "load_lora_expert", "lora_factors_of",
           "saved_lora_tensors", "vision_weight_name"]
