"""Reading and validating LLaVA-format instruction data.

The LLaVA instruction-tuning format is a JSON list (or JSONL, one record per
line) of records such as::

    {"id": "000123",
     "image": "coco/000123.jpg",            # or a list of paths, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat."}],
     ...any other fields...}

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

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["HUMAN_ROLES", "IMAGE_PLACEHOLDER", "load_records", "skipped_records"]

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
