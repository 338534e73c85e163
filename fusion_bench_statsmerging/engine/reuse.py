"""Saving a trained StatsMergeLearner and applying it to another pool (experimental).

``learner.pt`` (written by every StatsMerging run next to its coefficients) holds what is
needed to predict coefficients for *another* pool without training:

- ``format_version`` (this module's :data:`FORMAT_VERSION`; files without it are version 0,
  written before versioning, and still load);
- ``options``: the learner's structure and inputs (``mode``, ``features``, ``rank``,
  ``hidden_dim``, ``learner_layers``, ``output``, ``init_coefficient``, ``max_coefficient``,
  ``use_depth``, the latter as the learner actually used it);
- ``learner_state_dict``: the MLP's weights;
- ``normalizer``: the statistics transform (signed log + z-score) the learner was trained
  with, and ``raw_statistics``: the untransformed statistics of the pool it was fitted on;
- ``pool``: that pool's expert names and tensor names (for the record; not needed to reuse).

Why a learner transfers at all: it scores every (expert, tensor) row independently from
the row's statistics and the tensor's *relative depth* in the model (0 = first tensor, 1 =
last), so a pool with other experts (unseen tasks), another number of experts, or another
number of tensors (another depth of the same family, or another architecture) maps onto it
without any table: tensor l of L is presented at depth l / (L - 1). What must match is the
statistics vector itself (``features`` and ``rank``) and the mode; :func:`resolve_options`
refuses a mismatch with the keys to change.

Statistics normalisation on the new pool (``normalizer``): ``saved`` (default) applies the
transform fitted on the training pool, so the learner sees the new statistics on the scale
it was trained on (an expert with twice the task-vector norm looks like one); ``refit``
fits the transform on the new pool, as a training run would, which recentres the inputs
when the new pool's raw statistics live on another scale (e.g. a wider model has larger
norms and singular values) at the price of making every input relative to the new pool.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from ..utils.errors import UserError
from .learner import StatsMergeLearner
from .stats import FeatureNormalizer, num_features, validate_features

FORMAT_VERSION = 1
NORMALIZERS = ("saved", "refit")
# The options that fix the learner's inputs and shape; the reuse config leaves them null
# ("take the saved learner's"), a set value must agree with the file.
LEARNER_OPTIONS = ("mode", "features", "rank", "hidden_dim", "learner_layers", "output",
                   "init_coefficient", "max_coefficient", "use_depth")


class LearnerFileError(UserError):
    """A learner file that cannot be read or does not fit the configuration."""


@dataclass
class SavedLearner:
    """The content of a ``learner.pt``, validated."""

    path: str
    format_version: int
    options: Dict[str, Any]
    state_dict: Dict[str, Tensor]
    normalizer: FeatureNormalizer
    raw_statistics: Optional[Tensor] = None
    pool: Dict[str, Any] = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return num_features(self.options["features"], self.options["rank"])

    def build(self) -> StatsMergeLearner:
        """The trained learner (strict load: a file that does not fit its options fails here)."""
        o = self.options
        learner = StatsMergeLearner(self.in_features, o["hidden_dim"], o["learner_layers"], o["output"],
                                    o["init_coefficient"], o["max_coefficient"], use_depth=o["use_depth"])
        try:
            learner.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise LearnerFileError(f"{self.path}: the saved weights do not fit the saved options {o}: {exc}") from exc
        return learner


def learner_payload(learner: StatsMergeLearner, normalizer: FeatureNormalizer, raw_statistics: Tensor,
                    options: Mapping[str, Any], pool: Mapping[str, Any],
                    provenance: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What ``learner.pt`` holds (see the module docstring). ``learner_config``, ``mode``,
    ``features`` and ``rank`` keep the version-0 layout for older readers."""
    options = {**dict(options), "features": list(options["features"]), "use_depth": bool(learner.use_depth)}
    return {
        "format_version": FORMAT_VERSION,
        "options": options,
        "learner_state_dict": {k: v.detach().cpu() for k, v in learner.state_dict().items()},
        "normalizer": {k: v.detach().cpu() for k, v in normalizer.state_dict().items()},
        "raw_statistics": raw_statistics.detach().cpu(),
        "pool": dict(pool),
        "provenance": dict(provenance or {}),
        "learner_config": {
            "in_features": num_features(options["features"], options["rank"]),
            "hidden_dim": options["hidden_dim"], "num_layers": options["learner_layers"],
            "output": options["output"], "init_coefficient": options["init_coefficient"],
            "max_coefficient": options["max_coefficient"], "use_depth": options["use_depth"],
        },
        "mode": options["mode"], "features": options["features"], "rank": options["rank"],
    }


