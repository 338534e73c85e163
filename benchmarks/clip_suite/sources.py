"""Loaders for the offline *real* image sources (Fashion-MNIST, sklearn digits, skimage samples).

Each loader returns plain numpy arrays so the rest of the builder never depends on where the
pixels came from.  Nothing here touches the network.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

FASHION_CLASSES: Tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# (class name, skimage.data loader).  All are bundled with scikit-image (no pooch download).
SCENE_SOURCES: Tuple[Tuple[str, str], ...] = (
    ("astronaut", "astronaut"),
    ("brick wall", "brick"),
    ("cat", "chelsea"),
    ("coffee cup", "coffee"),
    ("coins", "coins"),
    ("grass", "grass"),
    ("gravel", "gravel"),
    ("moon surface", "moon"),
    ("rocket", "rocket"),
    ("galaxies", "hubble_deep_field"),
)


@dataclass(frozen=True)
class FashionMNIST:
    """The four IDX arrays of Fashion-MNIST (28x28 uint8 greyscale)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _idx_candidates(hint: Optional[str]) -> List[Path]:
    """Folders that may hold the IDX files: the CLI hint, then Debian's dataset package."""
    out = [Path(hint)] if hint else []
    out += [Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/fashion-mnist")]
    return out


def find_fashion_mnist(hint: Optional[str] = None) -> Path:
    """Locate a folder with all four Fashion-MNIST IDX .gz files (searching /usr/share as fallback)."""
    for d in _idx_candidates(hint):
        if all((d / f).is_file() for f in FASHION_FILES.values()):
            return d
    for d in Path("/usr/share").glob("**/"):
        if "fashion" in str(d).lower() and all((d / f).is_file() for f in FASHION_FILES.values()):
            return d
    raise FileNotFoundError(
        "Fashion-MNIST IDX files not found; `apt-get install dataset-fashion-mnist` or pass "
        "--fashion-mnist DIR containing " + ", ".join(FASHION_FILES.values())
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse a (gzipped) IDX file: big-endian header with dims, then raw uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(hint: Optional[str] = None) -> FashionMNIST:
    """Load Fashion-MNIST from local IDX files."""
    d = find_fashion_mnist(hint)
    arrs = {k: read_idx(d / f) for k, f in FASHION_FILES.items()}
    return FashionMNIST(**arrs)


def load_sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 handwritten digits bundled with scikit-learn, as uint8 (0-255) + labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(np.asarray(d.images) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return imgs, np.asarray(d.target, dtype=np.int64)


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Normalise skimage sample images (grey, RGB or RGBA; any dtype) to uint8 RGB."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float64) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def load_scene_images() -> Dict[str, np.ndarray]:
    """Load the skimage sample photographs used for the scene-patch task, keyed by class name."""
    import skimage.data as skd

    return {name: _as_rgb_uint8(getattr(skd, fn)()) for name, fn in SCENE_SOURCES}
