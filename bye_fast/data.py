"""LLaVA-format instruction data: reading, prompts, loaders, and writing the cleaned set.

The LLaVA instruction-tuning format is a JSON list (or JSONL, one record per
line) of records such as::

    {"id": "000123",
     "image": "coco/000123.jpg",            # or a list of paths, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat."}],
     ...any other fields...}

BYE scores each sample on its prompt (image + first question, no answer), so
this module turns records into prompts exactly as the model sees them before it
answers (:func:`build_prompt`), batches them with the model's processor
(:class:`LlavaDataset`, :class:`LlavaCollator`, :func:`make_loader`), and
finally writes the records a detection kept and the ones it removed
(:func:`filter_dataset`).

Conventions
-----------
* Record positions in messages are 0-based (``record 0`` is the first one);
  JSONL messages also give the 1-based line number.
* Human turns are those whose ``"from"`` is ``"human"`` or ``"user"``
  (case-insensitive); only the first one is used for the prompt.
* Ids are ``str`` or ``int`` and are compared by their text: the integer ``3``
  and the string ``"3"`` are the same id (so they count as duplicates within
  one file, and a detection id ``"3"`` -- e.g. from a numpy string array --
  matches a record id ``3``), while ``"03"`` is a different id. Booleans and
  floats are not ids.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "BadImageError",
    "FilterReport",
    "LlavaCollator",
    "LlavaDataset",
    "LlavaLoader",
    "build_prompt",
    "filter_dataset",
    "load_records",
    "make_loader",
    "shard_indices",
    "skipped_records",
]

#: The image placeholder of the LLaVA data format (independent of the model's image token).
IMAGE_PLACEHOLDER = "<image>"
#: Values of a turn's ``"from"`` that mark a human (question) turn, compared lower-case.
HUMAN_ROLES = frozenset({"human", "user"})
#: Key added to each removed record in the audit file (see :func:`filter_dataset`).
AUDIT_KEY = "bye_detection"

_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- ids
def _id_key(value: Any) -> str:
    """The text an id is compared by (see the module docstring), or ``TypeError``."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"an id must be a str or an int, not a bool ({value!r})")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (str, np.str_)):
        return str(value)
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    raise TypeError(f"an id must be a str or an int, not {type(value).__name__} ({value!r})")


def _preview(items: Sequence, k: int = 5) -> str:
    """``'a', 'b', ... (+3 more)``: the first ``k`` items of a list, for messages."""
    shown = ", ".join(repr(x) for x in items[:k])
    return shown + (f", ... (+{len(items) - k} more)" if len(items) > k else "")


# ------------------------------------------------------------------------- reading
def _file_format(path: Path, text: str | None = None) -> str:
    """``"jsonl"`` for a ``.jsonl``/``.ndjson`` suffix, ``"json"`` for ``.json``.

    With ``text`` (the file's content), a file whose suffix is not ``.jsonl``
    but whose first non-blank character is not ``[`` is read as JSONL too, so
    JSONL saved under a ``.json`` name still loads.
    """
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if text is None:
        return "json" if suffix == ".json" else "unknown"
    head = text.lstrip()
    if head.startswith("[") or (not head and suffix == ".json"):
        return "json"
    return "jsonl"


def _record_problem(record: Any) -> str | None:
    """What is wrong with one record (not counting duplicate ids), or None."""
    if not isinstance(record, Mapping):
        return f"a record must be a JSON object, got {type(record).__name__}"
    if "id" not in record:
        return "record has no 'id'"
    rid = record["id"]
    try:
        _id_key(rid)
    except TypeError as e:
        return str(e)
    images = record.get("image")
    if images is not None:
        paths = [images] if isinstance(images, str) else images
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            return f"(id {rid!r}): 'image' must be a non-empty path or a list of them, got {images!r}"
    conversations = record.get("conversations")
    if conversations is None:
        return f"(id {rid!r}): record has no 'conversations'"
    if not isinstance(conversations, list) or not all(isinstance(t, Mapping) for t in conversations):
        return f"(id {rid!r}): 'conversations' must be a list of objects"
    turn = _first_human_turn(conversations)
    if turn is None:
        roles = sorted(HUMAN_ROLES)
        return f"(id {rid!r}): 'conversations' has no human turn (a turn whose 'from' is one of {roles})"
    if not isinstance(turn.get("value"), str):
        return f"(id {rid!r}): the first human turn has no text 'value'"
    return None


