"""The broad image-caption mixture used for contrastive pretraining.

Design goal: give the model real zero-shot ability (colour, shape, texture, glyph, count,
clothing and aerial vocabulary grounded in pixels) *without* containing the eval tasks:

* digits/letters are seen only as clean glyphs on plain backgrounds (never on signs, among
  distractor digits, or as handwriting);
* for Fashion-MNIST, scenes, textures and land cover only the classes listed in
  ``TaskSpec.pretrain_named`` are named; the others appear with generic captions, and real
  images come from pixels no task split uses;
* counts above three are captioned "several"/"many";
* every class name of every task also appears as rendered text ("the word sandal"), so the
  text tower has seen the words even where it never saw the objects.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from . import render as R
from .data import Resources, _WORKER_RES, chunk_rng, parallel_map, scene_patch
from .tasks import (LANDCOVER, NUMBER_WORDS, TASKS, TASKS_BY_NAME, TEXTURE_KINDS,
                    draw_landcover, draw_objects)

Sample = Tuple[np.ndarray, List[str]]

CAPTIONS_PER_IMAGE = 3
PRETRAIN_STREAM = 7

TEXTURE_SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "banded": ("banded", "striped"),
    "dotted": ("dotted", "polka dot"),
    "chequered": ("chequered", "checkered", "checkerboard"),
    "grid": ("grid",),
    "speckled": ("speckled",),
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SIZE_WORDS = ("small", "big", "large", "tiny", "")
EXTRA_WORDS = ("hello", "stop", "exit", "open", "sale", "north", "photo", "image", "cat", "tree", "car", "house")


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _fill(rng: np.random.Generator, templates: Sequence[str], k: int, **kw: str) -> List[str]:
    """``k`` captions from random templates; whitespace tidied after empty slots."""
    return [" ".join(_pick(rng, templates).format(**kw).split()) for _ in range(k)]


def _two_colours(rng: np.random.Generator, min_diff: float = 60.0) -> Tuple[str, str]:
    """Two named colours that are distinguishable in brightness (for legible glyphs/textures)."""
    names = list(R.COLOURS)
    while True:
        a, b = _pick(rng, names), _pick(rng, names)
        if a != b and abs(R.luminance(R.COLOURS[a]) - R.luminance(R.COLOURS[b])) >= min_diff:
            return a, b


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def pt_single_shape(rng: np.random.Generator, size: int, res: Resources, k: int) -> Sample:
    """One named shape at a named position, on a plain or named-texture background."""
    n = size * R.SUPERSAMPLE
    colour, bgname = _two_colours(rng, 50)
    tex_kinds = list(TEXTURE_SYNONYMS)
    use_tex = rng.random() < 0.35
    if use_tex:
        kind = _pick(rng, tex_kinds)
        c1, c2 = R.jitter_colour(rng, R.COLOURS[bgname]), R.jitter_colour(rng, R.COLOURS[bgname], 60)
        base = R.texture_image(kind, rng, n, c1, c2)
        bg_word = f"{_pick(rng, TEXTURE_SYNONYMS[kind])}"
    else:
        base = R.plain_background(n, R.jitter_colour(rng, R.COLOURS[bgname]))
        bg_word = bgname
    img = Image.fromarray(base)
    pos = _pick(rng, list(R.POSITIONS))
    px, py = R.POSITIONS[pos]
    r = n * rng.uniform(0.13, 0.2)
    shape = _pick(rng, R.SHAPES)
    R.draw_shape(ImageDraw.Draw(img), shape, (px + rng.uniform(-0.05, 0.05)) * n,
                 (py + rng.uniform(-0.05, 0.05)) * n, r, float(rng.uniform(0, 2 * math.pi)),
                 R.jitter_colour(rng, R.COLOURS[colour]))
    out = R.finish(img, size)
    sz = _pick(rng, SIZE_WORDS)
    templates = (
        "a {sz} {c} {s} in the {p}.", "a {c} {s} on a {b} background.", "a {s}.",
        "a photo of a {c} {s}.", "the {p} of the image has a {c} {s}.", "a {c} {s} at the {p}.",
        "one {c} {s}.", "a drawing of a {sz} {s} on a {b} background.", "{c} {s}, {p}.",
    )
    return out, _fill(rng, templates, k, sz=sz, c=colour, s=shape, p=pos, b=bg_word)


def pt_many_shapes(rng: np.random.Generator, size: int, res: Resources, k: int) -> Sample:
    """Several identical objects; counts one to three are named, larger counts are not."""
    count = int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.2, 0.22, 0.22, 0.12, 0.12, 0.12]))
    img, shape, colour, bg = draw_objects(rng, count, size)
    word = NUMBER_WORDS[count] if count <= 3 else _pick(rng, ("several", "many", "some", "a group of"))
    noun = shape if count == 1 else _plural(shape)
    obj = "object" if count == 1 else "objects"
    templates = (
        "{w} {c} {n}.", "{w} {n} on a {b} background.", "a photo of {w} {o}.", "{w} {c} {n} scattered around.",
        "an image with {w} {c} {n}.", "{w} {o}.", "a picture showing {w} {n}.",
    )
    return img, _fill(rng, templates, k, w=word, c=colour, n=noun, b=bg, o=obj)


def pt_glyph(rng: np.random.Generator, size: int, res: Resources, k: int) -> Sample:
    """A clean letter or digit in a random DejaVu face on a plain or gradient background."""
    n = size * R.SUPERSAMPLE
    fg, bgname = _two_colours(rng, 70)
    is_digit = rng.random() < 0.45
    if is_digit:
        d = int(rng.integers(10))
        ch = str(d)
    else:
        ch = _pick(rng, LETTERS)
        if rng.random() < 0.4:
            ch = ch.lower()
    bgc = R.jitter_colour(rng, R.COLOURS[bgname])
    base = (R.gradient_background(rng, n, bgc, R.jitter_colour(rng, bgc, 30)) if rng.random() < 0.3
            else R.plain_background(n, bgc))
    fonts = R.available_fonts() or [R.FONT_NAMES[0]]
    layer = R.glyph_layer(ch, _pick(rng, fonts), n, rng.uniform(0.45, 0.85), float(rng.uniform(-10, 10)),
                          0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08))
    img = R.composite(base, layer, R.jitter_colour(rng, R.COLOURS[fg]))
    out = R.finish(R.maybe_blur(Image.fromarray(img), rng, 0.15, 0.8 * R.SUPERSAMPLE), size)
    if is_digit:
        templates = ("the digit {ch}.", "the number {w}.", 'a photo of the number: "{ch}".',
                     "a {fg} {ch} on a {bg} background.", "the numeral {ch} written in {fg}.",
                     "a picture of the number {ch}.", "{ch}", "the number {ch} in {fg}.")
        return out, _fill(rng, templates, k, ch=ch, w=NUMBER_WORDS[int(ch)], fg=fg, bg=bgname)
    case = "an uppercase" if ch.isupper() else "a lowercase"
    templates = ("the letter {ch}.", "a {fg} letter {ch} on a {bg} background.", "the character {ch}.",
                 "{case} letter {ch}.", "a photo of the letter {ch}.", "letter {ch} in {fg}.", "{ch}")
    return out, _fill(rng, templates, k, ch=ch, fg=fg, bg=bgname, case=case)


def pt_texture(rng: np.random.Generator, size: int, res: Resources, k: int) -> Sample:
    """A texture swatch; only the families in TEXTURE_SYNONYMS are ever named."""
    n = size * R.SUPERSAMPLE
    kind = _pick(rng, TEXTURE_KINDS)
    c1, c2 = _two_colours(rng, 50)
    img = R.texture_image(kind, rng, n, R.jitter_colour(rng, R.COLOURS[c1]), R.jitter_colour(rng, R.COLOURS[c2]))
    out = R.finish(Image.fromarray(img), size)
    if kind in TEXTURE_SYNONYMS:
        templates = ("a {t} pattern.", "a close-up of a {t} texture.", "a {a} and {b} {t} pattern.",
                     "a photo of a {t} surface.", "{a} and {b}, {t}.", "a {t} fabric.")
        return out, _fill(rng, templates, k, t=_pick(rng, TEXTURE_SYNONYMS[kind]), a=c1, b=c2)
    templates = ("an abstract pattern.", "a close-up of a texture.", "a {a} and {b} pattern.",
                 "a repeating pattern in {a} and {b}.")
    return out, _fill(rng, templates, k, a=c1, b=c2)


def pt_fashion(rng: np.random.Generator, size: int, res: Resources, k: int) -> Sample:
    """A Fashion-MNIST image the task splits never use; half of the classes are named."""
    assert res.fashion is not None
    idx = res.fashion_index["pretrain"]
    i = int(idx[int(rng.integers(len(idx)))])
    lab = int(res.fashion.train_labels[i])
    out = R.resize_array(res.fashion.train_images[i], size)
    spec = TASKS_BY_NAME["syn_fashion"]
    if lab in spec.pretrain_named:
        templates = ("a photo of a {c}.", "a grayscale photo of a {c}.", "a {c} on a black background.",
                     "a product photo of a {c}.", "a {c}, clothing.")
        return out, _fill(rng, templates, k, c=spec.classnames[lab])
    templates = ("a grayscale photo of a piece of clothing.", "a product photo.", "a photo of a fashion item.",
                 "something to wear.")
    return out, _fill(rng, templates, k)


def pt_scene(rng: np.random.Generator, size: int, res: Resources, k: int) -> Sample:
    """A patch from the pretraining cells of a skimage photograph; half of the sources are named."""
    names = list(res.scenes)
    lab = int(rng.integers(len(names)))
    cells = res.scene_cells[names[lab]]["pretrain"]
    out = scene_patch(res.scenes[names[lab]], cells[int(rng.integers(len(cells)))], rng, size)
    if lab in TASKS_BY_NAME["syn_scenes"].pretrain_named:
        templates = ("a photo of {c}.", "a close-up photo of the {c}.", "a cropped photo of {c}.", "{c}.")
        return out, _fill(rng, templates, k, c=names[lab])
    return out, _fill(rng, ("a photo.", "a cropped photograph.", "a close-up photo of something."), k)


def pt_landcover(rng: np.random.Generator, size: int, res: Resources, k: int) -> Sample:
    """An aerial tile; only some land-cover classes are named."""
    lab = int(rng.integers(len(LANDCOVER)))
    out = draw_landcover(rng, lab, size)
    if lab in TASKS_BY_NAME["syn_landcover"].pretrain_named:
        templates = ("an aerial view of a {c}.", "a satellite photo of {c}.", "{c} seen from above.",
                     "an aerial photo of the {c}.")
        return out, _fill(rng, templates, k, c=LANDCOVER[lab])
    return out, _fill(rng, ("an aerial photo.", "a satellite image of land.", "the ground seen from above."), k)


def vocabulary_words() -> List[str]:
    """Every class name of every task plus common words: the rendered-text vocabulary."""
    words = {c for t in TASKS for c in t.classnames}
    words |= set(NUMBER_WORDS) | set(R.COLOURS) | set(R.SHAPES) | set(TEXTURE_KINDS) | set(EXTRA_WORDS)
    return sorted(words)


def pt_word(rng: np.random.Generator, size: int, res: Resources, k: int) -> Sample:
    """A word rendered as text: grounds the spelling of every class name, not its appearance."""
    n = size * R.SUPERSAMPLE
    word = _pick(rng, vocabulary_words())
    fg, bg = _two_colours(rng, 80)
    img = Image.fromarray(R.plain_background(n, R.jitter_colour(rng, R.COLOURS[bg])))
    fonts = R.available_fonts() or [R.FONT_NAMES[0]]
    font = R.fit_text_font(word, _pick(rng, fonts), 0.95 * n, 0.6 * n)
    R.draw_text_centered(ImageDraw.Draw(img), word, font, n / 2, n / 2, R.jitter_colour(rng, R.COLOURS[fg]))
    templates = ("the word {w}.", "a sign that says {w}.", 'text that reads "{w}".', "{w} written in {fg}.",
                 "the text {w} on a {bg} background.")
    return R.finish(img, size), _fill(rng, templates, k, w=word, fg=fg, bg=bg)


def pt_noise(rng: np.random.Generator, size: int, res: Resources, k: int) -> Sample:
    """Blank and noise images: teaches 'nothing here' captions, a cheap negative."""
    kind = int(rng.integers(3))
    if kind == 0:
        c = _pick(rng, list(R.COLOURS))
        return R.plain_background(size, R.jitter_colour(rng, R.COLOURS[c])), _fill(
            rng, ("a blank {c} image.", "a plain {c} square.", "solid {c}."), k, c=c)
    if kind == 1:
        img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        return img, _fill(rng, ("random noise.", "static noise.", "a noisy image."), k)
    img = R.blend(R.smooth_noise(rng, size, 3), R.random_rgb(rng), R.random_rgb(rng))
    return img, _fill(rng, ("a blurry abstract image.", "a smooth blur of colours."), k)


PretrainFn = Callable[[np.random.Generator, int, Resources, int], Sample]

# (weight, generator); weights are normalised.  Sources needing absent resources are dropped.
PRETRAIN_SOURCES: Dict[str, Tuple[float, PretrainFn]] = {
    "single_shape": (0.16, pt_single_shape),
    "many_shapes": (0.14, pt_many_shapes),
    "glyph": (0.20, pt_glyph),
    "texture": (0.10, pt_texture),
    "fashion": (0.08, pt_fashion),
    "scene": (0.08, pt_scene),
    "landcover": (0.08, pt_landcover),
    "word": (0.12, pt_word),
    "noise": (0.04, pt_noise),
}


def mixture(res: Resources) -> Dict[str, float]:
    """Normalised source weights for the resources actually loaded."""
    w = {k: v[0] for k, v in PRETRAIN_SOURCES.items() if k != "fashion" or res.fashion is not None}
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def _pretrain_chunk(args: Tuple[int, int, np.ndarray, Tuple[str, ...]]) -> Tuple[np.ndarray, List[List[str]]]:
    """Worker: generate one chunk of the pool; source ids are fixed by the caller."""
    seed, chunk, source_ids, names = args
    res = _WORKER_RES["res"]
    rng = chunk_rng(seed, PRETRAIN_STREAM, chunk)
    imgs, caps = [], []
    for s in source_ids:
        img, c = PRETRAIN_SOURCES[names[s]][1](rng, res.size, res, CAPTIONS_PER_IMAGE)
        imgs.append(img)
        caps.append(c)
    return np.stack(imgs), caps  # type: ignore[return-value]


def build_pretrain_pool(n: int, res: Resources, seed: int, workers: int, chunk: int = 512
                        ) -> Tuple[np.ndarray, List[List[str]], np.ndarray, Tuple[str, ...]]:
    """``n`` images with CAPTIONS_PER_IMAGE captions each, plus each sample's source id."""
    mix = mixture(res)
    names = tuple(mix)
    src = np.random.default_rng([seed, PRETRAIN_STREAM]).choice(len(names), size=n, p=[mix[k] for k in names])
    jobs = [(seed, i, src[i * chunk:(i + 1) * chunk], names) for i in range(math.ceil(n / chunk))]
    parts = parallel_map(_pretrain_chunk, jobs, res, workers)  # type: ignore[arg-type]
    imgs = np.concatenate([p[0] for p in parts])
    caps = [c for p in parts for c in p[1]]
    return imgs, caps, src, names
