"""Resumable scoring: finished rows in shard files, described by a manifest.

A checkpoint folder holds

* ``manifest.json``: what the rows were computed with -- a hash of the model
  config (and a sample of its weights), of the scoring options, and for every
  shard a hash of the data order up to its last batch -- plus the list of
  shards and whether the run finished;
* ``shard_<first>_<stop>.npz``: the rows of loader batches ``first .. stop-1``
  (a :class:`~bye_fast.scores.Scores` file).

Every file is written atomically (temp file + rename), the shard before the
manifest that lists it, so a run killed at any point leaves a consistent
checkpoint (at worst an unlisted shard file, which the next run overwrites).

The data order is a hash chain over the batches as the loader yields them:
``h_i = sha256(h_{i-1} || ids_i || input_ids_i || attention_mask_i)``. A
stored shard is reused only if the rerun's chain at its last batch is the
same, i.e. the same batches came in the same order. Pixel values are not
hashed (too costly); a change of images under unchanged ids and text goes
unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bye_fast._io import write_json_atomic
from bye_fast.scores import RowBuffer, Scores, _as_ids

__all__ = ["ScoreCheckpoint", "batch_digest", "model_fingerprint"]

MANIFEST = "manifest.json"
_FORMAT = "bye_fast.score checkpoint"
_VERSION = 1
#: Config keys that do not change what the model computes (paths, versions, dtype -- which is an option).
_VOLATILE_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_commit_hash",
        "attn_implementation",
        "_attn_implementation",
        "_attn_implementation_internal",
        "_attn_implementation_autoset",
    }
)
_CHAIN_SEED = hashlib.sha256(b"bye_fast data order v1").hexdigest()


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Hashes that identify a model: its class, its config and a sample of its weights.

    The config hash is over ``model.config.to_json_string()`` without keys that
    do not change the computation (paths, library version, dtype, attention
    implementation). The weights hash is over every parameter's name, shape
    and first and last 16 values, so it tells a fine-tuned model from its base
    without reading all weights.
    """
    config = _strip(json.loads(model.config.to_json_string()))
    h = hashlib.sha256()
    samples = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            k = min(16, flat.numel())
            samples.append(torch.cat([flat[:k], flat[flat.numel() - k :]]).float())
            h.update(f"{name}:{tuple(p.shape)};".encode())
        if samples:
            h.update(torch.cat(samples).cpu().numpy().tobytes())
    return {
        "class": type(model).__name__,
        "config_sha256": _sha(config),
        "weights_sha256": h.hexdigest(),
        "config": config,
    }


def batch_digest(ids: list, inputs: Mapping[str, Any]) -> bytes:
    """Digest of one batch for the data-order chain: its ids, ``input_ids`` and ``attention_mask``."""
    h = hashlib.sha256(json.dumps(ids, default=str).encode())
    for key in ("input_ids", "attention_mask"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor):
            h.update(f"{key}{tuple(value.shape)}".encode())
            h.update(value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.digest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, default=str)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Readable differences between two JSON-like values (at most a few)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{where}: (absent) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{where}: {old[k]!r} -> (absent)")
            else:
                out.extend(_diff(old[k], new[k], where))
        return out
    return [] if old == new else [f"{prefix or 'value'}: {old!r} -> {new!r}"]


def _shown(items: list[str], k: int = 5) -> str:
    return "; ".join(items[:k]) + (f"; ... ({len(items) - k} more)" if len(items) > k else "")


class _Pending(RowBuffer):
    """Rows of the batches not yet written as a shard."""

    def __init__(self) -> None:
        super().__init__()
        self.n_batches = 0


