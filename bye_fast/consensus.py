"""The default detector: tight tail clusters, tested feature by feature, kept where the features agree.

Why. A model fine-tuned on poisoned data treats the poisoned samples alike, whatever
their content: in the features that react to the trigger they form a *tight* group
at one *end* of the distribution (high or low), while clean data may have several
broad modes (answer classes, question types). The paper's 2-component mixtures
split those clean modes; a mean over layers blurs the one head that sees the
trigger. This detector asks, for every per-head and per-layer feature and both
ends, one question with a calibrated answer, and removes only what many features
agree on.

How (:class:`ConsensusDetector`):

1. **Features** (:data:`FEATURES`): per layer and head the image-attention
   entropy and the shares of the attention on the image and on the text before
   it; per layer the paper's head-mean entropy and the top-k spatial
   concentration; the model's logit margin for its first answer token. Each is
   robustly standardised (median, MAD) within its *context*.
2. **Contexts**: all samples, and each group of samples that get the same first
   answer token from the model (``Scores.answer_token``) with at least
   ``min_group`` members -- a poison group hiding inside an existing answer
   ("yes") shows inside that group; one with its own answer shows among all.
3. **Valley test** per feature, end and candidate size k (``min_cluster`` to
   ``max_fraction`` of the context): the k most extreme values span a width w;
   count the values in the next window of the same width towards the bulk. Any
   density that decreases away from the bulk puts at least as many values in
   that window as in the tail, so ``P(window <= observed | window + k)`` under
   Binomial(., 1/2) is a conservative p-value for "a tight cluster at the tail".
   It does not fire for broad classes, skew or heavy tails, only for a group
   denser than the values just inside it. Bonferroni over every feature, end,
   size and context: a feature is *significant* when ``p * n_tests < alpha``;
   with nothing to find, nothing passes, whatever n (at n < 2 min_cluster no
   test can pass at all).
4. **Consensus**: in each context, the features whose tail sets overlap the
   most significant one's (Jaccard >= 1/2) form a block; a sample is in the
   cluster when at least half of the block's features put it in their tail.
5. **Budget**: the clusters of all contexts together must not exceed
   ``max_fraction`` of the samples; a larger group is reported as too large to
   be poison and nothing is removed.
6. **Suspicion score** (for review, every sample): the share of the block
   features that put the sample in their tail, plus a small tie-break by its
   mean standardised distance towards the cluster's end; without any
   significant feature, the same on the three strongest features.

Every decision is in ``Detection.reason`` and ``details`` (per-feature evidence
``-log10(p * n_tests)``, the blocks, the clusters, the number of tests).
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np

from bye_fast.detect import Detection, valid_rows
from bye_fast.scores import Scores

__all__ = ["FEATURES", "REFINE_FEATURES", "ConsensusDetector", "valley_scan", "valley_scan_reference"]

#: Scores fields the cluster test reads (missing ones are skipped): the paper's per-layer entropy.
FEATURES = ("entropy",)
#: Scores fields the membership of a found cluster is refined with (missing ones are skipped).
REFINE_FEATURES = ("entropy", "head_entropy", "head_image_share", "head_before_share", "image_topk_share")


class FeatureColumns:
    """The detector's features as ``(n, F)`` columns, read in blocks without copying the whole matrix.

    ``names`` has one entry per column (``"head_entropy layer 3 head 1"``); ``blocks(width)`` yields
    ``(first column, (n, b) array)``; ``column(j)`` is one column. Values keep their floating dtype
    (float32 scores stay float32: the scan sorts them in half the time and memory of float64).
    """

    def __init__(self, scores: Scores, families: tuple[str, ...] = FEATURES) -> None:
        n = scores.n_samples
        self.parts: list[np.ndarray] = []
        self.names: list[str] = []
        for fam in families:
            value = getattr(scores, fam, None)
            if value is None:
                continue
            x = np.asarray(value)
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float64)
            x = x.reshape(n, -1)
            self.parts.append(x)
            if x.shape[1] == 1:
                self.names.append(fam)
            elif np.ndim(value) == 3:
                H = np.shape(value)[2]
                self.names += [f"{fam} layer {j // H} head {j % H}" for j in range(x.shape[1])]
            else:
                self.names += [f"{fam} layer {j}" for j in range(x.shape[1])]
        if not self.parts:
            raise ValueError(f"these scores have none of the detector's features {families}")
        self.n = n
        self.starts = np.cumsum([0] + [p.shape[1] for p in self.parts])
        self.dtype = np.result_type(*self.parts)

    @property
    def n_features(self) -> int:
        return int(self.starts[-1])

    def block(self, j0: int, j1: int) -> np.ndarray:
        """Columns ``j0:j1`` as one ``(n, j1 - j0)`` array."""
        out = []
        for p, s in zip(self.parts, self.starts[:-1], strict=True):
            lo, hi = max(j0, s), min(j1, s + p.shape[1])
            if lo < hi:
                out.append(p[:, lo - s : hi - s])
        return out[0] if len(out) == 1 else np.concatenate(out, axis=1).astype(self.dtype, copy=False)

    def blocks(self, width: int = 64):
        for j0 in range(0, self.n_features, width):
            yield j0, self.block(j0, min(j0 + width, self.n_features))

    def column(self, j: int) -> np.ndarray:
        return self.block(j, j + 1)[:, 0]


def feature_matrix(scores: Scores, families: tuple[str, ...] = FEATURES) -> tuple[np.ndarray, list[str]]:
    """The ``(n, F)`` float64 matrix of the feature families present in ``scores``, and feature names."""
    cols = FeatureColumns(scores, families)
    return cols.block(0, cols.n_features).astype(np.float64), cols.names


def _log10_binom_cdf(k: np.ndarray, n: np.ndarray, q: float = 0.5) -> np.ndarray:
    """log10 P(Binomial(n, q) <= k), elementwise."""
    from scipy.stats import binom

    return binom.logcdf(k, n, q) / np.log(10)


#: Candidate cluster sizes grow by this factor (every integer while the step is below one).
SIZE_RATIO = 1.05


def size_grid(kmin: int, kmax: int, ratio: float = SIZE_RATIO) -> np.ndarray:
    """The cluster sizes tested: every integer from ``kmin`` while ``ratio`` steps are below one, then
    geometric up to ``kmax`` (inclusive). A cluster of any size lies within 5% of a tested one, and
    the number of tests -- hence the Bonferroni price and the cost -- grows with log(n), not n."""
    kmin, kmax = int(kmin), int(kmax)
    if kmax < kmin or kmin < 1:
        return np.zeros(0, np.int64)
    steps = int(np.ceil(np.log(kmax / kmin) / np.log(ratio))) + 1
    ks = np.unique(np.round(kmin * ratio ** np.arange(steps)).astype(np.int64))
    return np.unique(np.append(ks[ks <= kmax], kmax))


def _scan_sorted(asc: np.ndarray, ks: np.ndarray, trim: float, gap: float = 1.0) -> tuple[float, int, float]:
    """The best high-end cluster of the ascending-sorted ``asc`` over the sizes ``ks``."""
    n = len(asc)
    ks = ks[ks <= n - 1]
    if not len(ks):
        return 0.0, 0, float("inf")
    cut = asc[n - ks]  # the k-th largest
    w = asc[n - 1 - (trim * ks).astype(np.int64)] - cut
    tail = n - np.searchsorted(asc, cut, side="left")  # values >= cut (ties included)
    window = n - np.searchsorted(asc, cut - gap * w, side="left") - tail
    logp = np.where(w > 0, _log10_binom_cdf(window, window + tail, gap / (1 + gap)), 0.0)
    i = int(np.argmin(logp))
    return float(logp[i]), int(tail[i]), float(cut[i])


def valley_scan(
    y: np.ndarray,
    kmin: int,
    kmax: int,
    *,
    trim: float = 0.05,
    gap: float = 1.0,
    sizes: np.ndarray | None = None,
) -> tuple[float, int, float]:
    """The best tail cluster at the HIGH end of ``y``: ``(log10 p, size, cut)``; members are ``y >= cut``.

    For each size k (``sizes``, default every k in ``[kmin, kmax]``): the k largest values (less
    the top ``trim`` share, so that one far outlier does not widen the window) span ``w``; ``m``
    values lie in ``[cut - w, cut)``; ``p = P(Binomial(m + k, 1/2) <= m)``. Ties at the top
    (``w == 0``) give no evidence. ``(0.0, 0, inf)`` when no k is possible.
    """
    ks = np.arange(kmin, int(kmax) + 1) if sizes is None else np.asarray(sizes, np.int64)
    if kmin < 1:
        ks = ks[ks >= 1]
    return _scan_sorted(np.sort(y), ks, trim, gap)


def valley_scan_reference(
    y: np.ndarray, kmin: int, kmax: int, *, trim: float = 0.05, gap: float = 1.0, sizes=None
) -> tuple[float, int, float]:
    """:func:`valley_scan` written with loops and exact binomial sums (the obviously-correct twin)."""
    from math import comb, log10

    ys = sorted((float(v) for v in y), reverse=True)
    n = len(ys)
    best = (0.0, 0, float("inf"))
    for k in range(kmin, min(kmax, n - 1) + 1) if sizes is None else [int(k) for k in sizes if k <= n - 1]:
        cut = ys[k - 1]
        w = ys[int(trim * k)] - cut
        if w <= 0:
            continue
        tail = sum(v >= cut for v in ys)
        window = sum(cut - gap * w <= v < cut for v in ys)
        m = window + tail
        q = gap / (1 + gap)
        p = sum(comb(m, i) * q**i * (1 - q) ** (m - i) for i in range(window + 1))
        lp = log10(p)
        if lp < best[0]:
            best = (lp, tail, cut)
    return best


def _iqr(v: np.ndarray) -> float:
    return float(np.subtract(*np.percentile(v, [75, 25]))) if len(v) >= 2 else float("nan")


def _spread_ratio(y: np.ndarray, cut: float, groups: list[np.ndarray] | None = None) -> float:
    """How collapsed the tail (``y >= cut``) is: its interquartile range over a reference spread,
    << 1 for poison. The reference is the rest's spread; with answer ``groups`` (index arrays), the
    typical WITHIN-group spread of the groups other than the one holding most of the tail, so that
    a feature that separates answer classes does not make a whole class look tight."""
    tail = y >= cut
    if tail.sum() < 2 or (~tail).sum() < 2:
        return float("inf")
    ref = _iqr(y[~tail])
    if groups:
        share = [tail[g].sum() for g in groups]
        host = int(np.argmax(share))
        within = [_iqr(y[g]) for k, g in enumerate(groups) if k != host]
        within = [w for w in within if np.isfinite(w)]
        if within:
            ref = float(np.median(within))
    return _iqr(y[tail]) / ref if ref > 0 else float("inf")


def _robust_z(x: np.ndarray) -> np.ndarray:
    med = np.median(x, axis=0)
    mad = 1.4826 * np.median(np.abs(x - med), axis=0)
    scale = np.where(mad > 0, mad, x.std(axis=0))
    return (x - med) / np.where(scale > 0, scale, 1.0)


class ConsensusDetector:
    """Tight tail clusters found per feature with a calibrated test, kept where features agree.

    See the module docstring for the method.

    Parameters
    ----------
    max_fraction : the largest share of the samples that may be removed (default 0.3). A
        cluster (or the clusters together) above it is reported as too large to be poison,
        and nothing is removed.
    alpha : family-wise false-alarm level of the cluster test over all features, ends, sizes
        and contexts (default 0.01).
    min_cluster : the smallest tail cluster tested (default 5 samples).
    min_group : the smallest answer group analysed on its own (default 20 samples).
    groups : also analyse within the model's answer groups (needs ``Scores.answer_token``).
    max_spread_ratio : a tail cluster counts only when its interquartile range is at most this
        share of the rest's (default 0.5): poison is collapsed, a clean mode is as broad as the rest.
    features : the Scores fields used (default :data:`FEATURES`).

    Attributes
    ----------
    evidence_ : (F,) ``-log10(p * n_tests)`` of each feature's best tail cluster over all
        contexts (> ``-log10(alpha)``: significant).
    clusters_ : list of dict, one per context with a significant block: ``context``, ``size``,
        ``evidence``, ``block`` (feature names), ``side`` of the lead feature.
    n_tests_ : the number of tests the Bonferroni correction counts.
    flagged_, score_ : per sample (see :class:`bye_fast.detect.Detection`).
    detection_ : the :class:`Detection`.
    """

    name: ClassVar[str] = "consensus"
    #: Share of the top values left out of a cluster's width (one far outlier must not widen it).
    trim: ClassVar[float] = 0.05
    #: Features sorted together (memory: ``block_width x n`` values).
    block_width: ClassVar[int] = 64

    def __init__(
        self,
        max_fraction: float = 0.3,
        alpha: float = 0.01,
        min_cluster: int = 5,
        min_group: int = 20,
        groups: bool = True,
        max_spread_ratio: float = 0.5,
        features: tuple[str, ...] = FEATURES,
        gap: float = 1.0,
        refine_features: tuple[str, ...] | None = REFINE_FEATURES,
        refine_c: float = 0.1,
    ) -> None:
        self.gap = gap
        self.refine_features = refine_features
        self.refine_c = refine_c
        self.max_fraction = max_fraction
        self.max_spread_ratio = max_spread_ratio
        self.alpha = alpha
        self.min_cluster = min_cluster
        self.min_group = min_group
        self.groups = groups
        self.features = features

    def get_params(self) -> dict:
        return {"max_fraction": self.max_fraction, "alpha": self.alpha, "min_cluster": self.min_cluster,
                "min_group": self.min_group, "groups": self.groups, "max_spread_ratio": self.max_spread_ratio,
                "features": list(self.features), "gap": self.gap,
                "refine_features": None if self.refine_features is None else list(self.refine_features),
                "refine_c": self.refine_c}  # fmt: skip

    def _check(self) -> None:
        if not (np.isfinite(self.max_fraction) and 0 < self.max_fraction <= 1):
            raise ValueError(f"max_fraction must be in (0, 1]; got {self.max_fraction}")
        if not (np.isfinite(self.alpha) and 0 < self.alpha < 1):
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha}")
        if int(self.min_cluster) < 2 or int(self.min_group) < 2:
            raise ValueError(
                f"min_cluster and min_group must be >= 2; got {self.min_cluster}, {self.min_group}"
            )

    def _contexts(self, scores: Scores, valid: np.ndarray) -> list[tuple[str, np.ndarray, float]]:
        nv = int(valid.sum())
        contexts = [("all samples", np.arange(nv), self.max_fraction)]
        if self.groups and scores.answer_token is not None:
            tok = np.asarray(scores.answer_token)[valid]
            for t in np.unique(tok):
                idx = np.nonzero(tok == t)[0]
                if self.min_group <= len(idx) < nv:
                    contexts.append((f"answer token {int(t)}", idx, 0.5))
        return contexts

    def _group_index(self, scores: Scores, valid: np.ndarray) -> list[np.ndarray] | None:
        """Index arrays (into the valid samples) of the answer groups with at least ``min_group`` members."""
        if scores.answer_token is None:
            return None
        tok = np.asarray(scores.answer_token)[valid]
        groups = [np.nonzero(tok == t)[0] for t in np.unique(tok)]
        groups = [g for g in groups if len(g) >= self.min_group]
        return groups if len(groups) >= 2 else None

    def _scan(
        self, cols: FeatureColumns, rows, plans: list[tuple[str, np.ndarray, np.ndarray]]
    ) -> list[np.ndarray]:
        """Per context, a ``(F, 4)`` array of each usable feature's best tail: ``log10 p, side, cut, size``
        (cut in the feature's own units times ``side``; members are ``side * value >= cut``).

        Columns are read in blocks, transposed and sorted row-wise (one sort serves both ends)."""
        keep = np.nonzero(rows.columns)[0]
        vidx = np.nonzero(rows.valid)[0]
        out = [np.zeros((len(keep), 4)) for _ in plans]
        pos = 0
        for j0, blk in cols.blocks(self.block_width):
            sel = keep[(keep >= j0) & (keep < j0 + blk.shape[1])] - j0
            if not len(sel):
                continue
            bt = np.ascontiguousarray(blk[vidx][:, sel].T)  # (b, nv)
            for c, (_, idx, ks) in enumerate(plans):
                srt = np.sort(bt if len(idx) == len(vidx) else bt[:, idx], axis=1)
                for r in range(len(sel)):
                    hi = _scan_sorted(srt[r], ks, self.trim, self.gap)
                    lo = _scan_sorted(-srt[r, ::-1], ks, self.trim, self.gap)
                    best = (hi[0], 1.0, hi[2], hi[1]) if hi[0] <= lo[0] else (lo[0], -1.0, lo[2], lo[1])
                    out[c][pos + r] = best if best[0] < 0 else (0.0, 0.0, np.inf, 0)
            pos += len(sel)
        return out

    #: Rows the refining classifier is fitted on, at most, per class (members / others).
    refine_rows: ClassVar[int] = 20_000

    def _refine(
        self, scores: Scores, valid: np.ndarray, seed: np.ndarray, exclude: set[str]
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Membership of the found cluster, refined with every feature family.

        The calibrated test decides WHETHER there is a cluster and gives its core (``seed``, over the
        valid samples); a linear classifier (L2 logistic regression, balanced classes) of seed vs
        rest on the standardised features of ``refine_features`` -- less the features the test
        found the cluster with (``exclude``), so that the classifier cannot just redraw the test's
        cut -- then decides WHO is in it: a poisoned sample the lead feature misses but the heads
        place with the others is kept in. Fitted on at most ``refine_rows`` samples per class. The refined set replaces
        the seed only when it stays within ``max_fraction`` and overlaps the seed (Jaccard >= 1/2).
        Returns ``(members, probability, note)`` over the valid samples.
        """
        from sklearn.linear_model import LogisticRegression

        cols = FeatureColumns(scores, tuple(self.refine_features))
        vidx = np.nonzero(valid)[0]
        finite = np.ones(cols.n_features, bool)
        for j0, b in cols.blocks(self.block_width):
            finite[j0 : j0 + b.shape[1]] = np.isfinite(b[vidx]).all(axis=0)
        use = np.nonzero(finite & ~np.isin(cols.names, list(exclude)))[0]
        if not len(use):
            return seed, seed.astype(np.float64), "no feature left to refine with: kept the test's cluster"
        rng = np.random.default_rng(0)
        pos, neg = np.nonzero(seed)[0], np.nonzero(~seed)[0]
        pos = rng.choice(pos, self.refine_rows, replace=False) if len(pos) > self.refine_rows else pos
        neg = rng.choice(neg, self.refine_rows, replace=False) if len(neg) > self.refine_rows else neg
        train = np.sort(np.concatenate([pos, neg]))
        rows_t = vidx[train]
        xt = np.concatenate([b[rows_t] for _, b in cols.blocks(self.block_width)], axis=1)[:, use]
        xt = xt.astype(np.float64)
        med = np.median(xt, axis=0)
        sd = xt.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        clf = LogisticRegression(C=self.refine_c, class_weight="balanced", max_iter=2000)
        clf.fit((xt - med) / sd, seed[train])
        w = np.zeros(cols.n_features)
        w[use] = clf.coef_[0] / sd
        logit = np.full(len(vidx), float(clf.intercept_[0] - (med * clf.coef_[0] / sd).sum()))
        for j0, b in cols.blocks(self.block_width):
            logit += b[vidx] @ w[j0 : j0 + b.shape[1]].astype(b.dtype)
        prob = 1.0 / (1.0 + np.exp(-logit))
        members = prob > 0.5
        jac = (members & seed).sum() / max(1, (members | seed).sum())
        if members.sum() > self.max_fraction * len(vidx) or jac < 0.5:
            return seed, prob, (f"refinement dropped ({int(members.sum())} samples, Jaccard {jac:.2f} with the "
                                f"test's {int(seed.sum())}): kept the test's cluster")  # fmt: skip
        return members, prob, f"refined with {len(use)} features: {int(seed.sum())} -> {int(members.sum())} samples"

    def _members(self, best: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The tail cluster of one significant feature. Its size was tested on a grid; the cut is
        refined over every size within one grid step of it (the evidence stays the grid's)."""
        side, k = best[1], int(best[3])
        lo, hi = int(np.floor(k / SIZE_RATIO)), int(np.ceil(k * SIZE_RATIO))
        lp, _, cut = valley_scan(side * y, max(lo, 1), hi, trim=self.trim, gap=self.gap)
        return side * y >= (cut if lp < 0 else best[2])

    def fit(self, scores: Scores) -> ConsensusDetector:
        self._check()
        cols = FeatureColumns(scores, tuple(self.features))
        names = cols.names
        n = scores.n_samples
        rows = valid_rows(scores, cols, names)
        keep = np.nonzero(rows.columns)[0]
        vidx = np.nonzero(rows.valid)[0]
        vnames = [names[j] for j in keep]
        F, nv = len(keep), len(vidx)
        contexts = self._contexts(scores, rows.valid)
        plans = [(label, idx, size_grid(self.min_cluster, int(frac * len(idx)))) for label, idx, frac in contexts]
        n_tests = sum(F * 2 * len(ks) for _, _, ks in plans)
        self.n_tests_ = int(n_tests)
        if n_tests == 0:
            warnings.warn(
                f"{nv} samples are too few for any decision (a tail cluster needs at least "
                f"min_cluster={self.min_cluster} samples and at most max_fraction={self.max_fraction:g} of them): "
                "nothing can be flagged",
                UserWarning,
                stacklevel=3,
            )
        log_m = float(np.log10(max(n_tests, 1)))
        level = float(-np.log10(self.alpha))
        scans = self._scan(cols, rows, plans) if n_tests else [np.zeros((F, 4)) for _ in plans]

        def column(j: int, idx: np.ndarray) -> np.ndarray:  # feature j (of the usable ones), context rows
            return cols.column(int(keep[j]))[vidx[idx]].astype(np.float64)

        evidence = np.full(F, -np.inf)
        self.clusters_: list[dict] = []
        score_v = np.zeros(nv)
        in_cluster = np.zeros(nv, dtype=bool)
        ranking: list[tuple[float, float, np.ndarray, int]] = []  # (evidence, side, idx, j)
        groups_v = self._group_index(scores, rows.valid)
        for (label, idx, _), scan in zip(plans, scans, strict=True):
            in_groups = groups_v is not None and len(idx) == nv  # the all-samples context
            ev = -(scan[:, 0] + log_m)
            for j in np.nonzero(ev > 0)[0]:  # a broad mode is no evidence
                ratio = _spread_ratio(scan[j, 1] * column(j, idx), scan[j, 2], groups_v if in_groups else None)
                if not ratio <= self.max_spread_ratio:
                    ev[j] = 0.0
            evidence = np.maximum(evidence, ev)
            for j in np.argsort(-ev)[:3]:
                ranking.append((float(ev[j]), float(scan[j, 1]), idx, int(j)))
            sig = [int(j) for j in np.argsort(-ev) if ev[j] > level]
            if not sig:
                continue
            tails = {j: self._members(scan[j], column(j, idx)) for j in sig}
            lead = tails[sig[0]]
            block = [j for j in sig if (tails[j] & lead).sum() / max(1, (tails[j] | lead).sum()) >= 0.5]
            votes = np.mean([tails[j] for j in block], axis=0)
            distance = np.mean([scan[j, 1] * _robust_z(column(j, idx)) for j in block], axis=0)
            members = votes >= 0.5
            in_cluster[idx[members]] = True
            score_v[idx] = np.maximum(score_v[idx], votes + 1e-3 * np.tanh(distance / 10))
            self.clusters_.append({
                "context": label, "size": int(members.sum()), "context_size": len(idx),
                "evidence": float(ev[sig[0]]), "lead": vnames[sig[0]], "side": "high" if scan[sig[0], 1] > 0 else "low",
                "block": [vnames[j] for j in block], "n_significant": len(sig),
            })  # fmt: skip
        if not self.clusters_ and ranking:  # nothing significant: rank by the three strongest features
            ranking.sort(key=lambda r: -r[0])
            top = ranking[:3]
            for _, side, idx, j in top:
                if side:
                    score_v[idx] += np.tanh(side * _robust_z(column(j, idx)) / 10) / len(top) * 1e-3
        self.evidence_ = np.full(len(names), np.nan)
        self.evidence_[keep] = evidence
        n_found = int(in_cluster.sum())
        too_large = n_found > self.max_fraction * nv
        refined = ""
        if self.clusters_ and not too_large and self.refine_features:
            used = {b for c in self.clusters_ for b in c["block"]}
            in_cluster, prob, refined = self._refine(scores, rows.valid, in_cluster, used)
            score_v = prob
            n_found = int(in_cluster.sum())
        flagged = np.zeros(n, dtype=bool)
        if self.clusters_ and not too_large:
            flagged[vidx[in_cluster]] = True
        score = np.full(n, np.nan)
        score[rows.valid] = score_v
        self.flagged_, self.score_ = flagged, score
        reason = self._reason(n_found, nv, too_large, evidence, vnames, level) + rows.note()
        if refined:
            reason += f"; {refined}"
        chosen = sorted({names.index(b) for c in self.clusters_ for b in c["block"]})
        self.detection_ = Detection(
            ids=scores.ids,
            flagged=flagged,
            score=score,
            method=self.name,
            options=self.get_params(),
            reason=reason,
            no_image_ids=rows.no_image_ids,
            details={
                "feature_names": names,
                "evidence": self.evidence_,
                "evidence_threshold": level,
                "evidence_label": "evidence -log10(p x tests)",
                "chosen": chosen,
                "clusters": self.clusters_,
                "n_tests": self.n_tests_,
                "contexts": [{"context": c[0], "size": len(c[1])} for c in contexts],
                "too_large": bool(too_large),
                "left_out": rows.left_out,
                "refined": refined,
            },
            meta=dict(scores.meta),
        )
        return self

    def _reason(
        self, n_found: int, nv: int, too_large: bool, evidence: np.ndarray, names: list[str], level: float
    ) -> str:
        if not self.clusters_:
            j = int(np.argmax(evidence))
            return (
                f"nothing to find: no feature has a tail cluster at family-wise level alpha={self.alpha:g} "
                f"({self.n_tests_} tests; the strongest, {names[j]}, has evidence {evidence[j]:.2f} < {level:.2f}): "
                "nothing flagged"
            )
        parts = "; ".join(
            f"{c['context']}: {c['size']} of {c['context_size']} at the {c['side']} end of {c['lead']} "
            f"(evidence {c['evidence']:.1f}, {len(c['block'])} agreeing feature(s))"
            for c in self.clusters_
        )
        if too_large:
            return (
                f"found {n_found} of {nv} samples ({n_found / nv:.1%}) in tight tail clusters, more than "
                f"max_fraction={self.max_fraction:g}: too large to be poison (a clean mode?), nothing flagged; {parts}"
            )
        return f"flagged {n_found} of {nv} samples ({n_found / nv:.1%}); {parts}"
