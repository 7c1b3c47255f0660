"""Instruction data (LLaVA or messages records; JSON, JSONL, parquet, ``datasets`` folders): the names
of :mod:`bye_fast.records`, :mod:`bye_fast.prompts`, :mod:`bye_fast.loader` and :mod:`bye_fast.filter`
in one place.

This module only re-exports, so that ``from bye_fast.data import make_loader``
(and the other names it always had) keeps working:

* :mod:`bye_fast.records` -- reading and validating records (:func:`load_records`);
* :mod:`bye_fast.prompts` -- the prompt a record is scored on (:func:`build_prompt`);
* :mod:`bye_fast.loader` -- datasets, collators and loaders (:func:`make_loader`,
  :func:`shard_indices`);
* :mod:`bye_fast.filter` -- writing the cleaned set and its audit file
  (:func:`filter_dataset`).
"""

from __future__ import annotations

from bye_fast.filter import AUDIT_KEY, FilterReport, _same_file, audit_path, filter_dataset
from bye_fast.loader import (
    ON_BAD_IMAGE,
    BadImageError,
    LlavaCollator,
    LlavaDataset,
    LlavaLoader,
    make_loader,
    shard_indices,
)
from bye_fast.prompts import CHAT_TEMPLATES, IMAGE_PLACEMENTS, PromptOptions, build_prompt
from bye_fast.records import (
    FORMATS,
    HUMAN_ROLES,
    IMAGE_PLACEHOLDER,
    DataSource,
    TableRecords,
    _id_key,
    _image_paths,
    load_records,
    read_dataset,
    record_ids,
    skipped_records,
)

__all__ = [
    "AUDIT_KEY",
    "CHAT_TEMPLATES",
    "FORMATS",
    "IMAGE_PLACEMENTS",
    "BadImageError",
    "DataSource",
    "FilterReport",
    "HUMAN_ROLES",
    "IMAGE_PLACEHOLDER",
    "LlavaCollator",
    "LlavaDataset",
    "LlavaLoader",
    "ON_BAD_IMAGE",
    "PromptOptions",
    "TableRecords",
    "audit_path",
    "build_prompt",
    "filter_dataset",
    "load_records",
    "make_loader",
    "read_dataset",
    "record_ids",
    "shard_indices",
    "skipped_records",
]

# private helpers that callers of the old single module reach for
_private = (_id_key, _image_paths, _same_file)
