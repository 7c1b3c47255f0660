"""Reading and validating instruction data: LLaVA and "messages" records, from JSON, JSONL, parquet
or a HF ``datasets`` folder.

Record schemas
--------------
* **LLaVA** (``"conversations"``)::

      {"id": "000123",
       "image": "coco/000123.jpg",            # or a list of images, or absent
       "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                         {"from": "gpt", "value": "A cat."}],
       ...any other fields...}

* **messages** (ShareGPT / OpenAI style, ``"messages"``)::

      {"messages": [{"role": "system", "content": "You are ..."},           # optional
                    {"role": "user", "content": "<image>What is shown?"},   # or a list of parts:
                    # "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
                    {"role": "assistant", "content": "A cat."}],
       "images": ["coco/000123.jpg"],          # or "image": one image
       ...any other fields...}

An image is a path (relative to the image folder), or -- in a HF dataset or
parquet file -- an image column's value: ``{"bytes": ..., "path": ...}`` (how
``datasets.Image`` stores it), raw bytes, or a ``PIL.Image``. Either schema may
name its images ``"image"`` (one or a list) or ``"images"`` (a list).

Containers (:func:`read_dataset`)
---------------------------------
* a ``.json`` file holding a list of records, or JSONL (``.jsonl``/``.ndjson``,
  or a ``.json`` file that does not start with ``[``), one record per line;
* a ``.parquet`` file, or a folder of ``*.parquet`` files (read in name order
  as one table), one record per row;
* a folder written by ``datasets.Dataset.save_to_disk`` (one split).

Conventions
-----------
* Record positions in messages are 0-based (``record 0`` is the first one);
  JSONL messages also give the 1-based line number.
* Human turns are those whose ``"from"`` (LLaVA) or ``"role"`` (messages) is
  ``"human"`` or ``"user"`` (case-insensitive); only the first one is used for
  the prompt, with a ``"system"`` turn before it.
* Ids are ``str`` or ``int`` and are compared by their text: the integer ``3``
  and the string ``"3"`` are the same id (so they count as duplicates within
  one file, and a detection id ``"3"`` -- e.g. from a numpy string array --
  matches a record id ``3``), while ``"03"`` is a different id. Booleans and
  floats are not ids.
* **Records without ids**: when NO record of a dataset has an ``"id"`` field,
  each record's id is its row index (0-based position in the file or table;
  a folder of parquet files counts on across its files in name order). Scoring
  and :func:`bye_fast.filter.filter_dataset` use the same rule, so they match.
  A dataset where some records have an id and some do not is refused, and so
  is a LLaVA JSON/JSONL file without ids (the LLaVA format has them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMATS",
    "HUMAN_ROLES",
    "IMAGE_PLACEHOLDER",
    "DataSource",
    "TableRecords",
    "load_records",
    "read_dataset",
    "record_ids",
    "skipped_records",
]

#: Container formats :func:`read_dataset` reads (``DataSource.format``).
FORMATS = ("json", "jsonl", "parquet", "parquet-dir", "hf")

#: The image placeholder of the LLaVA data format (independent of the model's image token).
IMAGE_PLACEHOLDER = "<image>"
#: Values of a turn's ``"from"`` that mark a human (question) turn, compared lower-case.
HUMAN_ROLES = frozenset({"human", "user"})

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


def _is_image_value(value: Any) -> bool:
    """A path, bytes, a ``{"bytes", "path"}`` dict (``datasets.Image``'s storage) or a PIL image."""
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, (bytes, bytearray)):
        return len(value) > 0
    if isinstance(value, Mapping):
        raw, path = value.get("bytes"), value.get("path")
        if raw:
            return isinstance(raw, (bytes, bytearray))
        return isinstance(path, str) and bool(path)
    return hasattr(value, "convert") and hasattr(value, "size")  # PIL.Image.Image, without importing PIL here


def _image_field(record: Mapping) -> tuple[str | None, Any]:
    """``("images", value)`` or ``("image", value)``: the record's image field (None: no images)."""
    has_images = record.get("images") is not None
    if has_images and record.get("image") is not None:
        raise ValueError("record has both 'image' and 'images'; give one of them")
    if has_images:
        return "images", record["images"]
    if record.get("image") is not None:
        return "image", record["image"]
    return None, None


def _image_values(record: Mapping) -> list:
    """The record's images (paths, bytes, ``{"bytes", "path"}`` dicts or PIL images), in order."""
    _, images = _image_field(record)
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


#: The old name (LLaVA images are paths).
_image_paths = _image_values


def _schema(record: Mapping) -> str | None:
    """``"messages"``, ``"llava"``, or None when the record has neither list."""
    if record.get("messages") is not None:
        return "messages"
    if record.get("conversations") is not None:
        return "llava"
    return None


def _turn_problem(turn: Mapping, schema: str) -> str | None:
    """What is wrong with a human/system turn's text, or None."""
    if schema == "llava":
        return None if isinstance(turn.get("value"), str) else "has no text 'value'"
    content = turn.get("content")
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"'content' must be a string or a list of parts, got {type(content).__name__}"
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                return f"part {k} is a text part without a string 'text'"
        elif kind != "image":
            return f"part {k} must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, got {part!r}"
    return None