def _validate(records: Iterable[Any], source: str, where: Callable[[int], str] | None = None) -> None:
    """Validate all records and the uniqueness of their ids; ``where(i)`` names record ``i``."""
    where = where or (lambda i: f"{source}: record {i}")
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        problem = _record_problem(record)
        if problem is not None:
            sep = "" if problem.startswith("(") else ":"  # "file: record 3 (id 'x'): ..."
            raise ValueError(f"{where(i)}{sep} {problem}")
        key = _id_key(record["id"])
        first = seen.setdefault(key, i)
        if first != i:
            rid, other = record["id"], records[first]["id"] if isinstance(records, Sequence) else None
            same = f" (same as id {other!r})" if other is not None and other != rid else ""
            raise ValueError(f"{where(i)}: duplicate id {rid!r}{same}, first seen at {where(first)}")


def load_records(path: PathLike) -> list[dict]:
    """Read and validate a LLaVA-format dataset (JSON list or JSONL).

    Parameters
    ----------
    path : str or os.PathLike
        A ``.json`` file holding a list of records, or a ``.jsonl``/``.ndjson``
        file with one record per line (blank lines are skipped). A file with
        another suffix, or a ``.json`` file that does not start with ``[``, is
        read as JSONL -- unless it is one JSON object that is not a one-line
        record (e.g. ``{"data": [...]}``), which is refused as such.

    Returns
    -------
    list of dict
        The records as parsed, in file order, unmodified.

    Raises
    ------
    ValueError
        Naming the file and the record (0-based index; JSONL also the line) for
        text that is not UTF-8, a file that is one JSON object, invalid JSON, a
        record that is not an object, a missing or duplicate
        ``id`` (ids are str or int, compared by text: ``3`` and ``"3"``
        collide), a bad ``image`` field, missing ``conversations``, or no human
        turn.
    """
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[list[dict], str]:
    """:func:`load_records`, plus the format that was read (``"json"`` or ``"jsonl"``)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); LLaVA data must be "
            "UTF-8 JSON or JSONL"
        ) from None
    if path.suffix.lower() not in _JSONL_SUFFIXES and text.lstrip().startswith("{"):
        _refuse_json_object(path, text)
    if _file_format(path, text) == "json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
        _validate(records, str(path))
        return records, "json"
    records, lines = [], []
    # Split on "\n" only: str.splitlines() would also split inside records at U+2028 etc.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            hint = "" if path.suffix.lower() in _JSONL_SUFFIXES else " (read as JSONL: no '[' at the start)"
            raise ValueError(
                f"{path}: line {lineno} (record {len(records)}): invalid JSON at column {e.colno}: "
                f"{e.msg}{hint}"
            ) from None
        lines.append(lineno)
    _validate(records, str(path), lambda i: f"{path}: line {lines[i]} (record {i})")
    return records, "jsonl"


def _refuse_json_object(path: Path, text: str) -> None:
    """A file that is ONE JSON object (not JSONL with one record on one line) is not a dataset."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return  # several lines of records: JSONL
    if isinstance(obj, dict) and ("id" not in obj or "\n" in text.strip()):
        keys = _preview(list(obj), 6)
        raise ValueError(
            f"{path}: holds one JSON object (keys {keys}), not a list of records; LLaVA data is a JSON "
            "list [{...}, ...] or JSONL (one record per line)"
        )


# -------------------------------------------------------------------------- prompts
def _first_human_turn(conversations: Sequence[Mapping]) -> Mapping | None:
    for turn in conversations:
        role = turn.get("from")
        if isinstance(role, str) and role.lower() in HUMAN_ROLES:
            return turn
    return None


def _image_paths(record: Mapping) -> list[str]:
    images = record.get("image")
    if images is None:
        return []
    return [images] if isinstance(images, str) else list(images)


