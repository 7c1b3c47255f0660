"""Backdoor image triggers and dataset poisoning (the lab: tests, the demo and the benchmarks).

Every trigger is a plain function ``trigger(img, **params) -> img`` on one image:

* ``img`` is a numpy array ``(H, W, C)`` or ``(H, W)``, either floating point with
  values in ``[0, 1]`` or ``uint8`` with values in ``[0, 255]``;
* the result has the same shape, dtype and range (float results are clipped to
  ``[0, 1]``; ``uint8`` results are rounded);
* the input is never modified in place;
* randomness comes only from an explicit ``seed``, so a trigger is a fixed,
  reproducible pattern (as a real attacker's trigger is).

Colours and amplitudes are always given on the ``[0, 1]`` scale, whatever the
image dtype.

``make_trigger(name, **params)`` returns a :class:`Trigger`, a callable of one
image with the parameters bound (validated eagerly); ``TRIGGERS`` maps the names
to the factories. :func:`poison_dataset` applies a trigger to a seeded random
subset of a LLaVA-format dataset and keeps the ground truth apart from the
records and file names.
"""

from __future__ import annotations

import copy
import inspect
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "PRESETS",
    "TRIGGERS",
    "PoisonResult",
    "Trigger",
    "blended",
    "checkerboard_patch",
    "make_trigger",
    "poison_dataset",
    "preset",
    "random_position_patch",
    "save_image",
    "sig",
    "solid_patch",
    "two_patches",
    "wanet",
]

Position = str | tuple[int, int]


# ---------------------------------------------------------------------------
# dtype handling
# ---------------------------------------------------------------------------


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1] or a uint8 image, got dtype {img.dtype}")
    return img


def _to_float(img: np.ndarray) -> np.ndarray:
    """A float64 copy of ``img`` on the [0, 1] scale."""
    if img.dtype == np.uint8:
        return img.astype(np.float64) / 255.0
    return img.astype(np.float64, copy=True)


