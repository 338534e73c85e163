"""The eight downstream classification tasks: class names, prompt templates and image generators.

The tasks mimic the *kinds* of the TA8 suite (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB,
MNIST, DTD) with offline material:

=================  ===========================  ========  =========================================
task               analogue                     source    what changes between classes
=================  ===========================  ========  =========================================
syn_fashion        Fashion-MNIST / Cars         real      garment type
syn_digits         MNIST                        real      handwritten digit (sklearn 8x8 scans)
syn_housenum       SVHN                         rendered  centre digit among distractor digits
syn_textures       DTD                          procedural texture family
syn_signs          GTSRB                        rendered  letter painted on a road-sign shape
syn_scenes         SUN397 / RESISC45            real      which photograph a patch comes from
syn_landcover      EuroSAT                      procedural land-use type seen from above
syn_counts         CLEVR-count                  procedural number of objects
=================  ===========================  ========  =========================================

``pretrain_named`` lists the classes whose *names* the pretraining captions use together with
images of them; the other classes only appear with generic captions (or not at all).  This is
what keeps zero-shot accuracy well below the fine-tuned experts, as in the real benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from . import render as R
from .sources import FASHION_CLASSES, SCENE_SOURCES

DIGIT_NAMES: Tuple[str, ...] = tuple(str(i) for i in range(10))
NUMBER_WORDS: Tuple[str, ...] = ("zero", "one", "two", "three", "four", "five",
                                 "six", "seven", "eight", "nine")
TEXTURE_KINDS: Tuple[str, ...] = ("banded", "dotted", "chequered", "zigzagged", "grid",
                                  "wavy", "crosshatched", "blotchy", "speckled", "concentric")
SIGN_LETTERS: Tuple[str, ...] = ("A", "B", "E", "H", "K", "M", "P", "R", "S", "X")
LANDCOVER: Tuple[str, ...] = ("annual crop land", "forest", "shrubland", "highway",
                              "industrial buildings", "pasture land", "orchard",
                              "residential buildings", "river", "lake or sea")
COUNT_MAX = 6

HOUSENUM_FONTS: Tuple[str, ...] = ("DejaVuSans-Bold.ttf", "DejaVuSansMono-Bold.ttf",
                                   "DejaVuSerif-Bold.ttf", "DejaVuSans-BoldOblique.ttf",
                                   "DejaVuSerif-BoldItalic.ttf")
SIGN_FONTS: Tuple[str, ...] = ("DejaVuSans-Bold.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif-Bold.ttf")


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one task; written to tasks.json and the manifest."""

    name: str
    classnames: Tuple[str, ...]
    templates: Tuple[str, ...]
    source: str
    analogue: str
    pretrain_named: Tuple[int, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


TASKS: Tuple[TaskSpec, ...] = (
    TaskSpec(
        "syn_fashion", FASHION_CLASSES,
        ("a photo of a {}.", "a grayscale photo of a {}.", "a low resolution photo of a {}.",
         "a product photo of a {}.", "a photo of the {}, a type of clothing."),
        "real:fashion-mnist", "Fashion-MNIST / Stanford Cars",
        pretrain_named=(1, 2, 3, 5, 8),
    ),
    TaskSpec(
        "syn_digits", DIGIT_NAMES,
        ('a photo of the number: "{}".', "a handwritten digit {}.", "a blurry photo of the number {}.",
         "a scan of a handwritten {}."),
        "real:sklearn-digits", "MNIST",
        pretrain_named=(),
    ),
    TaskSpec(
        "syn_housenum", DIGIT_NAMES,
        ('a photo of the number: "{}".', "a street photo of the house number {}.",
         "the digit {} on a door.", "a cropped photo of the number {}."),
        "rendered:dejavu-bold+clutter", "SVHN",
        pretrain_named=(),
    ),
    TaskSpec(
        "syn_textures", TEXTURE_KINDS,
        ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
         "a photo of a {} object.", "a close-up of a {} surface."),
        "procedural", "DTD",
        pretrain_named=(0, 1, 2, 4, 8),
    ),
    TaskSpec(
        "syn_signs", tuple(f"letter {c}" for c in SIGN_LETTERS),
        ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
         'a close up photo of a "{}" traffic sign.', "a road sign showing the {}."),
        "rendered:dejavu-bold+sign-shapes", "GTSRB",
        pretrain_named=(),
    ),
    TaskSpec(
        "syn_scenes", tuple(name for name, _ in SCENE_SOURCES),
        ("a photo of a {}.", "a cropped photo of the {}.", "a close-up photo of {}.",
         "a photo of the {} scene."),
        "real:skimage-samples", "SUN397 / RESISC45",
        pretrain_named=(0, 4, 5, 7, 8),
    ),
    TaskSpec(
        "syn_landcover", LANDCOVER,
        ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
         "an aerial view of {}.", "a satellite image of the {}."),
        "procedural", "EuroSAT",
        pretrain_named=(1, 3, 8, 9),
    ),
    TaskSpec(
        "syn_counts", NUMBER_WORDS[1:COUNT_MAX + 1],
        ("a photo of {} objects.", "an image with {} shapes.", "a picture showing {} things.",
         "there are {} objects in this photo."),
        "procedural", "CLEVR-count",
        pretrain_named=(0, 1, 2),
    ),
)

