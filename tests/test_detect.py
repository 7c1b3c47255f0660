"""detect(): the paper's procedure against a scikit-learn-only re-implementation, and its guarantees."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

import bye_fast
from bye_fast import Scores
from bye_fast.detect import Detection


def _synthetic(seed=0, n=400, layers=8, rate=0.1, sensitive=(2, 5), shift=-1.5, heads=4):
    """Clean entropies ~ N(4, 0.1); poisoned ones shifted by ``shift`` in the sensitive layers."""
    rng = np.random.default_rng(seed)
    poisoned = np.zeros(n, dtype=bool)
    poisoned[rng.choice(n, int(round(rate * n)), replace=False)] = True
    ent = rng.normal(4.0, 0.1, size=(n, layers))
    head = rng.normal(4.0, 0.1, size=(n, layers, heads))
    for layer in sensitive:
        ent[poisoned, layer] += shift + rng.normal(0, 0.05, size=poisoned.sum())
        head[poisoned, layer, 1] += shift
    ids = [f"s{i:03d}" for i in range(n)]
    return Scores(entropy=ent, head_entropy=head, ids=ids), poisoned


def _paper_sklearn(x: np.ndarray, threshold: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The paper's procedure written with scikit-learn only (the obviously-correct twin)."""
    sensitive = []
    for j in range(x.shape[1]):
        g = GaussianMixture(2, random_state=0).fit(x[:, j : j + 1])
        mu = g.means_.ravel()
        sd = np.sqrt(g.covariances_.ravel())
        if abs(mu[0] - mu[1]) > threshold * 2 * (sd[0] + sd[1]):
            sensitive.append(j)
    if not sensitive:
        return np.zeros(x.shape[0], bool), np.array([], int)
    s = x[:, sensitive].mean(1)
    g = GaussianMixture(2, random_state=0).fit(s[:, None])
    return g.predict(s[:, None]) == int(np.argmin(g.means_.ravel())), np.array(sensitive)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.2])
def test_paper_method_matches_sklearn_reimplementation(seed, rate):
    scores, poisoned = _synthetic(seed=seed, rate=rate)
    det = bye_fast.detect(scores)
    flags, sensitive = _paper_sklearn(scores.entropy.astype(np.float64))
    np.testing.assert_array_equal(det.sensitive_features, sensitive)
    np.testing.assert_array_equal(det.flagged, flags)
    np.testing.assert_array_equal(det.flagged, poisoned)  # the synthetic poison is easy: exact recovery
    assert det.flagged_component == 0 and det.boundary is not None
    assert det.mixture["means"][0] < det.boundary < det.mixture["means"][1]


def test_clean_data_comes_out_whole():
    scores, _ = _synthetic(rate=0.0)
    det = bye_fast.detect(scores)
    assert det.n_flagged == 0
    assert len(det.sensitive_features) == 0
    assert "nothing flagged" in det.reason and "separation" in det.reason
    assert np.isnan(det.suspicious_score).all()


def test_threshold_controls_sensitivity():
    scores, _ = _synthetic()
    assert len(bye_fast.detect(scores, threshold=100.0).sensitive_features) == 0
    assert len(bye_fast.detect(scores, threshold=1.0).sensitive_features) == 2


def test_higher_entropy_poison_needs_minority_flag():
    scores, poisoned = _synthetic(shift=+1.5)
    lower = bye_fast.detect(scores, flag="lower")
    minority = bye_fast.detect(scores, flag="minority")
    assert lower.flagged.sum() > 0.5 * len(poisoned)  # the paper's rule removes the clean majority here
    np.testing.assert_array_equal(minority.flagged, poisoned)
    assert minority.flagged_component == 1


def test_head_features():
    scores, poisoned = _synthetic(sensitive=(3,))
    scores.entropy[:] = np.random.default_rng(5).normal(
        4.0, 0.1, size=scores.entropy.shape
    )  # layers say nothing
    assert bye_fast.detect(scores).n_flagged == 0
    det = bye_fast.detect(scores, features="heads")
    assert det.feature_names[det.sensitive_features[0]] == "layer 3 head 1"
    np.testing.assert_array_equal(det.flagged, poisoned)
    no_heads = Scores(entropy=scores.entropy)
    with pytest.raises(ValueError, match="head_entropy"):
        bye_fast.detect(no_heads, features="heads")


def test_nan_rows_never_flagged_and_reported():
    scores, poisoned = _synthetic()
    scores.entropy[[0, 7]] = np.nan
    scores.head_entropy[[0, 7]] = np.nan
    det = bye_fast.detect(scores)
    assert det.no_image_ids == ["s000", "s007"]
    assert not det.flagged[[0, 7]].any()
    keep = np.ones(len(poisoned), bool)
    keep[[0, 7]] = False
    np.testing.assert_array_equal(det.flagged[keep], poisoned[keep])
    # with the image-token counts, those decide which rows had no image
    n_img = np.full(len(poisoned), 64)
    n_img[[0, 7]] = 0
    counted = Scores(
        entropy=scores.entropy, head_entropy=scores.head_entropy, ids=scores.ids, n_image_tokens=n_img
    )
    assert bye_fast.detect(counted).no_image_ids == ["s000", "s007"] == counted.no_image_ids


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_entropy_of_a_sample_with_an_image_is_an_error_naming_it(value):
    scores, _ = _synthetic()
    scores.entropy[12, 3] = value  # one layer of one sample: not a sample without image
    with pytest.raises(ValueError, match=r"1 sample\(s\) with image tokens .*s012"):
        bye_fast.detect(scores)
    n_img = np.full(scores.n_samples, 64)
    counted = Scores(
        entropy=scores.entropy, head_entropy=scores.head_entropy, ids=scores.ids, n_image_tokens=n_img
    )
    with pytest.raises(ValueError, match="s012"):
        bye_fast.detect(counted)


def test_too_few_samples_and_bad_options():
    scores, _ = _synthetic(n=9)
    with pytest.raises(ValueError, match="at least 10 samples"):
        bye_fast.detect(scores)
    scores, _ = _synthetic()
    with pytest.raises(ValueError, match="method"):
        bye_fast.detect(scores, method="kmeans")
    with pytest.raises(ValueError, match="features"):
        bye_fast.detect(scores, features="tokens")
    with pytest.raises(ValueError, match="flag"):
        bye_fast.detect(scores, flag="upper")


def test_json_round_trip(tmp_path):
    scores, _ = _synthetic()
    scores.entropy[3] = np.nan
    det = bye_fast.detect(scores)
    back = Detection.from_json(det.to_json(tmp_path / "det.json"))
    np.testing.assert_array_equal(back.flagged, det.flagged)
    np.testing.assert_allclose(back.suspicious_score, det.suspicious_score)
    np.testing.assert_array_equal(back.sensitive_features, det.sensitive_features)
    assert back.ids.tolist() == det.ids.tolist() and back.reason == det.reason


def test_json_is_strict_with_unfittable_features(tmp_path):
    import json

    scores, _ = _synthetic()
    scores.entropy[:, 0] = 4.0  # a constant layer: its mixture cannot be fitted
    det = bye_fast.detect(scores)
    assert not np.isfinite(det.separation[0])
    path = det.to_json(tmp_path / "det.json")

    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    raw = json.loads(path.read_text(), parse_constant=refuse)  # NaN / Infinity would fail here
    assert raw["separation"][0] is None
    back = Detection.from_json(path)
    np.testing.assert_array_equal(np.isnan(back.separation), np.isnan(det.separation))
    np.testing.assert_allclose(back.separation, det.separation)
    np.testing.assert_array_equal(back.flagged, det.flagged)
