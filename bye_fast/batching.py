"""Split a batch of model inputs by rows, keeping images with their rows.

:func:`split_batch` cuts a batch into row groups of at most ``max_tokens``
``rows x seq_len`` tokens (for :func:`bye_fast.score`'s
``max_tokens_per_batch``); :func:`halve` cuts it in two (for the retry after a
CUDA out-of-memory error). Both keep the row order, so concatenating the
groups' results gives the batch's result.

How each key is cut:

* per-row sequence tensors (``input_ids``, ``attention_mask``,
  ``token_type_ids``, ``mm_token_type_ids``, ``labels``: ``(B, L)``;
  ``position_ids``: ``(B, L)`` or ``(3, B, L)``) by rows, and then by columns:
  columns that are padding in every row of the group (from the left or right
  edge) are dropped, so a group is as narrow as its longest row;
* per-image tensors (``pixel_values`` of LLaVA ``(n_images, C, H, W)`` and
  LLaVA-NeXT ``(n_images, crops, C, H, W)``, ``image_sizes (n_images, 2)``,
  ``image_grid_thw (n_images, 3)``) by the images of the group's rows;
* patch-flattened ``pixel_values (sum of patches, dim)`` (Qwen2-VL, with
  ``image_grid_thw``) by the patch counts ``t*h*w`` of the group's images;
* ``ids`` (a list, array or tensor with one entry per row) by rows.

Which images belong to which row is read from ``input_ids``, by the model
family's :class:`ImageLayout` (:func:`image_layout`):

* by default every maximal run of image-placeholder tokens is one image, in
  order. This holds when images are separated by other tokens (Qwen2-VL wraps
  each image in vision start/end tokens, Gemma 3 in begin/end-of-image tokens,
  LLaVA prompts put text between images) and for rows without images;
* InternVL: every entry of ``pixel_values`` is a tile of ``image_seq_length``
  image tokens (an image of several tiles is one run);
* Mistral 3: an image of ``image_sizes`` (h, w) has ``(h // s) * (w // s)`` image
  tokens (``s`` = patch size x spatial merge size), in several runs broken by
  ``[IMG_BREAK]``;
* Idefics3 / SmolVLM: ``pixel_values`` and ``pixel_attention_mask`` have one
  entry per ROW (``(B, images, ...)``, zero-padded) and are cut by rows;
  LLaVA-OneVision's ``batch_num_images`` too.

When the images do not add up (two images written back to back, say), or a
key is unknown (videos, say), the batch cannot be cut safely and
:class:`NotImplementedError` names the batch and the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["ImageLayout", "halve", "image_layout", "n_rows", "row_groups", "split_batch", "take_rows"]

#: (B, L) per-row sequence keys (``position_ids`` may also be (3, B, L)).
SEQUENCE_KEYS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels", "position_ids"}
)
#: Keys with one entry per image.
IMAGE_KEYS = frozenset({"pixel_values", "image_sizes", "image_grid_thw"})


@dataclass(frozen=True)
class ImageLayout:
    """How a model family's image inputs line up with the image tokens of ``input_ids``.

    Attributes
    ----------
    row_keys : keys with one entry per row (cut by rows like ``ids``), taken out of the per-image keys.
    tokens_per_entry : each entry of the per-image tensors stands for this many image tokens
        (InternVL's tiles); None: every run of image tokens is one entry.
    size_divisor : the image tokens of an image are ``(h // d) * (w // d)`` for its ``image_sizes``
        ``(h, w)`` and this ``d`` (Mistral 3); None: not used.
    """

    row_keys: frozenset[str] = frozenset()
    tokens_per_entry: int | None = None
    size_divisor: int | None = None


def image_layout(model) -> ImageLayout:
    """The :class:`ImageLayout` of a (peft-unwrapped) transformers model, from its config's ``model_type``."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind == "internvl":
        return ImageLayout(tokens_per_entry=int(cfg.image_seq_length))
    if kind == "mistral3":
        return ImageLayout(size_divisor=int(cfg.vision_config.patch_size) * int(cfg.spatial_merge_size))
    if kind in ("idefics3", "smolvlm"):
        return ImageLayout(row_keys=frozenset({"pixel_values", "pixel_attention_mask"}))
    if kind == "llava_onevision":
        return ImageLayout(row_keys=frozenset({"batch_num_images"}))
    return ImageLayout()


_DEFAULT_LAYOUT = ImageLayout()


def _rows_of(batch: Mapping[str, Any], index: int) -> int:
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"batch {index}: cannot split a batch without a (batch, seq_len) 'input_ids' tensor")
    return int(ids.shape[0])


def _extent(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """First and last attended column of every row (the whole width without an attention mask)."""
    ids = batch["input_ids"]
    B, L = ids.shape
    mask = batch.get("attention_mask")
    if mask is None:
        return np.zeros(B, dtype=np.int64), np.full(B, L - 1, dtype=np.int64)
    attended = mask.detach().to("cpu", torch.bool).numpy()
    first = np.where(attended.any(1), attended.argmax(1), 0)
    last = np.where(attended.any(1), L - 1 - attended[:, ::-1].argmax(1), L - 1)
    return first.astype(np.int64), last.astype(np.int64)


def row_groups(batch: Mapping[str, Any], max_tokens: int, *, index: int = 0) -> tuple[list[range], list[int]]:
    """Consecutive row ranges whose ``rows x width`` stays within ``max_tokens``.

    ``width`` is what the group will have after :func:`take_rows` drops the
    all-padding edge columns: from the first attended column of any of its
    rows to the last. Rows are taken greedily in order.

    Parameters
    ----------
    batch : mapping with an ``input_ids`` (B, L) tensor and optionally ``attention_mask``.
    max_tokens : int
        Budget of ``rows x width`` per group, ``>= 1``.
    index : int
        The batch's position in the loader, for error messages.
    layout : the model family's :class:`ImageLayout` (:func:`image_layout`); default: one image per run.

    Returns
    -------
    groups : list of range
        Row ranges covering ``range(B)`` in order.
    too_long : list of int
        Rows whose own width exceeds the budget (each is then a group of its own).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    B = _rows_of(batch, index)
    first, last = _extent(batch)
    groups: list[range] = []
    too_long: list[int] = []
    start, lo, hi = 0, int(first[0]), int(last[0])
    if hi - lo + 1 > max_tokens:
        too_long.append(0)
    for r in range(1, B):
        nlo, nhi = min(lo, int(first[r])), max(hi, int(last[r]))
        if (r - start + 1) * (nhi - nlo + 1) <= max_tokens:
            lo, hi = nlo, nhi
            continue
        groups.append(range(start, r))
        start, lo, hi = r, int(first[r]), int(last[r])
        if hi - lo + 1 > max_tokens:
            too_long.append(r)
    groups.append(range(start, B))
    return groups, too_long


@dataclass
class _Layout:
    """Where each row's images and patches sit in the per-image tensors."""

    image_start: np.ndarray  # (B + 1,) cumulative images per row
    patch_start: np.ndarray | None  # (n_images + 1,) cumulative patches per image (flattened pixels)
    row_tokens: np.ndarray  # (B,) image tokens per row


def _images_by_tokens(
    row_tokens: np.ndarray, entry_tokens: np.ndarray, what: str, index: int
) -> np.ndarray:
    """(B + 1,) cumulative entries per row, given each row's image tokens and each entry's; the rows'
    tokens must end where an entry's do."""
    row_ends = np.cumsum(row_tokens)
    entry_ends = np.concatenate([[0], np.cumsum(entry_tokens)])
    image_start = np.concatenate([[0], np.searchsorted(entry_ends, row_ends)])
    if entry_ends[-1] != row_ends[-1] or not np.array_equal(entry_ends[image_start[1:]], row_ends):
        raise NotImplementedError(
            f"batch {index}: the rows' image tokens ({row_tokens.tolist()}) do not add up to whole images "
            f"({what}: {entry_tokens.tolist()}); bye_fast cannot tell which image belongs to which row. "
            "Score this loader without max_tokens_per_batch, or with a smaller batch size"
        )
    return image_start


def _layout(
    batch: Mapping[str, Any], image_token_id: int | None, index: int, family: ImageLayout
) -> _Layout | None:
    present = [k for k in IMAGE_KEYS - family.row_keys if batch.get(k) is not None]
    if not present and not any(batch.get(k) is not None for k in family.row_keys if k.startswith("pixel_")):
        return None
    if image_token_id is None:
        raise ValueError(f"batch {index}: splitting a batch with images needs the image token id")
    ids = batch["input_ids"]
    is_img = (ids == image_token_id).to("cpu")
    starts = is_img.clone()
    starts[:, 1:] &= ~is_img[:, :-1]  # first token of each run of image tokens
    per_row = starts.sum(1).numpy().astype(np.int64)
    image_start = np.concatenate([[0], np.cumsum(per_row)])
    row_tokens = is_img.sum(1).numpy().astype(np.int64)
    if not present:  # per-row pixels only (Idefics3)
        return _Layout(image_start, None, row_tokens)
    if family.tokens_per_entry is not None:  # InternVL: tiles of a fixed number of tokens
        n = int(batch[present[0]].shape[0])
        entry_tokens = np.full(n, family.tokens_per_entry, dtype=np.int64)
        image_start = _images_by_tokens(row_tokens, entry_tokens, f"{family.tokens_per_entry} per entry", index)
    elif family.size_divisor is not None:  # Mistral 3: tokens from the image sizes
        sizes = batch.get("image_sizes")
        if not isinstance(sizes, torch.Tensor):
            raise NotImplementedError(
                f"batch {index}: this model's images are cut by their 'image_sizes', which the batch lacks"
            )
        d = family.size_divisor
        entry_tokens = ((sizes[:, 0] // d) * (sizes[:, 1] // d)).to("cpu", torch.int64).numpy()
        image_start = _images_by_tokens(row_tokens, entry_tokens, "tokens per image from image_sizes", index)
    n_images = int(image_start[-1])
    grid = batch.get("image_grid_thw")
    patch_start = None
    pixels = batch.get("pixel_values")
    for key in present:
        value = batch[key]
        if not isinstance(value, torch.Tensor):
            raise NotImplementedError(
                f"batch {index}: cannot split {key!r} of type {type(value).__name__} (expected a tensor)"
            )
        if key == "pixel_values" and value.dim() == 2:  # flattened patches (Qwen2-VL style)
            if grid is None:
                raise NotImplementedError(
                    f"batch {index}: 'pixel_values' is (patches, dim) but there is no 'image_grid_thw' "
                    "to tell which patches belong to which image"
                )
            continue
        n = int(value.shape[0])
        if n != n_images:
            raise NotImplementedError(
                f"batch {index}: {key!r} holds {n} images but input_ids has {n_images} runs of image "
                f"tokens (per row: {per_row.tolist()}); bye_fast cannot tell which image belongs to which "
                "row (are two images written back to back?). Score this loader without "
                "max_tokens_per_batch, or with a smaller batch size"
            )
    if pixels is not None and pixels.dim() == 2:
        counts = grid.to("cpu", torch.int64).prod(-1).numpy()
        patch_start = np.concatenate([[0], np.cumsum(counts)])
        if int(patch_start[-1]) != int(pixels.shape[0]):
            raise ValueError(
                f"batch {index}: 'pixel_values' has {pixels.shape[0]} patches but 'image_grid_thw' "
                f"sums to {int(patch_start[-1])}"
            )
    return _Layout(image_start, patch_start, row_tokens)


def _check_keys(batch: Mapping[str, Any], B: int, index: int, family: ImageLayout) -> None:
    known = SEQUENCE_KEYS | IMAGE_KEYS | family.row_keys | {"ids"}
    for key, value in batch.items():
        if key in known or value is None:
            continue
        if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
            raise NotImplementedError(
                f"batch {index}: bye_fast does not know how to split {key!r} by rows (known: "
                f"{sorted(known)}); score without max_tokens_per_batch or with a smaller batch size"
            )
    for key in ("ids", *sorted(family.row_keys)):
        value = batch.get(key)
        if value is not None and len(value) != B:
            raise ValueError(f"batch {index}: {key!r} has {len(value)} entries for {B} rows")


def _take_rows(
    batch: Mapping[str, Any], rows: range, layout: _Layout | None, index: int, family: ImageLayout
) -> dict[str, Any]:
    B, L = batch["input_ids"].shape
    first, last = _extent(batch)
    lo, hi = int(first[rows.start : rows.stop].min()), int(last[rows.start : rows.stop].max())
    cols = slice(lo, hi + 1) if (lo, hi) != (0, L - 1) else slice(None)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if value is None:
            out[key] = value
        elif key in SEQUENCE_KEYS:
            if not isinstance(value, torch.Tensor) or value.shape[-1] != L:
                raise ValueError(f"batch {index}: {key!r} must be a tensor ending in seq_len={L}")
            if key == "position_ids" and value.dim() == 3:
                out[key] = value[:, rows.start : rows.stop, cols]
            elif value.dim() == 2 and value.shape[0] == B:
                out[key] = value[rows.start : rows.stop, cols]
            else:
                raise NotImplementedError(
                    f"batch {index}: cannot split {key!r} of shape {tuple(value.shape)} by rows"
                )
        elif key == "ids" or key in family.row_keys:
            out[key] = value[rows.start : rows.stop]
        elif key in IMAGE_KEYS:
            i0, i1 = int(layout.image_start[rows.start]), int(layout.image_start[rows.stop])
            if key == "pixel_values" and value.dim() == 2:
                out[key] = value[int(layout.patch_start[i0]) : int(layout.patch_start[i1])]
            else:
                out[key] = value[i0:i1]
        else:
            out[key] = value  # scalars, strings, flags: shared by all rows
    for key in IMAGE_KEYS:  # a group without images gets none (the model then skips its vision tower)
        if key in out and isinstance(out[key], torch.Tensor) and out[key].shape[0] == 0:
            out[key] = None
    if layout is not None and not layout.row_tokens[rows.start : rows.stop].any():
        for key in family.row_keys:  # per-row pixels (all padding images) of rows without any image
            if key.startswith("pixel_"):
                out[key] = None
    return out


def take_rows(
    batch: Mapping[str, Any],
    rows: range,
    *,
    image_token_id: int | None,
    index: int = 0,
    layout: ImageLayout | None = None,
) -> dict[str, Any]:
    """The sub-batch of ``rows`` (a ``range``), with its images and without all-padding edge columns.

    Parameters
    ----------
    batch : mapping of model inputs (see the module docstring for the keys understood).
    rows : range
        Consecutive rows to keep, ``0 <= start < stop <= B``.
    image_token_id : int or None
        Id of the image placeholder in ``input_ids``; needed when the batch has images.
    index : int
        The batch's position in the loader, for error messages.
    layout : the model family's :class:`ImageLayout` (:func:`image_layout`); default: one image per run.

    Raises
    ------
    NotImplementedError
        If a key cannot be cut by rows, or images cannot be assigned to rows.
    """
    B = _rows_of(batch, index)
    if not (0 <= rows.start < rows.stop <= B) or rows.step != 1:
        raise ValueError(f"batch {index}: rows {rows} are not a non-empty consecutive part of range({B})")
    family = layout or _DEFAULT_LAYOUT
    _check_keys(batch, B, index, family)
    return _take_rows(batch, rows, _layout(batch, image_token_id, index, family), index, family)


def split_batch(
    batch: Mapping[str, Any],
    max_tokens: int,
    *,
    image_token_id: int | None,
    index: int = 0,
    layout: ImageLayout | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Cut ``batch`` into consecutive row groups of at most ``max_tokens`` ``rows x seq_len``.

    Parameters
    ----------
    batch : mapping of model inputs (see the module docstring for the keys understood).
    max_tokens : int
        Token budget per group (rows times the group's width after dropping
        all-padding edge columns). A row wider than the budget forms a group
        of its own.
    image_token_id : int or None
        Id of the image placeholder in ``input_ids``; needed when the batch has images.
    index : int
        The batch's position in the loader, for error messages.

    Returns
    -------
    groups : list of dict
        The sub-batches, in row order. When everything fits, ``[dict(batch)]``
        (nothing is cut or trimmed).
    too_long : list of int
        Rows wider than the budget.
    """
    groups, too_long = row_groups(batch, max_tokens, index=index)
    if len(groups) == 1:
        return [dict(batch)], too_long
    B = _rows_of(batch, index)
    family = layout or _DEFAULT_LAYOUT
    _check_keys(batch, B, index, family)
    where = _layout(batch, image_token_id, index, family)
    return [_take_rows(batch, g, where, index, family) for g in groups], too_long


def halve(
    batch: Mapping[str, Any],
    *,
    image_token_id: int | None,
    index: int = 0,
    layout: ImageLayout | None = None,
) -> list[dict[str, Any]]:
    """Cut a batch of ``B >= 2`` rows into its first ``ceil(B/2)`` and last ``floor(B/2)`` rows
    (``layout`` as for :func:`split_batch`)."""
    B = _rows_of(batch, index)
    if B < 2:
        raise ValueError(f"batch {index}: cannot halve a batch of {B} row")
    family = layout or _DEFAULT_LAYOUT
    _check_keys(batch, B, index, family)
    where = _layout(batch, image_token_id, index, family)
    mid = (B + 1) // 2
    return [_take_rows(batch, range(r0, r1), where, index, family) for r0, r1 in ((0, mid), (mid, B))]


def n_rows(batch: Mapping[str, Any]) -> int:
    """Rows of a batch (``input_ids.shape[0]``)."""
    return _rows_of(batch, 0)
