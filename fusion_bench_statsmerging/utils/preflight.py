"""Checks run before any long work, shared by all our methods and loaders.

Each check turns a silently wrong result into one error naming the culprit:

- an expert whose checkpoint lacks a tensor would be loaded with that tensor *randomly
  initialised* (transformers only warns) and merged as if it were a task vector:
  :func:`check_checkpoint_complete` compares the loaded model with the file it came from;
- NaN/inf weights poison every merge and end in ``loss: nan`` with exit 0:
  :func:`check_finite_model` names model and tensor;
- an output folder that cannot be written would lose a finished run at its very end:
  :func:`check_writable` creates (and removes) a file there first;
- a task without its evaluation split would silently leave the average:
  :func:`check_splits` refuses the pool instead;
- a weight file cut short (an interrupted download or copy) ends in safetensors' own error naming
  neither file nor model: :func:`check_weight_files` reads each header first.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import UserError

Shapes = Dict[str, Tuple[int, ...]]


class PreflightError(UserError):
    """An input that would make the run wrong or lost, found before the run starts."""


# --------------------------------------------------------------------------- output folders
def check_writable(directory: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``directory`` and a file in it, then remove the file: permission, read-only mounts and
    a file in the way all show up now rather than after training."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PreflightError(
            f"Cannot write to the {what} '{path}' ({exc.strerror or exc}). Nothing has been computed yet; "
            f"choose a writable folder (e.g. `method.artifact_dir=...` or `path.log_dir=...`) and rerun."
        ) from None
    return path


def creatable_problem(directory: str | os.PathLike) -> Optional[str]:
    """Why ``directory`` could not be created or written, or None; creates nothing (checked before a
    run that may not start). The nearest existing folder above it decides."""
    path = Path(directory).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        return f"'{existing}' is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in '{existing}'"
    return None


# --------------------------------------------------------------------------- checkpoint files
def weight_files(name_or_path: str) -> List[str]:
    """The local safetensors file(s) of a ``save_pretrained`` checkpoint (a folder or a cached hub repo):
    the single file, or every shard its index names; [] when there is none to read here."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    def local(filename: str) -> Optional[str]:
        try:
            return cached_file(name_or_path, filename, local_files_only=True,
                               _raise_exceptions_for_missing_entries=False)
        except Exception:  # not a directory or cached repo: nothing to compare with
            return None

    single = local(SAFE_WEIGHTS_NAME)
    if single:
        return [single]
    index = local(SAFE_WEIGHTS_INDEX_NAME)
    if not index:
        return []
    try:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError):
        raise PreflightError(f"The shard index '{index}' is not readable JSON with a weight_map; the checkpoint "
                             "was cut short or edited. Re-save or re-download the model.") from None
    files = [local(s) for s in shards]
    return files if all(files) else []


