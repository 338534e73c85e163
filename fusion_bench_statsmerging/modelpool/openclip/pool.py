"""Model and task pools of OpenCLIP experts: fine-tuned OpenCLIP image encoders merged by any method.

``_pretrained_`` is an OpenCLIP model (``open_clip.create_model(name, pretrained=TAG_OR_FILE)``, or a
local checkpoint with a model-config JSON), the experts are fine-tuned OpenCLIP image encoders saved as
state-dict files. The pools convert them once, exactly (:mod:`.convert`), into transformers
folders in a cache (a full ``CLIPModel`` for the pretrained model, text tower included, and one
``CLIPVisionModel`` per expert) and then *are* the host's CLIP pools over those folders: StatsMerging,
StatsMerging++, SAMerging and the host's data-free methods merge them unchanged, the host's
``CLIPClassificationMixin`` builds the zero-shot heads with the converted OpenCLIP text tower and the
host's templates, and its CLIP task pool scores the merged model against the same heads.

The tokenizer: OpenCLIP's own BPE tokenizer is exported as an equivalent transformers ``CLIPTokenizer``
(same vocabulary and merges), or ``processor_dir`` names a transformers ``CLIPProcessor`` folder to use
instead (the tiny suite's byte-level one). The cache is keyed by the sources (names, tags, file
sizes and modification times), so a changed checkpoint is converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.taskpool import CLIPVisionModelTaskPool

from ..clip_suite import CLIPSuiteModelPool, CLIPSuiteTaskPool, SuiteError, _select, read_suite_tasks
from .convert import (
    ConversionError, check_openclip_config, hf_vision_to_openclip, openclip_to_hf_clip,
    vision_model_from_openclip_visual,
)

CACHE_ENV = "STATSMERGING_OPENCLIP_CACHE"
DONE = "conversion.json"  # written last: a folder without it is an interrupted conversion
STRIP_PREFIXES = ("module.", "model.")  # DDP wrappers; task-vector ImageEncoder checkpoints (model = CLIP)
OPENCLIP_DIR = "openclip"
CHECKPOINTS = (".pt", ".pth", ".bin", ".safetensors", ".npz")


class OpenCLIPError(ConversionError):
    """An OpenCLIP source that cannot be used: a missing file, a checkpoint of another architecture."""


@dataclass(frozen=True)
class OpenCLIPSource:
    """Where the pretrained OpenCLIP model comes from.

    ``model_name`` with ``pretrained`` a tag ('openai', 'laion2b_s34b_b79k') or a checkpoint file; or
    ``model_config`` (an OpenCLIP model-config JSON, for custom architectures) with ``pretrained`` a
    checkpoint file. ``processor_dir``: a transformers ``CLIPProcessor`` folder to use instead of OpenCLIP's
    tokenizer and preprocessing (required with ``model_config``, which names no tokenizer)."""

    model_name: Optional[str] = None
    pretrained: Optional[str] = None
    model_config: Optional[str] = None
    processor_dir: Optional[str] = None

    def check(self) -> None:
        """Fail, naming the path, before anything is loaded."""
        if not self.model_name and not self.model_config:
            raise OpenCLIPError("Give the OpenCLIP pool `model_name` (e.g. ViT-B-32) or `model_config` (a JSON file).")
        for what in ("model_config", "processor_dir"):
            value = getattr(self, what)
            if value and not Path(value).exists():
                raise OpenCLIPError(f"OpenCLIP `{what}` '{value}' does not exist.")
        looks_like_file = self.pretrained and (os.sep in self.pretrained or Path(self.pretrained).suffix in CHECKPOINTS)
        if looks_like_file and not Path(self.pretrained).is_file():
            raise OpenCLIPError(f"OpenCLIP `pretrained` checkpoint '{self.pretrained}' does not exist (a tag such as "
                                "'openai' downloads from the hub instead; open_clip.list_pretrained() lists them).")
        if self.model_config and not (self.pretrained and Path(self.pretrained).is_file()):
            raise OpenCLIPError(f"With `model_config` the pretrained weights must be a checkpoint file; "
                                f"'{self.pretrained}' is not one.")
        if self.model_config and not self.processor_dir:
            raise OpenCLIPError("With `model_config` (a custom OpenCLIP architecture) give `processor_dir`, a "
                                "transformers CLIPProcessor folder: a custom config names no tokenizer.")
        check_openclip_config(self.config(), f"'{self.model_config or self.model_name}'")

    def config(self) -> dict:
        """The OpenCLIP model config (the JSON file, or open_clip's registered config of ``model_name``)."""
        if self.model_config:
            return json.loads(Path(self.model_config).read_text())
        import open_clip

        config = open_clip.get_model_config(self.model_name)
        if config is None:
            raise OpenCLIPError(f"Unknown OpenCLIP model name '{self.model_name}' (open_clip.list_models() lists them; "
                                "a custom architecture takes `model_config`, a JSON file).")
        return config

    def fingerprint(self) -> str:
        parts = {k: (file_identity(v) if v and Path(v).exists() else v) for k, v in asdict(self).items()}
        return digest(parts)

    def load(self) -> nn.Module:
        """The OpenCLIP ``CLIP`` (eval mode, on the CPU)."""
        import open_clip

        if self.model_config:
            from open_clip.model import CLIP

            model = CLIP(**self.config())
            open_clip.load_checkpoint(model, self.pretrained)
        else:
            model = open_clip.create_model(self.model_name, pretrained=self.pretrained)
        return model.eval()


def file_identity(path: str) -> list:
    """What identifies a file or folder for the cache: absolute path, size, modification time."""
    p = Path(path).resolve()
    stat = p.stat()
    return [str(p), stat.st_size, stat.st_mtime_ns]


def digest(parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_root(cache_dir: Optional[str]) -> Path:
    """The conversion cache: ``cache_dir``, else $STATSMERGING_OPENCLIP_CACHE, else ~/.cache/statsmerging_openclip."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/statsmerging_openclip").expanduser()


def _write_atomically(target: Path, write) -> Path:
    """Run ``write(folder)`` into a temporary sibling and rename it into place (parallel runs stay safe)."""
    if (target / DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- expert files
def read_expert_visual(path: str, label: str) -> Dict[str, Tensor]:
    """An expert's image-encoder state dict, keys as in OpenCLIP's ``model.visual``.

    Accepts the visual tower's own state dict, a whole ``CLIP``'s (its ``visual.`` part is used), either
    under ``state_dict``/``model`` keys or behind ``module.``/``model.`` prefixes (DDP, the task-vector
    papers' ``ImageEncoder``)."""
    file = Path(path)
    if not file.is_file():
        raise OpenCLIPError(f"Expert '{label}': state-dict file '{path}' does not exist.")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # a pickled module, not a state dict
            raise OpenCLIPError(f"Expert '{label}': '{path}' is not a plain state dict ({type(error).__name__}); "
                                "re-save it with `torch.save(model.state_dict(), path)`.") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise OpenCLIPError(f"Expert '{label}': '{path}' holds a {type(state).__name__}, not a state dict.")
    return visual_part(dict(state))


def visual_part(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The image-encoder tensors of a state dict, prefixes removed."""
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def check_expert_visual(expert: Mapping[str, Tensor], pretrained: Mapping[str, Tensor], label: str) -> bool:
    """An expert must be the pretrained image encoder's architecture (else an error naming the tensors);
    returns whether its projection differs, which only warns: the merged model keeps the pretrained
    projection, with which the zero-shot heads are built."""
    missing = sorted(set(pretrained) - set(expert))
    extra = sorted(set(expert) - set(pretrained))
    shapes = [f"{k} {tuple(expert[k].shape)} vs {tuple(pretrained[k].shape)}" for k in pretrained
              if k in expert and expert[k].shape != pretrained[k].shape]
    if missing or extra or shapes:
        raise OpenCLIPError(f"Expert '{label}' is not an image encoder of the pretrained OpenCLIP architecture: "
                            f"missing {missing[:4]}, unexpected {extra[:4]}, shape mismatches {shapes[:4]}.")
    return not torch.equal(expert["proj"], pretrained["proj"])


def warn_projection(label: str) -> None:
    warnings.warn(f"OpenCLIP expert '{label}' carries a different visual projection than the pretrained model; "
                  "the merged model keeps the pretrained projection (the zero-shot heads use it), so this "
                  "expert's projection change is not merged.", stacklevel=3)


# --------------------------------------------------------------------------- conversion
def export_openclip_tokenizer(model_name: str, context_length: int, folder: Path):
    """A transformers ``CLIPTokenizer`` giving the ids OpenCLIP's BPE tokenizer for ``model_name`` gives (same
    vocabulary, merges and start/end tokens; padding with the end token, which argmax pooling ignores)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tokenizer = open_clip.get_tokenizer(model_name)
    if not isinstance(tokenizer, SimpleTokenizer):
        raise OpenCLIPError(f"OpenCLIP model '{model_name}' uses a {type(tokenizer).__name__}; only OpenCLIP's own "
                            "BPE tokenizer is exported. Pass `processor_dir`, a transformers CLIPProcessor folder.")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder))
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    sot, eot = tokenizer.decoder[tokenizer.sot_token_id], tokenizer.decoder[tokenizer.eot_token_id]
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token=sot, eos_token=eot,
                         pad_token=eot, unk_token=eot, model_max_length=context_length)