def _question_and_images(record: Mapping) -> tuple[str, list[str]]:
    """First human turn's text and the record's image paths; ``ValueError`` if they disagree."""
    rid = record.get("id")
    turn = _first_human_turn(record.get("conversations") or [])
    if turn is None or not isinstance(turn.get("value"), str):
        raise ValueError(f"record {rid!r}: no human turn with a text 'value'")
    text, images = turn["value"], _image_paths(record)
    n_placeholders = text.count(IMAGE_PLACEHOLDER)
    if n_placeholders and n_placeholders != len(images):
        raise ValueError(
            f"record {rid!r}: its first human turn has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but the record has {len(images)} image(s)"
        )
    return text, images


def _content(text: str, n_images: int) -> list[dict]:
    """Chat-template content items: text pieces and images in placeholder order."""
    if IMAGE_PLACEHOLDER not in text:
        items = [{"type": "image"} for _ in range(n_images)]
        return items + ([{"type": "text", "text": text.strip()}] if text.strip() else [])
    items: list[dict] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            items.append({"type": "image"})
        if piece.strip():
            items.append({"type": "text", "text": piece.strip()})
    return items


def _image_token(processor: Any) -> str:
    token = getattr(processor, "image_token", None)
    token = token or getattr(getattr(processor, "tokenizer", None), "image_token", None)
    return token or IMAGE_PLACEHOLDER


