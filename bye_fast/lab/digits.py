"""Digit images: scikit-learn's bundled handwritten digits on textured backgrounds.

No download: ``sklearn.datasets.load_digits`` ships 1797 grey 8 x 8 digits.
Each is drawn bilinearly upscaled (about 60-76 pixels tall) in a light colour
over a muted, textured 96 x 96 background (the backgrounds of
:mod:`bye_fast.lab.scenes`), jittered around the centre. A picture depends
only on the digit and a seed, so a split is reproducible.

Questions on these images (see :mod:`bye_fast.lab.tasks`): "what digit is
this ?" (pre-training), "is it even or odd ?" (the binary task) and "which
digit comes next ?" (the ten-answer task).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from bye_fast.lab.scenes import SIZE, TEXTURES, Scene, _muted, _texture

__all__ = ["N_DIGITS", "digit_image", "digit_images", "load_digits"]

N_DIGITS = 1797


@lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) with values 0..16, labels (1797,)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digit_image(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One (8, 8) digit (values 0..16) as a uint8 (SIZE, SIZE, 3) picture."""
    return _digit_picture(digit, rng)[0]


def _digit_picture(digit: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The picture and its background texture."""
    side = int(rng.integers(60, 77))
    alpha = (
        np.asarray(
            Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR),
            dtype=np.float32,
        )[..., None]
        / 255.0
    )
    scene = Scene(
        TEXTURES[int(rng.integers(len(TEXTURES)))], (_muted(rng), _muted(rng)), int(rng.integers(2**31)), ()
    )
    img = _texture(scene)
    ink = np.array([rng.integers(215, 256) for _ in range(3)], dtype=np.float32)
    slack = (SIZE - side) // 2
    y0 = slack + int(rng.integers(-8, 9))
    x0 = slack + int(rng.integers(-8, 9))
    y0, x0 = int(np.clip(y0, 0, SIZE - side)), int(np.clip(x0, 0, SIZE - side))
    region = img[y0 : y0 + side, x0 : x0 + side]
    region[:] = alpha * ink + (1.0 - alpha) * region
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), scene.texture


def digit_images(index: np.ndarray, seed: int, *, textures: bool = False):
    """Pictures of the digits ``index`` (into :func:`load_digits`), picture ``k`` drawn from ``(seed, k)``.

    With ``textures`` also the background texture of each picture (for vision pre-training).
    """
    images, _ = load_digits()
    out = np.empty((len(index), SIZE, SIZE, 3), np.uint8)
    tex = []
    for k, i in enumerate(np.asarray(index)):
        out[k], t = _digit_picture(images[int(i)], np.random.default_rng([seed, k, 7]))
        tex.append(t)
    return (out, tex) if textures else out