def export_openclip_processor(model: nn.Module, model_name: str, folder: Path) -> None:
    """A transformers ``CLIPProcessor`` standing in for OpenCLIP's tokenizer and preprocessing of ``model_name``:
    the exported tokenizer, images resized (bicubic) and centre-cropped to the model's size with its mean
    and std."""
    import open_clip
    from transformers import CLIPImageProcessor, CLIPProcessor

    tokenizer = export_openclip_tokenizer(model_name, model.positional_embedding.shape[0], folder / "_tokenizer")
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                                image_std=list(cfg.get("std", open_clip.OPENAI_DATASET_STD)), resample=3)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer")


def convert_pretrained(source: OpenCLIPSource, root: Path, model: Optional[nn.Module] = None) -> Path:
    """The pretrained OpenCLIP model as a transformers ``CLIPModel`` folder (with processor), cached."""
    source.check()

    def write(folder: Path) -> None:
        openclip_model = model if model is not None else source.load()
        openclip_to_hf_clip(openclip_model).save_pretrained(folder)
        if source.processor_dir:
            from transformers import CLIPProcessor

            CLIPProcessor.from_pretrained(source.processor_dir).save_pretrained(folder)
        else:
            export_openclip_processor(openclip_model, source.model_name, folder)
        (folder / DONE).write_text(json.dumps({"source": asdict(source)}, indent=2))

    return _write_atomically(root / f"pretrained-{source.fingerprint()}", write)


