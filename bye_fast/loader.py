"""Torch datasets, collators and loaders of records: processor batches with ``"ids"``, in record order."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bye_fast.prompts import PromptOptions, _question, _question_and_images, _render
from bye_fast.records import DataSource, PathLike, _image_values, _preview, _validate, read_dataset

__all__ = [
    "ON_BAD_IMAGE",
    "BadImageError",
    "LlavaCollator",
    "LlavaDataset",
    "LlavaLoader",
    "make_loader",
    "shard_indices",
]


# ------------------------------------------------------------------- torch dataset
#: What :class:`LlavaDataset` does with a record whose image cannot be read.
ON_BAD_IMAGE = ("error", "skip")


class BadImageError(ValueError):
    """An image of a record cannot be read (empty, truncated, not an image, too large to decode).

    The message names the record id, the path and the reason; ``record_id``, ``path`` and
    ``reason`` hold them (None when the error was re-raised from a DataLoader worker).
    """

    def __init__(self, message: str, *, record_id: Any = None, path: str | None = None,
                 reason: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.record_id, self.path, self.reason = record_id, path, reason


def _image_problem(err: Exception, path: Path) -> str:
    """Why ``PIL`` could not read ``path``, in a few words."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, Image.DecompressionBombError):
        return f"too large to decode safely ({err})"
    if isinstance(err, IsADirectoryError):
        return "a directory, not an image file"
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image file PIL can read"
    return f"{err}" if str(err) else type(err).__name__


class LlavaDataset(Dataset):
    """Prompts and images of records (LLaVA or messages, see :mod:`bye_fast.records`), in record order.

    Items are ``{"id": record id, "prompt": str, "images": [PIL.Image in RGB]}``
    (``images`` is empty for a text-only record). Prompts are built lazily with
    :func:`bye_fast.prompts.build_prompt` and the ``prompt`` options;
    placeholder/image mismatches are checked up front. Images are read from
    paths (relative to ``image_folder``), embedded bytes or ``{"bytes", "path"}``
    dicts (a ``datasets`` or parquet image column), or PIL images.

    Parameters
    ----------
    records : sequence of Mapping
        Validated as in :func:`load_records`; never modified.
    image_folder : str, os.PathLike or None
        Folder that the records' relative image paths are relative to (absolute
        paths are used as they are). ``None``: relative to the working directory.
    processor : transformers.ProcessorMixin
        Used for its chat template only; batching is :class:`LlavaCollator`'s job.
    ids : sequence, optional
        The records' ids (a shard of a dataset whose ids are row indices); default:
        their ``"id"`` fields, or their positions when none has one.
    prompt : PromptOptions, optional
        How prompts are built (default: ``PromptOptions()``).
    on_bad_image : "error" or "skip"
        What to do with a record one of whose images cannot be read (missing,
        empty, truncated, not an image, a decompression bomb): raise (default),
        or return the item ``{"id": ..., "skipped": {"id", "image", "reason"}}``,
        which :class:`LlavaCollator` leaves out of its batch.

    Raises
    ------
    ValueError
        On invalid records (see :func:`load_records`, :func:`build_prompt`).
    FileNotFoundError
        From ``__getitem__``, naming the record id and the path, when an image
        file does not exist (``on_bad_image="error"``).
    BadImageError
        From ``__getitem__``, naming the record id, the path and the reason, when
        an image file cannot be read (``on_bad_image="error"``).
    """

    def __init__(
        self,
        records: Sequence[Mapping],
        image_folder: PathLike | None,
        processor: Any,
        *,
        on_bad_image: str = "error",
        ids: Sequence[Any] | None = None,
        prompt: PromptOptions | None = None,
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}; got {on_bad_image!r}")
        if ids is not None and len(ids) != len(records):
            raise ValueError(f"{len(ids)} ids for {len(records)} records")
        self.ids = _validate(records, "<records>", ids=ids)
        for rid, record in zip(self.ids, records, strict=True):
            _question_and_images(record, rid)
        self.records = records
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.processor = processor
        self.on_bad_image = on_bad_image
        self.prompt = prompt if prompt is not None else PromptOptions()

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, relpath: str) -> Path:
        """Where an image path of a record points."""
        return self.image_folder / relpath if self.image_folder is not None else Path(relpath)

    def _open(self, value: Any) -> Image.Image:
        """An image value of a record (a path, bytes, a ``{"bytes", "path"}`` dict, a PIL image) in RGB."""
        if isinstance(value, Mapping) and not value.get("bytes"):
            value = value.get("path")
        if isinstance(value, str):
            path = self.image_path(value)
            with Image.open(path) as im:
                return im.convert("RGB")
        if isinstance(value, Mapping):  # datasets.Image storage: {"bytes": ..., "path": name or None}
            with Image.open(io.BytesIO(value["bytes"])) as im:
                return im.convert("RGB")
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as im:
                return im.convert("RGB")
        return value.convert("RGB")

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, rid = self.records[index], self.ids[index]
        images = []
        for value in _image_values(record):
            try:
                images.append(self._open(value))
            except Exception as e:  # any failure to open or decode this image is this record's
                where = _where(value, self)
                path = Path(where) if isinstance(value, (str, Mapping)) and not _embedded(value) else None
                reason = _image_problem(e, path) if path is not None else _bytes_problem(e, value)
                if self.on_bad_image == "skip":
                    return {"id": rid, "skipped": {"id": rid, "image": where, "reason": reason}}
                if isinstance(e, FileNotFoundError) and path is not None:
                    raise FileNotFoundError(
                        errno.ENOENT, f"record {rid!r}: image file not found", where
                    ) from None
                raise BadImageError(
                    f"record {rid!r}: cannot read image {where}: {reason}",
                    record_id=rid,
                    path=where,
                    reason=reason,
                ) from e
        prompt = _render(_question(record, rid), self.processor, self.prompt)
        return {"id": rid, "prompt": prompt, "images": images}