def build_prompt(record: Mapping, processor: Any) -> str:
    """The prompt of ``record`` as the model sees it when it must answer.

    Only the FIRST human turn is used. Its ``<image>`` placeholders become
    image content items, in order, between the text pieces around them
    (stripped of surrounding whitespace); if the text has no placeholder but
    the record has images, the images come first, as in LLaVA. The message is
    rendered with ``processor.apply_chat_template(messages,
    add_generation_prompt=True, tokenize=False)``: generation prompt on, no
    answer.

    If the processor has no chat template, the prompt is the plain question
    text with each placeholder replaced by the processor's image token (its
    ``image_token``, else its tokenizer's, else ``<image>``), and, when the text
    has no placeholder, one image token per image followed by a newline in
    front -- no role markers and no generation prompt.

    Parameters
    ----------
    record : Mapping
        A LLaVA-format record (not modified).
    processor : transformers.ProcessorMixin
        The model's processor, e.g. a ``LlavaProcessor``.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        Naming the record id, if the first human turn has placeholders whose
        number differs from the number of images, or there is no human turn.
    """
    text, images = _question_and_images(record)
    if getattr(processor, "chat_template", None) is None:
        token = _image_token(processor)
        if IMAGE_PLACEHOLDER in text:
            return text.replace(IMAGE_PLACEHOLDER, token)
        return token * len(images) + "\n" + text if images else text
    messages = [{"role": "user", "content": _content(text, len(images))}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


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
    """Prompts and images of LLaVA-format records, in record order.

    Items are ``{"id": record id, "prompt": str, "images": [PIL.Image in RGB]}``
    (``images`` is empty for a text-only record). Prompts are built lazily with
    :func:`build_prompt`; placeholder/image mismatches are checked up front.

    Parameters
    ----------
    records : sequence of Mapping
        Validated as in :func:`load_records`; never modified.
    image_folder : str, os.PathLike or None
        Folder that the records' relative image paths are relative to (absolute
        paths are used as they are). ``None``: relative to the working directory.
    processor : transformers.ProcessorMixin
        Used for its chat template only; batching is :class:`LlavaCollator`'s job.
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
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}; got {on_bad_image!r}")
        _validate(records, "<records>")
        for record in records:
            _question_and_images(record)
        self.records = records
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.processor = processor
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, relpath: str) -> Path:
        """Where an image path of a record points."""
        return self.image_folder / relpath if self.image_folder is not None else Path(relpath)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        images = []
        for rel in _image_paths(record):
            path = self.image_path(rel)
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except Exception as e:  # any failure to open or decode this file is this record's
                reason = _image_problem(e, path)
                if self.on_bad_image == "skip":
                    return {"id": record["id"], "skipped": {"id": record["id"], "image": str(path), "reason": reason}}
                if isinstance(e, FileNotFoundError):
                    raise FileNotFoundError(
                        errno.ENOENT, f"record {record['id']!r}: image file not found", str(path)
                    ) from None
                raise BadImageError(
                    f"record {record['id']!r}: cannot read image {path}: {reason}",
                    record_id=record["id"], path=str(path), reason=reason,
                ) from e  # fmt: skip
        return {"id": record["id"], "prompt": build_prompt(record, self.processor), "images": images}


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


def skipped_records(meta: Mapping[str, Any]) -> list[dict]:
    """The records a scoring run skipped, from the ``"skipped"`` entry of a Scores' or Detection's meta.

    ``bye-fast score --on-bad-image skip`` writes it (JSON text of ``[{"id", "image", "reason"}]``);
    no entry: ``[]``.
    """
    value = meta.get("skipped")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"meta['skipped'] is not the JSON list bye-fast score writes ({e})") from None
    if not isinstance(value, list) or not all(isinstance(v, Mapping) and "id" in v for v in value):
        raise ValueError("meta['skipped'] must be a list of {'id', 'image', 'reason'}")
    return list(value)


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
) -> LlavaLoader:
    """An ordered (unshuffled) ``DataLoader`` of processor batches with ``"ids"``.

    Parameters
    ----------
    records_or_path : str, os.PathLike or sequence of Mapping
        A dataset file (read with :func:`load_records`) or the records.
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

    Returns
    -------
    LlavaLoader
        A ``torch.utils.data.DataLoader``: batches as made by
        :class:`LlavaCollator`, in record order, without skipped records.
    """
    if isinstance(records_or_path, (str, os.PathLike)):
        records = load_records(records_or_path)
    else:
        records = records_or_path
        _validate(records, "<records>")
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither: rank={rank}, world_size={world_size}")
    if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank is not None:
        shard = shard_indices(len(records), rank, world_size)
        records = [records[i] for i in shard]
    return LlavaLoader(
        LlavaDataset(records, image_folder, processor, on_bad_image=on_bad_image),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=LlavaCollator(processor),
    )


# ------------------------------------------------------------------------ filtering
@dataclass
class FilterReport:
    """What :func:`filter_dataset` wrote.

    Parameters
    ----------
    n_total, n_kept, n_removed : int
        Records in the source, written to ``dst``, and written to ``removed_path``.
    dst : Path
        The kept records.
    removed_path : Path
        The removed records with their detection info.
    n_unscored : int
        Of the kept records, those that were never scored (skipped for an
        unreadable image) and so were kept unchecked.
    """

    n_total: int
    n_kept: int
    n_removed: int
    dst: Path
    removed_path: Path
    n_unscored: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.n_removed / self.n_total if self.n_total else 0.0
        unscored = (
            f"\n  {self.n_unscored} of the kept records were not scored (skipped for an unreadable image): "
            "kept unchecked"
            if self.n_unscored
            else ""
        )
        return (
            f"kept {self.n_kept} of {self.n_total} records, removed {self.n_removed} ({share:.1f}%)\n"
            f"  kept    -> {self.dst}\n"
            f"  removed -> {self.removed_path}{unscored}"
        )


def audit_path(dst: PathLike, removed_path: PathLike | None = None) -> Path:
    """Where :func:`filter_dataset` writes the audit file: ``removed_path``, else ``<dst stem>.removed.json``."""
    dst = Path(dst)
    return Path(removed_path) if removed_path is not None else dst.with_name(f"{dst.stem}.removed.json")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _per_sample_info(detection: Any, n: int) -> dict[str, np.ndarray]:
    """The detection's per-sample arrays to write with each removed record."""
    names = getattr(detection, "per_sample_fields", None)
    explicit = names is not None
    if not explicit:
        names = [k for k in getattr(detection, "__dict__", {}) if not k.startswith("_")]
    info = {"score": np.asarray(detection.score, dtype=np.float64)}
    for name in names:
        if name in ("ids", "flagged", "score"):
            continue
        value = getattr(detection, name)
        if callable(value) or isinstance(value, (str, bytes, Mapping)):
            continue
        try:
            arr = np.asarray(value)
        except Exception:  # e.g. ragged nested lists
            continue
        if arr.ndim in (1, 2) and arr.shape[0] == n and arr.dtype.kind in "biufUS":
            info[name] = arr
        elif explicit:
            raise ValueError(f"detection.{name} is not a per-sample array of length {n}")
    return info


def _jsonable(value: Any) -> Any:
    """Plain JSON values; non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _match(records: list[dict], detection: Any, src: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per record of ``src``: the detection row it came from (-1: not scored), and the per-sample info."""
    for attr in ("ids", "flagged", "score"):
        if not hasattr(detection, attr):
            raise TypeError(f"detection has no .{attr} (need .ids, .flagged and .score)")
    det_ids = detection.ids.tolist() if isinstance(detection.ids, np.ndarray) else list(detection.ids)
    flagged = np.asarray(detection.flagged)
    scores = np.asarray(detection.score)
    n = len(det_ids)
    if flagged.dtype != np.bool_:
        raise TypeError(f"detection.flagged must be a bool array, got dtype {flagged.dtype}")
    if flagged.shape != (n,) or scores.shape != (n,):
        raise ValueError(
            f"detection.ids ({n}), .flagged {flagged.shape} and .score {scores.shape} "
            "must have one entry per sample"
        )
    row: dict[str, int] = {}
    for i, rid in enumerate(det_ids):
        try:
            key = _id_key(rid)
        except TypeError as e:
            raise ValueError(f"detection.ids[{i}]: {e}") from None
        if key in row:
            raise ValueError(f"detection.ids has duplicate id {rid!r}")
        row[key] = i
    src_keys = [_id_key(r["id"]) for r in records]
    known = set(src_keys)
    unknown = [rid for rid in det_ids if _id_key(rid) not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} detection id(s) are not in {src}: {_preview(unknown)}")
    unscored = {}
    for entry in skipped_records(getattr(detection, "meta", None) or {}):
        key = _id_key(entry["id"])
        if key in row or key not in known:
            where = "scored too" if key in row else f"not in {src}"
            raise ValueError(f"the detection lists id {entry['id']!r} as skipped (not scored) but it is {where}")
        unscored[key] = entry
    missing = [r["id"] for r, k in zip(records, src_keys, strict=True) if k not in row and k not in unscored]
    if missing:
        raise ValueError(f"{len(missing)} id(s) of {src} are not in the detection: {_preview(missing)}")
    rows = np.array([row.get(k, -1) for k in src_keys], dtype=np.int64)
    return rows, _per_sample_info(detection, n)


def _dump(records: Iterable[Any], f, fmt: str) -> None:
    if fmt == "jsonl":
        for record in records:
            json.dump(record, f, ensure_ascii=False)
            f.write("\n")
    else:
        json.dump(list(records), f, ensure_ascii=False, indent=2)
        f.write("\n")


def _write_temp(path: Path, records: list, fmt: str, mode: int) -> str:
    """Write ``records`` to a fsync'ed temp file next to ``path``; return its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(f.fileno(), mode)
            _dump(records, f, fmt)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _unlink(path: PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def filter_dataset(
    src: PathLike,
    detection: Any,
    dst: PathLike,
    *,
    removed_path: PathLike | None = None,
    overwrite: bool = False,
) -> FilterReport:
    """Write the records of ``src`` that ``detection`` did not flag to ``dst``.

    Parameters
    ----------
    src : str or os.PathLike
        The LLaVA-format dataset that was scored (JSON or JSONL). Never modified.
    detection : object
        Anything with ``.ids`` (sequence), ``.flagged`` (bool array, same
        length) and ``.score`` (float array, same length: the suspicion), in any
        order. Its ids must be exactly the ids of ``src``, matched by text:
        an int id ``3`` and a string id ``"3"`` are the same id, ``"03"`` is
        not -- except the records its ``meta["skipped"]`` lists (records that
        ``bye-fast score --on-bad-image skip`` could not score, see
        :func:`skipped_records`): those are kept, unchecked, and counted in
        ``FilterReport.n_unscored``.
    dst : str or os.PathLike
        Where the kept records go: every field preserved, in ``src`` order. JSON
        (a list, indented) for a ``.json`` suffix, JSONL for ``.jsonl``/``.ndjson``,
        else the format of ``src``.
    removed_path : str or os.PathLike, optional
        Where the removed records go (format chosen the same way); default
        ``<dst stem>.removed.json`` next to ``dst``. Each is the source record
        with one key added, ``"bye_detection"``: ``{"index": position in src,
        "score": ..., ...}`` plus the detection's other per-sample
        values -- the attributes named by ``detection.per_sample_fields`` if it
        has one, else every public attribute that is a 1-D or 2-D numeric or
        string array with one row per sample. Non-finite floats are written as
        ``null``.
    overwrite : bool
        Replace existing ``dst`` / ``removed_path`` files.

    Returns
    -------
    FilterReport

    Raises
    ------
    ValueError
        If ``dst`` or ``removed_path`` is ``src`` (also via a symlink or hard
        link) or they are the same file; if the ids do not match (the message
        names a few); if a removed record already has a ``"bye_detection"`` key.
    FileExistsError
        If ``dst`` or ``removed_path`` exists and ``overwrite`` is False.
    TypeError
        If ``detection`` lacks an attribute or ``flagged`` is not boolean.

    Notes
    -----
    Both files are written to fsync'ed temp files in their target directories,
    then renamed into place with ``os.replace``: the audit file first, ``dst``
    last. On any failure the temp files are deleted and, if the rename of
    ``dst`` failed, the just-renamed audit file is undone too (the previous
    audit file, if ``overwrite`` replaced one, is put back), so ``dst`` never
    exists in a partial state and never without its own audit file. The outputs get ``src``'s permission bits. The existence
    checks happen before writing; a file created concurrently by another
    process in between is overwritten.
    """
    src, dst = Path(src), Path(dst)
    removed = audit_path(dst, removed_path)
    for name, out in (("dst", dst), ("removed_path", removed)):
        if _same_file(out, src):
            raise ValueError(f"refusing to write {name} {out} over the source dataset {src}")
    if _same_file(dst, removed):
        raise ValueError(f"dst and removed_path are the same file: {dst}")
    if not overwrite:
        for out in (dst, removed):
            if out.exists() or out.is_symlink():
                raise FileExistsError(errno.EEXIST, "output exists (overwrite=True replaces it)", str(out))

    records, src_format = _read(src)
    rows, info = _match(records, detection, src)
    flagged = np.zeros(len(records), dtype=bool)  # a record that was not scored (row -1) is kept
    flagged[rows >= 0] = np.asarray(detection.flagged)[rows[rows >= 0]]
    kept = [r for r, f in zip(records, flagged, strict=True) if not f]
    audit = []
    for index in np.flatnonzero(flagged).tolist():
        record = records[index]
        if AUDIT_KEY in record:
            raise ValueError(f"{src}: record {index} (id {record['id']!r}) already has a {AUDIT_KEY!r} key")
        entry = {"index": index}
        entry.update({k: _jsonable(v[rows[index]].tolist()) for k, v in info.items()})
        audit.append({**record, AUDIT_KEY: entry})

    mode = os.stat(src).st_mode & 0o777
    tmps: list[str] = []
    backup: str | None = None  # the audit file being overwritten, restored if dst cannot be placed
    try:
        for out, content in ((removed, audit), (dst, kept)):
            fmt = _file_format(out)
            tmps.append(_write_temp(out, content, src_format if fmt == "unknown" else fmt, mode))
        if removed.exists():
            backup = f"{tmps[0]}.previous"
            try:
                os.link(removed, backup)
            except OSError:  # no hard links here
                shutil.copy2(removed, backup)
        os.replace(tmps[0], removed)
        os.replace(tmps[1], dst)
    except BaseException:
        # a renamed temp file no longer exists: that tells what was placed, even after an interrupt
        audit_placed = len(tmps) == 2 and not os.path.exists(tmps[0])
        dst_placed = len(tmps) == 2 and not os.path.exists(tmps[1])
        for tmp in tmps:
            _unlink(tmp)
        if audit_placed and not dst_placed:  # the new audit file is in place, its dataset is not
            if backup is not None:
                previous, backup = backup, None
                os.replace(previous, removed)  # if this fails, the old audit file stays at `previous`
            else:
                _unlink(removed)
        raise
    finally:
        if backup is not None:
            _unlink(backup)
    for parent in {dst.parent.resolve(), removed.parent.resolve()}:
        _fsync_dir(parent)
    return FilterReport(len(records), len(kept), len(audit), dst, removed, int((rows < 0).sum()))
