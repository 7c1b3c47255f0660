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

__all__ = ["FEATURES", "ConsensusDetector", "valley_scan", "valley_scan_reference"]

#: Scores fields the default detector reads, in this order (missing ones are skipped).
FEATURES = ("head_entropy", "head_image_share", "head_before_share", "entropy", "image_topk_share",
            "answer_margin")  # fmt: skip


def feature_matrix(scores: Scores, families: tuple[str, ...] = FEATURES) -> tuple[np.ndarray, list[str]]:
    """The ``(n, F)`` float64 matrix of the feature families present in ``scores``, and feature names."""
    n = scores.n_samples
    cols, names = [], []
    for fam in families:
        value = getattr(scores, fam, None)
        if value is None:
            continue
        x = np.asarray(value, dtype=np.float64).reshape(n, -1)
        cols.append(x)
        if x.shape[1] == 1:
            names.append(fam)
        elif np.ndim(value) == 3:
            H = np.shape(value)[2]
            names += [f"{fam} layer {j // H} head {j % H}" for j in range(x.shape[1])]
        else:
            names += [f"{fam} layer {j}" for j in range(x.shape[1])]
    if not cols:
        raise ValueError(f"these scores have none of the detector's features {families}")
    return np.concatenate(cols, axis=1), names


def _log10_binom_cdf(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """log10 P(Binomial(n, 1/2) <= k), elementwise."""
    from scipy.stats import binom

    return binom.logcdf(k, n, 0.5) / np.log(10)


def valley_scan(y: np.ndarray, kmin: int, kmax: int, *, trim: float = 0.05) -> tuple[float, int, float]:
    """The best tail cluster at the HIGH end of ``y``: ``(log10 p, size, cut)``; members are ``y >= cut``.

    For each k in ``[kmin, kmax]``: the k largest values (less the top ``trim`` share, so that
    one far outlier does not widen the window) span ``w``; ``m`` values lie in ``[cut - w, cut)``;
    ``p = P(Binomial(m + k, 1/2) <= m)``. Ties at the top (``w == 0``) give no evidence.
    ``(0.0, 0, inf)`` when no k is possible.
    """
    n = len(y)
    kmax = min(int(kmax), n - 1)
    if kmax < kmin or kmin < 1:
        return 0.0, 0, float("inf")
    asc = np.sort(y)
    desc = asc[::-1]
    ks = np.arange(kmin, kmax + 1)
    cut = desc[ks - 1]
    w = desc[(trim * ks).astype(np.int64)] - cut
    tail = n - np.searchsorted(asc, cut, side="left")  # values >= cut (ties included)
    window = n - np.searchsorted(asc, cut - w, side="left") - tail
    logp = np.where(w > 0, _log10_binom_cdf(window, window + tail), 0.0)
    i = int(np.argmin(logp))
    return float(logp[i]), int(tail[i]), float(cut[i])


def valley_scan_reference(
    y: np.ndarray, kmin: int, kmax: int, *, trim: float = 0.05
) -> tuple[float, int, float]:
    """:func:`valley_scan` written with loops and exact binomial sums (the obviously-correct twin)."""
    from math import comb, log10

    ys = sorted((float(v) for v in y), reverse=True)
    n = len(ys)
    best = (0.0, 0, float("inf"))
    for k in range(kmin, min(kmax, n - 1) + 1):
        cut = ys[k - 1]
        w = ys[int(trim * k)] - cut
        if w <= 0:
            continue
        tail = sum(v >= cut for v in ys)
        window = sum(cut - w <= v < cut for v in ys)
        m = window + tail
        p = sum(comb(m, i) for i in range(window + 1)) / 2**m
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

    def __init__(
        self,
        max_fraction: float = 0.3,
        alpha: float = 0.01,
        min_cluster: int = 5,
        min_group: int = 20,
        groups: bool = True,
        max_spread_ratio: float = 0.5,
        features: tuple[str, ...] = FEATURES,
    ) -> None:
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
                "features": list(self.features)}  # fmt: skip

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

    def fit(self, scores: Scores) -> ConsensusDetector:
        self._check()
        x, names = feature_matrix(scores, tuple(self.features))
        n = len(x)
        rows = valid_rows(scores, x, names)
        xv = x[rows.valid][:, rows.columns]
        vnames = [nm for nm, keep in zip(names, rows.columns, strict=True) if keep]
        F = xv.shape[1]
        contexts = self._contexts(scores, rows.valid)
        plans = []
        n_tests = 0
        for label, idx, frac in contexts:
            kmin = int(self.min_cluster)
            kmax = int(frac * len(idx))
            n_tests += F * 2 * max(0, kmax - kmin + 1)
            plans.append((label, idx, kmin, kmax))
        self.n_tests_ = int(n_tests)
        if n_tests == 0:
            warnings.warn(
                f"{len(xv)} samples are too few for any decision (a tail cluster needs at least "
                f"min_cluster={self.min_cluster} samples and at most max_fraction={self.max_fraction:g} of them): "
                "nothing can be flagged",
                UserWarning,
                stacklevel=3,
            )
        log_m = float(np.log10(max(n_tests, 1)))
        level = float(-np.log10(self.alpha))
        evidence = np.full(F, -np.inf)
        self.clusters_: list[dict] = []
        nv = len(xv)
        score_v = np.zeros(nv)
        in_cluster = np.zeros(nv, dtype=bool)
        ranking: list[
            tuple[float, int, np.ndarray, int, float]
        ] = []  # (evidence, side, idx, j, cut) per context
        groups_v = self._group_index(scores, rows.valid)
        for label, idx, kmin, kmax in plans:
            z = _robust_z(xv[idx])
            in_groups = groups_v is not None and len(idx) == nv  # the all-samples context
            scan = []
            for j in range(F):
                best = (0.0, 0, 0, np.inf)
                for side in (1, -1):
                    lp, k, cut = valley_scan(side * z[:, j], kmin, kmax)
                    if lp < best[0]:
                        best = (lp, side, k, cut)
                scan.append(best)
            ev = np.array([-(s[0] + log_m) for s in scan])
            tight = np.array([
                _spread_ratio(s[1] * z[:, j], s[3], groups_v if in_groups else None) if s[1] else np.inf
                for j, s in enumerate(scan)
            ])  # fmt: skip
            ev = np.where(
                tight <= self.max_spread_ratio, ev, np.minimum(ev, 0.0)
            )  # a broad mode is no evidence
            evidence = np.maximum(evidence, ev)
            for j in np.argsort(-ev)[:3]:
                ranking.append((float(ev[j]), scan[j][1], idx, int(j), scan[j][3], z))
            sig = [j for j in range(F) if ev[j] > level]
            if not sig:
                continue
            sig.sort(key=lambda j: -ev[j])
            tails = {j: scan[j][1] * z[:, j] >= scan[j][3] for j in sig}
            lead = tails[sig[0]]
            block = [j for j in sig if (tails[j] & lead).sum() / max(1, (tails[j] | lead).sum()) >= 0.5]
            votes = np.mean([tails[j] for j in block], axis=0)
            distance = np.mean([scan[j][1] * z[:, j] for j in block], axis=0)
            members = votes >= 0.5
            in_cluster[idx[members]] = True
            score_v[idx] = np.maximum(score_v[idx], votes + 1e-3 * np.tanh(distance / 10))
            self.clusters_.append({
                "context": label, "size": int(members.sum()), "context_size": len(idx),
                "evidence": float(ev[sig[0]]), "lead": vnames[sig[0]], "side": "high" if scan[sig[0]][1] > 0 else "low",
                "block": [vnames[j] for j in block], "n_significant": len(sig),
            })  # fmt: skip
        if not self.clusters_ and ranking:  # nothing significant: rank by the three strongest features
            ranking.sort(key=lambda r: -r[0])
            top = ranking[:3]
            for _, side, idx, j, _cut, z in top:
                score_v[idx] += np.tanh(side * z[:, j] / 10) / len(top) * 1e-3
        self.evidence_ = np.full(len(names), np.nan)
        self.evidence_[np.nonzero(rows.columns)[0]] = evidence
        n_found = int(in_cluster.sum())
        too_large = n_found > self.max_fraction * nv
        flagged = np.zeros(n, dtype=bool)
        if self.clusters_ and not too_large:
            flagged[np.nonzero(rows.valid)[0][in_cluster]] = True
        score = np.full(n, np.nan)
        score[rows.valid] = score_v
        self.flagged_, self.score_ = flagged, score
        reason = self._reason(n_found, nv, too_large, evidence, vnames, level) + rows.note()
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