TASKS_BY_NAME: Dict[str, TaskSpec] = {t.name: t for t in TASKS}


# ----------------------------------------------------------------------------------------
# Synthetic task generators: (rng, label, final size) -> uint8 (size, size, 3)
# ----------------------------------------------------------------------------------------

def _contrasting_to(rng: np.random.Generator, ref: np.ndarray, min_diff: float) -> R.RGB:
    """Random colour whose brightness differs from the mean of ``ref`` (keeps glyphs legible)."""
    lum = R.luminance(ref.reshape(-1, 3).mean(0))
    for _ in range(100):
        c = R.random_rgb(rng)
        if abs(R.luminance(c) - lum) >= min_diff:
            return c
    return (255, 255, 255) if lum < 128 else (0, 0, 0)


def draw_housenum(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """SVHN-like crop: a centred digit flanked by partial neighbours, on a cluttered photo-like bg."""
    n = size * R.SUPERSAMPLE
    c1, c2 = R.random_rgb(rng), R.random_rgb(rng)
    base = R.gradient_background(rng, n, c1, c2)
    img = Image.fromarray(base)
    if rng.random() < 0.7:
        R.clutter(ImageDraw.Draw(img), rng, n, int(rng.integers(1, 5)))
    base = np.asarray(img)
    fg = _contrasting_to(rng, base, 70.0)
    fonts = R.available_fonts(HOUSENUM_FONTS) or [R.FONT_NAMES[0]]
    font_name = fonts[int(rng.integers(len(fonts)))]
    hf = rng.uniform(0.5, 0.85)
    font = R.load_font(font_name, max(4, int(n * hf)))
    layer = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(layer)
    cx = n * (0.5 + rng.uniform(-0.06, 0.06))
    cy = n * (0.5 + rng.uniform(-0.06, 0.06))
    R.draw_text_centered(d, str(label), font, cx, cy, 255)
    adv = font.getlength(str(label)) * rng.uniform(1.0, 1.2)
    for side in (-1, 1):
        if rng.random() < 0.75:
            R.draw_text_centered(d, str(int(rng.integers(10))), font, cx + side * adv, cy, 255)
    angle = float(rng.uniform(-10, 10))
    layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy))
    out = R.composite(base, layer, fg)
    out = np.asarray(R.maybe_blur(Image.fromarray(out), rng, 0.5, 1.2 * R.SUPERSAMPLE))
    out = R.finish(Image.fromarray(out), size)
    return R.add_noise(out, rng, float(rng.uniform(0, 10)))


