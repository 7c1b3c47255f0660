"""method="paper" decides what the authors' public code decides (XuankunRong/BYE, bye.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

import bye_fast
from bye_fast import Scores
from bye_fast.detect import Detection, PaperDetector


def authors_procedure(entropy: np.ndarray) -> tuple[list[int], np.ndarray | None]:
    """The authors' get_layerwise_kl + detect_suspicious_samples, restated (the obviously-correct twin)."""
    sensitive = []
    for layer in range(entropy.shape[1]):
        gmm = GaussianMixture(n_components=2, random_state=0).fit(entropy[:, layer].reshape(-1, 1))
        means = gmm.means_.flatten()
        stds = np.sqrt(gmm.covariances_).flatten()
        if abs(means[0] - means[1]) > 2.0 * (stds[0] + stds[1]):
            sensitive.append(layer)
    if not sensitive:
        return [], None
    s = entropy[:, sensitive].mean(axis=1)
    gmm = GaussianMixture(n_components=2, random_state=0)
    labels = gmm.fit_predict(s.reshape(-1, 1))
    return sensitive, labels == np.argmin(gmm.means_.flatten())


def near_threshold(seed: int, n: int = 300, layers: int = 32) -> np.ndarray:
    """32 layers, each a two-mode mixture whose separation |mu0-mu1| / (s0+s1) is drawn around the
    paper's threshold 2 (1.4-2.6): the case where a fit that stops elsewhere decides otherwise."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, layers))
    for j in range(layers):
        w = rng.uniform(0.05, 0.4)
        s0, s1 = rng.uniform(0.05, 0.3, size=2)
        sep = rng.uniform(1.4, 2.6)
        low = rng.random(n) < w
        x[:, j] = np.where(low, rng.normal(4.0 - sep * (s0 + s1), s1, n), rng.normal(4.0, s0, n))
    return x


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_the_authors_code_near_the_threshold(seed):
    x = near_threshold(seed)
    sensitive, flags = authors_procedure(x)
    det = bye_fast.detect(Scores(entropy=x), method="paper")
    assert det.details["sensitive"].tolist() == sensitive
    if flags is None:
        assert det.n_flagged == 0
    else:
        np.testing.assert_array_equal(det.flagged, flags)
    assert 0 < len(sensitive) < 32  # the data really is near the threshold: some layers each way


def test_threshold_is_the_papers_multiplier():
    x = near_threshold(3)
    sep = PaperDetector().fit(Scores(entropy=x)).separation_
    for t in (1.0, 2.0, 3.0):
        d = PaperDetector(threshold=t).fit(Scores(entropy=x))
        np.testing.assert_array_equal(d.sensitive_, np.nonzero(sep > t)[0])


def test_clean_unimodal_data_comes_out_whole():
    x = np.random.default_rng(0).normal(4.0, 0.1, size=(300, 8))
    det = bye_fast.detect(Scores(entropy=x), method="paper")
    assert det.n_flagged == 0 and "nothing flagged" in det.reason
    assert np.isnan(det.score).all()


def test_samples_without_image_are_left_out_and_never_flagged():
    x = near_threshold(1)
    n_img = np.full(len(x), 64)
    n_img[[0, 5]] = 0
    x[[0, 5]] = np.nan
    det = bye_fast.detect(Scores(entropy=x, n_image_tokens=n_img, ids=[f"s{i}" for i in range(len(x))]),
                          method="paper")  # fmt: skip
    assert det.no_image_ids == ["s0", "s5"] and not det.flagged[[0, 5]].any()
    keep = n_img > 0
    sensitive, flags = authors_procedure(x[keep])
    assert det.details["sensitive"].tolist() == sensitive
    np.testing.assert_array_equal(det.flagged[keep], flags if flags is not None else False)


def test_a_layer_that_cannot_see_the_image_is_left_out_and_named():
    x = near_threshold(2)
    x[10:20, 7] = np.nan  # e.g. a sliding-window layer for the longest prompts
    det = bye_fast.detect(Scores(entropy=x), method="paper")
    assert "layer 7 (10 samples)" in det.reason
    assert np.isnan(det.details["separation"][7]) and 7 not in det.details["sensitive"]
    sensitive, _ = authors_procedure(np.delete(x, 7, axis=1))
    assert det.details["sensitive"].tolist() == [j if j < 7 else j + 1 for j in sensitive]
    x[3, :] = np.nan  # no layer saw this sample's image: treated as a sample without image
    det = bye_fast.detect(Scores(entropy=x), method="paper")
    assert det.no_image_ids == [3]


def test_json_round_trip_is_strict(tmp_path):
    import json

    x = near_threshold(4)
    x[:, 0] = 4.0  # a constant layer: separation 0/0
    det = bye_fast.detect(Scores(entropy=x), method="paper")
    path = det.to_json(tmp_path / "det.json")

    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    json.loads(path.read_text(), parse_constant=refuse)
    back = Detection.from_json(path)
    np.testing.assert_array_equal(back.flagged, det.flagged)
    np.testing.assert_allclose(back.score, det.score)
    assert back.reason == det.reason and back.options == {"threshold": 2.0, "random_state": 0}
    np.testing.assert_array_equal(back.rank, det.rank)


def test_bad_options_and_too_few_samples():
    x = near_threshold(0)
    with pytest.raises(ValueError, match="method"):
        bye_fast.detect(Scores(entropy=x), method="kmeans")
    with pytest.raises(ValueError, match="bad option"):
        bye_fast.detect(Scores(entropy=x), method="paper", features="heads")
    with pytest.raises(ValueError, match="at least 10 samples"):
        bye_fast.detect(Scores(entropy=x[:9]), method="paper")
