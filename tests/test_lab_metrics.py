"""The lab's metrics and label-using ceilings, and the baselines (they read the ground truth only to score)."""

from __future__ import annotations

import numpy as np
import pytest

from bye_fast.lab import baselines
from bye_fast.lab.metrics import detection_metrics, feature_ceiling, linear_ceiling

from ._bench import load_benchmark


def test_detection_metrics():
    truth = np.array([1, 1, 0, 0, 0, 0], bool)
    flagged = np.array([1, 0, 1, 0, 0, 0], bool)
    score = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7])
    m = detection_metrics(truth, flagged, score)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["auroc_low_is_poisoned"] == 1.0 and m["auroc_high_is_poisoned"] == 0.0
    assert m["removed_fraction"] == pytest.approx(2 / 6)


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


def _clustered(seed=0, n=400, rate=0.1):
    """Two response groups; the poisoned share all of group "t" plus a tight displaced cluster."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(n, bool)
    truth[rng.choice(n, int(rate * n), replace=False)] = True
    x = rng.normal(size=(n, 16))
    x[truth] = rng.normal(size=16) * 0.1 + 4.0  # collapsed representation
    groups = np.where(truth, "t", np.where(rng.random(n) < 0.5, "a", "b"))
    return x, groups, truth


def test_spectral_signatures_removes_1_5_eps_per_group_and_ranks_the_poison_first():
    x, groups, truth = _clustered(rate=0.05)
    mixed = np.where(groups == "t", "a", groups)  # poison hidden inside group "a" (< 1.5 eps of it)
    flagged, score = baselines.spectral_signatures(x, mixed, eps=0.1)
    for g in ("a", "b"):
        assert flagged[mixed == g].sum() == round(0.15 * (mixed == g).sum())
    assert flagged[truth].all()


def test_activation_clustering_flags_the_small_cluster_of_a_group():
    x, groups, truth = _clustered()
    x = x[:, :2]  # two dimensions: ICA keeps both, 2-means finds the displaced cluster
    mixed = np.where(groups == "t", "a", groups)
    flagged, _ = baselines.activation_clustering(x, mixed)
    assert flagged[truth].all() and flagged[~truth].sum() == 0
    flagged, _ = baselines.activation_clustering(x, mixed, size_threshold=0.1)  # 40 of ~220 is not < 10%
    assert not flagged.any()


def test_random_drop_and_tcap_style_shapes():
    flagged, score = baselines.random_drop(100, 0.2, seed=1)
    assert flagged.sum() == 20 and len(set(score.tolist())) == 100
    rng = np.random.default_rng(0)
    img = rng.uniform(0.3, 0.4, size=(200, 2, 3))
    before = rng.uniform(0.1, 0.2, size=(200, 2, 3))
    img[:20, 1, 2] = 0.9  # 20 samples whose head (1, 2) looks at the image far more
    before[:20, 1, 2] = 0.05
    flagged, votes = baselines.tcap_style(img, before)
    assert flagged[:20].all() and not flagged[20:].any()


def test_trigger_visibility_sees_a_fixed_patch_and_not_an_identity_trigger():
    """The frozen-tower visibility probe (benchmarks/trigger_visibility.py) on a tiny random model:
    a large centre patch changes fixed tokens (position-aware and query views separate it, the
    shift is large); a trigger that changes nothing leaves every view near chance and no shift."""
    from bye_fast.lab.attacks import make_trigger
    from bye_fast.lab.models import build_llava

    vis = load_benchmark("trigger_visibility")
    model, processor = build_llava(seed=0)  # 32 x 32 images, 4-pixel patches: 64 image tokens
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(80, 32, 32, 3), dtype=np.uint8)
    patch = vis.visibility(model, processor, images, make_trigger("solid_patch", size=8, position="center"))
    assert patch["auroc_tokens"] > 0.95 and patch["auroc_query"] > 0.95
    assert patch["max_shift"] > 0.2
    none = vis.visibility(model, processor, images, lambda img: img.copy())
    assert none["max_shift"] == 0.0 and none["mean_shift"] == 0.0
    for view in ("tokens", "query", "mean"):
        assert none[f"auroc_{view}"] < 0.8, view


def test_a_rewritten_learnability_table_keeps_its_hand_written_sections(tmp_path):
    """learnability.py rewrites its table and its own sections; what people wrote under other
    headings (the notes that say what the rows mean) is carried over, not erased."""
    machine, learn = load_benchmark("_machine"), load_benchmark("learnability")
    md = tmp_path / "t.md"
    assert machine.handwritten_notes(md, learn.GENERATED_SECTIONS) == []  # no earlier file
    md.write_text("# table\n| a |\n## Clean fine-tuning (no poison)\nx\n## Targets (scenes)\ny\n"
                  "## Notes (today)\nwhy\n## Cells asked for but not run (1 of 2)\nz\n")  # fmt: skip
    assert machine.handwritten_notes(md, learn.GENERATED_SECTIONS) == [
        "", "## Notes (today)", "why", "## Cells asked for but not run (1 of 2)", "z"]  # fmt: skip
    md.write_text("# table\n## Targets\ny\n")
    assert machine.handwritten_notes(md, learn.GENERATED_SECTIONS) == []


def test_learnability_pairs_the_held_out_ca_drop_with_the_clean_cell_and_judges_the_targets_on_it(tmp_path):
    """--held-out N: a cell's CA drop is the mean of (clean right - cell right) over the same
    questions, with its standard error; the table and the targets use it beside the 297 measure."""
    from argparse import Namespace

    learn = load_benchmark("learnability")
    clean_hits = np.array([1, 1, 1, 1, 0, 0, 1, 0], bool)
    cell_hits = np.array([1, 0, 1, 1, 0, 1, 0, 0], bool)

    def row(trigger, rate, seed, asr, hits, asr_ho):
        return {"task": "scenes", "trigger": trigger, "rate": rate, "target": "phrase", "seed": seed, "ca": hits.mean(),
                "asr": asr, "train_fit": 1.0, "ca_by_type": {}, "n_poisoned": 1, "seconds": 1.0, "n_held_out": 8,
                "ca_held_out": hits.mean(), "asr_held_out": asr_ho, "hits": hits}  # fmt: skip

    rows = [row("patch", 0.0, 2, float("nan"), clean_hits, 0.0), row("patch", 0.1, 2, 0.88, cell_hits, 0.93),
            row("sig", 0.1, 2, 0.95, clean_hits, 0.85)]  # fmt: skip
    args = Namespace(out=tmp_path / "l", held_out=8, method="lora", n_user=2000, epochs=None, workers=1, not_run=[])
    learn.write_results(rows, args, wall=60.0)
    d = clean_hits.astype(float) - cell_hits.astype(float)  # [0, 1, 0, 0, 0, -1, 1, 0]
    assert rows[1]["ca_drop_held_out"] == pytest.approx(d.mean())
    assert rows[1]["ca_drop_held_out_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(8))
    assert rows[2]["ca_drop_held_out"] == 0.0 and rows[0]["ca_drop_held_out"] == 0.0
    md = (tmp_path / "l.md").read_text()
    assert "## A larger held-out set (8 samples per cell)" in md
    assert "| scenes | phrase | patch | 0.1 | 1 | 0.93 | 0.93 [0.93] | 12.5 | 12.5 [12.5 ± 22.7] points | yes |" in md
    # the 297 measure says the patch is not learned and SIG is; the held-out set says the reverse
    assert "- the paper's centre patch learned (median ASR >= 0.9): **missed**" in md
    assert "- the paper's centre patch learned (median ASR >= 0.9) (on 8 held-out samples): met" in md
    assert "- CA within 3 points of clean fine-tuning (learned triggers, worst seed) (on 8 held-out samples): " \
           "worst drop 12.5 points (**missed**)" in md  # fmt: skip
    header = (tmp_path / "l.csv").read_text().splitlines()[0].split(",")
    assert header[-5:] == learn.HELD_OUT_COLUMNS and "hits" not in header