def expert_folder(root: Path, path: str, pretrained_dir: Path) -> Path:
    """Where an expert's conversion is cached: keyed by its file and by the pretrained conversion it is read against."""
    return root / f"expert-{digest([file_identity(path), pretrained_dir.name])}"


def convert_expert(label: str, path: str, pretrained_dir: Path, pretrained_visual: Mapping[str, Tensor],
                   root: Path) -> Path:
    """One expert's image encoder as a ``CLIPVisionModel`` folder, cached; checked against the pretrained first."""
    from transformers import CLIPConfig

    def write(folder: Path) -> None:
        visual = read_expert_visual(path, label)
        differs = check_expert_visual(visual, pretrained_visual, label)
        config = CLIPConfig.from_pretrained(pretrained_dir).vision_config
        model, _ = vision_model_from_openclip_visual(visual, config, f"expert '{label}'")
        model.save_pretrained(folder)
        (folder / DONE).write_text(json.dumps({"expert": label, "file": str(Path(path).resolve()),
                                               "projection_differs": differs}, indent=2))

    folder = _write_atomically(expert_folder(root, path, pretrained_dir), write)
    if json.loads((folder / DONE).read_text()).get("projection_differs"):
        warn_projection(label)  # on every load, cached or not
    return folder


def convert_openclip_pool(source: OpenCLIPSource, experts: Mapping[str, str], root: Path) -> Dict[str, str]:
    """``{'_pretrained_': folder, task: folder}`` of transformers models converted from the OpenCLIP sources.

    Every expert file is checked to exist before anything is loaded; the OpenCLIP model is loaded once,
    and only when something is not in the cache yet."""
    source.check()
    for label, path in experts.items():
        if not Path(path).is_file():
            raise OpenCLIPError(f"Expert '{label}': state-dict file '{path}' does not exist.")
    target = root / f"pretrained-{source.fingerprint()}"
    model = None if (target / DONE).is_file() else source.load()
    pretrained_dir = convert_pretrained(source, root, model)
    pretrained_visual: Optional[Dict[str, Tensor]] = None
    models = {"_pretrained_": str(pretrained_dir)}
    for label, path in experts.items():
        if not (expert_folder(root, path, pretrained_dir) / DONE).is_file() and pretrained_visual is None:
            model = model if model is not None else source.load()
            pretrained_visual = visual_part(model.state_dict())
        models[label] = str(convert_expert(label, path, pretrained_dir, pretrained_visual or {}, root))
    return models


def to_openclip_visual(model: nn.Module, projection: Tensor) -> Dict[str, Tensor]:
    """A merged ``CLIPVisionModel`` back in OpenCLIP's ``model.visual`` layout (e.g. to save it for OpenCLIP users);
    ``projection`` is the pretrained ``visual_projection.weight``."""
    return hf_vision_to_openclip(model.state_dict(), projection)


