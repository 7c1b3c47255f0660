"""Baseline detectors for the benchmarks (the lab): what bye_fast's default must beat.

Each returns ``(flagged, score)``: a boolean mask and a suspicion score (higher = more
suspicious) over the samples. None reads the ground truth.

* :func:`random_drop` -- the paper's baseline: drop a random 20%.
* :func:`spectral_signatures` -- Tran et al. 2018, per response group: centre the group's
  representations, score each sample by its squared projection on the top singular vector,
  remove the ``1.5 * eps`` highest-scoring share of the group (``eps`` = the assumed poison rate).
* :func:`activation_clustering` -- Chen et al. 2018, per response group: FastICA to 10
  dimensions, 2-means, flag the smaller cluster when it holds less than 35% of the group.
* :func:`tcap_style` -- our reading of TCAP (arXiv 2601.21692, its abstract): per head, the
  attention shares of the three components (text before the image, the image, the text after);
  a 2-component GMM per head and component; components whose modes are well separated are
  "trigger-responsive" and vote for the samples of their smaller mode; a 2-component GMM on the
  vote counts (EM) flags the high-vote cluster.

"Response group": the samples that share a response (in an MLLM the analogue of a class; the
poisoned samples share the attacker's answer). The benchmarks use the first word of each
record's answer; any per-sample labels work.
"""

from __future__ import annotations

import numpy as np

__all__ = ["activation_clustering", "random_drop", "spectral_signatures", "tcap_style"]


def random_drop(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flag a random ``fraction`` of ``n`` samples (score: a random permutation)."""
    rng = np.random.default_rng(seed)
    score = rng.permutation(n).astype(float)
    flagged = np.zeros(n, bool)
    flagged[np.argsort(-score)[: int(round(fraction * n))]] = True
    return flagged, score


def _per_group(x, groups, min_group: int, fit) -> tuple[np.ndarray, np.ndarray]:
    """Run ``fit(x[idx]) -> (flagged, score)`` on every response group of at least ``min_group``."""
    x = np.asarray(x, dtype=np.float64)
    groups = np.asarray(groups)
    flagged = np.zeros(len(x), bool)
    score = np.zeros(len(x))
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        if len(idx) >= min_group:
            flagged[idx], score[idx] = fit(x[idx])
    return flagged, score


def spectral_signatures(
    x: np.ndarray, groups, *, eps: float = 0.1, min_group: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral signatures per response group on representations ``x`` (n, d)."""

    def fit(xg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xc = xg - xg.mean(axis=0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        s = (xc @ vt[0]) ** 2
        top = np.zeros(len(xg), bool)
        top[np.argsort(-s)[: int(round(1.5 * eps * len(xg)))]] = True
        return top, s / (np.median(s) + 1e-12)

    return _per_group(x, groups, min_group, fit)


def activation_clustering(
    x: np.ndarray, groups, *, dims: int = 10, size_threshold: float = 0.35, seed: int = 0, min_group: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Activation clustering per response group on representations ``x`` (n, d)."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA

    def fit(xg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = min(dims, xg.shape[1], len(xg) - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z = FastICA(k, random_state=seed, max_iter=400).fit_transform(xg - xg.mean(axis=0))
        labels = KMeans(2, n_init=10, random_state=seed).fit_predict(z)
        sizes = np.bincount(labels, minlength=2) / len(xg)
        small = int(np.argmin(sizes))
        in_small = labels == small
        return in_small & (sizes[small] < size_threshold), np.where(
            in_small, 1.0 - sizes[small], sizes[small]
        )

    return _per_group(x, groups, min_group, fit)


def tcap_style(
    image_share: np.ndarray, before_share: np.ndarray, *, separation: float = 2.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """TCAP-style per-head allocation detector on ``(n, L, H)`` image and text-before shares."""
    import warnings

    from sklearn.mixture import GaussianMixture

    image_share = np.asarray(image_share, dtype=np.float64)
    n = len(image_share)
    after = 1.0 - image_share - np.asarray(before_share, dtype=np.float64)
    parts = [image_share.reshape(n, -1), np.asarray(before_share, dtype=np.float64).reshape(n, -1),
             after.reshape(n, -1)]  # fmt: skip
    votes = np.zeros(n)
    for part in parts:
        for j in range(part.shape[1]):
            v = part[:, j : j + 1]
            if np.ptp(v) < 1e-9:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g = GaussianMixture(2, random_state=seed).fit(v)
            mu, sd = g.means_.ravel(), np.sqrt(g.covariances_.ravel())
            if abs(mu[0] - mu[1]) > separation * (sd[0] + sd[1]):
                labels = g.predict(v)
                small = int(np.argmin(np.bincount(labels, minlength=2)))
                votes += labels == small
    if votes.max() == 0:
        return np.zeros(n, bool), votes
    g = GaussianMixture(2, random_state=seed).fit(votes[:, None])
    high = int(np.argmax(g.means_.ravel()))
    return g.predict(votes[:, None]) == high, votes
