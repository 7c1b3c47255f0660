"""Tests of bye_fast.stats.BimodalStats (native streaming moments, histograms, binned 2-GMM fits)."""

from __future__ import annotations

import copy
import pickle
import threading
import warnings

import numpy as np
import pytest

from bye_fast.stats import BimodalFit, BimodalStats

scipy_stats = pytest.importorskip("scipy.stats")


# ----------------------------------------------------------------------------- helpers
def two_gaussians(rng: np.random.Generator, n: int, w: tuple, mu: tuple, sd: tuple) -> np.ndarray:
    hi = rng.random(n) < w[1]
    return np.where(hi, rng.normal(mu[1], sd[1], n), rng.normal(mu[0], sd[0], n))


def data(n: int = 3000, f: int = 5, seed: int = 0) -> np.ndarray:
    """Columns of different shapes: Gaussian, skewed, far-from-zero mean, bimodal, uniform."""
    rng = np.random.default_rng(seed)
    cols = [
        rng.normal(0.0, 1.0, n),
        rng.exponential(1.0, n),
        1e4 + rng.normal(0.0, 1e-2, n),  # big offset, small spread: naive power sums would fail
        two_gaussians(rng, n, (0.9, 0.1), (2.0, 4.0), (0.3, 0.2)),
        rng.uniform(-3, 3, n),
    ]
    return np.stack([cols[j % len(cols)] for j in range(f)], axis=1)


def make(x: np.ndarray, lo: float = -5.0, hi: float = 10.0, bins: int = 512) -> BimodalStats:
    return BimodalStats(x.shape[1], lo, hi, bins).update(x)


def assert_same_state(a: BimodalStats, b: BimodalStats, rtol: float = 1e-12) -> None:
    """Counts and histograms exactly; moments to rtol (M3 relative to M2**1.5: it can be ~0)."""
    for name in ("count", "hist", "n_nonfinite", "n_clamped_low", "n_clamped_high"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.min, b.min)
    np.testing.assert_array_equal(a.max, b.max)
    m2a, m3a, m4a = a.central_moments
    m2b, m3b, m4b = b.central_moments
    scale = np.sqrt(a.var) + np.abs(a.mean)
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=rtol * np.nanmax(scale))
    np.testing.assert_allclose(m2a, m2b, rtol=rtol)
    np.testing.assert_allclose(m4a, m4b, rtol=rtol)
    np.testing.assert_allclose(m3a, m3b, rtol=0, atol=rtol * np.max(m2a**1.5) + 1e-300)
    np.testing.assert_allclose(a.skewness, b.skewness, rtol=0, atol=rtol * 10)
    np.testing.assert_allclose(a.kurtosis, b.kurtosis, rtol=0, atol=rtol * 10)


# ---------------------------------------------------------------- fit vs scikit-learn
# (weights, means, stds) of the generating mixture; well-separated cases first.
WELL = {
    "balanced": ((0.5, 0.5), (0.0, 6.0), (1.0, 1.0)),
    "90/10": ((0.9, 0.1), (3.0, 1.5), (0.2, 0.15)),  # entropy-like: 10% poison with lower entropy
}
POOR = {
    "balanced": ((0.5, 0.5), (0.0, 1.5), (1.0, 1.0)),
    "90/10": ((0.9, 0.1), (0.0, 2.0), (1.0, 0.8)),
}


