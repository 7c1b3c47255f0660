"""Writing the cleaned dataset: the records a detection kept, and an audit file of the ones it removed.

:func:`filter_dataset` places both outputs as one transaction with the atomic
writer of :mod:`bye_fast._io`: a reader sees the old pair or the new one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bye_fast._io import fsync_dir, place, remove, temp_file, temp_folder
from bye_fast.records import (
    DataSource,
    PathLike,
    _file_format,
    _id_key,
    _preview,
    read_dataset,
    skipped_records,
)

__all__ = ["AUDIT_KEY", "FilterReport", "audit_path", "filter_dataset"]

#: Key added to each removed record in the audit file (see :func:`filter_dataset`).
AUDIT_KEY = "bye_detection"


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


def _match(src_ids: list, detection: Any, src: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
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
    src_keys = [_id_key(rid) for rid in src_ids]
    known = set(src_keys)
    unknown = [rid for rid in det_ids if _id_key(rid) not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} detection id(s) are not in {src}: {_preview(unknown)}")
    unscored = {}
    for entry in skipped_records(getattr(detection, "meta", None) or {}):
        key = _id_key(entry["id"])
        if key in row or key not in known:
            where = "scored too" if key in row else f"not in {src}"
            raise ValueError(
                f"the detection lists id {entry['id']!r} as skipped (not scored) but it is {where}"
            )
        unscored[key] = entry
    missing = [rid for rid, k in zip(src_ids, src_keys, strict=True) if k not in row and k not in unscored]
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


_FORMAT_NAMES = {"hf": "datasets save_to_disk folder", "parquet-dir": "folder of parquet files"}


def _audit_safe(value: Any) -> Any:
    """A table row made JSON-ready for the audit file: embedded images as ``{"path", "n_bytes", "sha256"}``."""
    if isinstance(value, (bytes, bytearray)):
        return {"n_bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, Mapping):
        if isinstance(value.get("bytes"), (bytes, bytearray)) and set(value) <= {"bytes", "path"}:
            return {"path": value.get("path"), **_audit_safe(value["bytes"])}
        return {str(k): _audit_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_audit_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # dates, decimals, PIL images...


def _stage(source: DataSource, kept: np.ndarray, dst: Path, mode: int | None) -> Path:
    """Write the kept records of ``source`` beside ``dst`` in its format; return the temp file or folder."""
    fmt = source.format
    if fmt in ("json", "jsonl"):
        out_fmt = _file_format(dst)
        with temp_file(dst, encoding="utf-8", newline="\n", file_mode=mode) as (f, tmp):
            _dump((source.records[i] for i in kept.tolist()), f, fmt if out_fmt == "unknown" else out_fmt)
        return tmp
    import pyarrow.parquet as pq

    if fmt == "parquet":
        with temp_file(dst, "wb", file_mode=mode) as (f, tmp):
            pq.write_table(source.table.take(kept), f)
        return tmp
    with temp_folder(dst) as tmp:
        if fmt == "parquet-dir":
            start = 0
            for file, n in source.files:
                part = kept[(kept >= start) & (kept < start + n)] - start
                pq.write_table(source.table.slice(start, n).take(part), tmp / file.name)
                start += n
        else:  # "hf"
            import datasets

            quiet = not datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            try:
                source.dataset.select(kept.tolist()).save_to_disk(str(tmp))
            finally:
                if not quiet:
                    datasets.enable_progress_bars()
    return tmp


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
        The dataset that was scored (any format of :func:`bye_fast.records.read_dataset`:
        LLaVA or messages JSON/JSONL, a parquet file or folder of them, a
        ``datasets`` ``save_to_disk`` folder). Never modified.
    detection : object
        Anything with ``.ids`` (sequence), ``.flagged`` (bool array, same
        length) and ``.score`` (float array, same length: the suspicion), in any
        order. Its ids must be exactly the ids of ``src``, matched by text:
        an int id ``3`` and a string id ``"3"`` are the same id, ``"03"`` is
        not; records without ids are matched by their row index, the ids that
        scoring gave them -- except the records its ``meta["skipped"]`` lists (records that
        ``bye-fast score --on-bad-image skip`` could not score, see
        :func:`skipped_records`): those are kept, unchecked, and counted in
        ``FilterReport.n_unscored``.
    dst : str or os.PathLike
        Where the kept records go: every field preserved, in ``src`` order, in
        ``src``'s format. A JSON/JSONL source: JSON (a list, indented) for a
        ``.json`` suffix, JSONL for ``.jsonl``/``.ndjson``, else the format of
        ``src``. A parquet file: a parquet file (same schema). A folder of
        parquet files: a folder with the same file names, each holding its kept
        rows. A ``datasets`` folder: a ``save_to_disk`` folder (same features).
    removed_path : str or os.PathLike, optional
        Where the removed records go (format chosen the same way); default
        ``<dst stem>.removed.json`` next to ``dst``. Each is the source record
        with one key added, ``"bye_detection"``: ``{"index": position in src,
        "score": ..., ...}`` plus the detection's other per-sample
        values -- the attributes named by ``detection.per_sample_fields`` if it
        has one, else every public attribute that is a 1-D or 2-D numeric or
        string array with one row per sample. Non-finite floats are written as
        ``null``. Always JSON (or JSONL): from a parquet or ``datasets`` source,
        an embedded image is written as ``{"path", "n_bytes", "sha256"}`` (not
        its bytes), and other values JSON lacks as text.
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
    Both outputs are written to fsync'ed temp files (a temp folder for a folder)
    in their target directories,
    then renamed into place with ``os.replace``: the audit file first, ``dst``
    last. On any failure the temp files are deleted and, if the rename of
    ``dst`` failed, the just-renamed audit file is undone too (the previous
    audit file, if ``overwrite`` replaced one, is put back), so ``dst`` never
    exists in a partial state and never without its own audit file. The outputs get ``src``'s permission bits
    (where the file system allows ``chmod``). The existence
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

    source = read_dataset(src)
    records, src_format, table_source = source.records, source.format, source.table is not None
    if source.path.is_dir():
        for name, out in (("dst", dst), ("removed_path", removed)):
            if source.path.resolve() in out.resolve().parents:
                raise ValueError(f"refusing to write {name} {out} inside the source dataset folder {src}")
    if src_format == "parquet" and dst.suffix.lower() != ".parquet":
        raise ValueError(f"{src} is a parquet file: dst must be one too (a .parquet name), got {dst}")
    if src_format in ("hf", "parquet-dir") and dst.suffix.lower() in (
        ".json",
        ".jsonl",
        ".ndjson",
        ".parquet",
    ):
        raise ValueError(
            f"{src} is a {_FORMAT_NAMES[src_format]}: dst is a folder of the same kind, got {dst}"
        )
    rows, info = _match(source.ids, detection, src)
    flagged = np.zeros(len(records), dtype=bool)  # a record that was not scored (row -1) is kept
    flagged[rows >= 0] = np.asarray(detection.flagged)[rows[rows >= 0]]
    kept_index = np.flatnonzero(~flagged)
    audit = []
    for index in np.flatnonzero(flagged).tolist():
        record = records[index]
        if AUDIT_KEY in record:
            rid = f" (id {record['id']!r})" if "id" in record else ""
            raise ValueError(f"{src}: record {index}{rid} already has a {AUDIT_KEY!r} key")
        entry = {"index": index}
        entry.update({k: _jsonable(v[rows[index]].tolist()) for k, v in info.items()})
        audit.append({**(_audit_safe(record) if table_source else record), AUDIT_KEY: entry})

    mode = os.stat(src).st_mode & 0o777 if not source.path.is_dir() else None
    tmps: list[Path] = []
    backup: Path | None = None  # the audit file being overwritten, restored if dst cannot be placed
    try:
        fmt = _file_format(removed)
        with temp_file(removed, encoding="utf-8", newline="\n", file_mode=mode) as (f, tmp):
            tmps.append(tmp)
            _dump(
                audit,
                f,
                "jsonl" if fmt == "jsonl" or (fmt == "unknown" and src_format == "jsonl") else "json",
            )
        tmps.append(_stage(source, kept_index, dst, mode))
        if removed.exists():
            backup = tmps[0].with_name(f"{tmps[0].name}.previous")
            try:
                os.link(removed, backup)
            except OSError:  # no hard links here
                shutil.copy2(removed, backup)
        place(tmps[0], removed)
        place(tmps[1], dst)
    except BaseException:
        # a renamed temp file no longer exists: that tells what was placed, even after an interrupt
        audit_placed = len(tmps) == 2 and not tmps[0].exists()
        dst_placed = len(tmps) == 2 and not tmps[1].exists()
        for tmp in tmps:
            remove(tmp)
        if audit_placed and not dst_placed:  # the new audit file is in place, its dataset is not
            if backup is not None:
                previous, backup = backup, None
                os.replace(previous, removed)  # if this fails, the old audit file stays at `previous`
            else:
                remove(removed)
        raise
    finally:
        if backup is not None:
            remove(backup)
    for parent in {dst.parent.resolve(), removed.parent.resolve()}:
        fsync_dir(parent)
    n_kept = len(kept_index)
    return FilterReport(len(records), n_kept, len(audit), dst, removed, int((rows < 0).sum()))
