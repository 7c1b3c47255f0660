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

Which images belong to which row is read from ``input_ids``: every maximal run
of image-placeholder tokens is one image, in order. This holds when images
are separated by other tokens (Qwen2-VL wraps each image in vision start/end
tokens; LLaVA prompts put text between images) and for rows without images.
When the runs do not add up to the number of images (two images written
back to back, say), or a key is unknown (videos, say), the batch cannot be
cut safely and :class:`NotImplementedError` names the batch and the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["halve", "n_rows", "row_groups", "split_batch", "take_rows"]

#: (B, L) per-row sequence keys (``position_ids`` may also be (3, B, L)).
SEQUENCE_KEYS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels", "position_ids"}
)
#: Keys with one entry per image.
IMAGE_KEYS = frozenset({"pixel_values", "image_sizes", "image_grid_thw"})


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


def _layout(batch: Mapping[str, Any], image_token_id: int | None, index: int) -> _Layout | None:
    present = [k for k in IMAGE_KEYS if batch.get(k) is not None]
    if not present:
        return None
    if image_token_id is None:
        raise ValueError(f"batch {index}: splitting a batch with images needs the image token id")
    ids = batch["input_ids"]
    is_img = (ids == image_token_id).to("cpu")
    starts = is_img.clone()
    starts[:, 1:] &= ~is_img[:, :-1]  # first token of each run of image tokens
    per_row = starts.sum(1).numpy().astype(np.int64)
    image_start = np.concatenate([[0], np.cumsum(per_row)])
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
    return _Layout(image_start, patch_start)


def _check_keys(batch: Mapping[str, Any], B: int, index: int) -> None:
    for key, value in batch.items():
        if key in SEQUENCE_KEYS or key in IMAGE_KEYS or key == "ids" or value is None:
            continue
        if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
            raise NotImplementedError(
                f"batch {index}: bye_fast does not know how to split {key!r} by rows (known: "
                f"{sorted(SEQUENCE_KEYS | IMAGE_KEYS | {'ids'})}); score without max_tokens_per_batch "
                "or with a smaller batch size"
            )
    ids = batch.get("ids")
    if ids is not None and len(ids) != B:
        raise ValueError(f"batch {index}: 'ids' has {len(ids)} entries for {B} rows")


def _take_rows(batch: Mapping[str, Any], rows: range, layout: _Layout | None, index: int) -> dict[str, Any]:
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
        elif key in IMAGE_KEYS:
            i0, i1 = int(layout.image_start[rows.start]), int(layout.image_start[rows.stop])
            if key == "pixel_values" and value.dim() == 2:
                out[key] = value[int(layout.patch_start[i0]) : int(layout.patch_start[i1])]
            else:
                out[key] = value[i0:i1]
        elif key == "ids":
            out[key] = value[rows.start : rows.stop]
        else:
            out[key] = value  # scalars, strings, flags: shared by all rows
    for key in IMAGE_KEYS:  # a group without images gets none (the model then skips its vision tower)
        if key in out and isinstance(out[key], torch.Tensor) and out[key].shape[0] == 0:
            out[key] = None
    return out


def take_rows(
    batch: Mapping[str, Any], rows: range, *, image_token_id: int | None, index: int = 0
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

    Raises
    ------
    NotImplementedError
        If a key cannot be cut by rows, or images cannot be assigned to rows.
    """
    B = _rows_of(batch, index)
    if not (0 <= rows.start < rows.stop <= B) or rows.step != 1:
        raise ValueError(f"batch {index}: rows {rows} are not a non-empty consecutive part of range({B})")
    _check_keys(batch, B, index)
    return _take_rows(batch, rows, _layout(batch, image_token_id, index), index)


def split_batch(
    batch: Mapping[str, Any], max_tokens: int, *, image_token_id: int | None, index: int = 0
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
    _check_keys(batch, B, index)
    layout = _layout(batch, image_token_id, index)
    return [_take_rows(batch, g, layout, index) for g in groups], too_long


def halve(batch: Mapping[str, Any], *, image_token_id: int | None, index: int = 0) -> list[dict[str, Any]]:
    """Cut a batch of ``B >= 2`` rows into its first ``ceil(B/2)`` and last ``floor(B/2)`` rows."""
    B = _rows_of(batch, index)
    if B < 2:
        raise ValueError(f"batch {index}: cannot halve a batch of {B} row")
    _check_keys(batch, B, index)
    layout = _layout(batch, image_token_id, index)
    mid = (B + 1) // 2
    return [_take_rows(batch, range(0, mid), layout, index), _take_rows(batch, range(mid, B), layout, index)]


def n_rows(batch: Mapping[str, Any]) -> int:
    """Rows of a batch (``input_ids.shape[0]``)."""
    return _rows_of(batch, 0)
