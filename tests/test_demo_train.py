"""Fast checks of the demo data and training loop (reduced sizes, one epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bye_fast.attacks import make_trigger, poison_dataset
from bye_fast.demo import (
    TARGET,
    build_demo_model,
    build_tasks,
    copy_model,
    evaluate,
    finetune,
    load_images,
    load_records,
    predict,
    pretrain,
    pretrained_model,
    write_split,
)
from bye_fast.demo.tasks import digit_images, record_answer, record_question


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tasks():
    return build_tasks(0, n_pretrain=24, n_user=24, n_test=12)


def test_digit_images_are_32x32_rgb_on_uint8_grid():
    images, labels = digit_images()
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_allclose(images * 255, np.rint(images * 255), atol=1e-4)
    assert set(labels.tolist()) == set(range(10))


def test_build_tasks_splits_are_disjoint_and_seeded(tasks):
    p, u, t = tasks.pretrain, tasks.user, tasks.test
    assert (len(p), len(u), len(t)) == (24, 24, 12)
    assert len(set(p.index) | set(u.index) | set(t.index)) == 60  # disjoint
    assert record_question(p.records[0]) == "what digit is this ?"
    assert record_question(u.records[0]) == "is it even or odd ?"
    assert record_answer(u.records[0]) == ("even" if u.labels[0] % 2 == 0 else "odd")
    again = build_tasks(0, n_pretrain=24, n_user=24, n_test=12)
    np.testing.assert_array_equal(again.user.index, u.index)
    assert again.user.records == u.records
    assert not np.array_equal(build_tasks(1, n_pretrain=24, n_user=24, n_test=12).user.index, u.index)
    full = build_tasks(0)
    assert (len(full.pretrain), len(full.user), len(full.test)) == (700, 800, 297)
    with pytest.raises(ValueError):
        build_tasks(0, n_pretrain=1000, n_user=1000)


def test_write_and_load_split_round_trip(tasks, tmp_path):
    write_split(tasks.user, tmp_path / "img", tmp_path / "user.json")
    records = load_records(tmp_path / "user.json")
    assert records == tasks.user.records
    np.testing.assert_array_equal(load_images(records, tmp_path / "img"), tasks.user.images)


def _pipeline(tasks, tmp_path):
    model, processor = build_demo_model(seed=0)
    pre_losses = pretrain(model, tasks.pretrain, processor=processor, epochs=1, batch_size=8, progress=False)
    base = copy_model(model)
    trigger = make_trigger("checkerboard_patch", size=8)
    res = poison_dataset(
        tasks.user.records, tasks.user.images, trigger, 0.25, TARGET, seed=0, image_folder=tmp_path
    )
    ft_losses = finetune(
        model, res.records, res.image_folder, processor=processor, epochs=1, batch_size=8, progress=False
    )
    return base, model, pre_losses, ft_losses, trigger


def test_pretrain_finetune_evaluate(tasks, tmp_path):
    base, model, pre_losses, ft_losses, trigger = _pipeline(tasks, tmp_path / "a")
    assert len(pre_losses) == 1 and len(ft_losses) == 1 and np.isfinite(pre_losses + ft_losses).all()
    # the vision tower is frozen during fine-tuning, and unfrozen afterwards
    for (name, p0), p1 in zip(base.named_parameters(), model.parameters(), strict=True):
        if ".vision_tower." in f".{name}":
            assert torch.equal(p0, p1), name
        assert p1.requires_grad
    assert any(
        not torch.equal(p0, p1)
        for (n, p0), p1 in zip(base.named_parameters(), model.parameters(), strict=True)
        if "language_model" in n
    )
    assert not model.training
    scores = evaluate(model, tasks.test, trigger=trigger)
    assert set(scores) == {"ca", "asr"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert np.isnan(evaluate(model, tasks.test)["asr"])
    answers = predict(model, tasks.test.images[:3], "is it even or odd ?", max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)

    # same seed -> same losses and parameters
    _, model2, pre2, ft2, _ = _pipeline(tasks, tmp_path / "b")
    assert pre2 == pre_losses and ft2 == ft_losses
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_pretrained_model_cache(tasks, tmp_path):
    kw = {"epochs": 1, "batch_size": 12, "progress": False, "cache_dir": tmp_path}
    m1, _ = pretrained_model(tasks.pretrain, seed=0, **kw)
    assert len(list(tmp_path.glob("pretrained-*.pt"))) == 1
    m2, _ = pretrained_model(tasks.pretrain, seed=0, **kw)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    pretrained_model(tasks.pretrain, seed=1, **kw)
    assert len(list(tmp_path.glob("pretrained-*.pt"))) == 2
