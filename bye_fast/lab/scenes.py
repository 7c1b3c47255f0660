"""Procedural scenes: RGB images of coloured objects on textured backgrounds, and questions about them.

No download: everything is drawn with numpy from a seed. A scene is a
``SIZE`` x ``SIZE`` (96 x 96) uint8 image on a 3 x 3 grid of 32-pixel slots:
a muted, textured background (plain, stripes, dots, grid or noise) and 1-4
objects in distinct slots, each with its own colour and its own shape
(circle, square, triangle, cross, or a handwritten digit from scikit-learn's
bundled set), small or big, jittered inside its slot. Because colours and
shapes are distinct within a scene, "the red object" and "the circle" each
name one object.

Question types (every answer is a short phrase of the closed vocabulary
:data:`WORDS`):

=========  ==========================================  ==============================
type       question                                     answers
=========  ==========================================  ==============================
colour     what colour is the {shape} ?                 6 colours
shape      what shape is the {colour} object ?          5 shapes
count      how many objects are there ?                 one ... four
position   where is the {colour} {shape} ?              left, right, top, bottom, middle
exists     is there a {colour} {shape} ?                yes, no
caption    describe the image .                         "a red circle on dots", "three objects on grid"
=========  ==========================================  ==============================

``position`` is read off the object's slot: the left column is "left", the
right column "right", else the top row "top", the bottom row "bottom", and the
centre slot "middle". The caption names the object of a one-object scene, or
the count of a busier one, and the background texture (2-5 words).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLOURS",
    "NUMBER_WORDS",
    "POSITIONS",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZE",
    "TEXTURES",
    "WORDS",
    "Scene",
    "ask",
    "make_scene",
    "render",
    "render_with_labels",
    "scene_samples",
    "vision_targets",
]

#: Side of a scene image in pixels.
SIZE = 96
_SLOT = SIZE // 3

#: Object colours (RGB, saturated so that they stand out from the muted backgrounds).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 220, 30),
    "purple": (160, 55, 210),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "digit")
TEXTURES = ("plain", "stripes", "dots", "grid", "noise")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("colour", "shape", "count", "position", "exists", "caption")
_SIZES = {"small": (16, 21), "big": (26, 30)}

#: Every word a scene question or answer uses.
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        "what colour is the shape object ? how many objects are there where is there a describe image . "
        "on yes no left right top bottom middle".split()
        + list(COLOURS)
        + list(SHAPES)
        + list(TEXTURES)
        + list(NUMBER_WORDS)
    )
)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: int  # side of the object's bounding box, pixels
    slot: tuple[int, int]  # (row, column) in the 3 x 3 grid
    centre: tuple[int, int]  # (y, x) pixel centre
    digit: int = -1  # index into scikit-learn's digits for shape "digit"

    @property
    def position(self) -> str:
        r, c = self.slot
        if c != 1:
            return "left" if c == 0 else "right"
        if r != 1:
            return "top" if r == 0 else "bottom"
        return "middle"


@dataclass(frozen=True)
class Scene:
    """What is in one image (enough to render it and to answer every question)."""

    texture: str
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # base and pattern colours
    texture_seed: int
    objects: tuple[SceneObject, ...]


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    """A greyish colour: values 60-170, channels within 35 of each other."""
    base = rng.integers(70, 150)
    return tuple(int(np.clip(base + rng.integers(-20, 21), 60, 170)) for _ in range(3))


def make_scene(rng: np.random.Generator, n_objects: int | None = None, *, digits: np.ndarray) -> Scene:
    """A random scene; ``digits`` is scikit-learn's ``load_digits().images`` (n, 8, 8)."""
    n = int(rng.integers(1, 5)) if n_objects is None else int(n_objects)
    if not 1 <= n <= 4:
        raise ValueError(f"a scene has 1-4 objects; got {n}")
    slots = rng.choice(9, size=n, replace=False)
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    objects = []
    for slot, ci, si in zip(slots, colours, shapes, strict=True):
        lo, hi = _SIZES["big" if rng.random() < 0.5 else "small"]
        size = int(rng.integers(lo, hi + 1))
        r, c = divmod(int(slot), 3)
        slack = (_SLOT - size) // 2
        cy = r * _SLOT + _SLOT // 2 + int(rng.integers(-slack, slack + 1))
        cx = c * _SLOT + _SLOT // 2 + int(rng.integers(-slack, slack + 1))
        shape = SHAPES[si]
        digit = int(rng.integers(len(digits))) if shape == "digit" else -1
        objects.append(SceneObject(list(COLOURS)[ci], shape, size, (r, c), (cy, cx), digit))
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    return Scene(texture, (_muted(rng), _muted(rng)), int(rng.integers(2**31)), tuple(objects))


