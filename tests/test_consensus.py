"""The default detector (bye_fast.consensus): its test is calibrated, it finds tight tail clusters on
either side, leaves broad clean modes alone, respects its budget and explains itself."""

from __future__ import annotations

import numpy as np
import pytest

import bye_fast
from bye_fast import Scores
from bye_fast.consensus import (
    ConsensusDetector,
    FeatureColumns,
    nearest_neighbours,
    nearest_neighbours_reference,
    principal_projection,
    principal_projection_reference,
    size_grid,
    valley_scan,
    valley_scan_reference,
)
from bye_fast.detect import Detection


@pytest.mark.parametrize("seed", range(6))
def test_valley_scan_matches_its_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 120))
    y = np.round(rng.normal(size=n), 2)  # rounding makes ties
    if seed % 2:
        y[: n // 8] = 3 + rng.normal(0, 0.05, n // 8)  # a tail cluster
    got = valley_scan(y, 5, n // 3)
    want = valley_scan_reference(y, 5, n // 3)
    assert got[1:] == want[1:]
    assert got[0] == pytest.approx(want[0], abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_valley_scan_on_the_size_grid_matches_its_reference(dtype):
    rng = np.random.default_rng(11)
    y = rng.normal(size=300).astype(dtype)
    y[:30] = (2.5 + rng.normal(0, 0.05, 30)).astype(dtype)
    ks = size_grid(5, 90)
    assert ks[0] == 5 and ks[-1] == 90 and np.all(np.diff(ks) > 0) and np.all(ks[1:] / ks[:-1] <= 1.25)
    assert set(range(5, 21)) <= set(ks.tolist()) and len(ks) < 50
    got = valley_scan(y, 5, 90, sizes=ks)
    want = valley_scan_reference(y.astype(np.float64), 5, 90, sizes=ks)
    assert got[1] == want[1] and got[2] == pytest.approx(want[2], rel=1e-6)
    assert got[0] == pytest.approx(want[0], abs=1e-9) and got[0] < -5


def test_blocked_scan_equals_one_block():
    """The block-wise read of the features (for large inputs), in threads or not, decides exactly as one block."""
    scores, _ = _poisoned(seed=4)
    one = ConsensusDetector().fit(scores)
    small = ConsensusDetector()
    small.block_width = 3  # instance override of the class default
    small.fit(scores)
    np.testing.assert_array_equal(one.flagged_, small.flagged_)
    np.testing.assert_allclose(one.evidence_, small.evidence_)
    threaded = ConsensusDetector(n_jobs=3)
    threaded.block_width = 2  # many blocks over three threads
    threaded.fit(scores)
    np.testing.assert_array_equal(one.flagged_, threaded.flagged_)
    np.testing.assert_array_equal(one.evidence_, threaded.evidence_)


@pytest.mark.parametrize("n", [10, 20, 40, 100, 400])
def test_nothing_is_found_in_noise_at_any_size(n):
    """Pure noise, 32 layers, 20 seeds: at most one run in 20 may flag anything (none does)."""
    flagged_runs = 0
    for seed in range(20):
        x = np.random.default_rng(seed).normal(4.0, 0.3, size=(n, 32))
        with pytest.warns(UserWarning, match="too few samples") if n < 10 else _nothing():
            det = bye_fast.detect(Scores(entropy=x))
        flagged_runs += det.n_flagged > 0
    assert flagged_runs <= 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_too_few_samples_for_any_decision_warns():
    x = np.random.default_rng(0).normal(size=(12, 4))  # 12 samples: no cluster of >= 5 fits in 30%
    with pytest.warns(UserWarning, match="too few for any decision"):
        det = bye_fast.detect(Scores(entropy=x))
    assert det.n_flagged == 0


def _poisoned(seed=0, n=800, rate=0.1, side=+1, layers=8, heads=4):
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < rate
    he = rng.normal(3.0, 0.4, size=(n, layers, heads))
    he[truth, 5, 2] = 3.0 + side * 2.0 + rng.normal(0, 0.05, truth.sum())  # two heads see the trigger
    he[truth, 5, 3] = 3.0 + side * 1.5 + rng.normal(0, 0.05, truth.sum())
    entropy = he.mean(-1)
    entropy[truth, 5] = 3.0 + side * 1.2 + rng.normal(0, 0.03, truth.sum())  # ... and collapse the layer
    return Scores(entropy=entropy, head_entropy=he, ids=[f"s{i}" for i in range(n)]), truth


@pytest.mark.parametrize("side", [+1, -1])
def test_finds_a_tight_cluster_on_either_side(side):
    scores, truth = _poisoned(side=side)
    det = bye_fast.detect(scores)
    np.testing.assert_array_equal(det.flagged, truth)
    assert det.details["clusters"][0]["side"] == ("high" if side > 0 else "low")
    assert det.details["clusters"][0]["lead"] == "entropy layer 5"
    assert det.details["refined"] == ""  # refinement is opt-in since v10
    assert bye_fast.detect(scores, refine=True).details["refined"].startswith("refined with")
    # the suspicion score ranks every poisoned sample before every clean one
    assert det.rank[truth].max() == truth.sum()
    # per-head features can drive the test too
    heads = bye_fast.detect(scores, features=("head_entropy",), refine_features=None)
    np.testing.assert_array_equal(heads.flagged, truth)
    assert heads.details["clusters"][0]["lead"] in (
        "head_entropy layer 5 head 2",
        "head_entropy layer 5 head 3",
    )


def test_refinement_keeps_members_the_lead_feature_misses():
    """A tenth of the poisoned samples do not collapse the layer entropy, but their heads look like the
    other poisoned samples' heads: the test alone misses them, the refinement (``refine=True``) keeps
    them in."""
    scores, truth = _poisoned(seed=2)
    rng = np.random.default_rng(9)
    stray = np.nonzero(truth)[0][::10]
    scores.entropy[stray, 5] = rng.normal(3.0, 0.2, len(stray))
    alone = bye_fast.detect(scores)
    assert not alone.flagged[stray].any() and alone.flagged[truth].sum() == truth.sum() - len(stray)
    det = bye_fast.detect(scores, refine=True)
    np.testing.assert_array_equal(det.flagged, truth)


def test_broad_clean_modes_are_left_alone():
    """Two answer classes that attend differently (a binary task): no tail cluster, nothing removed."""
    rng = np.random.default_rng(3)
    n = 800
    cls = rng.random(n) < 0.2
    he = rng.normal(3.0, 0.4, size=(n, 8, 4))
    he[cls] += 1.5  # a second, broad mode of 20%
    det = bye_fast.detect(Scores(entropy=he.mean(-1), head_entropy=he))
    assert det.n_flagged == 0 and det.reason.startswith("nothing to find")


def test_a_cluster_larger_than_the_budget_is_reported_not_removed():
    scores, truth = _poisoned(rate=0.4)
    det = bye_fast.detect(scores, max_fraction=0.3)
    assert det.n_flagged == 0 and det.details["too_large"]
    assert "too large to be poison" in det.reason
    assert bye_fast.detect(scores, max_fraction=0.5).n_flagged == truth.sum()


def test_a_cluster_hidden_inside_an_answer_group_is_found_there():
    """The poisoned samples answer "yes" like a third of the clean ones; only within that group do they
    stand out (globally their head value is in the middle of the other groups')."""
    rng = np.random.default_rng(5)
    n = 900
    answer = rng.integers(0, 3, n)  # three answer groups
    truth = (answer == 1) & (rng.random(n) < 0.3)
    he = rng.normal(0.0, 0.3, size=(n, 4, 2))
    he[:, 0, 0] += np.array([-3.0, 0.0, 3.0])[answer]  # the groups differ a lot
    he[truth, 0, 0] = 0.9 + rng.normal(0, 0.02, truth.sum())  # inside the middle group's spread
    scores = Scores(entropy=he.mean(-1), head_entropy=he, answer_token=answer)
    opts = {"features": ("head_entropy",), "refine_features": None}
    det = bye_fast.detect(scores, **opts)
    assert [c["context"] for c in det.details["clusters"]] == ["answer token 1"]
    assert det.flagged[truth].all() and (det.flagged & ~truth).sum() <= 0.05 * truth.sum()
    assert bye_fast.detect(scores, groups=False, **opts).n_flagged == 0


def test_detection_json_round_trip_and_options(tmp_path):
    scores, _ = _poisoned()
    det = bye_fast.detect(scores)
    back = Detection.from_json(det.to_json(tmp_path / "d.json"))
    np.testing.assert_array_equal(back.flagged, det.flagged)
    np.testing.assert_allclose(back.score, det.score)
    assert back.options == ConsensusDetector().get_params() and back.method == "consensus"
    for bad in ({"max_fraction": 0.0}, {"max_fraction": 1.5}, {"alpha": 0.0}, {"min_cluster": 1}):
        with pytest.raises(ValueError):
            bye_fast.detect(scores, **bad)
    with pytest.raises(ValueError, match="bad option"):
        bye_fast.detect(scores, threshold=2.0)


def _answer_groups(seed, n_groups, poison_share=0.0, n=1000, poison_sd=0.01):
    """Clean answer groups at different places with similar spreads; optionally a poison group
    (its own answer token) whose heads are collapsed while its layer entropy is unremarkable."""
    rng = np.random.default_rng(seed)
    answer = rng.integers(0, n_groups, n)
    truth = rng.random(n) < poison_share
    answer[truth] = n_groups  # the target answer: a group of its own
    he = rng.normal(0.0, 0.3, size=(n, 6, 4)) + rng.normal(0, 1.0, size=(n_groups + 1, 6, 4))[answer]
    he[truth, 2, 1] = 4.0 + rng.normal(0, poison_sd, truth.sum())
    return Scores(entropy=he.mean(-1), head_entropy=he, answer_token=answer), truth


@pytest.mark.parametrize("seed", range(3))
def test_a_collapsed_answer_group_is_found_whole(seed):
    scores, truth = _answer_groups(seed, n_groups=4, poison_share=0.08)
    det = bye_fast.detect(scores, refine_features=None)
    assert [c["context"] for c in det.details["clusters"]] == ["answer token 4 (whole group)"]
    assert det.details["clusters"][0]["lead"] == "head_entropy layer 2 head 1"
    np.testing.assert_array_equal(det.flagged, truth)
    assert "collapsed in head_entropy layer 2 head 1" in det.reason
    assert bye_fast.detect(scores, group_features=None, refine_features=None).n_flagged == 0


@pytest.mark.parametrize("n", [2000, 6000])
def test_the_collapsed_test_judges_groups_of_40_samples_or_more(n):
    """The same collapsed head in a target group of 30 samples (quartiles too noisy to judge: left to
    the other tests) and of 45 (found whole)."""
    rng = np.random.default_rng(5)
    scores, _ = _answer_groups(0, n_groups=4, n=n)
    he, answer = scores.head_entropy.copy(), scores.answer_token.copy()
    for m, want in ((30, False), (45, True)):
        truth = np.zeros(n, bool)
        truth[rng.choice(n, m, replace=False)] = True
        a, h = answer.copy(), he.copy()
        a[truth] = 4
        h[truth, 2, 1] = 4.0 + rng.normal(0, 0.01, m)
        det = bye_fast.detect(Scores(entropy=h.mean(-1), head_entropy=h, answer_token=a), refine_features=None,
                              min_cluster=5)  # fmt: skip
        whole = [c for c in det.details["clusters"] if c["context"] == "answer token 4 (whole group)"]
        assert bool(whole) == want, (m, det.reason)
        if want:
            np.testing.assert_array_equal(det.flagged, truth)


def test_a_group_only_somewhat_tighter_than_the_others_is_left_alone():
    """A group whose spread in one head is ~0.1 of the other groups' (a clean answer-specific question
    type on the scene task did that) is not collapsed at the default ``max_group_spread``; at 0.15 it is."""
    scores, truth = _answer_groups(0, n_groups=4, poison_share=0.08, poison_sd=0.03)
    det = bye_fast.detect(scores, refine_features=None)
    assert det.n_flagged == 0, det.reason
    det = bye_fast.detect(scores, refine_features=None, max_group_spread=0.15)
    np.testing.assert_array_equal(det.flagged, truth)


@pytest.mark.parametrize("n_groups", [2, 10])
def test_clean_answer_groups_are_not_collapsed(n_groups):
    """Groups that differ in place but not in spread (answer classes) are left alone, 20 seeds."""
    for seed in range(20):
        scores, _ = _answer_groups(seed, n_groups=n_groups)
        det = bye_fast.detect(scores)
        assert det.n_flagged == 0, det.reason


def test_a_large_far_cluster_is_found_whole():
    """30,000 samples, 3,000 in a far, tight cluster: the p-values of every size near the cluster's
    underflow in scipy; the bound in log space still ranks the whole cluster best."""
    rng = np.random.default_rng(1)
    x = rng.normal(4.0, 0.3, size=(30_000, 4))
    truth = np.zeros(30_000, bool)
    truth[rng.choice(30_000, 3_000, replace=False)] = True
    x[truth, 2] = 2.0 + rng.normal(0, 0.02, truth.sum())
    det = bye_fast.detect(Scores(entropy=x), refine_features=None)
    np.testing.assert_array_equal(det.flagged, truth)


def test_large_answer_groups_of_noise_give_no_evidence():
    """Two answer groups of 25,000 samples of pure noise: nothing is significant. (With tails tested up
    to half a group and windows reaching across the mode, noise reached p ~ 1e-6 here.)"""
    rng = np.random.default_rng(3)
    x = rng.normal(4.0, 0.3, size=(50_000, 8)).astype(np.float32)
    det = bye_fast.detect(Scores(entropy=x, answer_token=rng.integers(0, 2, 50_000)))
    assert det.n_flagged == 0 and det.reason.startswith("nothing to find")
    assert np.nanmax(det.details["evidence"]) < det.details["evidence_threshold"]


def _content_groups(seed, n_classes=10, per_class=80, n_poison=80, target="phrase", dim=16, spread=0.5):
    """Answer groups that follow the image (class c answers c), plus poisoned samples of every class
    answering the target: a new answer (phrase) or class 0's (existing). Attention features: noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    cls = np.repeat(np.arange(n_classes), per_class)
    pois_cls = rng.integers(0, n_classes, n_poison)
    emb = np.concatenate([centres[cls], centres[pois_cls]]) + rng.normal(size=(len(cls) + n_poison, dim)) * spread
    answer = np.concatenate([cls, np.full(n_poison, 99 if target == "phrase" else 0)])
    truth = np.r_[np.zeros(len(cls), bool), np.ones(n_poison, bool)]
    n = len(answer)
    s = Scores(entropy=rng.normal(size=(n, 4)), answer_token=answer, image_embedding=emb)
    return s, truth


def _f1(flagged, truth):
    return 2 * (flagged & truth).sum() / max(1, flagged.sum() + truth.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", ["phrase", "existing"])
def test_an_answer_group_whose_images_disagree_with_it_is_found(seed, target):
    s, truth = _content_groups(seed, target=target)
    det = bye_fast.detect(s)
    assert _f1(det.flagged, truth) >= 0.9, det.reason
    assert "look like other answers" in det.reason
    assert not det.flagged[~truth][: 80].any() or target == "existing"  # class 0 stays (phrase target)
    # the ranked suspicion: poisoned samples above the clean ones
    assert np.median(det.score[truth]) > np.percentile(det.score[~truth], 95)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_answer_groups_that_follow_the_images_are_left_alone(seed):
    s, _ = _content_groups(seed, n_poison=0)
    det = bye_fast.detect(s)
    assert not det.flagged.any(), det.reason


def test_the_content_test_needs_five_groups_and_can_be_switched_off():
    s, truth = _content_groups(0, n_classes=3)
    assert not bye_fast.detect(s).flagged.any()  # 4 groups: the median group means little
    s, truth = _content_groups(0)
    assert not bye_fast.detect(s, content_groups=False).flagged.any()
    assert bye_fast.detect(s, content_groups=True).flagged.sum() > 0
    with pytest.raises(ValueError, match="min_content_ratio"):
        bye_fast.detect(s, min_content_ratio=1.0)
    with pytest.raises(ValueError, match="n_neighbors"):
        bye_fast.detect(s, n_neighbors=0)


def test_the_neighbour_search_on_a_subset_agrees_with_the_full_one(monkeypatch):
    s, truth = _content_groups(3)
    full = bye_fast.detect(s).flagged
    monkeypatch.setattr(ConsensusDetector, "knn_reference", 500)  # of 880 samples
    sub = bye_fast.detect(s).flagged
    assert (full != sub).sum() <= 0.05 * truth.sum() and _f1(sub, truth) >= 0.9


def test_the_content_test_is_in_the_details_and_the_plot(tmp_path):
    from bye_fast.plots import plot_detection

    s, truth = _content_groups(0)
    det = bye_fast.detect(s)
    groups = {g["answer_token"]: g for g in det.details["content_groups"]}
    assert set(groups) == set(range(10)) | {99}
    assert groups[99]["diversity_ratio"] >= det.details["content_threshold"] > max(
        g["diversity_ratio"] for t, g in groups.items() if t != 99
    )
    back = bye_fast.Detection.from_json(det.to_json(tmp_path / "detection.json"))  # JSON-safe
    assert back.details["content_groups"] == det.details["content_groups"]
    paths = plot_detection(s, det, tmp_path / "plots")
    assert (tmp_path / "plots" / "answer_groups.png") in paths
    assert (tmp_path / "plots" / "answer_groups.png").stat().st_size > 1000


def test_a_diverse_group_whose_members_look_like_each_other_is_left_alone():
    """Diverse, but its images sit apart from every other answer's: its members' neighbours are its
    own, so nobody in it looks like another answer -- no cluster, and the ranking stays intact."""
    s, _ = _content_groups(0, n_poison=0)
    rng = np.random.default_rng(5)
    own = rng.normal(size=(80, 16)) * 2.0 + 40.0  # far from the class centres, broad
    s = Scores(entropy=np.r_[s.entropy, rng.normal(size=(80, 4))], answer_token=np.r_[s.answer_token, [99] * 80],
               image_embedding=np.r_[s.image_embedding, own])  # fmt: skip
    det = bye_fast.detect(s)
    ratio = {g["answer_token"]: g for g in det.details["content_groups"]}[99]
    assert ratio["tested"] and ratio["diversity_ratio"] >= det.details["content_threshold"]
    assert not det.flagged.any() and not det.details["clusters"], det.reason


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nearest_neighbours_match_their_float64_twin(seed, dtype):
    rng = np.random.default_rng(seed)
    n, dim = 700, 48
    x = (rng.normal(size=(n, dim)) + 20.0 * rng.normal(size=(1, dim))).astype(dtype)  # far from the origin
    ref = np.sort(rng.choice(n, 400, replace=False))
    rows = np.sort(rng.choice(n, 150, replace=False))  # some rows are in ref (not their own neighbour)
    fast = nearest_neighbours(x, rows, ref, 7, chunk=64)
    slow = nearest_neighbours_reference(x, rows, ref, 7)
    assert fast.shape == slow.shape == (150, 7)
    np.testing.assert_array_equal(np.sort(fast, axis=1), np.sort(slow, axis=1))
    assert not (ref[fast] == rows[:, None]).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dims", [3, 12, 40])
def test_principal_projection_matches_its_float64_twin(seed, dims):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(200, 400)), 30
    x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, d) + 10.0 ** (seed + 1)).astype(np.float32)  # off-centre
    ref = np.sort(rng.choice(n, n // 2, replace=False))
    x[ref[seed]] = np.nan  # a sample without a usable view: left out of the fit
    fast, kept = principal_projection(x, ref, dims, chunk=64)
    slow, kept_slow = principal_projection_reference(x, ref, dims)
    assert np.isnan(fast[ref[seed]]).all() and np.isnan(slow[ref[seed]]).all()
    ok = np.isfinite(x).all(axis=1)
    fast, slow, x = fast[ok], slow[ok], x[ok]
    assert fast.dtype == np.float32 and fast.shape == slow.shape == (n - 1, min(dims, d))
    assert kept == pytest.approx(kept_slow, rel=1e-9) and (kept == pytest.approx(1.0)) == (dims >= d)
    dist = lambda z: np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))  # noqa: E731 (signs of directions differ)
    np.testing.assert_allclose(dist(fast.astype(np.float64)), dist(slow), rtol=1e-4, atol=1e-4)
    if dims >= d:  # every direction: a rotation, the distances of x itself
        np.testing.assert_allclose(dist(slow), dist(x.astype(np.float64)), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="no reference row is finite"):
        principal_projection(np.full((5, 3), np.nan), np.arange(5), 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_wide_views_are_searched_in_their_principal_directions(seed, monkeypatch):
    """A 256-dim embedding (wider than knn_dims): the votes of the content test and of the reach rule's
    member rule read its top 128 principal directions, and decide at least as well as the whole view
    (better where the trigger's one direction drowns in 255 noisy ones: the projection drops noise)."""
    cases = [_content_groups(seed, dim=256), _existing_target(seed, dim=256)]
    projected = [ConsensusDetector().fit(s) for s, _ in cases]
    monkeypatch.setattr(ConsensusDetector, "knn_dims", 10_000)
    whole = [ConsensusDetector().fit(s) for s, _ in cases]
    for (_, truth), a, b in zip(cases, projected, whole, strict=True):
        assert _f1(a.flagged_, truth) >= max(0.85, _f1(b.flagged_, truth) - 0.01)
    (content,) = [c for c in projected[0].clusters_ if c["side"] == "inconsistent"]
    assert "top 128 of 256 principal directions" in content["neighbour_space"]
    (member,) = [c for c in projected[1].clusters_ if c["side"] == "universal"]
    assert "pictures in its top 128 of 256 principal directions" in member["members"]
    (member,) = [c for c in whole[1].clusters_ if c["side"] == "universal"]
    assert "principal" not in member["members"]  # as narrow views (the lab's) are searched: whole


def _mixed_questions(seed, n_poison=0, per_class=60, dim=16, spread=0.5):
    """Two questions about the same pictures (10 classes): question 1 answers the class (tokens
    0-9), question 2 its parity (tokens 20, 21: five classes each, so those groups are diverse).
    Poisoned samples (either question, any class) answer token 99."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim)) * 3
    cls = np.tile(np.repeat(np.arange(10), per_class), 2)
    question = np.repeat([1, 2], 10 * per_class)
    answer = np.where(question == 1, cls, 20 + cls % 2)
    pois_cls, pois_q = rng.integers(0, 10, n_poison), rng.integers(1, 3, n_poison)
    cls, question = np.r_[cls, pois_cls], np.r_[question, pois_q]
    answer = np.r_[answer, np.full(n_poison, 99)]
    emb = centres[cls] + rng.normal(size=(len(cls), dim)) * spread
    truth = np.r_[np.zeros(len(cls) - n_poison, bool), np.ones(n_poison, bool)]
    n = len(cls)
    key = np.array([-(2**62), 2**62 + 12345])[question - 1]  # any int64, as a hash gives
    s = Scores(entropy=rng.normal(size=(n, 4)), answer_token=answer, image_embedding=emb, prompt_key=key)
    return s, truth


@pytest.mark.parametrize("seed", [0, 1])
def test_answers_that_depend_on_the_question_are_judged_per_question(seed, monkeypatch):
    """The same picture answers "3" or "odd" depending on the question: among every question the
    parity groups look inconsistent (and would be removed), among their own question they do not."""
    s, _ = _mixed_questions(seed)
    det = bye_fast.detect(s)
    assert not det.flagged.any(), det.reason
    parity = [g for g in det.details["content_groups"] if g["answer_token"] in (20, 21)]
    assert parity and all(g["tested"] and g["own_question_share"] == 1.0 for g in parity)
    # without the question, a third of each parity group looks like other answers; the digit groups'
    # members look like other answers as often (the other question's), so the background rate still
    # leaves them alone; without either guard they would be removed
    blind = Scores(**{**s.__dict__, "prompt_key": None})
    det = bye_fast.detect(blind)
    assert "prompt_key" in det.details["content_note"] and det.n_flagged == 0, det.reason
    parity = [g for g in det.details["content_groups"] if g["answer_token"] in (20, 21)]
    assert all(g["n_flagged"] > 0.25 * g["size"] and g["background_rate"] > 0.3 for g in parity)
    monkeypatch.setattr(ConsensusDetector, "_background_rate", lambda self, *a: None)
    assert bye_fast.detect(blind).flagged.sum() > 0.1 * s.n_samples
    assert bye_fast.detect(s).n_flagged == 0  # judged per question, no background needed


@pytest.mark.parametrize("seed", [0, 1])
def test_a_target_over_mixed_questions_is_still_found(seed):
    s, truth = _mixed_questions(seed, n_poison=120)
    det = bye_fast.detect(s)
    assert _f1(det.flagged, truth) >= 0.9, det.reason


def test_a_question_too_rare_for_its_own_neighbours_is_not_judged():
    """Five poisoned samples ask a question no one else does: among every question their answer would
    look foreign for the wrong reason, so they are not judged (v10); the others are judged as before."""
    s, truth = _content_groups(0)
    key = np.zeros(s.n_samples, np.int64)
    rare = np.nonzero(truth)[0][:5]
    key[rare] = 7
    det = bye_fast.detect(Scores(**{**s.__dict__, "prompt_key": key}))
    base = bye_fast.detect(Scores(**{**s.__dict__, "prompt_key": np.zeros(s.n_samples, np.int64)}))
    assert base.flagged[rare].all() and not det.flagged[rare].any()
    others = np.ones(s.n_samples, bool)
    others[rare] = False
    np.testing.assert_array_equal(det.flagged[others], base.flagged[others])
    (g,) = [g for g in det.details["content_groups"] if g["answer_token"] == 99]
    assert g["n_judged"] == g["size"] - 5


def test_a_question_is_judged_by_how_many_samples_ask_it_not_by_the_reference(monkeypatch):
    """Beyond ``knn_reference`` samples the common reference is a random subset; a question asked by
    enough samples must still be judged among its own samples (the subset holds too few of each of
    many questions). Here 20 questions of ~150 samples each and a reference of 500 (~25 a question)."""
    s, truth = _content_groups(0, per_class=240, n_poison=240)
    key = np.random.default_rng(1).integers(0, 20, s.n_samples)
    s = Scores(**{**s.__dict__, "prompt_key": key})
    monkeypatch.setattr(ConsensusDetector, "knn_reference", 500)
    det = bye_fast.detect(s)
    (g,) = [g for g in det.details["content_groups"] if g["answer_token"] == 99]
    assert g["own_question_share"] == 1.0 and g["n_judged"] == g["size"]
    assert _f1(det.flagged, truth) >= 0.9, det.reason


def test_answers_to_questions_too_varied_to_share_a_key_are_not_judged():
    """Round 9's miss, in small: half the samples ask one of 150 fine-grained questions ("is there a
    red circle ?") whose answer depends on the question as much as on the picture. Those answer groups
    hold every kind of picture and their members' neighbours give other answers, but no question has
    enough samples to judge them among its own: they are left alone, not removed whole."""
    rng = np.random.default_rng(0)
    n_classes, per_class, dim = 10, 120, 16
    centres = rng.normal(size=(n_classes, dim)) * 3
    cls = np.repeat(np.arange(n_classes), per_class)
    emb = centres[cls] + rng.normal(size=(len(cls), dim)) * 0.5
    fine = rng.random(len(cls)) < 0.5
    key = np.where(fine, 1 + rng.integers(0, 150, len(cls)), 0)
    answer = np.where(fine, 20 + (key + cls) % 2, cls)
    s = Scores(entropy=rng.normal(size=(len(cls), 4)), answer_token=answer, image_embedding=emb, prompt_key=key)
    det = bye_fast.detect(s)
    assert det.n_flagged == 0, det.reason
    groups = {g["answer_token"]: g for g in det.details["content_groups"]}
    assert groups[20]["tested"] and groups[20]["n_judged"] == 0 and groups[20]["own_question_share"] == 0
    # without prompt keys every sample is taken to ask one question: judged among all, most members of
    # those groups look foreign (v9 judged them so, here and on round 9's scenes)
    blind = bye_fast.detect(Scores(**{**s.__dict__, "prompt_key": None}))
    groups = {g["answer_token"]: g for g in blind.details["content_groups"]}
    assert groups[20]["n_judged"] == groups[20]["size"] and groups[20]["n_flagged"] > 0.5 * groups[20]["size"]


def test_a_group_with_no_more_look_alikes_than_the_others_is_left_alone(monkeypatch):
    """Classes that overlap (spread 2.5): a few members of a parity group have neighbours of the other
    parity, about as often as the digit groups' members have neighbours of other digits. That is the
    embedding's noise, not a target: the group is left alone. Without the background rate it would go."""
    s, _ = _mixed_questions(1, spread=2.5)
    det = bye_fast.detect(s)
    assert det.n_flagged == 0, det.reason
    g = {x["answer_token"]: x for x in det.details["content_groups"] if x["tested"]}
    assert g[21]["n_flagged"] >= 5 and 0 < g[21]["background_rate"] < 0.1 and g[21]["excess_p"] > 0.01
    monkeypatch.setattr(ConsensusDetector, "_background_rate", lambda self, *a: None)
    assert bye_fast.detect(s).n_flagged >= 5


def _collapsed_reference(det: ConsensusDetector, x: np.ndarray, names: list[str], answer: np.ndarray) -> dict:
    """The collapsed-group test written feature by feature on whole columns (the slow twin of
    ``ConsensusDetector._collapsed_groups``): {group: sorted [(spread, feature)]}."""
    n = len(answer)
    groups = {int(t): np.nonzero(answer == t)[0] for t in np.unique(answer)}
    groups = {t: g for t, g in groups.items() if len(g) >= det.min_group}
    found: dict = {}
    for t, g in groups.items():
        if not det.min_collapsed_group <= len(g) <= det.max_fraction * n:
            continue
        rest = np.ones(n, bool)
        rest[g] = False
        for j, name in enumerate(names):
            def iqr(v):
                return np.percentile(v, 75) - np.percentile(v, 25)
            others = np.median([iqr(x[h, j]) for u, h in groups.items() if u != t])
            if not (others > 1e-3 and iqr(x[g, j]) / others <= det.max_group_spread):
                continue
            iqr_rest = iqr(x[rest, j])
            if iqr_rest > 0 and abs(np.median(x[g, j]) - np.median(x[rest, j])) / iqr_rest >= 1.0:
                found.setdefault(t, []).append((iqr(x[g, j]) / others, name))
    return {t: sorted(v) for t, v in found.items()}


@pytest.mark.parametrize("seed", range(3))
def test_collapsed_groups_equal_the_column_by_column_twin(seed):
    """Blocks of 3 features in 3 threads, small groups outside every slice (they still count in the
    rest's quartiles), a collapsed target: the same groups, features and spreads as the twin."""
    scores, truth = _answer_groups(seed, n_groups=4, poison_share=0.08, n=1500)
    answer = scores.answer_token.copy()
    answer[np.random.default_rng(seed).choice(np.nonzero(~truth)[0], 25, replace=False)] = 7  # < min_group
    answer[np.nonzero(~truth)[0][:30]] = 8  # a group too small for the collapsed test, big enough for a slice
    scores = Scores(entropy=scores.entropy, head_entropy=scores.head_entropy, answer_token=answer)
    det = ConsensusDetector(n_jobs=3)
    det.block_width = 3
    valid = np.ones(len(answer), bool)
    got = det._collapsed_groups(scores, valid, det._answer_groups(scores, valid))
    cols = FeatureColumns(scores, det.group_features)
    want = _collapsed_reference(det, cols.block(0, cols.n_features).astype(np.float64), cols.names, answer)
    assert want and {t: c["block"] for t, _, c in got} == {t: [f for _, f in v] for t, v in want.items()}
    for t, _, c in got:
        assert c["spread"] == pytest.approx(want[t][0][0], rel=1e-5)


def test_feature_columns_gather_equals_block_across_families():
    """A gathered block equals the plain block's rows, transposed, in the same dtype, within one family
    and across two."""
    rng = np.random.default_rng(3)
    n = 300
    scores = Scores(entropy=rng.normal(size=(n, 5)).astype(np.float32),
                    head_entropy=rng.normal(size=(n, 5, 3)))  # fmt: skip
    cols = FeatureColumns(scores, ("entropy", "head_entropy"))
    rows = rng.permutation(n)[:211]
    for j0, j1 in ((0, 5), (3, 9), (4, 20), (5, 20)):
        got, want = cols.gather(j0, j1, rows), cols.block(j0, j1)[rows].T
        assert got.dtype == want.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def test_a_tail_cluster_of_all_samples_must_be_mostly_one_answer(tmp_path):
    """A backdoor's cluster is its target's: kept and flagged. The same tight cluster spread over five
    answers is a clean mode: set aside, nothing flagged, and said so in the reason and detection.json.
    Without answer tokens the guard cannot apply; min_answer_share=0 switches it off."""
    rng = np.random.default_rng(0)
    n = 1200
    x = rng.normal(4.0, 0.3, size=(n, 6))
    truth = rng.random(n) < 0.08
    x[truth, 3] = 2.0 + rng.normal(0, 0.02, truth.sum())
    opts = {"group_features": None, "content_groups": False, "refine_features": None}
    target = np.where(truth, 7, rng.integers(0, 5, n))
    det = ConsensusDetector(**opts).fit(Scores(entropy=x, answer_token=target))
    np.testing.assert_array_equal(det.flagged_, truth)
    tail = [c for c in det.clusters_ if c["context"] == "all samples"]
    assert len(tail) == 1 and tail[0]["answer_share"] == 1.0 and tail[0]["n_answers"] == 1
    assert "100% of them give one answer, of 1" in det.detection_.reason and not det.set_aside_

    spread = rng.integers(0, 5, n)
    det = ConsensusDetector(**opts).fit(Scores(entropy=x, answer_token=spread))
    assert not det.flagged_.any() and not det.clusters_
    (aside,) = [c for c in det.set_aside_ if c["context"] == "all samples"]
    assert aside["size"] == truth.sum() and aside["n_answers"] == 5 and aside["answer_share"] < 0.4
    assert "min_answer_share=0.8" in aside["why"]
    assert det.detection_.reason.startswith("nothing to find: every tail cluster is a clean mode")
    assert "set aside: all samples" in det.detection_.reason
    back = Detection.from_json(det.detection_.to_json(tmp_path / "detection.json"))
    assert back.details["set_aside"][0]["why"] == aside["why"]
    assert back.options["min_answer_share"] == 0.8 and back.options["max_answer_coverage"] == 0.5

    off = ConsensusDetector(min_answer_share=0.0, **opts).fit(Scores(entropy=x, answer_token=spread))
    np.testing.assert_array_equal(off.flagged_, truth)
    det = ConsensusDetector(**opts).fit(Scores(entropy=x))
    np.testing.assert_array_equal(det.flagged_, truth)
    assert det.clusters_[0]["answer_share"] is None and "give one answer" not in det.detection_.reason


@pytest.mark.parametrize("seed", [0, 1])
def test_a_tail_cluster_that_is_most_of_a_large_answer_group_is_its_clean_mode(seed):
    """A binary task: 70% of answer 0's samples (half the data) sit tight at one end of a layer, a
    class-driven clean mode. It is one answer's, so only max_answer_coverage tells it from poison: set
    aside and said why. A backdoor's cluster of the same answer that is a minority of its group, or
    most of a small group (a phrase target), is still flagged."""
    rng = np.random.default_rng(seed)
    n = 1000
    answer = rng.integers(0, 2, n)
    x = rng.normal(4.0, 0.3, size=(n, 6))
    mode = (answer == 0) & (rng.random(n) < 0.7)
    x[mode, 2] = 2.0 + rng.normal(0, 0.02, mode.sum())
    opts = {"group_features": None, "content_groups": False, "refine_features": None, "max_fraction": 0.4}
    det = ConsensusDetector(**opts).fit(Scores(entropy=x, answer_token=answer))
    assert not det.flagged_.any(), det.detection_.reason
    (aside,) = [c for c in det.set_aside_ if c["context"] == "all samples"]
    assert aside["answer_share"] == 1.0 and aside["answer_coverage"] > 0.5 and aside["answer_group_share"] > 0.4
    assert "max_answer_coverage=0.5): that answer's clean mode" in aside["why"] and "set aside" in det.detection_.reason
    # without the guard it is removed whole (the budget allows it here)
    off = ConsensusDetector(max_answer_coverage=1.0, **opts).fit(Scores(entropy=x, answer_token=answer))
    np.testing.assert_array_equal(off.flagged_, mode)

    poison = (answer == 0) & (rng.random(n) < 0.2)  # 20% of a 50% group: flagged
    y = rng.normal(4.0, 0.3, size=(n, 6))
    y[poison, 2] = 2.0 + rng.normal(0, 0.02, poison.sum())
    np.testing.assert_array_equal(ConsensusDetector(**opts).fit(Scores(entropy=y, answer_token=answer)).flagged_, poison)
    phrase = rng.random(n) < 0.1  # all of a small group of its own (10% < max_fraction): flagged
    y = rng.normal(4.0, 0.3, size=(n, 6))
    y[phrase, 2] = 2.0 + rng.normal(0, 0.02, phrase.sum())
    det = ConsensusDetector(**opts).fit(Scores(entropy=y, answer_token=np.where(phrase, 7, answer)))
    np.testing.assert_array_equal(det.flagged_, phrase)
    assert det.clusters_[0]["answer_coverage"] == 1.0


def _group_tail(seed, shared):
    """Four answer groups at different levels of one head; group 1 holds a tight cluster at the top of
    its range. ``shared``: every group has a cluster in the same range (a clean image-driven mode);
    else only group 1 (a trigger in the poisoned samples only)."""
    rng = np.random.default_rng(seed)
    n = 1600
    answer = rng.integers(0, 4, n)
    he = rng.normal(0.0, 0.3, size=(n, 4, 2))
    he[:, 0, 0] += np.array([-1.0, 0.0, 0.5, 1.0])[answer]
    mode = (rng.random(n) < 0.15) & ((answer == 1) | shared)
    he[mode, 0, 0] = 1.6 + rng.normal(0, 0.02, mode.sum())
    return Scores(entropy=he.mean(-1), head_entropy=he, answer_token=answer), mode & (answer == 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_cluster_inside_an_answer_group_must_be_specific_to_it(seed):
    opts = {"features": ("head_entropy",), "refine_features": None, "group_features": None,
            "content_groups": False}  # fmt: skip
    scores, truth = _group_tail(seed, shared=False)
    det = ConsensusDetector(**opts).fit(scores)
    (c,) = [c for c in det.clusters_ if c["context"] == "answer token 1"]
    assert c["outside_share"] < 0.01 and c["tail_share"] > 0.1
    assert det.flagged_[truth].all() and (det.flagged_ & ~truth).sum() <= 0.05 * truth.sum()

    scores, _ = _group_tail(seed, shared=True)
    det = ConsensusDetector(**opts).fit(scores)
    assert not det.flagged_.any(), det.detection_.reason
    grp = [c for c in det.set_aside_ if c["context"].startswith("answer token")]
    assert grp and all("min_specificity=4" in c["why"] for c in grp)
    assert all(c["tail_share"] < 4 * c["outside_share"] for c in grp)
    assert ConsensusDetector(min_specificity=1.0, min_answer_share=0.0, **opts).fit(scores).flagged_.any()


def _content_with_trigger(seed, attention_sd):
    """An existing-answer target (class 0's answer) whose triggered samples differ from every clean one
    in one head (``attention_sd``: the trigger's shift is 1.5 / sd); a third of class 0 has pictures
    near other classes, so the neighbour vote flags them too."""
    rng = np.random.default_rng(seed)
    n_classes, per_class, n_poison, dim = 10, 80, 80, 16
    centres = rng.normal(size=(n_classes, dim)) * 3
    cls = np.repeat(np.arange(n_classes), per_class)
    emb = centres[cls] + rng.normal(size=(len(cls), dim)) * 0.5
    stray = (cls == 0) & (rng.random(len(cls)) < 0.35)  # clean zeros that look like other digits
    emb[stray] = centres[rng.integers(1, n_classes, stray.sum())] + rng.normal(size=(stray.sum(), dim)) * 0.5
    pois_cls = rng.integers(1, n_classes, n_poison)
    emb = np.concatenate([emb, centres[pois_cls] + rng.normal(size=(n_poison, dim)) * 0.5])
    answer = np.concatenate([cls, np.zeros(n_poison, int)])
    truth = np.r_[np.zeros(len(cls), bool), np.ones(n_poison, bool)]
    stray = np.r_[stray, np.zeros(n_poison, bool)]
    he = rng.normal(3.0, attention_sd, size=(len(answer), 3, 4))
    he[truth, 2, 1] += 1.5
    s = Scores(entropy=he.mean(-1), head_entropy=he, answer_token=answer, image_embedding=emb)
    return s, truth, stray


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_attention_re_decides_an_inconsistent_groups_members(seed):
    """The vote flags the triggered members and the clean zeros that look like other digits; the
    trigger shows in one head, so the cross-fitted re-decision drops the clean zeros."""
    s, truth, stray = _content_with_trigger(seed, attention_sd=0.3)
    vote = ConsensusDetector(refine_features=None).fit(s)
    assert vote.flagged_[stray].mean() > 0.5  # the vote's false positives
    det = ConsensusDetector().fit(s)
    (c,) = [c for c in det.clusters_ if c["side"] == "inconsistent"]
    assert c["refined"].startswith("re-decided with") and "re-decided" in det.detection_.reason
    assert _f1(det.flagged_, truth) > _f1(vote.flagged_, truth) + 0.05
    assert _f1(det.flagged_, truth) >= 0.9 and det.flagged_[stray].mean() < 0.2
    assert c["size"] == det.flagged_.sum()


def test_the_vote_stands_where_the_attention_does_not_see_the_split():
    """No trigger in the attention (pure noise): the re-decision would be a coin toss, so the vote
    stands; a group the vote takes almost whole (a new target's) is not re-decided either."""
    s, truth, _ = _content_with_trigger(0, attention_sd=0.3)
    s.head_entropy[truth, 2, 1] -= 1.5
    s.entropy = s.head_entropy.mean(-1)
    det = ConsensusDetector().fit(s)
    vote = ConsensusDetector(refine_features=None).fit(s)
    np.testing.assert_array_equal(det.flagged_, vote.flagged_)
    (c,) = [c for c in det.clusters_ if c["side"] == "inconsistent"]
    assert c["refined"].startswith("the vote stands (the attention features tell")
    s, truth = _content_groups(0, target="phrase")
    det = ConsensusDetector().fit(s)
    (c,) = [c for c in det.clusters_ if c["side"] == "inconsistent"]
    assert c["refined"].startswith("the vote stands (") and "taken almost whole" in c["refined"]


def _prompts_and_answers(seed, target=True, n=1200):
    """Two kinds of prompt (colour: keys 0-5, answers 10-13; count: keys 6-11, answers 20-22) and,
    with ``target``, a tenth of the samples answered 99 under every prompt; the attention features
    are noise (the target is not visible there)."""
    rng = np.random.default_rng(seed)
    key = rng.integers(0, 12, n)
    answer = np.where(key < 6, rng.integers(10, 14, n), rng.integers(20, 23, n))
    truth = (rng.random(n) < 0.1) if target else np.zeros(n, bool)
    answer[truth] = 99
    return Scores(entropy=rng.normal(size=(n, 4)), answer_token=answer, prompt_key=key), truth


@pytest.mark.parametrize("seed", [0, 1])
def test_an_answer_given_under_every_kind_of_prompt_is_found_whole(seed, tmp_path):
    scores, truth = _prompts_and_answers(seed)
    det = ConsensusDetector().fit(scores)
    np.testing.assert_array_equal(det.flagged_, truth)
    (c,) = [c for c in det.clusters_ if c["side"] == "universal"]
    assert c["size"] == truth.sum() and c["reach"] == 1.0 and c["next_reach"] < 0.5 and c["n_prompts"] == 12
    assert "under 12 prompts" in det.detection_.reason
    back = Detection.from_json(det.detection_.to_json(tmp_path / "detection.json"))
    assert back.options["min_reach_ratio"] == 1.5 and back.details["clusters"][0]["side"] == "universal"
    # switched off, or without prompt keys, the noise features alone find nothing
    assert not ConsensusDetector(min_reach_ratio=0).fit(scores).flagged_.any()
    no_keys = Scores(entropy=scores.entropy, answer_token=scores.answer_token)
    assert not ConsensusDetector().fit(no_keys).flagged_.any()


def test_answers_bound_to_their_prompts_or_one_prompt_for_all_are_left_alone():
    clean, _ = _prompts_and_answers(2, target=False)
    det = ConsensusDetector().fit(clean)
    assert not det.flagged_.any() and not det.clusters_, det.detection_.reason
    # one prompt for every sample (digits-ten): every reach is 1, the rule cannot tell
    scores, _ = _prompts_and_answers(3)
    one = Scores(entropy=scores.entropy, answer_token=scores.answer_token, prompt_key=np.zeros(scores.n_samples, int))
    assert not ConsensusDetector().fit(one).flagged_.any()
    with pytest.raises(ValueError, match="min_reach_ratio must be 0 \\(off\\) or >= 1; got 0.5"):
        ConsensusDetector(min_reach_ratio=0.5).fit(scores)


def _existing_target(seed, n=1500, rate=0.15, trigger=4.0, dim=16):
    """Colour prompts (keys 0-5, answers 10-13) and "is there ...?" prompts (keys 6-11, answers 30
    "yes" / 31 "no"); poisoned samples, under every prompt, answer 30: an existing answer, clean under
    its own kind of prompt. Pictures: 8 classes in a 16-d embedding; the trigger shifts the poisoned
    pictures by ``trigger`` along one direction (a tuned vision tower carries it)."""
    rng = np.random.default_rng(seed)
    key = rng.integers(0, 12, n)
    answer = np.where(key < 6, rng.integers(10, 14, n), rng.integers(30, 32, n))
    truth = rng.random(n) < rate
    answer[truth] = 30
    centres = rng.normal(size=(8, dim)) * 2
    emb = centres[rng.integers(0, 8, n)] + rng.normal(size=(n, dim)) * 0.5
    emb[truth, 0] += trigger
    s = Scores(entropy=rng.normal(size=(n, 4)), answer_token=answer, prompt_key=key, image_embedding=emb)
    return s, truth


@pytest.mark.parametrize("seed", [0, 1])
def test_an_existing_answer_target_keeps_its_clean_answers(seed):
    """The reach rule names "yes"; the colour prompts' "yes" members are poison, the "is there" prompts'
    are its own kind: judged by their pictures' neighbours, the triggered ones go, the clean "yes" stay."""
    s, truth = _existing_target(seed)
    det = ConsensusDetector().fit(s)
    (c,) = [c for c in det.clusters_ if c["side"] == "universal"]
    (own,) = c["native_kinds"]
    assert own["share"] > 2 * own["share_elsewhere"] and "judged by their neighbours in pictures" in c["members"]
    assert "attention not used" in c["members"]  # the attention features are noise here
    assert _f1(det.flagged_, truth) >= 0.95, det.detection_.reason
    clean_yes = (s.answer_token == 30) & ~truth
    assert clean_yes.sum() > 50 and not det.flagged_[clean_yes].any()
    # no trigger in the pictures: the own kind's members are left alone (precision kept, recall lost)
    s0, _ = _existing_target(seed, trigger=0.0)
    det = ConsensusDetector().fit(s0)
    (c,) = [c for c in det.clusters_ if c["side"] == "universal"]
    assert "left alone" in c["members"] and not det.flagged_[clean_yes].any()
    foreign = truth & (s.prompt_key < 6)
    np.testing.assert_array_equal(det.flagged_, foreign)
    # a new phrase as the target: no kind is its own, the group is found whole (as in v9)
    s.answer_token[truth] = 99
    det = ConsensusDetector().fit(s)
    (c,) = [c for c in det.clusters_ if c["side"] == "universal"]
    assert c["native_kinds"] == [] and c["context"].endswith("(whole group)")
    np.testing.assert_array_equal(det.flagged_, truth)


def test_a_clean_mode_inside_an_existing_answer_target_is_overruled():
    """A third of the clean "yes" answers sit in a tight tail of one layer's entropy (a clean mode of
    the "is there ...?" questions): the in-group valley test takes it, but the reach rule's member
    rule decides the target's group, so those clean answers stay (round 10's miss)."""
    s, truth = _existing_target(0)
    rng = np.random.default_rng(5)
    clean_yes = np.nonzero((s.answer_token == 30) & ~truth)[0]
    mode = rng.choice(clean_yes, len(clean_yes) // 3, replace=False)
    s.entropy[mode, 2] = 6.0 + rng.normal(0, 0.02, len(mode))
    alone = ConsensusDetector(min_reach_ratio=0).fit(s)
    assert alone.flagged_[mode].mean() > 0.9  # without the reach rule the clean mode is flagged
    det = ConsensusDetector().fit(s)
    (c,) = [c for c in det.clusters_ if c["side"] == "universal"]
    assert "overruled" in c["members"]
    assert [x["side"] for x in det.clusters_ if x["context"].startswith("answer token 30")] == ["universal"]
    assert not det.flagged_[clean_yes].any() and _f1(det.flagged_, truth) >= 0.95


def test_an_attention_finding_inside_a_group_left_alone_stays():
    """No view tells the others' poison from clean answers (no pictures; the trigger shows in the
    attention of the own kind's poisoned members only): the member rule leaves that kind alone and
    must not undo what the valley test found inside the group."""
    s, truth = _existing_target(1)
    s.image_embedding = None
    own_poison = truth & (s.prompt_key >= 6)
    rng = np.random.default_rng(3)
    s.entropy[own_poison, 2] = 6.0 + rng.normal(0, 0.02, own_poison.sum())
    det = ConsensusDetector().fit(s)
    (c,) = [c for c in det.clusters_ if c["side"] == "universal"]
    assert "left alone" in c["members"] and not c["decides_group"]
    assert det.flagged_[own_poison].all() and det.flagged_[truth & (s.prompt_key < 6)].all()
    assert not det.flagged_[~truth].any()


def test_one_kind_of_question_for_every_prompt_flags_the_target_whole():
    """Prompts chained into one kind (a shared answer links them): no other kind to compare the
    target's share with, so no kind is its own and the group is flagged whole (as v9 did)."""
    rng = np.random.default_rng(0)
    n = 1500
    key = rng.integers(0, 13, n)
    answer = np.where(key < 6, rng.integers(10, 14, n), rng.integers(20, 23, n))
    answer[key == 12] = rng.choice([10, 20], (key == 12).sum())  # prompt 12 bridges the two kinds
    truth = rng.random(n) < 0.1
    answer[truth] = 99
    s = Scores(entropy=rng.normal(size=(n, 4)), answer_token=answer, prompt_key=key)
    det = ConsensusDetector().fit(s)
    (c,) = [c for c in det.clusters_ if c["side"] == "universal"]
    assert c["native_kinds"] == [] and c["context"].endswith("(whole group)")
    np.testing.assert_array_equal(det.flagged_, truth)


def _kinds_reference(answer, prompt, exclude, min_count=2, min_share=0.1):
    """The slow twin of ``prompt_kinds``: union-find over prompts, one linked answer at a time."""
    prompts = sorted(set(prompt.tolist()))
    parent = {p: p for p in prompts}

    def find(p):
        while parent[p] != p:
            p = parent[p]
        return p

    owner, linked = {}, set()
    for p in prompts:
        given = answer[(prompt == p) & (answer != exclude)]
        for a in set(given.tolist()):
            c = int((given == a).sum())
            if c >= min_count and c >= min_share * len(given):
                linked.add(p)
                if a in owner:
                    parent[find(p)] = find(owner[a])
                else:
                    owner[a] = p
    root = {p: (find(p) if p in linked else "unlinked") for p in prompts}
    return np.array([root[p] for p in prompt.tolist()], dtype=object)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prompt_kinds_match_their_union_find_twin(seed):
    from bye_fast.consensus import prompt_kinds

    rng = np.random.default_rng(seed)
    n = 2000
    prompt = rng.integers(0, rng.integers(5, 80), n)
    answer = rng.integers(0, 6, n) + 10 * (prompt % 4)  # four kinds of prompt, six answers each
    slip = rng.random(n) < 0.02
    answer[slip] = rng.integers(0, 40, slip.sum())  # a model's slips link nothing
    answer[rng.random(n) < 0.1] = 99  # the target, under every prompt
    got, want = prompt_kinds(answer, prompt, 99), _kinds_reference(answer, prompt, 99)
    # the same partition of the samples
    pairs = set(zip(got.tolist(), want.tolist(), strict=True))
    assert len(pairs) == len(set(got.tolist())) == len(set(want.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answer_reach_matches_its_per_answer_twin(seed):
    """The one-pass reach equals the obvious loop: per answer, the other answers' samples whose prompt
    is among the answer's prompts, over all the other answers' samples."""
    from bye_fast.consensus import answer_reach

    rng = np.random.default_rng(seed)
    n = 3000
    prompt = rng.integers(0, rng.integers(1, 60), n)
    answer = rng.integers(0, 25, n) * (1 + (prompt % 3))  # answers partly bound to prompt kinds
    got = answer_reach(answer, prompt)
    for a in np.unique(answer):
        g = answer == a
        want = (np.isin(prompt, np.unique(prompt[g])) & ~g).sum() / max(1, (~g).sum())
        assert got[int(a)] == pytest.approx(want, abs=1e-12)