def _options_v0(state: Mapping[str, Any]) -> Dict[str, Any]:
    cfg = state["learner_config"]
    return {"mode": state["mode"], "features": list(state["features"]), "rank": int(state["rank"]),
            "hidden_dim": cfg["hidden_dim"], "learner_layers": cfg["num_layers"], "output": cfg["output"],
            "init_coefficient": cfg["init_coefficient"], "max_coefficient": cfg["max_coefficient"],
            "use_depth": bool(cfg["use_depth"])}


def load_learner(path: str | os.PathLike) -> SavedLearner:
    """Read and check a ``learner.pt``; every failure names the file and what is wrong."""
    path = str(path)
    if not Path(path).is_file():
        raise LearnerFileError(f"learner_path '{path}' does not exist; point it at the learner.pt of a "
                               "finished StatsMerging run (in its artefact directory).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise LearnerFileError(f"learner_path '{path}' is not a readable learner file: {exc}") from exc
    if not isinstance(state, Mapping) or "learner_state_dict" not in state or "normalizer" not in state:
        raise LearnerFileError(f"'{path}' is not a StatsMerging learner file (no learner_state_dict/normalizer); "
                               "did you pass coefficients.pt or a checkpoint of another kind?")
    version = int(state.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise LearnerFileError(f"'{path}' has learner format version {version}; this package reads up to "
                               f"{FORMAT_VERSION}. Upgrade fusion-bench-statsmerging.")
    options = dict(state["options"]) if version >= 1 else _options_v0(state)
    validate_features(options["features"])
    normalizer = FeatureNormalizer.from_state_dict(state["normalizer"])
    width = num_features(options["features"], options["rank"])
    if normalizer.scale.numel() != width:
        raise LearnerFileError(f"'{path}' is inconsistent: its normaliser has {normalizer.scale.numel()} "
                               f"columns, its features {options['features']} at rank {options['rank']} need {width}.")
    return SavedLearner(path, version, options, dict(state["learner_state_dict"]), normalizer,
                        state.get("raw_statistics"), dict(state.get("pool", {})))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def resolve_options(saved: SavedLearner, configured: Mapping[str, Any]) -> Dict[str, Any]:
    """The learner options of a reuse run: the saved ones, checked against any set in the config.

    ``None`` in ``configured`` means "the saved learner's". ``use_depth`` is compared as the
    learner uses it (only layer-wise learners take depth).
    """
    resolved, wrong = {}, []
    for key in LEARNER_OPTIONS:
        value, want = configured.get(key), saved.options[key]
        if key == "use_depth" and value is not None:
            mode = configured.get("mode") or saved.options["mode"]
            value = bool(value) and mode == "layer_wise"
        if value is not None and not _same(value, want):
            wrong.append(f"{key}: configured {list(value) if isinstance(value, (list, tuple)) else value!r}, "
                         f"saved {want!r}")
        resolved[key] = want
    if wrong:
        raise LearnerFileError(
            f"The learner in '{saved.path}' does not match this configuration ({'; '.join(wrong)}). "
            "A saved learner fixes its statistics (features, rank), mode and shape: remove these keys or "
            "set them to null (as config/method/statsmerging_reuse.yaml does) to use the saved values, "
            "or train a new learner with the options you want.")
    return resolved


def normalizer_for(saved: SavedLearner, raw: Tensor, choice: str) -> FeatureNormalizer:
    """The statistics transform used on a new pool (see the module docstring)."""
    if choice not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {list(NORMALIZERS)}, got '{choice}'.")
    if raw.shape[-1] != saved.in_features:
        raise LearnerFileError(f"The pool's statistics have {raw.shape[-1]} columns, the learner in "
                               f"'{saved.path}' takes {saved.in_features}.")
    return saved.normalizer if choice == "saved" else FeatureNormalizer.fit(raw)


def depth_mapping(num_layers_new: int, saved: SavedLearner) -> List[Dict[str, Any]]:
    """For the record: each new tensor's relative depth and the training pool's tensor nearest
    to it (the learner does not need this table; it takes the depth directly)."""
    names = list(saved.pool.get("param_names") or [])
    rows = []
    for l in range(num_layers_new):
        depth = l / (num_layers_new - 1) if num_layers_new > 1 else 0.0
        row = {"index": l, "relative_depth": round(depth, 6)}
        if names:
            nearest = round(depth * (len(names) - 1))
            row["nearest_training_tensor"] = names[nearest]
        rows.append(row)
    return rows
