"""The native column gather (bye_fast.columns) against its numpy twin."""

from __future__ import annotations

import numpy as np
import pytest

from bye_fast.columns import gather_columns, gather_columns_reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,j0,j1", [((1, 1), 0, 1), ((37, 5), 1, 4), ((1000, 130), 3, 131 - 1), ((600, 64), 0, 64)])
@pytest.mark.parametrize("layout", ["c", "fortran", "column_slice", "row_step"])
def test_gather_equals_numpy(dtype, shape, j0, j1, layout):
    rng = np.random.default_rng(hash((shape, j0, layout)) % 2**32)
    base = rng.normal(size=(shape[0] * 2, shape[1] + 7)).astype(dtype)
    x = {"c": np.ascontiguousarray(base[: shape[0], : shape[1]]),
         "fortran": np.asfortranarray(base[: shape[0], : shape[1]]),
         "column_slice": base[: shape[0], 3 : 3 + shape[1]],
         "row_step": base[::2, : shape[1]]}[layout]  # fmt: skip
    for rows in (rng.permutation(shape[0]), rng.integers(0, shape[0], 3 * shape[0] + 1), np.arange(0)):
        got = gather_columns(x, rows, j0, j1)
        want = gather_columns_reference(x, rows, j0, j1)
        assert got.dtype == x.dtype and got.flags.c_contiguous and got.shape == (j1 - j0, len(rows))
        np.testing.assert_array_equal(got, want)


def test_gather_other_dtypes_take_the_numpy_path():
    x = np.arange(24, dtype=np.int32).reshape(6, 4)
    np.testing.assert_array_equal(gather_columns(x, [5, 0], 1, 3), [[21, 1], [22, 2]])
    big_endian = np.arange(12, dtype=">f4").reshape(4, 3)
    np.testing.assert_array_equal(gather_columns(big_endian, [3, 1], 0, 2), [[9, 3], [10, 4]])


def test_gather_errors_name_the_argument():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(IndexError, match=r"rows\[1\] = 4 is out of range for 4 rows"):
        gather_columns(x, [0, 4], 0, 2)
    with pytest.raises(IndexError, match=r"rows\[0\] = -1"):
        gather_columns(x.astype(np.int64), [-1], 0, 2)
    with pytest.raises(IndexError, match="columns 1:4 out of range for 3 columns"):
        gather_columns(x, [0], 1, 4)
    with pytest.raises(ValueError, match="2-D"):
        gather_columns(np.zeros(3, np.float32), [0], 0, 1)