def sklearn_fit(x: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(2, random_state=0, tol=tol).fit(x[:, None])
    order = np.argsort(g.means_.ravel())
    return (
        g.weights_[order],
        g.means_.ravel()[order],
        np.sqrt(g.covariances_.ravel()[order]),
        float(g.score(x[:, None])),
    )


def mixture_loglik(x: np.ndarray, w: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> float:
    return float(np.log(sum(w[i] * scipy_stats.norm.pdf(x, mu[i], sd[i]) for i in range(2))).mean())


@pytest.mark.parametrize("case", sorted(WELL))
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_matches_sklearn_well_separated(case: str, seed: int) -> None:
    w, mu, sd = WELL[case]
    x = two_gaussians(np.random.default_rng(seed), 20000, w, mu, sd)
    st = BimodalStats(1, x.min() - 0.01, x.max() + 0.01, bins=4096).update(x)
    fit = st.fit()
    sw, smu, ssd, _ = sklearn_fit(x, tol=1e-8)  # both fully converged to the same optimum
    bw = st.bin_width
    # Tolerance from the binning: every sample is moved to its bin centre, i.e. by at most bw/2.
    # With well separated components the responsibilities are ~0/1, so a component mean moves by
    # at most bw/2 and a std by at most bw/2 + bw^2/(24 sigma) (the Sheppard term); the
    # rounding errors largely cancel (observed ~0.01 bw), so bw/2 is a safe, still tight bound.
    # The weights move only through the responsibilities of the few samples in the overlap.
    assert fit.converged[0]
    np.testing.assert_allclose(fit.means[0], smu, rtol=0, atol=bw / 2)
    np.testing.assert_allclose(fit.stds[0], ssd, rtol=0, atol=bw / 2)
    np.testing.assert_allclose(fit.weights[0], sw, rtol=0, atol=1e-3)
    np.testing.assert_allclose(fit.weights[0], np.asarray(w)[np.argsort(mu)], atol=0.02)  # near the truth
    assert fit.sensitive()[0] == (abs(smu[1] - smu[0]) > 2 * (ssd[0] + ssd[1]))  # BYE's rule


@pytest.mark.parametrize("case", sorted(POOR))
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_matches_sklearn_poorly_separated(case: str, seed: int) -> None:
    w, mu, sd = POOR[case]
    x = two_gaussians(np.random.default_rng(seed), 20000, w, mu, sd)
    st = BimodalStats(1, x.min() - 0.01, x.max() + 0.01, bins=4096).update(x)
    fit = st.fit()
    sw, smu, ssd, sll = sklearn_fit(x, tol=1e-5)
    # Overlapping components are weakly identified: the likelihood has a long flat ridge, EM
    # crawls along it (sklearn needs thousands of iterations to meet tol=1e-10) and where a fit
    # stops depends on init and stopping rule, not on binning. So compare what IS identified --
    # the fitted density and its likelihood on the raw samples -- tightly, and the parameters
    # loosely (observed: means within 0.07 sd, weights within 0.04, CDFs within 0.002).
    ll = mixture_loglik(x, fit.weights[0], fit.means[0], fit.stds[0])
    assert ll > sll - 1e-4  # at least as likely as sklearn's fit, up to the binning error
    grid = np.linspace(x.min(), x.max(), 2001)

    def cdf(w_: np.ndarray, m_: np.ndarray, s_: np.ndarray) -> np.ndarray:
        return sum(w_[i] * scipy_stats.norm.cdf(grid, m_[i], s_[i]) for i in range(2))

    assert np.abs(cdf(fit.weights[0], fit.means[0], fit.stds[0]) - cdf(sw, smu, ssd)).max() < 0.01
    np.testing.assert_allclose(fit.means[0], smu, atol=0.25)
    np.testing.assert_allclose(fit.stds[0], ssd, atol=0.25)
    np.testing.assert_allclose(fit.weights[0], sw, atol=0.1)
    assert not fit.sensitive()[0]


def test_fit_many_features_and_threads_deterministic() -> None:
    rng = np.random.default_rng(3)
    gaps = np.array([0.0, 1.0, 2.0, 3.0, 3.5, 5.0, 6.0, 7.0, 8.0])  # none near the rule's boundary, 4
    x = np.stack([two_gaussians(rng, 4000, (0.8, 0.2), (0.0, g), (1.0, 1.0)) for g in gaps], axis=1)
    st = make(x, lo=-6, hi=14, bins=1024)
    a, b, c = st.fit(n_threads=1), st.fit(n_threads=3), st.fit(n_threads=64)
    assert a == b == c
    # separation grows with the gap; BYE's rule |mu0 - mu1| > 2 (s0 + s1) fires only for gap > 4.
    assert np.all(np.diff(a.separation[3:]) > 0)
    np.testing.assert_array_equal(a.sensitive(), gaps > 4)


# ----------------------------------------------------------------- derived quantities
def test_derived_quantities_match_numpy() -> None:
    x = data(5000, 5)
    x[:, 2] -= 1e4  # into the histogram range
    st = make(x)
    fit = st.fit()
    m0, m1 = fit.means.T
    s0, s1 = fit.stds.T
    assert np.all(m0 <= m1)
    np.testing.assert_allclose(fit.weights.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(fit.separation, np.abs(m0 - m1) / (2 * (s0 + s1)), rtol=1e-12)
    np.testing.assert_allclose(
        fit.ashman_d, np.sqrt(2) * np.abs(m0 - m1) / np.sqrt(s0**2 + s1**2), rtol=1e-12
    )
    # BYE reference (bye.py, compute_kl_between_gaussians(means[0], stds[0], means[1], stds[1]))
    kl = np.log(s1 / s0) + (s0**2 + (m0 - m1) ** 2) / (2 * s1**2) - 0.5
    np.testing.assert_allclose(fit.kl, kl, rtol=1e-10)
    # Bimodality coefficient from scipy's sample-size-corrected skewness and excess kurtosis.
    n = x.shape[0]
    g = scipy_stats.skew(x, bias=False)
    k = scipy_stats.kurtosis(x, bias=False)
    bc = (g**2 + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    np.testing.assert_allclose(fit.bimodality_coefficient, bc, rtol=1e-9)
    assert fit.bimodality_coefficient[3] > 5 / 9 > fit.bimodality_coefficient[0]  # bimodal vs Gaussian


def otsu_reference(h: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    """Brute-force Otsu: the interval of split edges that maximise the between-class variance."""
    idx = np.arange(h.size, dtype=float)
    best, ks = -1.0, []
    for k in range(h.size - 1):
        w0, w1 = h[: k + 1].sum(), h[k + 1 :].sum()
        if w0 == 0 or w1 == 0:
            continue
        d = (h[: k + 1] @ idx[: k + 1]) / w0 - (h[k + 1 :] @ idx[k + 1 :]) / w1
        v = w0 * w1 * d * d
        if v > best * (1 + 1e-12):
            best, ks = v, [k]
        elif v >= best * (1 - 1e-12):
            ks.append(k)
    return edges[ks[0] + 1], edges[ks[-1] + 1]


@pytest.mark.parametrize("gap", [3.0, 10.0])
def test_otsu_threshold(gap: float) -> None:
    rng = np.random.default_rng(5)
    x = two_gaussians(rng, 5000, (0.7, 0.3), (0.0, gap), (0.5, 0.5))
    st = BimodalStats(1, -3, 14, bins=256).update(x)
    t = st.fit().otsu_threshold[0]
    a, b = otsu_reference(st.hist[0].astype(float), st.bin_edges)
    assert a <= t <= b
    if gap == 10.0:
        # Empty gap between the modes: the threshold sits in it, half-way between the populations.
        assert x[x < gap / 2].max() < t < x[x > gap / 2].min()
        assert abs(t - 0.5 * (x[x < gap / 2].max() + x[x > gap / 2].min())) < 2 * st.bin_width
    assert np.all(x[x < 1.0] < t) and np.all(x[x > gap - 1.0] > t)


# ------------------------------------------------------------------------------ moments
def accurate_moments(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """mean, var, skew, excess kurtosis per column in extended precision, centred twice."""
    xl = x.astype(np.longdouble)
    mean = xl.mean(axis=0)
    d = xl - mean
    mean = mean + d.mean(axis=0)
    d = xl - mean
    m2, m3, m4 = ((d**k).mean(axis=0) for k in (2, 3, 4))
    return tuple(np.asarray(v, dtype=np.float64) for v in (mean, m2, m3 / m2**1.5, m4 / m2**2 - 3))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_moments_match_numpy(dtype: type) -> None:
    x = data(4000, 5).astype(dtype)
    st = make(x)
    xd = x.astype(np.float64)
    np.testing.assert_array_equal(st.count, np.full(5, 4000))
    np.testing.assert_allclose(st.mean, xd.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(st.var, xd.var(axis=0), rtol=1e-9)
    np.testing.assert_allclose(st.skewness, scipy_stats.skew(xd, axis=0), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(st.kurtosis, scipy_stats.kurtosis(xd, axis=0), rtol=1e-7, atol=1e-12)
    # numpy / scipy lose ~1e-8 on column 2 (mean / std = 1e6); against an accurate reference the
    # streamed moments are good to ~1e-14.
    mean, var, skew, kurt = accurate_moments(xd)
    np.testing.assert_allclose(st.mean, mean, rtol=1e-15, atol=1e-14 * np.sqrt(var).max())
    np.testing.assert_allclose(st.var, var, rtol=1e-12)
    np.testing.assert_allclose(st.skewness, skew, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(st.kurtosis, kurt, rtol=1e-11, atol=1e-13)
    np.testing.assert_array_equal(st.min, xd.min(axis=0))
    np.testing.assert_array_equal(st.max, xd.max(axis=0))


def test_float32_same_as_float64_of_same_values() -> None:
    x32 = data(2000, 5).astype(np.float32)
    assert_same_state(make(x32), make(x32.astype(np.float64)), rtol=1e-14)


def test_histogram_matches_numpy_including_edges() -> None:
    st = BimodalStats(2, -1.0, 1.0, bins=64)
    edges = st.bin_edges
    np.testing.assert_array_equal(edges, np.linspace(-1.0, 1.0, 65))
    np.testing.assert_allclose(st.bin_centres, 0.5 * (edges[:-1] + edges[1:]), rtol=0, atol=1e-15)
    assert st.bin_width == 2.0 / 64
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [edges, np.nextafter(edges, -np.inf)[1:], np.nextafter(edges, np.inf)[:-1], rng.uniform(-1, 1, 500)]
    )
    st.update(np.stack([x, -x], axis=1))
    for j, col in enumerate((x, -x)):
        np.testing.assert_array_equal(st.hist[j], np.histogram(col, bins=64, range=(-1.0, 1.0))[0])
    np.testing.assert_array_equal(st.n_clamped_low + st.n_clamped_high, 0)  # hi itself is in range


# ---------------------------------------------------------- chunks, merge, serialisation
@pytest.mark.parametrize("chunk", [1, 7, 250, 1999])
def test_chunked_update_equals_single(chunk: int) -> None:
    x = data(2000, 5)
    one = make(x)
    st = BimodalStats(5, -5.0, 10.0, 512)
    for i in range(0, len(x), chunk):
        st.update(x[i : i + chunk])
    assert_same_state(st, one)


def test_halves_merge_equals_single_and_is_associative() -> None:
    x = data(3000, 5)
    one = make(x)
    a, b, c = make(x[:1000]), make(x[1000:2300]), make(x[2300:])
    left = a.copy().merge(b).merge(c)  # (a + b) + c
    right = a.copy().merge(b.copy().merge(c))  # a + (b + c)
    assert_same_state(left, one)
    assert_same_state(right, one)
    assert_same_state(left, right)
    empty = BimodalStats(5, -5.0, 10.0, 512)
    assert_same_state(empty.merge(one), one)  # into an empty state
    assert_same_state(one.copy().merge(BimodalStats(5, -5.0, 10.0, 512)), one)


def test_self_merge_doubles_counts() -> None:
    x = data(500, 3)
    st = make(x)
    st.merge(st)
    assert_same_state(st, make(np.concatenate([x, x])))


@pytest.mark.parametrize(
    "other",
    [dict(n_features=4), dict(lo=-4.0), dict(hi=11.0), dict(bins=256)],
    ids=["n_features", "lo", "hi", "bins"],
)
def test_merge_mismatch_raises(other: dict) -> None:
    kw = dict(n_features=5, lo=-5.0, hi=10.0, bins=512)
    a = BimodalStats(**kw)
    with pytest.raises(ValueError, match="different layouts"):
        a.merge(BimodalStats(**{**kw, **other}))
    with pytest.raises(TypeError):
        a.merge(object())  # type: ignore[arg-type]


def test_bytes_and_pickle_round_trip() -> None:
    x = data(1000, 5)
    x[3, 1] = np.nan
    st = make(x, lo=-1, hi=3)  # with clamping and a non-finite value
    blob = st.to_bytes()
    for back in (
        BimodalStats.from_bytes(blob),
        BimodalStats.from_bytes(bytearray(blob)),
        pickle.loads(pickle.dumps(st)),
        copy.deepcopy(st),
    ):
        assert back.to_bytes() == blob  # bit-identical state
        assert_same_state(back, st, rtol=0)
        assert back.fit() == st.fit()
    back.update(x)  # copies are independent
    assert back.count[0] == 2 * st.count[0]


def test_corrupted_blobs_raise_value_error() -> None:
    blob = make(data(300, 2)).to_bytes()
    for n in (0, 7, 20, 47, 48, 100, len(blob) - 8, len(blob) - 1):
        with pytest.raises(ValueError, match="invalid BimodalStats blob"):
            BimodalStats.from_bytes(blob[:n])
    with pytest.raises(ValueError, match="invalid BimodalStats blob"):
        BimodalStats.from_bytes(blob + b"\0" * 8)
    rng = np.random.default_rng(0)
    for pos in [0, 8, 16, 24, 32, 50, *rng.integers(48, len(blob), 20)]:
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(ValueError, match="invalid BimodalStats blob"):
            BimodalStats.from_bytes(bytes(bad))
    bad = bytearray(blob)
    bad[8] = 2  # a future version
    with pytest.raises(ValueError, match="version 2"):
        BimodalStats.from_bytes(bytes(bad))


# ---------------------------------------------------------------- layouts and dtypes
@pytest.mark.parametrize(
    "view",
    [
        lambda x: x[:, ::2],
        lambda x: np.asfortranarray(x[:, ::2]),
        lambda x: x[::-3, 1::2],
        lambda x: x.T.copy().T[:, :5],  # Fortran-ordered
        lambda x: x[:, ::-2],
    ],
    ids=["col_stride", "fortran", "neg_row_stride", "fortran2", "neg_col_stride"],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_contiguous_same_as_contiguous(view, dtype: type) -> None:
    x = data(1500, 10).astype(dtype)
    v = view(x)
    assert not v.flags.c_contiguous
    st = BimodalStats(v.shape[1], -5.0, 10.0, 512).update(v)
    # Same values, maybe another loop order / blocking: identical up to rounding.
    assert_same_state(st, BimodalStats(v.shape[1], -5.0, 10.0, 512).update(np.ascontiguousarray(v)))


def test_misaligned_and_broadcast_inputs() -> None:
    x = data(400, 3)
    rec = np.zeros(400, dtype=[("a", "i1"), ("x", "<f8", (3,))])  # packed: x is misaligned
    rec["x"] = x
    assert_same_state(make(rec["x"]), make(x))
    row = np.broadcast_to(x[0], (50, 3))  # zero row stride
    st = make(row)
    np.testing.assert_array_equal(st.count, 50)
    np.testing.assert_array_equal(st.mean, x[0])
    np.testing.assert_array_equal(st.var, 0.0)


def test_other_float_dtypes_and_lists() -> None:
    x = data(300, 3)
    ref = make(x.astype(np.float16).astype(np.float32))
    assert_same_state(make(x.astype(np.float16)), ref, rtol=0)
    assert_same_state(make(x.astype(">f8")), make(x), rtol=0)
    st = BimodalStats(1, 0, 1).update([0.25, 0.5, 0.75])  # 1-D list for one feature
    np.testing.assert_allclose(st.mean, [0.5])
    st.update(np.array([[0.5]]))
    np.testing.assert_array_equal(st.count, [4])


# --------------------------------------------------------------- non-finite, clamping
def test_nonfinite_values_are_counted_and_excluded() -> None:
    x = data(1000, 4)
    bad = x.copy()
    bad[::7, 0] = np.nan
    bad[3, 1] = np.inf
    bad[5, 1] = -np.inf
    bad[:, 2] = np.nan  # a feature with nothing finite
    st = make(bad)
    np.testing.assert_array_equal(st.n_nonfinite, [len(range(0, 1000, 7)), 2, 1000, 0])
    np.testing.assert_array_equal(st.count, 1000 - st.n_nonfinite)
    np.testing.assert_array_equal(st.hist.sum(axis=1), st.count)
    finite0 = x[np.arange(1000) % 7 != 0, 0]
    np.testing.assert_allclose(st.mean[0], finite0.mean(), rtol=1e-12)
    np.testing.assert_allclose(st.var[0], finite0.var(), rtol=1e-12)
    assert np.isnan(st.mean[2]) and np.isnan(st.var[2]) and np.isnan(st.skewness[2])
    fit = st.fit()
    assert np.isnan(fit.means[2]).all() and fit.n_iter[2] == 0 and not fit.converged[2]
    assert np.isfinite(fit.means[[0, 1, 3]]).all()


def test_clamping_counts_and_edge_bins() -> None:
    x = np.array([[-10.0], [-1.0], [-0.5], [0.0], [0.99], [1.0], [1.5], [np.inf]])
    st = BimodalStats(1, -1.0, 1.0, bins=4).update(x)
    np.testing.assert_array_equal(st.n_clamped_low, [1])  # -10
    np.testing.assert_array_equal(st.n_clamped_high, [1])  # 1.5 (1.0 == hi is in range; inf is non-finite)
    np.testing.assert_array_equal(st.hist, [[2, 1, 1, 3]])  # edges -1, -0.5, 0, 0.5, 1
    np.testing.assert_array_equal(st.n_nonfinite, [1])
    np.testing.assert_allclose(st.mean, [np.mean([-10, -1, -0.5, 0, 0.99, 1.0, 1.5])])  # exact values


def test_degenerate_features_give_nan_not_crash() -> None:
    x = np.full((100, 4), 0.3)
    x[1:, 1] = np.nan  # a single finite value
    x[:, 2] = np.linspace(0.30, 0.3001, 100)  # varies, but inside one bin
    x[:50, 3], x[50:, 3] = 0.0, 1.0  # two values: fittable
    st = make(x, lo=-1.0, hi=2.0, bins=64)
    np.testing.assert_array_equal(st.mean[0], 0.3)
    np.testing.assert_array_equal(st.var[:2], 0.0)
    assert np.isnan(st.skewness[:2]).all() and np.isnan(st.kurtosis[:2]).all()
    fit = st.fit()
    for name in ("weights", "means", "stds", "separation", "kl", "ashman_d"):
        assert np.isnan(getattr(fit, name)[:3]).all(), name
    assert np.isnan(fit.otsu_threshold[:3]).all() and np.isnan(fit.bimodality_coefficient[:2]).all()
    np.testing.assert_allclose(fit.means[3], [0.0, 1.0], atol=st.bin_width)
    np.testing.assert_allclose(fit.weights[3], [0.5, 0.5])
    assert fit.separation[3] > 1 and 0 < fit.otsu_threshold[3] < 1
    empty = BimodalStats(3, 0, 1).fit()
    assert np.isnan(empty.means).all() and not empty.converged.any()
    assert "fitted=0" in repr(empty)


# -------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    "shape",
    [(10,), (10, 4), (10, 6), (2, 5, 1), ()],
)
def test_bad_shape_raises_value_error(shape: tuple) -> None:
    st = BimodalStats(5, 0, 1)
    with pytest.raises(ValueError, match=r"shape \(n_rows, 5\).*got shape"):
        st.update(np.zeros(shape))
    np.testing.assert_array_equal(st.count, 0)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((4, 2), dtype=np.int64),
        np.zeros((4, 2), dtype=bool),
        np.zeros((4, 2), dtype=np.complex128),
        np.zeros((4, 2), dtype=object),
        np.zeros((4, 2), dtype=np.longdouble),
        [[1, 2], [3, 4]],
        [["a", "b"]],
    ],
    ids=["int", "bool", "complex", "object", "longdouble", "int_list", "str_list"],
)
def test_bad_dtype_raises_type_error(x) -> None:
    if getattr(x, "dtype", None) == np.longdouble and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match="float32 or float64"):
        BimodalStats(2, 0, 1).update(x)


@pytest.mark.parametrize(
    "args",
    [
        (0, 0.0, 1.0, 16),
        (2, 1.0, 1.0, 16),
        (2, 1.0, 0.0, 16),
        (2, np.nan, 1.0, 16),
        (2, 0.0, np.inf, 16),
        (2, 0, 1, 1),
    ],
)
def test_bad_constructor_args(args: tuple) -> None:
    with pytest.raises(ValueError):
        BimodalStats(*args)


def test_bad_fit_args() -> None:
    st = make(data(100, 2))
    for kw in (dict(max_iter=0), dict(tol=-1.0), dict(reg_covar=-1.0), dict(n_threads=0)):
        with pytest.raises(ValueError):
            st.fit(**kw)


# ------------------------------------------------------------------------- concurrency
def test_concurrent_updates_from_threads() -> None:
    x = data(4000, 5)
    st = BimodalStats(5, -5.0, 10.0, 512)
    parts = np.array_split(x, 8)
    threads = [threading.Thread(target=st.update, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_same_state(st, make(x))


def test_repr() -> None:
    x = data(100, 3)
    x[0, 0] = np.nan
    st = make(x, lo=0, hi=1)
    r = repr(st)
    assert r.startswith("BimodalStats(n_features=3, lo=0, hi=1, bins=512, count=99..100")
    assert "n_nonfinite=1" in r and "n_clamped=" in r
    fit = st.fit()
    # column 2 (~1e4) is all clamped into the last bin: not fittable
    assert isinstance(fit, BimodalFit) and repr(fit).startswith("BimodalFit(n_features=3, fitted=2")
