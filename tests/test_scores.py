"""The Scores container: validation, subsetting and a lossless .npz round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bye_fast import Scores
from bye_fast.scores import FIELDS, RowBuffer


def _scores(rng, n=7, layers=3, heads=2, hidden=5, ids=None):
    sizes = {"L": layers, "H": heads, "D": hidden, "V": hidden + 1}
    arrays = {}
    for f in FIELDS:
        shape = (n, *(sizes[d] for d in f.dims))
        arrays[f.name] = (
            rng.integers(0, 1000, shape) if f.dtype == np.int64 else rng.random(shape, dtype=np.float32)
        )
    return Scores(**arrays, ids=ids, meta={"model": "tiny", "backend": "torch"})


def test_field_table_is_the_dataclass():
    """Every per-sample attribute of Scores is in FIELDS (so save/load, gather and buffers carry it)."""
    attrs = [f.name for f in dataclasses.fields(Scores)]
    assert attrs == [f.name for f in FIELDS] + ["ids", "meta"]


@pytest.mark.parametrize("ids", [None, ["a", "b", "c", "d", "e", "f", "g"], [10, 3, 5, 7, 1, 2, 99]])
def test_save_load_round_trip(tmp_path, ids):
    rng = np.random.default_rng(0)
    s = _scores(rng, ids=ids)
    s.entropy[2, 1] = np.nan
    path = s.save(tmp_path / "sub" / "scores.npz")
    t = Scores.load(path)
    assert list(t.arrays()) == [f.name for f in FIELDS]
    for name in [*t.arrays(), "ids"]:
        np.testing.assert_array_equal(getattr(s, name), getattr(t, name))
        assert getattr(s, name).dtype == getattr(t, name).dtype
    assert t.ids.dtype == s.ids.dtype
    assert t.meta == s.meta
    assert not list(path.parent.glob("*.tmp"))


def test_optional_fields_may_be_absent(tmp_path):
    s = Scores(entropy=np.zeros((3, 2)))
    t = Scores.load(s.save(tmp_path / "s.npz"))
    assert t.head_entropy is None and t.image_mass is None
    assert t.ids.tolist() == [0, 1, 2]


def test_validation_errors():
    with pytest.raises(ValueError, match="entropy must be"):
        Scores(entropy=np.zeros(3))
    with pytest.raises(ValueError, match="head_entropy must be"):
        Scores(entropy=np.zeros((3, 2)), head_entropy=np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match="ids must have one entry per sample"):
        Scores(entropy=np.zeros((3, 2)), ids=[1, 2])
    with pytest.raises(ValueError, match="'x' appears more than once"):
        Scores(entropy=np.zeros((3, 2)), ids=["x", "y", "x"])
    with pytest.raises(ValueError, match=".npz"):
        Scores(entropy=np.zeros((3, 2))).save("scores.json")


def test_load_refuses_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", entropy=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not a bye_fast scores file"):
        Scores.load(tmp_path / "other.npz")


def test_subset_concatenate_and_no_image_ids():
    rng = np.random.default_rng(1)
    s = _scores(rng, ids=list("abcdefg"))
    s.n_image_tokens[[1, 4]] = 0
    assert s.no_image_ids == ["b", "e"]
    parts = [s.subset(np.arange(0, 3)), s.subset(np.arange(3, 7))]
    t = Scores.concatenate(parts)
    np.testing.assert_array_equal(t.head_entropy, s.head_entropy)
    assert t.ids.tolist() == list("abcdefg")
    assert s.subset(s.entropy[:, 0] > 2).n_samples == 0
    for name in s.arrays():
        np.testing.assert_array_equal(getattr(t, name), getattr(s, name))


def test_row_buffer_carries_every_field():
    rng = np.random.default_rng(2)
    s = _scores(rng, ids=list("abcdefg"))
    buf = RowBuffer()
    buf.add_scores(s.subset(np.arange(0, 4)))
    buf.add_scores(s.subset(np.arange(4, 7)))
    t = buf.to_scores(s.meta)
    for name in [*s.arrays(), "ids"]:
        np.testing.assert_array_equal(getattr(t, name), getattr(s, name))
    with pytest.raises(ValueError, match="fields"):
        buf.add({"entropy": s.entropy[:1]}, ["z"])


def test_reads_format_version_1(tmp_path):
    """Files of the first format (entropy, head_entropy, image_mass) still load."""
    path = tmp_path / "v1.npz"
    np.savez(path, format_version=np.array(1), entropy=np.zeros((2, 3), np.float32),
             image_mass=np.ones((2, 3), np.float32), ids=np.array(["a", "b"]),
             meta_keys=np.array(["model"]), meta_values=np.array(["tiny"]))  # fmt: skip
    t = Scores.load(path)
    assert t.image_mass.shape == (2, 3) and t.head_image_share is None and t.ids.tolist() == ["a", "b"]


def test_head_after_share_is_the_rest():
    rng = np.random.default_rng(3)
    s = _scores(rng)
    np.testing.assert_allclose(s.head_after_share, 1 - s.head_image_share - s.head_before_share)