def safetensors_problem(path: str | os.PathLike) -> Optional[str]:
    """Why a safetensors file cannot be read in full (unreadable, cut short, not safetensors), or None.
    Reads the header only: the 8-byte header length, the JSON header, and the end of its last tensor."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else None
            if length is None or length > size - 8:
                return f"its header is incomplete ({size} bytes on disk): the file was cut short"
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    except ValueError:
        return "its header is not safetensors JSON: the file is corrupt or of another format"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and len(t.get("data_offsets") or ()) == 2]
    if ends and 8 + length + max(ends) > size:
        return (f"its tensors need {8 + length + max(ends)} bytes but the file has {size}: "
                "it was cut short (an interrupted download or copy)")
    return None


def check_weight_files(name_or_path: str, label: str) -> None:
    """Every local safetensors file of model ``label`` reads in full, before anything loads it (a cut
    file would otherwise end in safetensors' own error naming neither the file nor the model)."""
    for file in weight_files(name_or_path):
        problem = safetensors_problem(file)
        if problem:
            raise PreflightError(f"The model '{label}' cannot be loaded from '{file}': {problem}. Re-save or "
                                 "re-download this model, or remove it from the model pool.")


def model_source(config) -> Optional[str]:
    """Where a model pool's entry is read from: its path or hub id, or None for an entry built otherwise."""
    if isinstance(config, (str, os.PathLike)):
        return str(config)
    if isinstance(config, Mapping):
        for key in ("pretrained_model_name_or_path", "path", "model_path"):
            if isinstance(config.get(key), str):
                return config[key]
    return None


def check_model_files(modelpool, names: Iterable[str]) -> None:
    """The weight files of the pool's models ``names`` (those read from a folder or hub cache) read in full."""
    models = getattr(modelpool, "_models", None) or {}
    for name in names:
        source = model_source(models.get(name))
        if source is not None:
            check_weight_files(source, name)


def saved_tensor_shapes(name_or_path: str) -> Optional[Shapes]:
    """Tensor names and shapes of a ``save_pretrained`` safetensors checkpoint, read from its header
    only (no weights). ``None`` when there is no local safetensors file to compare with."""
    from safetensors import safe_open

    files = weight_files(name_or_path)
    if not files:
        return None
    shapes: Shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _pretrained_model(model: nn.Module) -> Optional[nn.Module]:
    """The outermost transformers model inside ``model`` that was read from a checkpoint."""
    for module in model.modules():  # pre-order: outermost first
        if getattr(module, "name_or_path", "") and hasattr(module, "base_model_prefix"):
            return module
    return None


def _expected_tensors(model: nn.Module) -> Dict[str, List[str]]:
    """state_dict key -> all keys sharing its storage (tied weights are saved once, under any of them)."""
    groups: Dict[Tuple[int, int], List[str]] = {}
    state = model.state_dict()
    for key, tensor in state.items():
        groups.setdefault((tensor.data_ptr(), tensor.numel()), []).append(key)
    return {key: groups[(t.data_ptr(), t.numel())] for key, t in state.items()}


def _align_prefix(file_keys: Iterable[str], model_keys: Iterable[str], prefix: str) -> Dict[str, str]:
    """file key -> model key, allowing the base-model prefix transformers adds or strips on load."""
    model_keys = set(model_keys)
    mapping = {}
    for key in file_keys:
        if key in model_keys or not prefix:
            mapping[key] = key
        elif key.startswith(prefix + ".") and key[len(prefix) + 1:] in model_keys:
            mapping[key] = key[len(prefix) + 1:]
        elif f"{prefix}.{key}" in model_keys:
            mapping[key] = f"{prefix}.{key}"
        else:
            mapping[key] = key
    return mapping


def checkpoint_differences(model: nn.Module, saved: Shapes) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, shape) differences between a loaded model and its checkpoint file."""
    expected = _expected_tensors(model)
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    in_file = {model_key: saved[file_key]
               for file_key, model_key in _align_prefix(saved, state, prefix).items()}
    missing = [k for k, aliases in expected.items() if not any(a in in_file for a in aliases)]
    unexpected = [k for k in in_file if k not in state]
    shapes = [f"{k}: file {in_file[k]} vs model {tuple(state[k].shape)}" for k in in_file
              if k in state and tuple(state[k].shape) != tuple(in_file[k])]
    return missing, unexpected, shapes


def _first(names: Sequence[str]) -> str:
    """'a' or 'a' and N more: the culprit by name without a wall of names."""
    return f"'{names[0]}'" + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def check_checkpoint_complete(model: nn.Module, label: str, allow_extra: bool = False) -> None:
    """Fail when the checkpoint a model was read from lacks one of its tensors (transformers would
    have initialised it randomly) or, unless ``allow_extra``, holds tensors the model has no place for.

    ``allow_extra``: the pretrained model may be a larger checkpoint (a full CLIP for its vision tower).
    """
    inner = _pretrained_model(model)
    saved = saved_tensor_shapes(str(inner.name_or_path)) if inner is not None else None
    if saved is None:
        return
    missing, unexpected, shapes = checkpoint_differences(inner, saved)
    source = f"model '{label}' (checkpoint '{inner.name_or_path}')"
    if missing:
        raise PreflightError(
            f"The {source} lacks tensor {_first(missing)}; loading would initialise it randomly and merge "
            "noise as a task vector. Re-save the model with all its tensors, or remove it from the model pool.")
    if unexpected and not allow_extra:
        raise PreflightError(
            f"The {source} has tensor {_first(unexpected)} that the model architecture does not; it was saved "
            "from another architecture. Use an expert of the pretrained model's architecture (or the "
            "heterogeneous adapter).")
    if shapes:
        raise PreflightError(f"The {source} has tensors of other shapes: {shapes[0]}.")


def check_finite_model(model: nn.Module, label: str, names: Optional[Sequence[str]] = None) -> None:
    """Fail on the first NaN/inf weight, naming model and tensor (a NaN merges into a NaN model)."""
    wanted = set(names) if names is not None else None
    for name, tensor in model.state_dict().items():
        if (wanted is None or name in wanted) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise PreflightError(
                f"Non-finite values (NaN or inf) in tensor '{name}' of model '{label}'; the checkpoint is "
                "corrupt or was saved in a precision that overflowed. Fix or remove this model before merging.")


def check_loaded_model(model: nn.Module, label: str, pretrained: bool = False) -> nn.Module:
    """A loaded pool model is complete and finite; returns it, so loaders can wrap their return.
    Marks the model checked, so a method run on a strict pool does not scan it twice."""
    if not getattr(model, "_statsmerging_checked", False):
        check_checkpoint_complete(model, label, allow_extra=pretrained)
        check_finite_model(model, label)
        model._statsmerging_checked = True
    return model


# --------------------------------------------------------------------------- task splits
def missing_splits(tasks: Sequence[str], split_dir: Mapping[str, Path]) -> List[str]:
    """Tasks whose split folder does not exist."""
    return [t for t in tasks if not Path(split_dir[t]).is_dir()]


def check_splits(tasks: Sequence[str], split: str, split_dir: Mapping[str, Path], pool: str) -> None:
    """Every task the task pool scores has its ``split``: an average over fewer tasks is not the
    average the user asked for."""
    missing = missing_splits(tasks, split_dir)
    if missing:
        folders = ", ".join(f"'{split_dir[t]}'" for t in missing)
        raise PreflightError(
            f"The {pool} cannot score task(s) {missing}: their {split} split is missing ({folders}). An average "
            f"over the other tasks would not be the average asked for; restore the split, or select the "
            f"tasks to score with `taskpool.tasks=[...]`.")
