"""What a run needs from the Hugging Face hub, fetched ahead and checked offline.

    statsmerging-prefetch modelpool=clip-vit-base-patch32_TA8 taskpool=clip-vit-classification_TA8
    statsmerging-prefetch --check modelpool=... taskpool=...      # offline: is everything cached?
    statsmerging-prefetch --list  modelpool=... taskpool=...      # what and how big, nothing fetched

The arguments are the run's own Hydra overrides (``method=...`` too, if you like). The command composes
the same config ``fusion_bench`` would, lists every hub model and dataset it names (with download sizes
where the hub is reachable), downloads the missing ones into the Hugging Face caches (models:
``snapshot_download`` of config, tokenizer and safetensors files; datasets: ``datasets.load_dataset`` of
each split, so the prepared cache an offline run reads is there), then checks the caches as an offline
run would see them. Exit status 0 when everything is cached, 1 when something is missing.

Why: without hub access the headline command used to end after 10-33 s of retries in a 500-line
``ConnectionError: Couldn't reach 'tanganke/sun397'``. Now our methods check the same list first and
fail with one line naming what is missing and this command (:func:`offline_problem`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # configs, weights, vocabularies
MODEL_KEYS = ("pretrained_model_name_or_path", "base_model", "processor", "tokenizer", "clip_model")


@dataclass(frozen=True)
class Need:
    """One hub repository a run reads: a model, or a dataset (with its config name and split)."""

    kind: str  # "model" | "dataset"
    repo: str
    config: Optional[str] = None
    split: Optional[str] = None

    def label(self) -> str:
        extra = "/".join(x for x in (self.config, self.split) if x)
        return f"{self.kind} {self.repo}" + (f" [{extra}]" if extra else "")


# --------------------------------------------------------------------------- what a config needs
def is_hub_id(value: Any) -> bool:
    """'org/name' or a bare canonical name, not a path on this machine."""
    if not isinstance(value, str) or not value or "${" in value:
        return False
    if value.startswith(("/", ".", "~")) or os.path.exists(value):
        return False
    return value.count("/") <= 1 and " " not in value


def _dataset_need(node: Mapping[str, Any]) -> Optional[Need]:
    args = list(node.get("_args_") or [])
    repo = node.get("path") or (args[0] if args else None)
    config = node.get("name") or (args[1] if len(args) > 1 else None)
    if not is_hub_id(repo):
        return None
    return Need("dataset", str(repo), str(config) if config else None, node.get("split"))


def find_needs(node: Any, key: Optional[str] = None, in_models: bool = False) -> List[Need]:
    """Every hub model and dataset a (resolved, plain) config tree names, in order, without repeats.
    ``in_models``: ``node`` is a value of a ``models:`` mapping."""
    found: List[Need] = []
    if isinstance(node, Mapping):
        target = str(node.get("_target_", ""))
        if target.endswith("load_dataset"):
            need = _dataset_need(node)
            return [need] if need else []
        for k, v in node.items():  # the values of a `models:` mapping are model names
            found += find_needs(v, str(k), in_models=(key == "models"))
    elif isinstance(node, (list, tuple)):
        for v in node:
            found += find_needs(v, key)
    elif (in_models or key in MODEL_KEYS) and is_hub_id(node):
        found.append(Need("model", str(node)))
    return list(dict.fromkeys(found))


def _plain(node: Any) -> Any:
    """A config subtree as plain data, interpolations resolved where they can be (a missing
    environment variable leaves that value out: it names a local suite, not the hub)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        out = {}
        for k in node.keys():
            try:
                out[k] = _plain(node[k])
            except Exception:  # unresolvable interpolation
                continue
        return out
    if isinstance(node, ListConfig):
        return [_plain(v) for v in node]
    if isinstance(node, Mapping):
        return {k: _plain(v) for k, v in node.items()}
    return node


def compose(overrides: Sequence[str]):
    """The config ``fusion_bench <overrides>`` would run (our configs included, via the search-path plugin)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fusion_bench.utils.hydra_utils import get_default_config_path

    with initialize_config_dir(config_dir=str(Path(get_default_config_path()).resolve()), version_base=None):
        return hydra_compose(config_name="fabric_model_fusion", overrides=list(overrides))


def needs_of_config(cfg) -> List[Need]:
    """What a composed run config (``fusion_bench``'s) reads from the hub."""
    return find_needs({k: _plain(cfg[k]) for k in ("modelpool", "taskpool", "method") if k in cfg})


def needs_of_run(overrides: Sequence[str]) -> List[Need]:
    return needs_of_config(compose(overrides))


def needs_of_pools(modelpool: Any, taskpool_config: Any = None) -> List[Need]:
    """What an instantiated model pool (and the run's task pool config) will read from the hub."""
    parts = {"models": getattr(modelpool, "_models", None), "processor": getattr(modelpool, "_processor", None)}
    for key in ("_train_datasets", "_val_datasets", "_test_datasets"):
        parts[key] = getattr(modelpool, key, None)
    parts["taskpool"] = taskpool_config
    return find_needs({k: _plain(v) for k, v in parts.items() if v is not None})


# --------------------------------------------------------------------------- the caches
def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def datasets_cache() -> Path:
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE)