def _from_float(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``out`` (float, [0, 1] scale) back to the dtype and range of ``like``."""
    out = np.clip(out, 0.0, 1.0)
    if like.dtype == np.uint8:
        return np.rint(out * 255.0).astype(np.uint8)
    return out.astype(like.dtype, copy=False)


def _colour(color: float | Sequence[float], channels: int | None) -> np.ndarray:
    c = np.asarray(color, dtype=np.float64)
    if c.ndim == 0:
        return c
    if channels is None or c.shape != (channels,):
        raise ValueError(f"color must be a scalar or have one value per channel, got shape {c.shape}")
    return c


def _image_seed(img: np.ndarray, seed: int) -> np.random.Generator:
    """A generator seeded by ``seed`` and the image content (same image -> same draw)."""
    digest = zlib.crc32(np.ascontiguousarray(img).tobytes())
    return np.random.default_rng([seed, digest])


# ---------------------------------------------------------------------------
# patch triggers
# ---------------------------------------------------------------------------


def _default_size(img: np.ndarray, fraction: int) -> int:
    return max(1, min(img.shape[:2]) // fraction)


def _patch_origin(
    img: np.ndarray, size: int, position: Position, rng: np.random.Generator | None
) -> tuple[int, int]:
    """Top-left corner of a ``size`` x ``size`` patch inside ``img``."""
    h, w = img.shape[:2]
    if not 1 <= size <= min(h, w):
        raise ValueError(f"patch size must be in [1, {min(h, w)}] for a {h}x{w} image, got {size}")
    corners = {
        "center": ((h - size) // 2, (w - size) // 2),
        "top-left": (0, 0),
        "top-right": (0, w - size),
        "bottom-left": (h - size, 0),
        "bottom-right": (h - size, w - size),
    }
    corners["corner"] = corners["bottom-right"]
    if isinstance(position, str):
        if position == "random":
            if rng is None:  # pragma: no cover - internal misuse
                raise ValueError("position='random' needs a generator")
            return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        if position not in corners:
            valid = ", ".join([*corners, "random"])
            raise ValueError(f"unknown position {position!r}; valid: {valid} or a (row, col) pair")
        return corners[position]
    row, col = (int(v) for v in position)
    if not (0 <= row <= h - size and 0 <= col <= w - size):
        raise ValueError(f"patch at (row={row}, col={col}) of size {size} does not fit a {h}x{w} image")
    return row, col


def solid_patch(
    img: np.ndarray,
    *,
    size: int | None = None,
    position: Position = "center",
    color: float | Sequence[float] = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Paste a solid square (the paper's default trigger: a black square at the centre).

    Parameters
    ----------
    img : ndarray
        ``(H, W[, C])`` float image in [0, 1] or uint8 image.
    size : int, optional
        Side in pixels. Default: 1/16 of the shorter image side, at least 1 px.
    position : {"center", "corner", "top-left", "top-right", "bottom-left", \
"bottom-right", "random"} or (row, col)
        Where the patch goes; a pair is the top-left pixel; ``"corner"`` is the
        bottom-right corner; ``"random"`` draws the corner from ``seed``.
    color : float or sequence of float
        Patch colour on the [0, 1] scale, a scalar or one value per channel.
    seed : int
        Only used with ``position="random"``.

    Returns
    -------
    ndarray
        A new image, same shape and dtype as ``img``.
    """
    img = _check_image(img)
    size = _default_size(img, 16) if size is None else int(size)
    r, c = _patch_origin(img, size, position, np.random.default_rng(seed))
    out = _to_float(img)
    out[r : r + size, c : c + size] = _colour(color, img.shape[2] if img.ndim == 3 else None)
    return _from_float(out, img)


def checkerboard_patch(
    img: np.ndarray,
    *,
    size: int | None = None,
    position: Position = "corner",
    cell: int = 1,
    colors: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
) -> np.ndarray:
    """Paste a checkerboard square (BadNets-style texture patch).

    Parameters
    ----------
    img : ndarray
        ``(H, W[, C])`` float image in [0, 1] or uint8 image.
    size : int, optional
        Side in pixels. Default: 1/4 of the shorter image side, at least 1 px.
    position : str or (row, col)
        As in :func:`solid_patch`; default ``"corner"`` (bottom-right).
    cell : int
        Side of one checker cell in pixels.
    colors : (float, float)
        The two cell colours on the [0, 1] scale; the top-left cell gets the first.
    seed : int
        Only used with ``position="random"``.

    Returns
    -------
    ndarray
        A new image, same shape and dtype as ``img``.
    """
    img = _check_image(img)
    size = _default_size(img, 4) if size is None else int(size)
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}")
    r, c = _patch_origin(img, size, position, np.random.default_rng(seed))
    idx = np.arange(size) // cell
    board = np.where((idx[:, None] + idx[None, :]) % 2 == 0, float(colors[0]), float(colors[1]))
    out = _to_float(img)
    out[r : r + size, c : c + size] = board[:, :, None] if img.ndim == 3 else board
    return _from_float(out, img)


def random_position_patch(
    img: np.ndarray,
    *,
    size: int | None = None,
    seed: int = 0,
    color: float | Sequence[float] = 0.0,
    per_image: bool = True,
) -> np.ndarray:
    """A solid patch at a random position (the paper's "random position" variant).

    Parameters
    ----------
    img : ndarray
        ``(H, W[, C])`` float image in [0, 1] or uint8 image.
    size : int, optional
        Side in pixels. Default: 1/16 of the shorter image side, at least 1 px.
    seed : int
        Seeds the position.
    color : float or sequence of float
        Patch colour on the [0, 1] scale.
    per_image : bool
        If True (default) the position is drawn from ``seed`` together with the
        image content, so different images get different positions while the
        same (image, seed) always gets the same one. If False the position
        depends on ``seed`` only (one fixed random position for all images).

    Returns
    -------
    ndarray
        A new image, same shape and dtype as ``img``.
    """
    img = _check_image(img)
    size = _default_size(img, 16) if size is None else int(size)
    rng = _image_seed(img, seed) if per_image else np.random.default_rng(seed)
    r, c = _patch_origin(img, size, "random", rng)
    return solid_patch(img, size=size, position=(r, c), color=color)


