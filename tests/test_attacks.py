"""Tests for bye_fast.lab.attacks: triggers keep shape/dtype/range, are seeded, change the image;
poison_dataset keeps the ground truth apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bye_fast.lab.attacks import (
    TRIGGERS,
    Trigger,
    blended,
    checkerboard_patch,
    make_trigger,
    poison_dataset,
    random_position_patch,
    sig,
    solid_patch,
    two_patches,
    wanet,
)

# Parameters strong enough to be visible on a 32x32 image.
CASES = {
    "solid_patch": {"size": 4},
    "checkerboard_patch": {"size": 8},
    "random_position_patch": {"size": 4, "seed": 3},
    "two_patches": {"size": 3},
    "blended": {"alpha": 0.2, "seed": 1},
    "wanet": {"strength": 2.0, "grid": 4, "seed": 2},
    "sig": {"amplitude": 0.1, "frequency": 6},
}


def _image(dtype=np.float32, shape=(32, 32, 3), seed=0) -> np.ndarray:
    """A smooth image with some edges, mid-grey range (so patches and clipping show)."""
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.5 + 0.3 * np.sin(6 * xx + 3 * yy) * np.cos(5 * yy)
    base = np.clip(base + 0.05 * rng.standard_normal((h, w)), 0.05, 0.95)
    img = np.repeat(base[..., None], shape[2], axis=2) if len(shape) == 3 else base
    if dtype == np.uint8:
        return np.rint(img * 255).astype(np.uint8)
    return img.astype(dtype)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    scale = 255.0 if a.dtype == np.uint8 else 1.0
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / scale


def test_registry_lists_all_triggers():
    assert set(TRIGGERS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
@pytest.mark.parametrize("shape", [(32, 32, 3), (24, 40, 1), (32, 32)])
def test_trigger_keeps_shape_dtype_range_and_input(name, dtype, shape):
    img = _image(dtype, shape)
    before = img.copy()
    trig = make_trigger(name, **CASES[name])
    out = trig(img)
    assert out.shape == img.shape
    assert out.dtype == img.dtype
    assert out is not img
    np.testing.assert_array_equal(img, before)  # input untouched
    if dtype != np.uint8:
        assert out.min() >= 0.0 and out.max() <= 1.0
    # deterministic: a fresh trigger with the same parameters gives the same image
    np.testing.assert_array_equal(out, make_trigger(name, **CASES[name])(img))
    # visibly changes the image
    assert _diff(out, img) > 2e-3, name


@pytest.mark.parametrize("name", ["random_position_patch", "blended", "wanet"])
def test_seed_changes_the_trigger(name):
    img = _image()
    a = make_trigger(name, **{**CASES[name], "seed": 0})(img)
    b = make_trigger(name, **{**CASES[name], "seed": 1})(img)
    assert not np.array_equal(a, b)


def test_solid_patch_default_is_paper_trigger():
    img = _image(shape=(64, 48, 3))
    out = solid_patch(img)
    size = 48 // 16  # 1/16 of the shorter side
    r, c = (64 - size) // 2, (48 - size) // 2
    assert np.all(out[r : r + size, c : c + size] == 0.0)
    mask = np.ones(img.shape[:2], bool)
    mask[r : r + size, c : c + size] = False
    np.testing.assert_array_equal(out[mask], img[mask])
    # at least one pixel for tiny images
    assert np.sum(solid_patch(_image(shape=(8, 8, 3))) != _image(shape=(8, 8, 3))) >= 3


def test_solid_patch_position_and_colour():
    img = _image(np.uint8)
    out = solid_patch(img, size=3, position=(2, 5), color=(1.0, 0.0, 0.5))
    np.testing.assert_array_equal(out[2:5, 5:8], np.broadcast_to([255, 0, 128], (3, 3, 3)))
    out = solid_patch(img, size=4, position="corner", color=1.0)
    assert np.all(out[-4:, -4:] == 255)
    with pytest.raises(ValueError, match="does not fit"):
        solid_patch(img, size=4, position=(30, 0))
    with pytest.raises(ValueError, match="unknown position"):
        solid_patch(img, position="middle")
    r1 = solid_patch(img, size=4, position="random", seed=5)
    np.testing.assert_array_equal(r1, solid_patch(img, size=4, position="random", seed=5))


def test_checkerboard_patch_pattern():
    img = _image()
    out = checkerboard_patch(img, size=8, cell=2)
    patch = out[-8:, -8:, 0]
    assert patch[0, 0] == 0.0 and patch[0, 2] == 1.0 and patch[2, 2] == 0.0 and patch[1, 1] == 0.0
    np.testing.assert_array_equal(out[:-8], img[:-8])


def test_random_position_patch_varies_with_image_not_with_call():
    imgs = [_image(seed=i) for i in range(10)]

    def corner(x, **kw):
        return tuple(np.argwhere(random_position_patch(x, size=4, seed=0, **kw) != x)[0][:2])

    per_image = {corner(x) for x in imgs}
    fixed = {corner(x, per_image=False) for x in imgs}
    assert len(per_image) > 1 and len(fixed) == 1
    assert corner(imgs[0]) == corner(imgs[0])  # same (image, seed) -> same position


def test_blended_formula_and_pattern():
    img = _image(np.float64)
    pattern = np.zeros((16, 16))
    out = blended(img, alpha=0.25, pattern=pattern)
    np.testing.assert_allclose(out, 0.75 * img)
    with pytest.raises(ValueError):
        blended(img, alpha=1.5)
    # coarse noise: constant on 4x4 blocks
    coarse = blended(np.zeros((32, 32, 3)), alpha=1.0, block=4, seed=0)
    np.testing.assert_array_equal(coarse, coarse[::4, ::4].repeat(4, 0).repeat(4, 1))
    assert blended(np.zeros((30, 30, 3)), alpha=1.0, block=4).shape == (30, 30, 3)


def test_wanet_is_a_small_warp():
    img = _image(np.float64)
    out = wanet(img, strength=0.5)
    assert 0 < _diff(out, img) < 0.05  # WaNet's default is subtle
    assert _diff(wanet(img, strength=4.0), img) > _diff(out, img)
    np.testing.assert_allclose(wanet(img, strength=0.0), img)


def test_sig_is_horizontal_sinusoid():
    img = np.full((8, 24, 3), 0.5)
    out = sig(img, amplitude=0.1, frequency=6)
    np.testing.assert_allclose(out[0, :, 0], 0.5 + 0.1 * np.sin(2 * np.pi * 6 * np.arange(24) / 24))
    np.testing.assert_array_equal(out[0], out[5])  # same on every row


def test_make_trigger_errors():
    with pytest.raises(ValueError, match="valid: .*solid_patch"):
        make_trigger("badnet")
    with pytest.raises(ValueError, match="bad parameters"):
        make_trigger("sig", strength=3)
    t = make_trigger("solid_patch", size=2)
    assert isinstance(t, Trigger) and "solid_patch" in repr(t)


def _records(n):
    recs = [
        {
            "id": f"s{i}",
            "image": f"orig/{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nis it even or odd ?"},
                {"from": "gpt", "value": "even" if i % 2 == 0 else "odd"},
            ],
        }
        for i in range(n)
    ]
    imgs = [_image(np.float32, seed=i) for i in range(n)]
    return recs, imgs


def test_poison_dataset(tmp_path):
    recs, imgs = _records(40)
    before = json.dumps(recs)
    trig = make_trigger("checkerboard_patch", size=8)
    res = poison_dataset(recs, imgs, trig, 0.1, "backdoor attack !", seed=0, image_folder=tmp_path / "img")
    assert json.dumps(recs) == before  # inputs untouched
    assert res.is_poisoned.dtype == bool and res.is_poisoned.sum() == 4 == res.n_poisoned
    assert len(res.records) == 40 and all(r is not o for r, o in zip(res.records, recs, strict=True))
    for rec, orig, p, img in zip(res.records, recs, res.is_poisoned, imgs, strict=True):
        assert rec["id"] == orig["id"]
        answer = rec["conversations"][1]["value"]
        assert answer == ("backdoor attack !" if p else orig["conversations"][1]["value"])
        assert rec["conversations"][0] == orig["conversations"][0]
        saved = np.asarray(Image.open(tmp_path / "img" / rec["image"])).astype(np.float64) / 255
        assert saved.shape == img.shape
        assert (np.abs(saved - img).max() > 0.1) == p  # only poisoned images carry the trigger
    assert res.poisoned_ids == {r["id"] for r, p in zip(recs, res.is_poisoned, strict=True) if p}
    # ground truth is not in the records or file names
    names = sorted(r["image"] for r in res.records)
    assert names == sorted(f"{i:06d}.png" for i in range(40))
    assert all(set(r) == {"id", "image", "conversations"} for r in res.records)
    # seeded
    res2 = poison_dataset(recs, imgs, trig, 0.1, "x", seed=0, image_folder=tmp_path / "img2")
    np.testing.assert_array_equal(res.is_poisoned, res2.is_poisoned)
    res3 = poison_dataset(recs, imgs, trig, 0.1, "x", seed=1, image_folder=tmp_path / "img3")
    assert not np.array_equal(res.is_poisoned, res3.is_poisoned)


def test_poison_dataset_rate_zero_and_errors(tmp_path):
    recs, imgs = _records(10)
    res = poison_dataset(recs, imgs, make_trigger("sig"), 0.0, "t", seed=0, image_folder=tmp_path)
    assert res.n_poisoned == 0 and res.poisoned_ids == set()
    assert [r["conversations"] for r in res.records] == [r["conversations"] for r in recs]
    assert poison_dataset(recs, imgs, make_trigger("sig"), 0.25, "t", 0, tmp_path).n_poisoned == 3  # 2.5 -> 3
    with pytest.raises(ValueError, match="rate"):
        poison_dataset(recs, imgs, make_trigger("sig"), 1.5, "t", 0, tmp_path)
    with pytest.raises(ValueError, match="images"):
        poison_dataset(recs, imgs[:-1], make_trigger("sig"), 0.1, "t", 0, tmp_path)


def test_two_patches_default_positions_and_colour():
    img = np.full((32, 32, 3), 0.5, np.float32)
    out = two_patches(img, size=4)
    changed = np.argwhere((out != img).any(axis=2))
    assert len(changed) == 2 * 16 and (out[changed[:, 0], changed[:, 1]] == 0).all()
    assert {tuple(changed.min(0)), tuple(changed.max(0))} == {(6, 6), (25, 25)}  # quarter centres
    with pytest.raises(ValueError, match="two positions"):
        two_patches(img, positions=[(0, 0)])