# --------------------------------------------------------------------------- pools
class OpenCLIPVisionModelPool(CLIPVisionModelPool):
    """The host's CLIP vision model pool over OpenCLIP sources (converted exactly, cached).

    ``experts``: ``{task: state-dict file}`` (relative files are read from ``experts_dir``); task names are
    the host's (``sun397``, ``eurosat``, ...) or any registered with its template factory, since the
    zero-shot heads are built per task name."""

    def __init__(self, experts: Mapping[str, str], model_name: Optional[str] = None, pretrained: Optional[str] = None,
                 model_config: Optional[str] = None, processor_dir: Optional[str] = None,
                 cache_dir: Optional[str] = None, experts_dir: Optional[str] = None, **kwargs):
        source = OpenCLIPSource(model_name, pretrained, model_config, processor_dir)
        files = {task: str(Path(experts_dir or ".") / path) for task, path in dict(experts or {}).items()}
        models = convert_openclip_pool(source, files, cache_root(cache_dir))
        super().__init__(OmegaConf.create(models), processor=models["_pretrained_"], **kwargs)
        self.openclip_source = source

    def to_openclip_visual(self, model: nn.Module) -> Dict[str, Tensor]:
        """A (merged) vision model in OpenCLIP's ``model.visual`` layout, with the pretrained projection."""
        return to_openclip_visual(model, self.load_clip_model("_pretrained_").visual_projection.weight)


class OpenCLIPTaskPool(CLIPVisionModelTaskPool):
    """The host's CLIP classification task pool with the zero-shot heads of an OpenCLIP model (converted)."""

    def __init__(self, test_datasets, model_name: Optional[str] = None, pretrained: Optional[str] = None,
                 model_config: Optional[str] = None, processor_dir: Optional[str] = None,
                 cache_dir: Optional[str] = None, **kwargs):
        source = OpenCLIPSource(model_name, pretrained, model_config, processor_dir)
        folder = str(convert_pretrained(source, cache_root(cache_dir)))
        for replaced in ("processor", "clip_model"):  # both are the converted folder
            kwargs.pop(replaced, None)
        super().__init__(test_datasets, processor=folder, clip_model=folder, **kwargs)


def suite_openclip_source(suite: Path, openclip_dir: str = OPENCLIP_DIR) -> OpenCLIPSource:
    """A suite's OpenCLIP export (``<suite>/openclip/{model_config.json, pretrained.pt}``), tokenized with the
    suite's own processor (``pretrained/``)."""
    folder = suite / openclip_dir
    if not (folder / "model_config.json").is_file():
        raise SuiteError(f"No OpenCLIP export in suite '{suite}': '{folder / 'model_config.json'}' is missing. Build it "
                         "with `python -m fusion_bench_statsmerging.fixtures.openclip SUITE`.")
    return OpenCLIPSource(None, str(folder / "pretrained.pt"), str(folder / "model_config.json"),
                          str(suite / "pretrained"))


def suite_cache(suite: Path, openclip_dir: str, cache_dir: Optional[str]) -> Path:
    return Path(cache_dir) if cache_dir else suite / openclip_dir / "converted"


class OpenCLIPSuiteModelPool(CLIPSuiteModelPool):
    """A CLIP suite exported to OpenCLIP layout (``<suite>/openclip/``: ``model_config.json``, ``pretrained.pt``,
    ``experts/<task>.pt``), merged through the exact conversion; data and tasks are the suite's."""

    def __init__(self, suite_dir: str, tasks: Optional[Sequence[str]] = None, openclip_dir: str = OPENCLIP_DIR,
                 experts: Optional[Mapping[str, str]] = None, cache_dir: Optional[str] = None, **kwargs):
        suite = Path(suite_dir)
        names = _select(list(read_suite_tasks(suite)), tasks)
        files = {t: str(suite / openclip_dir / "experts" / f"{t}.pt") for t in names}
        files.update({t: str(p) for t, p in dict(experts or {}).items() if t in names})
        models = convert_openclip_pool(suite_openclip_source(suite, openclip_dir), files,
                                       suite_cache(suite, openclip_dir, cache_dir))
        super().__init__(suite_dir, tasks=names, experts={t: models[t] for t in names},
                         pretrained=models["_pretrained_"], **kwargs)
        self.openclip_dir = openclip_dir


class OpenCLIPSuiteTaskPool(CLIPSuiteTaskPool):
    """The suite's task pool scored with the zero-shot heads of its OpenCLIP export (converted)."""

    def __init__(self, suite_dir: str, openclip_dir: str = OPENCLIP_DIR, cache_dir: Optional[str] = None, **kwargs):
        suite = Path(suite_dir)
        source = suite_openclip_source(suite, openclip_dir)
        folder = convert_pretrained(source, suite_cache(suite, openclip_dir, cache_dir))
        super().__init__(suite_dir, pretrained=str(folder), **kwargs)


__all__ = ["OpenCLIPError", "OpenCLIPSource", "OpenCLIPSuiteModelPool", "OpenCLIPSuiteTaskPool", "OpenCLIPTaskPool",
           "OpenCLIPVisionModelPool", "check_expert_visual", "convert_openclip_pool", "convert_pretrained",
           "export_openclip_processor", "export_openclip_tokenizer", "read_expert_visual", "to_openclip_visual",
           "visual_part"]