def _snapshot_files(repo: str, repo_type: str, cache: Path) -> List[Path]:
    folder = cache / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots"
    return [p for p in folder.glob("*/**/*") if p.is_file()] if folder.is_dir() else []


def is_cached(need: Need, hub: Optional[Path] = None, data: Optional[Path] = None) -> bool:
    """Whether an offline run finds ``need``: a model snapshot with its config and weights; a dataset
    prepared by ``datasets`` (its arrow cache, per config) or its files in the hub cache."""
    hub = hub or hub_cache()
    if need.kind == "model":
        names = {p.name for p in _snapshot_files(need.repo, "model", hub)}
        weights = any(n.endswith((".safetensors", ".bin")) for n in names)
        return "config.json" in names and weights
    data = data or datasets_cache()
    prepared = data / need.repo.replace("/", "___")
    if need.config:
        prepared = prepared / need.config
    if prepared.is_dir() and any(prepared.rglob("*.arrow")):
        return True
    return any(p.suffix in (".parquet", ".arrow") for p in _snapshot_files(need.repo, "dataset", hub))


def missing(needs: Iterable[Need], hub: Optional[Path] = None, data: Optional[Path] = None) -> List[Need]:
    return [n for n in needs if not is_cached(n, hub, data)]


# --------------------------------------------------------------------------- the hub
def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick probe (not a 30 s retry loop); offline mode counts as unreachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        import requests

        requests.head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:
        return False


def download_size(need: Need) -> Optional[int]:
    """Bytes a download would fetch (None when the hub cannot say)."""
    import fnmatch

    from huggingface_hub import HfApi

    try:
        api = HfApi()
        info = (api.model_info if need.kind == "model" else api.dataset_info)(need.repo, files_metadata=True)
    except Exception:
        return None
    files = [(s.rfilename, s.size or 0) for s in info.siblings or []]
    if need.kind == "model":
        files = [(f, s) for f, s in files if any(fnmatch.fnmatch(f, p) for p in MODEL_FILES)]
    elif need.config:  # a dataset config's files live under its own folder
        own = [(f, s) for f, s in files if f.startswith(f"{need.config}/")]
        files = own or files
    return sum(s for _, s in files)


def fetch(need: Need) -> None:
    """Into the caches an offline run reads."""
    if need.kind == "model":
        from huggingface_hub import snapshot_download

        snapshot_download(need.repo, allow_patterns=MODEL_FILES)
    else:
        import datasets

        datasets.load_dataset(need.repo, need.config, split=need.split)


def human(size: Optional[int]) -> str:
    if size is None:
        return "size ?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


# --------------------------------------------------------------------------- for the methods
def command_for(modelpool: Optional[str], taskpool: Optional[str]) -> str:
    args = [f"modelpool={modelpool}" if modelpool else "modelpool=...", f"taskpool={taskpool}" if taskpool else ""]
    return "statsmerging-prefetch " + " ".join(a for a in args if a)


def summary(needs: Sequence[Need], shown: int = 4) -> str:
    """The first few by name, then a count: fits the last line of a long log."""
    names = ", ".join(n.label() for n in needs[:shown])
    return names + (f" and {len(needs) - shown} more" if len(needs) > shown else "")


def offline_problem(needs: Sequence[Need], command: str) -> Optional[str]:
    """The one-line error for a run whose hub files are not cached while the hub cannot be reached
    (checked in a few seconds, before any model or dataset is loaded); None when the run can go on."""
    absent = missing(needs)
    if not absent or hub_reachable():
        return None
    return (f"The Hugging Face hub cannot be reached (or HF_HUB_OFFLINE is set) and {len(absent)} of the "
            f"{len(needs)} hub repositories this run reads are not cached: {summary(absent)}. On a machine with hub access, run "
            f"`{command}` (it lists them with sizes and downloads them into the cache), then rerun.")


# --------------------------------------------------------------------------- command line
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="statsmerging-prefetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the run's Hydra overrides (modelpool=... taskpool=...)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only check the caches (offline); download nothing")
    mode.add_argument("--list", action="store_true", help="only list what is needed, with sizes")
    args = parser.parse_args(argv)
    if not any(o.startswith("modelpool=") for o in args.overrides):
        parser.error("give the run's overrides, at least modelpool=... (and taskpool=... to evaluate)")
    needs = needs_of_run(args.overrides)
    online = not args.check and hub_reachable()
    total = 0
    print(f"{len(needs)} hub repositories needed" + ("" if online else " (hub not reachable: sizes unknown)") + ":")
    for need in needs:
        size = download_size(need) if online else None
        total += size or 0
        print(f"  {'cached ' if is_cached(need) else 'MISSING'}  {need.label():70s} {human(size)}")
    if online:
        print(f"total download size (all listed): {human(total)}")
    if not args.check and not args.list:
        if not online:
            print("the hub cannot be reached from here: nothing downloaded", file=sys.stderr)
        else:
            for need in missing(needs):
                print(f"fetching {need.label()} ...", flush=True)
                fetch(need)
    absent = missing(needs)
    if absent:
        print(f"error: {len(absent)} of {len(needs)} not cached (an offline run would fail): {summary(absent)}",
              file=sys.stderr)
        return 1
    print("all cached: the run works offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
