"""The Scores container: validation, subsetting and a lossless .npz round trip."""

from __future__ import annotations

import numpy as np
import pytest

from bye_fast import Scores


def _scores(rng, n=7, layers=3, heads=2, ids=None):
    return Scores(
        entropy=rng.random((n, layers), dtype=np.float32),
        head_entropy=rng.random((n, layers, heads), dtype=np.float32),
        image_mass=rng.random((n, layers), dtype=np.float32),
        ids=ids,
        n_image_tokens=np.full(n, 64),
        meta={"model": "tiny", "backend": "torch"},
    )


@pytest.mark.parametrize("ids", [None, ["a", "b", "c", "d", "e", "f", "g"], [10, 3, 5, 7, 1, 2, 99]])
def test_save_load_round_trip(tmp_path, ids):
    rng = np.random.default_rng(0)
    s = _scores(rng, ids=ids)
    s.entropy[2, 1] = np.nan
    path = s.save(tmp_path / "sub" / "scores.npz")
    t = Scores.load(path)
    for name in ("entropy", "head_entropy", "image_mass", "n_image_tokens", "ids"):
        np.testing.assert_array_equal(getattr(s, name), getattr(t, name))
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