def _embedded(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value.get("bytes"))


def _where(value: Any, dataset: LlavaDataset) -> str:
    """How an image value is named in messages: its path, or what it is."""
    if isinstance(value, Mapping):
        if _embedded(value):
            return f"{value.get('path') or 'image bytes'} (embedded)"
        value = value.get("path")
    if isinstance(value, str):
        return str(dataset.image_path(value))
    return "image bytes" if isinstance(value, (bytes, bytearray)) else type(value).__name__


def _bytes_problem(err: Exception, value: Any) -> str:
    """Why ``PIL`` could not read embedded image bytes, in a few words."""
    if isinstance(err, Image.DecompressionBombError):
        return f"too large to decode safely ({err})"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image PIL can read"
    return f"{err}" if str(err) else type(err).__name__


class LlavaCollator:
    """Batch :class:`LlavaDataset` items with the model's processor.

    Calls ``processor(text=prompts, images=per-row image lists, padding=True,
    return_tensors="pt")`` -- so padding follows
    ``processor.tokenizer.padding_side`` -- and adds ``"ids"``: the record ids,
    one per row, in batch order. A batch without any image passes
    ``images=None``; a batch mixing text-only and image records passes a list
    of per-row image lists (``[]`` for text-only rows), which LLaVA processors
    accept. If the processor rejects a batch, its exception is re-raised with a
    note listing the batch's ids.

    Items marked ``"skipped"`` (``LlavaDataset(on_bad_image="skip")``) are left
    out of the batch and listed under ``batch["skipped"]`` (a list of ``{"id",
    "image", "reason"}``); a batch of skipped items only is ``{"ids": [],
    "skipped": [...]}``. The loader of :func:`make_loader` takes that key out
    before a model sees the batch.

    Picklable (it holds only the processor), so it works with ``num_workers > 0``.

    Parameters
    ----------
    processor : transformers.ProcessorMixin
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        skipped = [item["skipped"] for item in items if "skipped" in item]
        items = [item for item in items if "skipped" not in item]
        if not items:
            return {"ids": [], "skipped": skipped}
        ids = [item["id"] for item in items]
        prompts = [item["prompt"] for item in items]
        images = [list(item["images"]) for item in items]
        try:
            batch = self.processor(
                text=prompts,
                images=images if any(images) else None,
                padding=True,
                return_tensors="pt",
            )
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"bye_fast: while collating the batch with ids {_preview(ids)}")
            raise
        batch["ids"] = ids
        if skipped:
            batch["skipped"] = skipped
        return batch


class LlavaLoader(DataLoader):
    """The ``DataLoader`` of :func:`make_loader`: batches without the records skipped for a bad image.

    Attributes
    ----------
    skipped : list of dict
        ``{"id", "image", "reason"}`` of every record skipped during the last
        iteration (reset when a new iteration starts), in record order. A batch
        whose records were all skipped is not yielded.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: list[dict] = []

    def __iter__(self):
        self.skipped = []
        for batch in super().__iter__():
            self.skipped.extend(batch.pop("skipped", []))
            if len(batch["ids"]):
                yield batch