class ScoreCheckpoint:
    """A checkpoint folder of one scoring run (one rank); see the module docstring.

    Use :meth:`open`; then, for every loader batch in order, :meth:`begin_batch`
    (True: the batch's rows are stored, do not score it; collect them with
    :meth:`take_stored`), :meth:`add` for the rows of a scored batch, and
    :meth:`finish` at the end.

    Parameters
    ----------
    directory : Path
    manifest : dict
        The manifest as read or freshly made.
    every : int
        Write a shard after this many newly scored batches.
    """

    def __init__(self, directory: Path, manifest: dict, every: int) -> None:
        self.directory = directory
        self.manifest = manifest
        self.every = int(every)
        self._stored = list(manifest["shards"])
        self._cursor = 0  # next stored shard to consume
        self._stored_ids: list = []  # ids of the batches of the stored shard being consumed
        self._ready: list[Scores] = []
        self._chain = _CHAIN_SEED
        self._pending = _Pending()
        self._first_pending: int | None = None
        self._seen = 0

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls, directory: str | os.PathLike, *, model: torch.nn.Module, options: dict[str, Any], every: int
    ) -> ScoreCheckpoint:
        """Open (or create) the checkpoint in ``directory``; refuse one written for another run.

        Parameters
        ----------
        directory : path
            The folder; created if missing.
        model : torch.nn.Module
            The model being scored (its config and a weight sample are hashed).
        options : dict
            JSON-able scoring options that change the results (backend, dtype, ...).
        every : int
            Write a shard every this many newly scored batches (``>= 1``).

        Raises
        ------
        ValueError
            If the folder holds a checkpoint of another model, other options or
            another format, or is not empty and holds no manifest.
        """
        if int(every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fp = model_fingerprint(model)
        path = directory / MANIFEST
        if not path.exists():
            others = [p.name for p in directory.iterdir() if not p.name.startswith(".")]
            if others:
                raise ValueError(
                    f"checkpoint_dir {directory} is not empty ({_shown(sorted(others), 3)}) and holds no "
                    f"{MANIFEST}: it is not a bye_fast checkpoint; give an empty or new folder"
                )
            manifest = {
                "format": _FORMAT,
                "version": _VERSION,
                "model": fp,
                "options": options,
                "options_sha256": _sha(options),
                "shards": [],
                "complete": False,
                "n_batches": None,
            }
            _write_json_atomic(path, manifest)
            return cls(directory, manifest, every)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} cannot be read ({err}); use a new checkpoint_dir") from err
        restart = f"use a new checkpoint_dir, or delete {directory} to start over"
        if manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION:
            raise ValueError(
                f"{path} is not a bye_fast.score checkpoint of version {_VERSION} "
                f"(format={manifest.get('format')!r}, version={manifest.get('version')!r}); {restart}"
            )
        old = manifest["model"]
        if old["class"] != fp["class"] or old["config_sha256"] != fp["config_sha256"]:
            changes = _diff(old.get("config", {}), fp["config"])
            if old["class"] != fp["class"]:
                changes.insert(0, f"model class: {old['class']} -> {fp['class']}")
            raise ValueError(
                f"checkpoint_dir {directory} was written for another model config "
                f"({_shown(changes) or 'config hash differs'}); its rows cannot be mixed with this "
                f"model's: {restart}"
            )
        # options first: another dtype also changes the sampled weight values
        if manifest["options_sha256"] != _sha(options):
            changes = _diff(manifest["options"], options)
            raise ValueError(
                f"checkpoint_dir {directory} was written with other scoring options "
                f"({_shown(changes)}); rerun with the same options, or {restart}"
            )
        if old["weights_sha256"] != fp["weights_sha256"]:
            raise ValueError(
                f"checkpoint_dir {directory} was written for a model with the same config but other weights "
                f"(e.g. another fine-tuning checkpoint); its rows cannot be mixed with this model's: {restart}"
            )
        for shard in manifest["shards"]:
            if not (directory / shard["file"]).exists():
                raise ValueError(
                    f"checkpoint_dir {directory} is damaged: {shard['file']} is missing; {restart}"
                )
        return cls(directory, manifest, every)

    # ----------------------------------------------------------------- batches
    @property
    def stored_batches(self) -> int:
        """Loader batches whose rows the checkpoint holds."""
        return sum(s["n_batches"] for s in self._stored)

    def begin_batch(self, index: int, ids: list, inputs: Mapping[str, Any]) -> bool:
        """Record batch ``index`` in the data-order chain; True if its rows are stored already.

        Raises
        ------
        ValueError
            If the data order so far differs from the checkpointed run's, or the
            finished run had fewer batches.
        """
        if index != self._seen:
            raise RuntimeError(f"batches must be offered in order: expected {self._seen}, got {index}")
        self._seen += 1
        self._chain = hashlib.sha256(bytes.fromhex(self._chain) + batch_digest(ids, inputs)).hexdigest()
        if self._cursor < len(self._stored):
            shard = self._stored[self._cursor]
            self._stored_ids.extend(ids)
            last = shard["first_batch"] + shard["n_batches"] - 1
            if index < last:
                return True
            if self._chain != shard["data_sha256"]:
                raise ValueError(
                    f"the loader's batches {shard['first_batch']}..{last} (ids {_preview(self._stored_ids)}) "
                    f"differ from those of the checkpointed run in {self.directory} (other data, another "
                    "order, or another batch size): use a new checkpoint_dir, or delete it to start over"
                )
            part = Scores.load(self.directory / shard["file"])
            if part.ids.tolist() != _as_ids(self._stored_ids).tolist():  # as Scores stores them
                raise ValueError(
                    f"checkpoint_dir {self.directory} is damaged: {shard['file']} holds ids "
                    f"{_preview(part.ids.tolist())} but its batches have {_preview(self._stored_ids)}"
                )
            self._ready.append(part)
            self._cursor += 1
            self._stored_ids = []
            return True
        if self.manifest["complete"]:
            raise ValueError(
                f"the loader yields more batches than the finished run in {self.directory} "
                f"({self.manifest['n_batches']}): the data differs; use a new checkpoint_dir, or delete it"
            )
        return False

    def take_stored(self) -> Scores | None:
        """The rows of the stored shard completed by the last :meth:`begin_batch`, if any."""
        return self._ready.pop(0) if self._ready else None

    def add(self, index: int, arrays: dict[str, np.ndarray], ids: list) -> None:
        """The rows (by Scores field) of newly scored batch ``index``; writes a shard every ``every`` batches."""
        p = self._pending
        if self._first_pending is None:
            self._first_pending = index
        p.add(arrays, ids)
        p.n_batches += 1
        if p.n_batches >= self.every:
            self._flush()

    def _flush(self) -> None:
        p = self._pending
        if p.n_batches == 0:
            return
        first = self._first_pending
        stop = first + p.n_batches
        name = f"shard_{first:08d}_{stop:08d}.npz"
        meta = {"first_batch": first, "n_batches": p.n_batches, "data_sha256": self._chain}
        p.to_scores(meta).save(self.directory / name)
        self.manifest["shards"].append(
            {"file": name, "first_batch": first, "n_batches": p.n_batches, "n_rows": len(p.ids), **meta}
        )
        _write_json_atomic(self.directory / MANIFEST, self.manifest)
        self._pending = _Pending()
        self._first_pending = None

    def finish(self) -> None:
        """Write the last rows and mark the run finished.

        Raises
        ------
        ValueError
            If the loader ended before the batches the checkpoint holds.
        """
        if self._cursor < len(self._stored):
            raise ValueError(
                f"the loader yielded {self._seen} batches but the checkpointed run in {self.directory} "
                f"holds {self.stored_batches}: the data differs; use a new checkpoint_dir, or delete it"
            )
        self._flush()
        if not self.manifest["complete"]:
            self.manifest["complete"] = True
            self.manifest["n_batches"] = self._seen
            _write_json_atomic(self.directory / MANIFEST, self.manifest)


def _preview(ids: list, k: int = 4) -> str:
    return "[" + ", ".join(repr(i) for i in ids[:k]) + (", ...]" if len(ids) > k else "]")