def _record_problem(record: Any, *, id_required: bool = True) -> str | None:
    """What is wrong with one record (not counting duplicate ids), or None."""
    if not isinstance(record, Mapping):
        return f"a record must be a JSON object, got {type(record).__name__}"
    if "id" in record:
        rid = record["id"]
        try:
            _id_key(rid)
        except TypeError as e:
            return str(e)
        who = f"(id {rid!r}): "
    elif id_required:
        return "record has no 'id'"
    else:
        who = ""
    try:
        name, images = _image_field(record)
    except ValueError as e:
        return f"{who}{e}"
    if images is not None:
        values = list(images) if isinstance(images, (list, tuple)) else [images]
        if not all(_is_image_value(v) for v in values):
            shown = images if isinstance(images, (str, list, int, float)) else type(images).__name__
            return (
                f"{who}{name!r} must be an image (a non-empty path, bytes or a {{'bytes', 'path'}} dict) or a "
                f"list of them, got {shown!r}"
            )
    schema = _schema(record)
    if schema is None:
        return f"{who}record has no 'conversations' (LLaVA) or 'messages' list"
    key = "conversations" if schema == "llava" else "messages"
    turns = record.get(key)
    if not isinstance(turns, list) or not all(isinstance(t, Mapping) for t in turns):
        return f"{who}{key!r} must be a list of objects"
    turn = _first_human_turn(turns)
    if turn is None:
        roles, role_key = sorted(HUMAN_ROLES), "from" if schema == "llava" else "role"
        return f"{who}{key!r} has no human turn (a turn whose {role_key!r} is one of {roles})"
    problem = _turn_problem(turn, schema)
    if problem is not None:
        return f"{who}the first human turn {problem}"
    system = _system_turn(turns)
    if system is not None and _turn_problem(system, schema) is not None:
        return f"{who}the system turn {_turn_problem(system, schema)}"
    return None


def _validate(
    records: Sequence[Any],
    source: str,
    where: Callable[[int], str] | None = None,
    *,
    llava_ids_required: bool = False,
    ids: Sequence[Any] | None = None,
) -> list:
    """Validate all records and the uniqueness of their ids; ``where(i)`` names record ``i``.

    Returns the records' ids: their ``"id"`` fields, or their row indices when no record has one
    (see the module docstring). ``llava_ids_required``: a LLaVA record without an id is an error even
    then (LLaVA JSON/JSONL). ``ids``: the ids, already known (a shard of a dataset): only checked for
    duplicates.
    """
    where = where or (lambda i: f"{source}: record {i}")
    if isinstance(records, TableRecords):  # a column for all rows: no pass over the table for it
        have_ids = ids is None and "id" in records.table.column_names
    else:
        have_ids = ids is None and any(isinstance(r, Mapping) and "id" in r for r in records)
    seen: dict[str, int] = {}
    out = []
    for i, record in enumerate(records):
        required = ids is None and (have_ids or (llava_ids_required and isinstance(record, Mapping)
                                                 and _schema(record) == "llava"))  # fmt: skip
        problem = _record_problem(record, id_required=required)
        if problem is not None:
            if problem == "record has no 'id'" and have_ids:
                problem += (
                    " (other records have one: give every record an id, or none, and the row index is used)"
                )
            sep = "" if problem.startswith("(") else ":"  # "file: record 3 (id 'x'): ..."
            raise ValueError(f"{where(i)}{sep} {problem}")
        rid = ids[i] if ids is not None else (record["id"] if have_ids else i)
        out.append(rid)
        key = _id_key(rid)
        first = seen.setdefault(key, i)
        if first != i:
            other = out[first]
            same = f" (same as id {other!r})" if other != rid else ""
            raise ValueError(f"{where(i)}: duplicate id {rid!r}{same}, first seen at {where(first)}")
    return out


def record_ids(records: Sequence[Mapping]) -> list:
    """The ids of ``records`` (validated): their ``"id"`` fields, or their row indices when none has one."""
    return _validate(records, "<records>")


