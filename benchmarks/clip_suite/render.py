"""Procedural drawing primitives shared by the task generators and the pretraining mixture.

Everything is a pure function of an explicit ``numpy.random.Generator`` so that the whole
suite is reproducible from one seed.  Images are drawn on a supersampled canvas and
downsampled at the end, which gives anti-aliased edges at the tiny final resolutions.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

RGB = Tuple[int, int, int]

SUPERSAMPLE = 3

COLOURS: Dict[str, RGB] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 40),
    "orange": (245, 140, 30),
    "purple": (135, 55, 175),
    "pink": (245, 135, 190),
    "cyan": (40, 200, 215),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (125, 75, 35),
}

POSITIONS: Dict[str, Tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}

SHAPES: Tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "diamond",
    "hexagon", "ring", "pentagon", "arrow", "heart", "octagon",
)

# Font file names present both in Debian's fonts-dejavu and in matplotlib's bundled copy.
# matplotlib's copy is preferred: it is there wherever the builder's dependencies are (the GPU
# machine has no system fonts), and Debian's files differ from it byte for byte.
FONT_NAMES: Tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
)
SYSTEM_FONT_DIRS: List[str] = ["/usr/share/fonts/truetype/dejavu"]

_FONT_DIR_OVERRIDE: List[str] = []


def set_font_dir(path: Optional[str]) -> None:
    """Let the CLI point at a font folder; a module global because workers fork from here."""
    _FONT_DIR_OVERRIDE.clear()
    if path:
        _FONT_DIR_OVERRIDE.append(str(path))
    font_path.cache_clear()
    load_font.cache_clear()


def matplotlib_font_dir() -> Optional[Path]:
    """matplotlib's bundled TrueType folder (DejaVu included), or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    return Path(os.path.dirname(matplotlib.__file__)) / "mpl-data" / "fonts" / "ttf"


def _font_dirs() -> List[Path]:
    """Candidate folders for the DejaVu fonts: --fonts-dir, matplotlib's copy, the system's."""
    dirs = [Path(p) for p in _FONT_DIR_OVERRIDE]
    mpl = matplotlib_font_dir()
    if mpl is not None:
        dirs.append(mpl)
    dirs += [Path(p) for p in SYSTEM_FONT_DIRS]
    return dirs


def font_sources(names: Sequence[str] = FONT_NAMES) -> Dict[str, Optional[str]]:
    """Which file each font resolved to (None: Pillow's built-in font), for the manifest."""
    return {n: font_path(n) for n in names}


@lru_cache(maxsize=None)
def font_path(name: str) -> Optional[str]:
    """Resolve a DejaVu file name to a path, or None when no copy exists on this machine."""
    for d in _font_dirs():
        p = d / name
        if p.is_file():
            return str(p)
    return None


def available_fonts(names: Sequence[str] = FONT_NAMES) -> List[str]:
    """The subset of ``names`` that resolve; the manifest records it because it affects pixels."""
    return [n for n in names if font_path(n) is not None]


@lru_cache(maxsize=4096)
def load_font(name: str, size: int) -> ImageFont.ImageFont:
    """Cached TrueType font; falls back to Pillow's bundled font so rendering never fails."""
    p = font_path(name)
    if p is not None:
        return ImageFont.truetype(p, size)
    return ImageFont.load_default(size=size)


