"""Blocks of feature columns for a permutation of the samples, as contiguous rows (native gather).

The default detector sorts, and takes quantiles of, every feature within every context (all
samples, each answer group). Scores keep features as row-major ``(n, F)`` arrays, so a block of
``b`` features for a set of rows is a strided gather followed by a transpose; numpy does that in
two passes, the transposing one not cache-blocked, and on 1M x 1,024 float32 values the copies
cost more than the sorts. :func:`gather_columns` does it in one cache-tiled pass in the native
extension (``csrc/columns.cpp``), without the GIL, so the detector's threads run it in parallel.
:func:`gather_columns_reference` is its numpy twin.
"""

from __future__ import annotations

import numpy as np

from bye_fast import _C

__all__ = ["gather_columns", "gather_columns_reference"]


def gather_columns_reference(x: np.ndarray, rows: np.ndarray, j0: int, j1: int) -> np.ndarray:
    """``x[rows, j0:j1].T`` as a new C-contiguous array, in numpy (the obviously-correct twin)."""
    return np.ascontiguousarray(np.asarray(x)[np.asarray(rows)][:, j0:j1].T)


def gather_columns(x: np.ndarray, rows: np.ndarray, j0: int, j1: int) -> np.ndarray:
    """``x[rows, j0:j1].T`` as a new C-contiguous ``(j1 - j0, len(rows))`` array of ``x``'s dtype.

    ``x``: a 2-D float32 or float64 array (any strides; other dtypes and byte orders take the numpy
    path); ``rows``: integer indices into its first axis (``IndexError`` naming the first one out of
    range). Exactly :func:`gather_columns_reference`'s values."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D; got shape {x.shape}")
    j0, j1 = int(j0), int(j1)
    if not 0 <= j0 <= j1 <= x.shape[1]:
        raise IndexError(f"columns {j0}:{j1} out of range for {x.shape[1]} columns")
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if x.dtype not in (np.float32, np.float64) or not x.dtype.isnative:
        bad = np.nonzero((rows < 0) | (rows >= x.shape[0]))[0]
        if len(bad):
            raise IndexError(f"rows[{bad[0]}] = {rows[bad[0]]} is out of range for {x.shape[0]} rows")
        return gather_columns_reference(x, rows, j0, j1)
    return _C.gather_columns(x, rows, j0, j1)