def load_records(path: PathLike) -> Sequence[Mapping]:
    """Read and validate a dataset: LLaVA or messages records, in any container of :func:`read_dataset`.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.json`` file holding a list of records, or a ``.jsonl``/``.ndjson``
        file with one record per line (blank lines are skipped). A file with
        another suffix, or a ``.json`` file that does not start with ``[``, is
        read as JSONL -- unless it is one JSON object that is not a one-line
        record (e.g. ``{"data": [...]}``), which is refused as such. Or a
        ``.parquet`` file, a folder of them, or a ``datasets`` ``save_to_disk`` folder.

    Returns
    -------
    list of dict, or TableRecords
        The records as parsed, in file order, unmodified (a parquet or
        ``datasets`` table: a :class:`TableRecords`, rows read on demand).

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
    return read_dataset(path).records


@dataclass
class DataSource:
    """A dataset as read by :func:`read_dataset`: its records, their ids, and what writing it back needs.

    Attributes
    ----------
    path : Path
    format : str
        One of :data:`FORMATS`: ``"json"``, ``"jsonl"``, ``"parquet"`` (a file),
        ``"parquet-dir"`` (a folder of parquet files) or ``"hf"`` (a
        ``save_to_disk`` folder).
    records : sequence of Mapping
        A list of dicts (JSON, JSONL) or a :class:`TableRecords`.
    ids : list
        Each record's id: its ``"id"`` field, or its row index when no record has one.
    table : pyarrow.Table or None
        Every row (table formats).
    dataset : datasets.Dataset or None
        The dataset (``"hf"``).
    files : list of (Path, int)
        ``"parquet-dir"``: each file and its number of rows, in reading order.
    """

    path: Path
    format: str
    records: Sequence[Mapping]
    ids: list
    table: Any = None
    dataset: Any = None
    files: list = field(default_factory=list)


class TableRecords(Sequence):
    """The rows of a ``pyarrow.Table`` as records (dicts), read on demand.

    Indexing gives one row as a dict (an image column's value as stored: a
    ``{"bytes", "path"}`` dict or a path); a slice gives another ``TableRecords``;
    iteration reads the rows a batch at a time. Picklable (pyarrow tables are).
    """

    def __init__(self, table: Any) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("TableRecords slices must be contiguous")
            return TableRecords(self.table.slice(start, max(stop - start, 0)))
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"row {index} of a table of {n}")
        return self.table.slice(index, 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.to_batches(max_chunksize=256):
            yield from batch.to_pylist()


def read_dataset(path: PathLike) -> DataSource:
    """Read and validate a dataset of any container format (see the module docstring).

    Parquet and ``datasets`` folders need ``pyarrow`` and ``datasets``, imported only then.

    Raises
    ------
    ValueError
        As :func:`load_records`, and for a folder that is neither a ``save_to_disk``
        folder nor a folder of parquet files, or a ``DatasetDict`` (several splits).
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's errors: ArrowInvalid, OSError
            raise ValueError(f"{path}: not a parquet file pyarrow can read ({e})") from None
        return _table_source(path, "parquet", table)
    records, fmt, ids = _read_json(path)
    return DataSource(path, fmt, records, ids)


def _read_folder(path: Path) -> DataSource:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(
            f"{path}: a datasets DatasetDict with splits {splits}; give one split's folder, e.g. "
            f"{path / (splits[0] if splits else 'train')}"
        )
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid...
            raise ValueError(f"{path}: not a datasets folder that load_from_disk can read ({e})") from None
        if ds._indices is not None:  # a saved dataset has none; be safe
            ds = ds.flatten_indices()
        return _table_source(path, "hf", ds.data.table, dataset=ds)
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise ValueError(
            f"{path}: a folder that is neither a datasets save_to_disk folder (state.json, dataset_info.json) "
            "nor a folder of .parquet files"
        )
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except Exception as e:
            raise ValueError(f"{f}: not a parquet file pyarrow can read ({e})") from None
    try:
        table = pa.concat_tables(tables)
    except Exception as e:
        raise ValueError(f"{path}: its parquet files do not share one schema ({e})") from None
    return _table_source(
        path, "parquet-dir", table, files=[(f, t.num_rows) for f, t in zip(files, tables, strict=True)]
    )


def _table_source(path: Path, fmt: str, table: Any, **extra: Any) -> DataSource:
    records = TableRecords(table)
    ids = _validate(records, str(path), lambda i: f"{path}: row {i}")
    return DataSource(path, fmt, records, ids, table=table, **extra)


def _read(path: Path) -> tuple[list[dict], str]:
    """The records of a JSON/JSONL file and the format that was read (``"json"`` or ``"jsonl"``)."""
    return _read_json(path)[:2]


def _read_json(path: Path) -> tuple[list[dict], str, list]:
    """The records of a JSON/JSONL file, the format that was read (``"json"`` or ``"jsonl"``), the ids."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); LLaVA data must be "
            "UTF-8 JSON or JSONL (or parquet, or a datasets folder)"
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
        ids = _validate(records, str(path), llava_ids_required=True)
        return records, "json", ids
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
    ids = _validate(
        records, str(path), lambda i: f"{path}: line {lines[i]} (record {i})", llava_ids_required=True
    )
    return records, "jsonl", ids


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


def _role(turn: Mapping) -> str | None:
    role = turn.get("from", turn.get("role"))
    return role.lower() if isinstance(role, str) else None


def _first_human_turn(turns: Sequence[Mapping]) -> Mapping | None:
    """The first turn whose ``"from"`` (LLaVA) or ``"role"`` (messages) is a human role."""
    for turn in turns:
        if _role(turn) in HUMAN_ROLES:
            return turn
    return None


def _system_turn(turns: Sequence[Mapping]) -> Mapping | None:
    """A ``"system"`` turn before the first human turn, or None."""
    for turn in turns:
        role = _role(turn)
        if role in HUMAN_ROLES:
            return None
        if role == "system":
            return turn
    return None


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