def draw_texture_task(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """DTD-like swatch of texture family ``label`` with random colours, scale and orientation."""
    n = size * R.SUPERSAMPLE
    img = R.texture_image(TEXTURE_KINDS[label], rng, n)
    out = R.finish(Image.fromarray(img), size)
    return R.add_noise(out, rng, float(rng.uniform(0, 8)))


_SIGN_SHAPES = ("circle", "triangle", "octagon", "diamond", "square")
_SIGN_BORDERS = ((200, 30, 30), (30, 60, 180), (20, 20, 20), (30, 130, 50))
_SIGN_FILLS = ((245, 245, 245), (245, 210, 40), (40, 90, 200))


def draw_sign(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """GTSRB-like crop: a letter painted on a bordered sign shape over a street-ish background."""
    n = size * R.SUPERSAMPLE
    c1, c2 = R.random_rgb(rng), R.random_rgb(rng)
    bg = R.blend(R.smooth_noise(rng, n, int(rng.integers(3, 8))), c1, c2)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    if rng.random() < 0.4:
        R.clutter(d, rng, n, int(rng.integers(1, 3)))
    shape = _SIGN_SHAPES[int(rng.integers(len(_SIGN_SHAPES)))]
    cx, cy = n * (0.5 + rng.uniform(-0.05, 0.05, size=2))
    r = n * rng.uniform(0.38, 0.48)
    angle = float(rng.uniform(-0.15, 0.15))
    border = R.jitter_colour(rng, _SIGN_BORDERS[int(rng.integers(len(_SIGN_BORDERS)))], 12)
    fill_idx = int(rng.integers(len(_SIGN_FILLS)))
    fill = R.jitter_colour(rng, _SIGN_FILLS[fill_idx], 12)
    inner = 0.62 if shape == "triangle" else 0.8
    R.draw_shape(d, shape, cx, cy, r, angle, border)
    R.draw_shape(d, shape, cx, cy, r * inner, angle, fill)
    ink = (245, 245, 245) if fill_idx == 2 else R.jitter_colour(rng, (20, 20, 30), 10)
    fonts = R.available_fonts(SIGN_FONTS) or [R.FONT_NAMES[0]]
    font_name = fonts[int(rng.integers(len(fonts)))]
    # Letters fill most of the sign's face: at 32 px anything smaller is a few blurred pixels
    # (a CPU probe learned 0.26/0.36-high letters to only 39% validation accuracy).
    hf = (0.28 if shape == "triangle" else 0.44) * rng.uniform(0.85, 1.1)
    ly = cy / n + (0.07 if shape == "triangle" else 0.0)
    layer = R.glyph_layer(SIGN_LETTERS[label], font_name, n, hf, float(rng.uniform(-8, 8)), cx / n, ly)
    out = R.composite(np.asarray(img), layer, ink)
    out = out.astype(np.float64) * rng.uniform(0.55, 1.2) + rng.uniform(-20, 20)
    out = np.clip(out, 0, 255).astype(np.uint8)
    out = np.asarray(R.maybe_blur(Image.fromarray(out), rng, 0.25, 0.8 * R.SUPERSAMPLE))
    return R.add_noise(R.finish(Image.fromarray(out), size), rng, float(rng.uniform(0, 8)))


def draw_counts(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """``label + 1`` non-overlapping small objects; shape and colour are nuisance variables."""
    return draw_objects(rng, label + 1, size)[0]


def place_objects(rng: np.random.Generator, k: int, n: int, r: float) -> List[Tuple[float, float]]:
    """Rejection-sample ``k`` centres whose discs of radius ``r`` do not touch (countable objects)."""
    for _ in range(200):
        pts: List[Tuple[float, float]] = []
        for _ in range(400):
            p = tuple(rng.uniform(r * 1.1, n - r * 1.1, size=2))
            if all(math.hypot(p[0] - q[0], p[1] - q[1]) > 2.3 * r for q in pts):
                pts.append(p)  # type: ignore[arg-type]
                if len(pts) == k:
                    return pts
        r *= 0.9
    return pts


def draw_objects(rng: np.random.Generator, k: int, size: int,
                 shape: Optional[str] = None, colour: Optional[str] = None
                 ) -> Tuple[np.ndarray, str, str, str]:
    """Image with ``k`` objects; returns (image, shape, colour name, background word) for captions."""
    n = size * R.SUPERSAMPLE
    bg_kind = ("plain", "gradient", "noisy")[int(rng.integers(3))]
    bgc = R.jitter_colour(rng, (rng.integers(150, 256),) * 3, 20) if rng.random() < 0.6 else R.random_rgb(rng)
    if bg_kind == "gradient":
        base = R.gradient_background(rng, n, bgc, R.jitter_colour(rng, bgc, 50))
    else:
        base = R.plain_background(n, bgc)
    img = Image.fromarray(base)
    d = ImageDraw.Draw(img)
    shape = shape or R.SHAPES[int(rng.integers(len(R.SHAPES)))]
    if colour is None:
        names = [c for c in R.COLOURS if abs(R.luminance(R.COLOURS[c]) - R.luminance(bgc)) > 50]
        colour = names[int(rng.integers(len(names)))] if names else "black"
    r = n * rng.uniform(0.075, 0.105) * (1.0 if k > 3 else rng.uniform(1.0, 1.5))
    for cx, cy in place_objects(rng, k, n, r):
        R.draw_shape(d, shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi)),
                     R.jitter_colour(rng, R.COLOURS[colour], 12))
    out = R.finish(img, size)
    if bg_kind == "noisy":
        out = R.add_noise(out, rng, 12.0)
    return out, shape, colour, bg_kind


# ---- land cover (EuroSAT-like), each a pure function of rng and canvas size -------------

def _rot_coords(rng: np.random.Generator, n: int, max_angle: float = math.pi) -> Tuple[np.ndarray, np.ndarray]:
    """Randomly rotated coordinate grid, so layouts (fields, streets) have random orientation."""
    x, y = np.mgrid[0:n, 0:n].astype(np.float64) / n
    t = rng.uniform(-max_angle, max_angle)
    return x * math.cos(t) + y * math.sin(t), -x * math.sin(t) + y * math.cos(t)


def _mottled(rng: np.random.Generator, n: int, c1: R.RGB, c2: R.RGB, cells: int) -> np.ndarray:
    """Two-colour smooth noise: the generic vegetation/ground texture."""
    return R.blend(R.smooth_noise(rng, n, cells), R.jitter_colour(rng, c1, 10), R.jitter_colour(rng, c2, 10))


def _lc_crops(rng: np.random.Generator, n: int) -> np.ndarray:
    u, v = _rot_coords(rng, n)
    edges = np.cumsum(rng.uniform(0.08, 0.25, size=12)) - 0.6
    palette = [(190, 180, 90), (120, 150, 60), (150, 110, 70), (90, 140, 60), (200, 190, 130)]
    idx = np.searchsorted(edges, u)
    cols = np.asarray([R.jitter_colour(rng, palette[int(rng.integers(5))], 15) for _ in range(13)], dtype=np.float64)
    img = cols[idx]
    furrow = 1.0 + 0.08 * np.sin(2 * math.pi * rng.uniform(15, 30) * v)
    return np.clip(img * furrow[..., None], 0, 255).astype(np.uint8)


def _lc_forest(rng: np.random.Generator, n: int) -> np.ndarray:
    img = _mottled(rng, n, (25, 70, 30), (55, 105, 45), int(rng.integers(6, 12))).astype(np.float64)
    crowns = R.smooth_noise(rng, n, int(n / 4))
    return np.clip(img * (0.75 + 0.5 * crowns[..., None]), 0, 255).astype(np.uint8)


def _lc_shrub(rng: np.random.Generator, n: int) -> np.ndarray:
    img = _mottled(rng, n, (120, 115, 70), (90, 110, 55), int(rng.integers(10, 18)))
    dots = rng.random((n, n)) < 0.02
    img[dots] = (img[dots] * 0.5).astype(np.uint8)
    return img


def _lc_background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random vegetated ground used under roads and rivers."""
    choice = int(rng.integers(3))
    if choice == 0:
        return _lc_pasture(rng, n)
    if choice == 1:
        return _lc_crops(rng, n)
    return _lc_shrub(rng, n)


def _lc_highway(rng: np.random.Generator, n: int) -> np.ndarray:
    img = _lc_background(rng, n).astype(np.float64)
    u, v = _rot_coords(rng, n)
    off = rng.uniform(0.3, 0.7)
    w = rng.uniform(0.035, 0.065)
    dist = np.abs(u - (u.min() + off * (u.max() - u.min())))
    road = (dist < w)[..., None]
    edge = ((dist >= w) & (dist < w * 1.35))[..., None]
    grey = np.asarray(R.jitter_colour(rng, (125, 125, 125), 15), dtype=np.float64)
    img = np.where(road, grey, img)
    img = np.where(edge, grey * 1.3, img)
    return np.clip(img, 0, 255).astype(np.uint8)


def _blocks(rng: np.random.Generator, n: int, freq: float, gap: float, fill_p: float,
            palette: List[R.RGB], street: R.RGB, max_angle: float) -> np.ndarray:
    """Grid of rectangular roofs separated by streets (residential/industrial layouts)."""
    u, v = _rot_coords(rng, n, max_angle)
    gu, gv = u * freq + 10, v * freq * rng.uniform(0.7, 1.3) + 10
    iu, iv = np.floor(gu).astype(np.int64), np.floor(gv).astype(np.int64)
    fu, fv = gu - iu, gv - iv
    inside = (fu > gap) & (fu < 1 - gap) & (fv > gap) & (fv < 1 - gap)
    ids = (iu * 131 + iv * 17) % 997
    table = np.asarray([R.jitter_colour(rng, palette[int(rng.integers(len(palette)))], 18) for _ in range(997)],
                       dtype=np.float64)
    present = rng.random(997) < fill_p
    roof = inside & present[ids]
    img = np.empty((n, n, 3), dtype=np.float64)
    img[...] = np.asarray(R.jitter_colour(rng, street, 12), dtype=np.float64)
    img[roof] = table[ids[roof]]
    return np.clip(img, 0, 255).astype(np.uint8)


def _lc_industrial(rng: np.random.Generator, n: int) -> np.ndarray:
    return _blocks(rng, n, rng.uniform(1.8, 3.0), 0.08, 0.8,
                   [(200, 200, 200), (170, 175, 185), (230, 230, 225), (140, 150, 160)], (110, 105, 100), 0.3)


def _lc_residential(rng: np.random.Generator, n: int) -> np.ndarray:
    img = _blocks(rng, n, rng.uniform(6.0, 9.0), 0.2, 0.85,
                  [(170, 70, 55), (120, 90, 80), (150, 150, 150), (190, 120, 90)], (110, 130, 90), 0.4)
    return img


def _lc_pasture(rng: np.random.Generator, n: int) -> np.ndarray:
    return _mottled(rng, n, (130, 170, 80), (150, 185, 95), int(rng.integers(2, 5)))


def _lc_orchard(rng: np.random.Generator, n: int) -> np.ndarray:
    base = _mottled(rng, n, (150, 130, 90), (130, 140, 80), 4).astype(np.float64)
    u, v = _rot_coords(rng, n, 0.5)
    f = rng.uniform(7, 11)
    du, dv = (u * f) % 1.0 - 0.5, (v * f) % 1.0 - 0.5
    tree = (np.sqrt(du ** 2 + dv ** 2) < rng.uniform(0.22, 0.32))[..., None]
    green = np.asarray(R.jitter_colour(rng, (45, 95, 40), 12), dtype=np.float64)
    return np.clip(np.where(tree, green, base), 0, 255).astype(np.uint8)


def _lc_river(rng: np.random.Generator, n: int) -> np.ndarray:
    img = _lc_background(rng, n).astype(np.float64)
    u, v = _rot_coords(rng, n)
    centre = (u.min() + u.max()) / 2 + 0.12 * np.sin(2 * math.pi * rng.uniform(0.6, 1.6) * v + rng.uniform(0, 6))
    w = rng.uniform(0.05, 0.11)
    water = (np.abs(u - centre) < w)[..., None]
    blue = np.asarray(R.jitter_colour(rng, (40, 70, 110), 15), dtype=np.float64)
    return np.clip(np.where(water, blue, img), 0, 255).astype(np.uint8)


def _lc_lake(rng: np.random.Generator, n: int) -> np.ndarray:
    img = _mottled(rng, n, (25, 60, 110), (40, 90, 130), int(rng.integers(3, 7))).astype(np.float64)
    if rng.random() < 0.4:
        u, _ = _rot_coords(rng, n)
        land = (u > u.max() - rng.uniform(0.1, 0.3))[..., None]
        img = np.where(land, _lc_background(rng, n).astype(np.float64), img)
    return np.clip(img, 0, 255).astype(np.uint8)


_LANDCOVER_FNS: Tuple[Callable[[np.random.Generator, int], np.ndarray], ...] = (
    _lc_crops, _lc_forest, _lc_shrub, _lc_highway, _lc_industrial,
    _lc_pasture, _lc_orchard, _lc_residential, _lc_river, _lc_lake,
)


def draw_landcover(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """EuroSAT-like tile of land-cover class ``label`` with sensor noise and brightness drift."""
    n = size * R.SUPERSAMPLE
    img = _LANDCOVER_FNS[label](rng, n).astype(np.float64)
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-15, 15)
    out = R.finish(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), size)
    return R.add_noise(out, rng, float(rng.uniform(2, 8)))


SYNTHETIC_DRAW: Dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "syn_housenum": draw_housenum,
    "syn_textures": draw_texture_task,
    "syn_signs": draw_sign,
    "syn_landcover": draw_landcover,
    "syn_counts": draw_counts,
}