def jitter_colour(rng: np.random.Generator, rgb: RGB, amount: float = 18.0) -> RGB:
    """Small per-channel noise so a colour name covers a neighbourhood, not one exact value."""
    c = np.asarray(rgb, dtype=np.float64) + rng.normal(0.0, amount, size=3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def random_rgb(rng: np.random.Generator) -> RGB:
    """Uniform random colour for nuisance elements (backgrounds, clutter)."""
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def luminance(rgb: Sequence[float]) -> float:
    """Perceptual brightness, used to keep foreground/background legible."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def contrasting_pair(rng: np.random.Generator, min_diff: float = 90.0) -> Tuple[RGB, RGB]:
    """Random (foreground, background) colours that differ enough in brightness to be readable."""
    while True:
        fg, bg = random_rgb(rng), random_rgb(rng)
        if abs(luminance(fg) - luminance(bg)) >= min_diff:
            return fg, bg


def finish(canvas: Image.Image, size: int) -> np.ndarray:
    """Downsample a supersampled canvas to the final ``size`` x ``size`` uint8 RGB array."""
    img = canvas.convert("RGB").resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 HxWx3 array to an RGB PIL image (the on-disk dataset format)."""
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize a grey or RGB uint8 image to ``size`` x ``size`` RGB with an antialiasing filter."""
    img = Image.fromarray(arr)
    img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------

def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float) -> List[Tuple[float, float]]:
    """Vertices of a regular n-gon, the building block of most named shapes."""
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _rotate(points: List[Tuple[float, float]], cx: float, cy: float, angle: float) -> List[Tuple[float, float]]:
    """Rotate polygon points about the shape centre so orientation is a nuisance variable."""
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * ca - (y - cy) * sa, cy + (x - cx) * sa + (y - cy) * ca) for x, y in points]


def shape_polygon(name: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    """Outline of a named polygonal shape (circle/ring are drawn as ellipses instead)."""
    if name == "square":
        return _regular_polygon(cx, cy, r, 4, angle + math.pi / 4)
    if name == "diamond":
        pts = [(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]
        return _rotate(pts, cx, cy, angle * 0.2)
    if name == "triangle":
        return _regular_polygon(cx, cy, r, 3, angle - math.pi / 2)
    if name == "pentagon":
        return _regular_polygon(cx, cy, r, 5, angle - math.pi / 2)
    if name == "hexagon":
        return _regular_polygon(cx, cy, r, 6, angle)
    if name == "octagon":
        return _regular_polygon(cx, cy, r, 8, angle + math.pi / 8)
    if name == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.42 * r
            a = angle - math.pi / 2 + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if name == "cross":
        w = 0.33 * r
        pts = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
               (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
               (cx - r, cy - w), (cx - w, cy - w)]
        return _rotate(pts, cx, cy, angle)
    if name == "arrow":
        pts = [(cx - r, cy - 0.25 * r), (cx + 0.1 * r, cy - 0.25 * r), (cx + 0.1 * r, cy - 0.7 * r),
               (cx + r, cy), (cx + 0.1 * r, cy + 0.7 * r), (cx + 0.1 * r, cy + 0.25 * r), (cx - r, cy + 0.25 * r)]
        return _rotate(pts, cx, cy, angle)
    if name == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((cx + r * x / 17.0, cy + r * y / 17.0))
        return _rotate(pts, cx, cy, angle * 0.25)
    raise ValueError(f"not a polygonal shape: {name}")


def draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float,
               angle: float, fill: RGB, outline_only: bool = False) -> None:
    """Draw one named shape; ``outline_only`` gives a style shift used by some tasks."""
    width = max(1, int(r * 0.22))
    if name in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        if name == "ring" or outline_only:
            draw.ellipse(box, outline=fill, width=max(width, int(r * 0.3)) if name == "ring" else width)
        else:
            draw.ellipse(box, fill=fill)
        return
    pts = shape_polygon(name, cx, cy, r, angle)
    if outline_only:
        draw.line(pts + [pts[0]], fill=fill, width=width, joint="curve")
    else:
        draw.polygon(pts, fill=fill)


# ----------------------------------------------------------------------------------------
# Textures and backgrounds (numpy, canvas resolution)
# ----------------------------------------------------------------------------------------

def _coords(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel coordinate grids normalised to [0, 1)."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float64) / n
    return x, y


def smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    small = (rng.random((cells, cells)) * 255).astype(np.uint8)
    big = Image.fromarray(small).resize((n, n), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float64) / 255.0


def blend(mask: np.ndarray, c1: Sequence[float], c2: Sequence[float]) -> np.ndarray:
    """Two-colour image from a [0,1] mask; the common output path of all textures."""
    m = np.clip(mask, 0.0, 1.0)[..., None]
    out = m * np.asarray(c1, dtype=np.float64) + (1.0 - m) * np.asarray(c2, dtype=np.float64)
    return np.clip(out, 0, 255).astype(np.uint8)


def _soft(v: np.ndarray, sharp: float = 8.0) -> np.ndarray:
    """Soft threshold at zero, so stripes are anti-aliased before the final downsample."""
    return 1.0 / (1.0 + np.exp(-sharp * v))


def texture_mask(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """A [0,1] mask for one texture kind, with random scale/orientation as nuisance."""
    x, y = _coords(n)
    theta = rng.uniform(0, math.pi)
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    freq = rng.uniform(3.0, 6.5)
    if kind == "banded":
        return _soft(np.sin(2 * math.pi * freq * u))
    if kind == "wavy":
        amp = rng.uniform(0.04, 0.09)
        return _soft(np.sin(2 * math.pi * freq * (u + amp * np.sin(2 * math.pi * rng.uniform(1.5, 3) * v))))
    if kind == "zigzagged":
        tri = np.abs(((v * freq * 1.2) % 1.0) - 0.5) * 2.0
        return _soft(np.sin(2 * math.pi * freq * (u + 0.12 * tri)))
    if kind == "chequered":
        f = freq * 0.7
        return _soft(np.sin(2 * math.pi * f * u) * np.sin(2 * math.pi * f * v), 12.0)
    if kind == "grid":
        f = freq * 0.8
        lu = np.abs(((u * f) % 1.0) - 0.5)
        lv = np.abs(((v * f) % 1.0) - 0.5)
        w = rng.uniform(0.36, 0.42)
        return np.maximum(_soft((lu - w) * 20, 4.0), _soft((lv - w) * 20, 4.0))
    if kind == "crosshatched":
        f = freq * 1.3
        a = np.abs(((((x + y) / math.sqrt(2)) * f) % 1.0) - 0.5)
        b = np.abs(((((x - y) / math.sqrt(2)) * f) % 1.0) - 0.5)
        return np.maximum(_soft((a - 0.4) * 25, 4.0), _soft((b - 0.4) * 25, 4.0))
    if kind == "dotted":
        f = freq * 0.9
        du = ((u * f) % 1.0) - 0.5
        dv = ((v * f) % 1.0) - 0.5
        r = rng.uniform(0.18, 0.3)
        return _soft((r - np.sqrt(du ** 2 + dv ** 2)) * 30, 4.0)
    if kind == "concentric":
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return _soft(np.sin(2 * math.pi * freq * 1.3 * d))
    if kind == "blotchy":
        noise = smooth_noise(rng, n, int(rng.integers(3, 6)))
        return _soft((noise - 0.5) * 3.0)
    if kind == "speckled":
        noise = rng.random((n, n))
        dens = rng.uniform(0.03, 0.08)
        return (noise < dens).astype(np.float64)
    raise ValueError(f"unknown texture {kind}")


def texture_image(kind: str, rng: np.random.Generator, n: int,
                  c1: Optional[RGB] = None, c2: Optional[RGB] = None) -> np.ndarray:
    """A two-colour texture of ``kind`` at canvas size ``n`` (random colours unless given)."""
    if c1 is None or c2 is None:
        c1, c2 = contrasting_pair(rng, 60.0)
    return blend(texture_mask(kind, rng, n), c1, c2)


def add_noise(arr: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian pixel noise: a cheap nuisance that breaks exact-colour shortcuts."""
    if sigma <= 0:
        return arr
    out = arr.astype(np.float64) + rng.normal(0.0, sigma, size=arr.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def gradient_background(rng: np.random.Generator, n: int, c1: RGB, c2: RGB) -> np.ndarray:
    """Linear gradient in a random direction (lighting-like variation)."""
    x, y = _coords(n)
    theta = rng.uniform(0, 2 * math.pi)
    t = (x - 0.5) * math.cos(theta) + (y - 0.5) * math.sin(theta) + 0.5
    return blend(t, c1, c2)


def plain_background(n: int, c: RGB) -> np.ndarray:
    """Uniform colour canvas."""
    out = np.empty((n, n, 3), dtype=np.uint8)
    out[...] = np.asarray(c, dtype=np.uint8)
    return out


def clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int, count: int) -> None:
    """Random rectangles/lines in random colours: distractors like real-world background."""
    for _ in range(count):
        x0, y0 = rng.uniform(-0.1, 1.0, size=2) * n
        w, h = rng.uniform(0.05, 0.4, size=2) * n
        col = random_rgb(rng)
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=col)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=col, width=int(max(1, n * 0.03)))


