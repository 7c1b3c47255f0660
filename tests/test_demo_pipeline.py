"""The demo pipeline end to end on a reduced size (outputs exist and agree; not a quality threshold)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bye_fast
from bye_fast.demo.pipeline import detection_metrics, feature_ceiling, linear_ceiling, run_demo


def test_detection_metrics():
    truth = np.array([1, 1, 0, 0, 0, 0], bool)
    flagged = np.array([1, 0, 1, 0, 0, 0], bool)
    score = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7])
    m = detection_metrics(truth, flagged, score)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["auroc_low_is_poisoned"] == 1.0 and m["auroc_high_is_poisoned"] == 0.0
    assert m["removed_fraction"] == pytest.approx(2 / 6)


def test_demo_pipeline_small(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(
        out,
        n_user=60,
        n_pretrain=60,
        pretrain_epochs=1,
        finetune_epochs=1,
        progress=False,
        verbose=False,
        threshold=0.0,  # every layer "sensitive": exercises flagging, filtering and retraining
    )
    for name in ("report.md", "result.json", "scores.npz", "detection.json", "ground_truth.json",
                 "data/train.json", "data/train.clean.json", "data/train.clean.removed.json",
                 "plots/separation.png", "plots/suspicious_score.png", "plots/ca_asr.png"):  # fmt: skip
        assert (out / name).exists(), name
    train = json.loads((out / "data" / "train.json").read_text())
    kept = json.loads((out / "data" / "train.clean.json").read_text())
    removed = json.loads((out / "data" / "train.clean.removed.json").read_text())
    assert len(train) == 60 and len(kept) + len(removed) == 60 and len(removed) == result.n_removed
    det = bye_fast.Detection.from_json(out / "detection.json")
    assert det.n_flagged == result.n_removed
    truth = set(json.loads((out / "ground_truth.json").read_text())["poisoned_ids"])
    assert len(truth) == result.n_poisoned == 6
    assert not any("poison" in json.dumps(r).lower() for r in train)  # ground truth kept apart
    for v in (result.ca_before, result.asr_before):
        assert 0.0 <= v <= 1.0
    for v in (result.ca_after, result.asr_after):  # undefined only when nothing was kept to retrain on
        assert (0.0 <= v <= 1.0) if kept else np.isnan(v)
    assert "attack success" in (out / "report.md").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo(out, n_user=60, n_pretrain=60, progress=False, verbose=False)


def test_feature_ceiling_finds_the_separating_feature_and_its_direction():
    rng = np.random.default_rng(0)
    truth = np.zeros(200, dtype=bool)
    truth[rng.choice(200, 20, replace=False)] = True
    x = rng.normal(size=(200, 3))
    x[truth, 1] -= 10.0  # column 1 separates, poisoned LOW
    c = feature_ceiling(truth, x)
    assert c["ceiling_feature"] == 1 and c["ceiling_direction"] == "low"
    assert c["ceiling_auroc"] == 1.0 and c["ceiling_f1"] == 1.0
    # a brute-force F1 over every threshold of every column and direction agrees on noise
    x = rng.normal(size=(200, 3))
    best = 0.0
    for j in range(3):
        for v in (x[:, j], -x[:, j]):
            for cut in v:
                f = v >= cut
                tp = (f & truth).sum()
                best = max(best, 2 * tp / (f.sum() + truth.sum()))
    assert abs(feature_ceiling(truth, x)["ceiling_f1"] - best) < 1e-12
    assert np.isnan(feature_ceiling(np.zeros(200, bool), x)["ceiling_f1"])  # no poison: no ceiling
    # ties: no threshold separates equal values, whatever their order
    const = np.zeros((200, 1))
    assert feature_ceiling(np.sort(truth)[::-1].copy(), const)["ceiling_f1"] == 2 * 20 / (200 + 20)


def test_linear_ceiling_sees_a_direction_no_single_feature_separates():
    rng = np.random.default_rng(1)
    truth = np.zeros(300, dtype=bool)
    truth[:30] = True
    z = rng.normal(size=(300, 2))
    a, b = 3 * z[:, 0], 3 * z[:, 0] + 0.5 * z[:, 1]  # two strongly correlated features
    b[truth] += 2.0  # poisoned: displaced ACROSS the correlation, hidden in each feature alone
    x = np.stack([a, b], axis=1)
    assert feature_ceiling(truth, x)["ceiling_f1"] < 0.5
    assert linear_ceiling(truth, x) > 0.9
    assert np.isnan(linear_ceiling(np.zeros(300, bool), x))