# --------------------------------------------------------------------------- rendering
def _texture(scene: Scene) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    base, other = (np.array(c, dtype=np.float32) for c in scene.background)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    period = int(rng.integers(6, 13))
    if scene.texture == "plain":
        mask = np.zeros((SIZE, SIZE), bool)
    elif scene.texture == "stripes":
        direction = int(rng.integers(3))
        coord = (yy, xx, yy + xx)[direction]
        mask = (coord // (period // 2)) % 2 == 0
    elif scene.texture == "dots":
        oy, ox = rng.integers(period, size=2)
        mask = (((yy + oy) % period - period / 2) ** 2 + ((xx + ox) % period - period / 2) ** 2) < (
            period / 4
        ) ** 2
    elif scene.texture == "grid":
        oy, ox = rng.integers(period, size=2)
        mask = ((yy + oy) % period < 2) | ((xx + ox) % period < 2)
    elif scene.texture == "noise":
        coarse = rng.random((SIZE // 8 + 1, SIZE // 8 + 1))
        mask = coarse.repeat(8, 0).repeat(8, 1)[:SIZE, :SIZE] < 0.5
    else:  # pragma: no cover - make_scene picks from TEXTURES
        raise ValueError(f"unknown texture {scene.texture!r}")
    img = np.where(mask[..., None], other, base)
    img += rng.normal(0.0, 6.0, size=img.shape)  # sensor-like grain
    return img


def _shape_mask(obj: SceneObject, digits: np.ndarray) -> np.ndarray:
    s = obj.size
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    c = s / 2
    if obj.shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c**2
    if obj.shape == "square":
        return np.ones((s, s), bool)
    if obj.shape == "triangle":  # apex up
        return (yy >= s - 2 * s * np.minimum(xx, s - xx) / s) & (yy <= s)
    if obj.shape == "cross":
        w = s / 3
        return (np.abs(yy - c) <= w / 2 + 0.5) | (np.abs(xx - c) <= w / 2 + 0.5)
    if obj.shape == "digit":
        d = digits[obj.digit] / 16.0  # (8, 8) in [0, 1]
        idx = np.minimum((np.arange(s) * 8) // s, 7)
        return d[np.ix_(idx, idx)] > 0.35
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, digits: np.ndarray) -> np.ndarray:
    """The scene as a uint8 (SIZE, SIZE, 3) image."""
    return render_with_labels(scene, digits)[0]


def render_with_labels(scene: Scene, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scene as a uint8 (SIZE, SIZE, 3) image and an int (SIZE, SIZE) map of which object
    (index into ``scene.objects``) each pixel shows, -1 for the background."""
    img = _texture(scene)
    labels = np.full((SIZE, SIZE), -1, np.int64)
    for k, obj in enumerate(scene.objects):
        mask = _shape_mask(obj, digits)
        y0 = obj.centre[0] - obj.size // 2
        x0 = obj.centre[1] - obj.size // 2
        region = img[y0 : y0 + obj.size, x0 : x0 + obj.size]
        region[mask] = np.array(COLOURS[obj.colour], dtype=np.float32)
        labels[y0 : y0 + obj.size, x0 : x0 + obj.size][mask] = k
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


# --------------------------------------------------------------------------- questions
def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    """A ``(question, answer)`` of type ``qtype`` about ``scene``."""
    objs = scene.objects
    obj = objs[int(rng.integers(len(objs)))]
    if qtype == "colour":
        return f"what colour is the {obj.shape} ?", obj.colour
    if qtype == "shape":
        return f"what shape is the {obj.colour} object ?", obj.shape
    if qtype == "count":
        return "how many objects are there ?", NUMBER_WORDS[len(objs)]
    if qtype == "position":
        return f"where is the {obj.colour} {obj.shape} ?", obj.position
    if qtype == "exists":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            return f"is there a {obj.colour} {obj.shape} ?", "yes"
        # a colour and a shape that are each in the scene, but not together (or absent ones)
        while True:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if (colour, shape) not in present:
                return f"is there a {colour} {shape} ?", "no"
    if qtype == "caption":
        if len(objs) == 1:
            return "describe the image .", f"a {obj.colour} {obj.shape} on {scene.texture}"
        return "describe the image .", f"{NUMBER_WORDS[len(objs)]} objects on {scene.texture}"
    raise ValueError(f"unknown question type {qtype!r}; valid: {', '.join(QUESTION_TYPES)}")


def scene_samples(
    seed: int, n: int, qtypes: Sequence[str], digits: np.ndarray, *, patch: int = 0
) -> tuple[np.ndarray, list[tuple[str, str, str]], list[dict] | None]:
    """``n`` scenes of the stream ``seed``, each with one question of a type drawn from ``qtypes``.

    Returns the uint8 images ``(n, SIZE, SIZE, 3)``, ``(qtype, question, answer)`` per image and,
    with ``patch`` > 0, the :func:`vision_targets` of each image (else None). Sample ``k``
    depends only on ``(seed, k)`` and ``qtypes``.
    """
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    qa = []
    targets = [] if patch else None
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        scene = make_scene(rng, digits=digits)
        qtype = qtypes[int(rng.integers(len(qtypes)))]
        images[k], which = render_with_labels(scene, digits)
        qa.append((qtype, *ask(scene, qtype, rng)))
        if patch:
            targets.append(vision_targets(scene, which, patch))
    return images, qa, targets


POSITIONS = ("left", "right", "top", "bottom", "middle")


def vision_targets(scene: Scene, which: np.ndarray, patch: int) -> dict[str, np.ndarray]:
    """What a vision tower is pre-trained to see in a rendered scene (``which`` from
    :func:`render_with_labels`), as a CLIP-style encoder sees objects and layout:

    * ``cells`` (g*g, 2): per ``patch`` x ``patch`` patch the colour and the shape of the object
      covering at least a quarter of it (1-based; 0 = background);
    * ``pairs`` (colours * shapes,): for every (colour, shape) pair 0 if absent, else 1 + the
      index of its position in :data:`POSITIONS`;
    * ``count``: number of objects - 1; ``texture``: index into :data:`TEXTURES`.
    """
    g = SIZE // patch
    blocks = which.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    cells = np.zeros((g * g, 2), np.int64)
    pairs = np.zeros(len(COLOURS) * len(SHAPES), np.int64)
    colours = list(COLOURS)
    for j, obj in enumerate(scene.objects):
        ci, si = colours.index(obj.colour), SHAPES.index(obj.shape)
        cells[(blocks == j).mean(-1) >= 0.25] = (ci + 1, si + 1)
        pairs[ci * len(SHAPES) + si] = 1 + POSITIONS.index(obj.position)
    return {"cells": cells, "pairs": pairs, "count": np.int64(len(scene.objects) - 1),
            "texture": np.int64(TEXTURES.index(scene.texture))}  # fmt: skip