# ----------------------------------------------------------------------------------------
# Glyphs
# ----------------------------------------------------------------------------------------

def draw_text_centered(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont,
                       cx: float, cy: float, fill: RGB) -> None:
    """Draw ``text`` centred on (cx, cy) using the font's real ink box."""
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    draw.text((cx - (l + r) / 2.0, cy - (t + b) / 2.0), text, font=font, fill=fill)


def glyph_layer(text: str, font_name: str, n: int, height_frac: float, angle: float,
                cx: float = 0.5, cy: float = 0.5) -> Image.Image:
    """Greyscale coverage mask ('L') of rotated text; composited later onto any background."""
    layer = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(layer)
    size = max(4, int(n * height_frac))
    font = load_font(font_name, size)
    draw_text_centered(d, text, font, cx * n, cy * n, 255)
    if angle:
        layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx * n, cy * n))
    return layer


def fit_text_font(text: str, font_name: str, max_w: float, max_h: float) -> ImageFont.ImageFont:
    """Largest font size whose rendering of ``text`` fits a box (rendered-word images)."""
    size = max(4, int(max_h))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    while size > 4:
        font = load_font(font_name, size)
        l, t, r, b = probe.textbbox((0, 0), text, font=font)
        if r - l <= max_w and b - t <= max_h:
            return font
        size = int(size * 0.85)
    return load_font(font_name, 4)


def composite(base: np.ndarray, mask: Image.Image, colour: RGB) -> np.ndarray:
    """Paint ``colour`` through a coverage mask onto a canvas array."""
    m = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    out = base.astype(np.float64) * (1 - m) + m * np.asarray(colour, dtype=np.float64)
    return np.clip(out, 0, 255).astype(np.uint8)


def maybe_blur(img: Image.Image, rng: np.random.Generator, p: float, max_radius: float) -> Image.Image:
    """Random Gaussian blur (camera defocus) applied with probability ``p``."""
    if rng.random() < p:
        return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, max_radius))))
    return img


DrawFn = Callable[[np.random.Generator, int], np.ndarray]