# -------------------------------------------------------------------------- loading
def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world_size`` scores.

    Blocks are in rank order, their sizes differ by at most one (the first
    ``n % world_size`` ranks get one extra), and together they cover every
    index exactly once -- also when ``n`` is not a multiple of ``world_size``
    or smaller than it (some ranks then get an empty range). Concatenating
    the ranks' results in rank order restores the original order.

    Parameters
    ----------
    n : int
        Number of records, ``>= 0``.
    rank : int
        ``0 <= rank < world_size``.
    world_size : int
        ``>= 1``.

    Returns
    -------
    range
    """
    for name, value in (("n", n), ("rank", rank), ("world_size", world_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def make_loader(
    records_or_path: PathLike | Sequence[Mapping],
    image_folder: PathLike | None,
    processor: Any,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    on_bad_image: str = "error",
    chat_template: str | os.PathLike = "processor",
    system_prompt: str | None = None,
    image_placement: str = "inline",
) -> LlavaLoader:
    """An ordered (unshuffled) ``DataLoader`` of processor batches with ``"ids"``.

    Parameters
    ----------
    records_or_path : str, os.PathLike, DataSource or sequence of Mapping
        A dataset (a file or folder read with :func:`bye_fast.records.read_dataset`:
        LLaVA or messages JSON/JSONL, parquet, a ``datasets`` folder), what
        ``read_dataset`` returned, or the records (ids: their ``"id"`` fields,
        or their positions when none has one).
    image_folder : str, os.PathLike or None
        See :class:`LlavaDataset`.
    processor : transformers.ProcessorMixin
    batch_size : int
    num_workers : int
    rank, world_size : int, optional
        Score only the ``rank``-th of ``world_size`` contiguous shards (see
        :func:`shard_indices`). Both or neither must be given; if neither, they
        come from ``torch.distributed`` when it is initialised, else the whole
        dataset is loaded.
    on_bad_image : "error" or "skip"
        A record with an image that cannot be read: raise, naming the record
        and the file (default), or leave the record out of its batch and list
        it in ``loader.skipped`` (see :class:`LlavaDataset`, :class:`LlavaLoader`).
    chat_template, system_prompt, image_placement
        How prompts are built: see :class:`bye_fast.prompts.PromptOptions`
        (defaults: the processor's template, no system prompt, images where the
        record puts them).

    Returns
    -------
    LlavaLoader
        A ``torch.utils.data.DataLoader``: batches as made by
        :class:`LlavaCollator`, in record order, without skipped records.
    """
    prompt = PromptOptions(chat_template, system_prompt, image_placement)
    if isinstance(records_or_path, (str, os.PathLike)):
        records_or_path = read_dataset(records_or_path)
    if isinstance(records_or_path, DataSource):
        records, ids = records_or_path.records, records_or_path.ids
    else:
        records = records_or_path
        ids = _validate(records, "<records>")
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither: rank={rank}, world_size={world_size}")
    if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank is not None:
        shard = shard_indices(len(records), rank, world_size)
        records, ids = records[shard.start : shard.stop], ids[shard.start : shard.stop]
    return LlavaLoader(
        LlavaDataset(records, image_folder, processor, on_bad_image=on_bad_image, ids=ids, prompt=prompt),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=LlavaCollator(processor),
    )