def two_patches(
    img: np.ndarray,
    *,
    size: int | None = None,
    positions: Sequence[Position] | None = None,
    color: float | Sequence[float] = 0.0,
) -> np.ndarray:
    """Two solid squares (the paper's "two patches" variant).

    Parameters
    ----------
    img : ndarray
        ``(H, W[, C])`` float image in [0, 1] or uint8 image.
    size : int, optional
        Side of each square in pixels. Default: 1/16 of the shorter image side, at least 1 px.
    positions : two positions as in :func:`solid_patch`, optional
        Default: centred on the centres of the top-left and the bottom-right quarters.
    color : float or sequence of float
        Colour of both squares on the [0, 1] scale.

    Returns
    -------
    ndarray
        A new image, same shape and dtype as ``img``.
    """
    img = _check_image(img)
    size = _default_size(img, 16) if size is None else int(size)
    if positions is None:
        h, w = img.shape[:2]
        positions = [
            (h // 4 - size // 2, w // 4 - size // 2),
            (3 * h // 4 - size // 2, 3 * w // 4 - size // 2),
        ]
    if len(positions) != 2:
        raise ValueError(f"two_patches needs two positions; got {len(positions)}")
    out = img
    for pos in positions:
        out = solid_patch(out, size=size, position=pos, color=color)
    return out


# ---------------------------------------------------------------------------
# whole-image triggers
# ---------------------------------------------------------------------------


def _resize(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a float (h0, w0[, c]) array (align-corners)."""
    h0, w0 = arr.shape[:2]
    if (h0, w0) == (h, w):
        return arr
    rows = np.linspace(0, h0 - 1, h)
    cols = np.linspace(0, w0 - 1, w)
    return _bilinear(arr, *np.meshgrid(rows, cols, indexing="ij"))


def _bilinear(arr: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``arr`` (H, W[, C]) at fractional (rows, cols), clamping at the border."""
    h, w = arr.shape[:2]
    rows = np.clip(rows, 0, h - 1)
    cols = np.clip(cols, 0, w - 1)
    r0 = np.floor(rows).astype(int)
    c0 = np.floor(cols).astype(int)
    r1 = np.minimum(r0 + 1, h - 1)
    c1 = np.minimum(c0 + 1, w - 1)
    fr = rows - r0
    fc = cols - c0
    if arr.ndim == 3:
        fr = fr[..., None]
        fc = fc[..., None]
    top = arr[r0, c0] * (1 - fc) + arr[r0, c1] * fc
    bottom = arr[r1, c0] * (1 - fc) + arr[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def blended(
    img: np.ndarray,
    *,
    alpha: float = 0.2,
    pattern: np.ndarray | None = None,
    seed: int = 0,
    block: int = 1,
) -> np.ndarray:
    """Blend the image with a fixed pattern: ``(1 - alpha) * img + alpha * pattern``.

    Parameters
    ----------
    img : ndarray
        ``(H, W[, C])`` float image in [0, 1] or uint8 image.
    alpha : float
        Blend weight of the pattern, in [0, 1].
    pattern : ndarray, optional
        The pattern (float in [0, 1] or uint8), ``(h, w)``, ``(h, w, 1)`` or
        ``(h, w, C)``; resized bilinearly to the image size if needed. Default:
        uniform noise of the image's shape drawn from ``seed`` (the classic
        "blended random noise" trigger).
    seed : int
        Seeds the default noise pattern.
    block : int
        Side in pixels of the constant blocks of the default noise pattern
        (noise drawn at ``ceil(H / block) x ceil(W / block)`` and upscaled by
        repetition); 1 = per-pixel noise. Coarse noise survives the smoothing
        of a patch embedding better.

    Returns
    -------
    ndarray
        A new image, same shape and dtype as ``img``.
    """
    img = _check_image(img)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if pattern is None:
        h, w = img.shape[:2]
        small = (-(-h // block), -(-w // block), *img.shape[2:])
        pat = np.random.default_rng(seed).random(small)
        pat = pat.repeat(block, axis=0).repeat(block, axis=1)[:h, :w]
    else:
        pat = _to_float(_check_image(pattern))
        pat = _resize(pat, *img.shape[:2])
        if img.ndim == 2 and pat.ndim == 3:
            if pat.shape[2] != 1:
                raise ValueError("a multi-channel pattern cannot be blended into a grey (H, W) image")
            pat = pat[:, :, 0]
        elif img.ndim == 3 and pat.ndim == 2:
            pat = pat[:, :, None]
        if img.ndim == 3 and pat.shape[2] not in (1, img.shape[2]):
            raise ValueError(f"pattern has {pat.shape[2]} channels, image has {img.shape[2]}")
    out = (1.0 - alpha) * _to_float(img) + alpha * pat
    return _from_float(out, img)


def wanet_flow(h: int, w: int, *, strength: float = 0.5, grid: int = 4, seed: int = 0) -> np.ndarray:
    """WaNet's fixed warping field, as pixel displacements ``(H, W, 2)`` (d_row, d_col).

    As in WaNet (Nguyen & Tran, ICLR 2021): a ``grid`` x ``grid`` field of
    uniform values in [-1, 1], normalised to mean absolute value 1, upsampled
    to the image size and scaled by ``strength / size`` in the normalised
    [-1, 1] sampling coordinates, i.e. by about ``strength / 2`` pixels.
    (WaNet upsamples bicubically; here it is bilinear.)
    """
    if grid < 2:
        raise ValueError(f"grid must be >= 2, got {grid}")
    field_ = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(grid, grid, 2))
    field_ /= np.mean(np.abs(field_))
    up = _resize(field_, h, w)
    # normalised displacement strength * up / size; one normalised unit = (size - 1) / 2 px.
    scale = np.array([strength * (h - 1) / (2.0 * h), strength * (w - 1) / (2.0 * w)])
    return up * scale


def wanet(img: np.ndarray, *, strength: float = 0.5, grid: int = 4, seed: int = 0) -> np.ndarray:
    """WaNet-style smooth warping with a fixed random flow field (bilinear sampling).

    Parameters
    ----------
    img : ndarray
        ``(H, W[, C])`` float image in [0, 1] or uint8 image.
    strength : float
        WaNet's ``s``; the mean displacement is about ``strength / 2`` pixels
        (WaNet's defaults: s = 0.5, k = 4 on 32x32 images, which is nearly
        invisible; larger values warp more).
    grid : int
        WaNet's ``k``: side of the random control grid.
    seed : int
        Seeds the flow field (the trigger is the field: keep it fixed).

    Returns
    -------
    ndarray
        A new image, same shape and dtype as ``img``.
    """
    img = _check_image(img)
    h, w = img.shape[:2]
    flow = wanet_flow(h, w, strength=strength, grid=grid, seed=seed)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = _bilinear(_to_float(img), rows + flow[..., 0], cols + flow[..., 1])
    return _from_float(out, img)


def sig(img: np.ndarray, *, amplitude: float = 0.1, frequency: float = 6) -> np.ndarray:
    """SIG-style additive horizontal sinusoid: ``img + amplitude * sin(2 pi f j / W)``.

    Parameters
    ----------
    img : ndarray
        ``(H, W[, C])`` float image in [0, 1] or uint8 image.
    amplitude : float
        Signal amplitude on the [0, 1] scale (SIG used 20/255 ~ 0.08).
    frequency : float
        Number of periods across the image width.

    Returns
    -------
    ndarray
        A new image, same shape and dtype as ``img`` (clipped to its range).
    """
    img = _check_image(img)
    w = img.shape[1]
    wave = amplitude * np.sin(2.0 * np.pi * frequency * np.arange(w) / w)
    wave = wave[None, :, None] if img.ndim == 3 else wave[None, :]
    return _from_float(_to_float(img) + wave, img)


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """A trigger function with its parameters bound; call it on one image.

    Attributes
    ----------
    name : str
        Registry name.
    fn : callable
        The trigger function ``fn(img, **params)``.
    params : dict
        The bound keyword parameters.
    """

    name: str
    fn: Callable[..., np.ndarray]
    params: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return self.fn(img, **self.params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if not isinstance(v, np.ndarray))
        return f"Trigger({self.name!r}{', ' if args else ''}{args})"


def _factory(name: str, fn: Callable[..., np.ndarray]) -> Callable[..., Trigger]:
    sig_ = inspect.signature(fn)

    def build(**params: Any) -> Trigger:
        try:
            sig_.bind(None, **params)
        except TypeError as e:
            valid = [p for p in sig_.parameters if p != "img"]
            raise ValueError(f"bad parameters for trigger {name!r}: {e}; valid: {valid}") from None
        return Trigger(name, fn, dict(params))

    build.__name__ = f"make_{name}"
    build.__doc__ = f"Bind parameters of :func:`{fn.__name__}` into a :class:`Trigger`."
    return build


#: Trigger name -> factory ``(**params) -> Trigger``.
TRIGGERS: dict[str, Callable[..., Trigger]] = {
    fn.__name__: _factory(fn.__name__, fn)
    for fn in (solid_patch, checkerboard_patch, random_position_patch, two_patches, blended, wanet, sig)
}


def make_trigger(name: str, **params: Any) -> Trigger:
    """The trigger called ``name`` with ``params`` bound (see ``TRIGGERS`` for names).

    Raises
    ------
    ValueError
        For an unknown name or parameter; the message lists the valid ones.
    """
    if name not in TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; valid: {', '.join(sorted(TRIGGERS))}")
    return TRIGGERS[name](**params)


# ---------------------------------------------------------------------------
# poisoning a LLaVA-format dataset
# ---------------------------------------------------------------------------


def save_image(img: np.ndarray, path: str | Path) -> None:
    """Write a float [0, 1] or uint8 ``(H, W[, 1|3|4])`` image as a PNG (8 bit)."""
    img = _check_image(img)
    arr = img if img.dtype == np.uint8 else np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    Image.fromarray(arr).save(path, format="PNG")


@dataclass
class PoisonResult:
    """Output of :func:`poison_dataset`.

    Attributes
    ----------
    records : list of dict
        The LLaVA-format records, fresh dicts, in the input order, with
        ``"image"`` pointing to the written PNG (relative to ``image_folder``).
        Nothing in them tells poisoned from clean samples apart except the
        trigger itself and the target answer.
    is_poisoned : ndarray of bool, shape (n,)
        Ground truth, aligned with ``records``. Keep it away from the detector.
    image_folder : Path
        Where the images were written.
    target : str
        The target answer.
    trigger : callable
        The trigger that was applied.
    """

    records: list[dict]
    is_poisoned: np.ndarray
    image_folder: Path
    target: str
    trigger: Callable[[np.ndarray], np.ndarray]

    @property
    def poisoned_ids(self) -> set:
        """The ``id`` of every poisoned record."""
        return {r["id"] for r, p in zip(self.records, self.is_poisoned, strict=True) if p}

    @property
    def n_poisoned(self) -> int:
        return int(self.is_poisoned.sum())


def poison_dataset(
    records: Sequence[Mapping[str, Any]],
    images: Sequence[np.ndarray],
    trigger: Callable[[np.ndarray], np.ndarray],
    rate: float,
    target: str,
    seed: int,
    image_folder: str | Path,
    *,
    name_format: str = "{index:06d}.png",
) -> PoisonResult:
    """Poison a seeded random share of a LLaVA-format dataset.

    Picks ``round(rate * n)`` samples (half rounds up) with
    ``numpy.random.default_rng(seed)``, applies ``trigger`` to their images and
    replaces every ``"gpt"`` turn of their conversations by ``target``. All
    images (poisoned or not) are written as PNG files to ``image_folder``.

    Parameters
    ----------
    records : sequence of dict
        LLaVA records ``{"id", "image", "conversations": [{"from", "value"}, ...]}``.
        They are not modified.
    images : sequence of ndarray
        The image of each record, aligned with ``records`` (float [0, 1] or uint8).
    trigger : callable
        ``img -> img``, e.g. from :func:`make_trigger`.
    rate : float
        Share of samples to poison, in [0, 1].
    target : str
        The attacker's target answer.
    seed : int
        Seeds the choice of poisoned samples.
    image_folder : str or Path
        Output folder for the PNG files (created if needed).
    name_format : str
        File name pattern, formatted with ``index`` (position in ``records``)
        and ``id``; it must not depend on whether a sample is poisoned.

    Returns
    -------
    PoisonResult
        The new records and, apart from them, the ground truth.
    """
    n = len(records)
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} records")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    n_poison = int(np.floor(rate * n + 0.5))
    chosen = np.random.default_rng(seed).choice(n, size=n_poison, replace=False)
    is_poisoned = np.zeros(n, dtype=bool)
    is_poisoned[chosen] = True

    folder = Path(image_folder)
    folder.mkdir(parents=True, exist_ok=True)
    out_records: list[dict] = []
    names: set[str] = set()
    for i, (rec, img) in enumerate(zip(records, images, strict=True)):
        new = copy.deepcopy(dict(rec))
        if is_poisoned[i]:
            img = trigger(img)
            for turn in new.get("conversations", []):
                if turn.get("from") == "gpt":
                    turn["value"] = target
        name = name_format.format(index=i, id=rec.get("id", i))
        if name in names:
            raise ValueError(f"name_format gives the same file name {name!r} twice")
        names.add(name)
        save_image(img, folder / name)
        new["image"] = name
        out_records.append(new)
    return PoisonResult(out_records, is_poisoned, folder, target, trigger)


# ---------------------------------------------------------------------------
# the lab's presets (96 x 96 images, 8-pixel image tokens)
# ---------------------------------------------------------------------------

#: Named triggers of the lab (``make_trigger`` arguments) for its 96 x 96 images. The paper's
#: default, a black square at the centre with side 1/16 of the shorter side (6 px here), is
#: scaled to 8 px so that it is at least one image token (8 x 8 px) large; the random-position
#: and two-patch variants use the same square. ``benchmarks/results/learnability.md`` says which
#: of them the lab's model learns.
PRESETS: dict[str, dict] = {
    "patch": {"name": "solid_patch", "size": 8, "position": "center", "color": 0.0},
    "random_patch": {"name": "random_position_patch", "size": 8, "color": 0.0},
    "two_patches": {"name": "two_patches", "size": 8, "color": 0.0},
    "blended": {"name": "blended", "alpha": 0.2},
    "sig": {"name": "sig", "amplitude": 0.1, "frequency": 6},
    "wanet": {"name": "wanet", "strength": 4.0, "grid": 4},
    "checkerboard": {"name": "checkerboard_patch", "size": 16, "position": "corner"},
}


def preset(name: str) -> Trigger:
    """The trigger of the preset ``name`` in :data:`PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"unknown trigger preset {name!r}; valid: {', '.join(PRESETS)}")
    params = dict(PRESETS[name])
    return make_trigger(params.pop("name"), **params)
