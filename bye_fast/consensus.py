"""The default detector: tight tail clusters, collapsed answer groups and answer groups whose images
disagree with their answer, found with calibrated tests.

Why. A model fine-tuned on poisoned data treats the poisoned samples alike, whatever
their content: in the features that react to the trigger they form a *tight* group
far out at one *end* of the distribution (high or low), and when the target is an
answer of its own the model gives it to all of them, so they make an answer group
that is collapsed in some attention feature. Clean data has several modes (answer
classes, digit or object classes, question types) that the paper's 2-component
mixtures split; those modes are broad and sit next to the bulk.

How (:class:`ConsensusDetector`), chosen on the design cells of
``benchmarks/results/detection_protocol.md`` (what was tried and dropped:
``benchmarks/results/detection_analysis.md``):

1. **Contexts**: all samples, and each group of samples that get the same first
   answer token from the model (``Scores.answer_token``) with at least
   ``min_group`` members -- a poison group hiding inside an existing answer
   ("yes") shows inside that group.
2. **Valley test** on the per-layer entropy (:data:`FEATURES`), per feature, end
   and cluster size k on a 5% geometric grid (``min_cluster`` to ``max_fraction``
   of the context): the k most extreme values span a width w; count the values in
   the next window of width ``gap * w`` towards the bulk. A density that decreases
   away from the bulk puts at least ``gap/(1+gap)`` of the two counts in the window,
   so a binomial tail is a conservative p-value for "a tight cluster at the end".
   Bonferroni over every feature, end, size and context: a feature is
   *significant* when ``p * n_tests < alpha`` (with nothing to find, nothing
   passes, whatever n). A significant tail counts only when it is collapsed
   (interquartile range <= ``max_spread_ratio`` of the rest's, or of the answer
   groups' typical one) and far (its median >= ``min_separation`` interquartile
   ranges of the rest beyond the rest's median): clean modes are shoulders.
3. **Consensus**: in each context, the significant features whose tail sets
   overlap the most significant one's (Jaccard >= 1/2) form a block; a sample is
   in the cluster when at least half of the block's features put it in their tail.
   **One answer's** (with ``Scores.answer_token``): a cluster of all samples must be
   mostly one answer (``min_answer_share``) and not most of a large answer group
   (``max_answer_coverage``), a cluster inside an answer group must be
   specific to it (the other answers' samples rarely lie in its range,
   ``min_specificity``); else it is set aside as a clean mode.
4. **Collapsed answer groups**: an answer group (40 samples or more, at most
   ``max_fraction`` of the samples) whose interquartile range in some feature of
   :data:`GROUP_FEATURES` (per-layer and per-head entropy, top-k share) is at most ``max_group_spread``
   of the other groups' median, one interquartile range or more away from the
   rest, is a cluster as a whole.
5. **Answer groups whose images disagree with the answer** (needs
   ``Scores.image_embedding``, five or more answer groups): clean answers follow
   what the image shows, so one answer's images look alike, while a backdoor
   target is given to triggered images of every kind. A group whose image
   embeddings are at least ``min_content_ratio`` times as diverse as the median
   group's is inconsistent; its members most of whose ``n_neighbors`` nearest
   images give other answers are flagged (they decide their own membership; the
   refinement below reads attention features only). The neighbours are searched
   among the samples that ask the same question (``Scores.prompt_key``), and a
   member is judged only where enough samples ask its question: the same picture
   may rightly answer "three" to one question and "odd" to another, and among
   every question an answer bound to its question looks foreign (v10, after a
   tuned tower's clean scene groups were taken so in round 9). A group is kept
   only when it has significantly more such members than the groups not tested
   have (the rate at which the embedding alone misleads the vote; binomial test
   at ``alpha``). The vote also takes clean members of the target's own class
   whose pictures look like other classes; where it leaves a good part of the
   group unflagged and the attention features reproduce its split, a
   cross-fitted classifier on the group's attention features re-decides who is
   in (the trigger shows in the attention, the class hardly).
6. **An answer given under every kind of prompt** (needs ``Scores.prompt_key``):
   a clean answer belongs to one kind of question, a target is given whatever the
   question. The group whose reach (the share of the other answers' samples whose
   prompt it is also given under) is at least ``min_reach`` and ``min_reach_ratio``
   times the next group's is the target's (added after round 8, where a target
   the vision tower carried left no trace in the attention tests), unless the
   content test decided that group among its members' own questions. Its members
   asked a kind of question (:func:`prompt_kinds`) where the answer is not the
   target's own are flagged; an existing answer ("yes") is also the clean answer
   of its own kind, and the members asked that kind are judged by their neighbours
   among the others' poison and the other answers' samples, in the pictures and in
   the attention (v10, v11); the rule then decides the whole group.
7. **Refinement** (``refine=True``; off by default since v10): the clusters'
   members are then decided by a logistic regression of cluster vs rest on
   :data:`REFINE_FEATURES` (per-head features included) less the features that
   found the cluster; kept when it stays within the budget and overlaps the
   cluster (Jaccard >= 1/2).
8. **Budget**: the clusters together must not exceed ``max_fraction`` of the
   samples; a larger group is reported as too large to be poison and nothing is
   removed.
9. **Suspicion score** (for review, every sample): with ``refine=True`` the refinement's probability
   where a cluster was found (an inconsistent group's members: the share of their
   neighbours outside the group, if higher); else the block votes; without any significant
   feature, a tie-break by the three strongest features.

Every decision is in ``Detection.reason`` and ``details`` (per-feature evidence
``-log10(p * n_tests)``, the blocks, the clusters, the refinement, the number of tests).
"""

from __future__ import annotations

import os
import warnings
from typing import ClassVar

import numpy as np

from bye_fast.columns import gather_columns
from bye_fast.detect import Detection, valid_rows
from bye_fast.scores import Scores

__all__ = [
    "FEATURES",
    "GROUP_FEATURES",
    "REFINE_FEATURES",
    "ConsensusDetector",
    "answer_reach",
    "prompt_kinds",
    "valley_scan",
    "valley_scan_reference",
]

#: Scores fields the cluster test reads (missing ones are skipped): the paper's per-layer entropy.
FEATURES = ("entropy",)
#: Scores fields in which a whole answer group is tested for collapse (missing ones are skipped).
GROUP_FEATURES = ("entropy", "head_entropy", "image_topk_share")
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

    def gather(self, j0: int, j1: int, rows: np.ndarray) -> np.ndarray:
        """Columns ``j0:j1`` of the samples ``rows`` as one C-contiguous ``(j1 - j0, len(rows))`` array
        (feature-major: the scans sort and take quantiles along contiguous rows), in the columns' dtype.
        One native cache-tiled pass per family (:func:`bye_fast.columns.gather_columns`)."""
        out = []
        for p, s in zip(self.parts, self.starts[:-1], strict=True):
            lo, hi = max(j0, s), min(j1, s + p.shape[1])
            if lo < hi:
                out.append(gather_columns(p, rows, lo - s, hi - s))
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0).astype(self.dtype, copy=False)


def _log10_binom_cdf(k: np.ndarray, n: np.ndarray, q: float = 0.5) -> np.ndarray:
    """log10 P(Binomial(n, q) <= k), elementwise, finite far into the lower tail.

    Where scipy's ``logcdf`` underflows (-inf: thousands of samples in a clean gap), the sum
    ``pmf(k) (1 + r + r^2 + ...)`` with ``r = k (1 - q) / ((n - k + 1) q) < 1`` (k below the mean)
    is bounded in log space: ``log pmf(k) - log(1 - r)`` -- so that larger clusters keep getting
    smaller p-values instead of tying at -inf."""
    from scipy.stats import binom

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    out = binom.logcdf(k, n, q)
    bad = ~np.isfinite(out)
    if bad.any():
        kb, nb = np.broadcast_to(k, out.shape)[bad], np.broadcast_to(n, out.shape)[bad]
        r = np.clip(kb * (1 - q) / ((nb - kb + 1) * q), 0.0, 1 - 1e-12)
        out[bad] = binom.logpmf(kb, nb, q) - np.log1p(-r)
    return out / np.log(10)


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


def _high_tails(srt: np.ndarray, ks: np.ndarray, trim: float, gap: float = 1.0) -> np.ndarray:
    """The best high-end cluster of each row of ``srt`` (rows sorted ascending) over the sizes ``ks``:
    a ``(rows, 3)`` array of ``log10 p, size, cut`` (``0, 0, inf`` where no size gives evidence).
    One binomial evaluation for the whole block: per-call overhead, not arithmetic, dominates."""
    b, n = srt.shape
    out = np.zeros((b, 3))
    out[:, 2] = np.inf
    ks = ks[ks <= n - 1]
    if not len(ks) or not b:
        return out
    cut = srt[:, n - ks]  # (b, K): the k-th largest
    w = srt[:, n - 1 - (trim * ks).astype(np.int64)] - cut
    low = cut - gap * w
    tail = np.empty(cut.shape, np.int64)
    window = np.empty(cut.shape, np.int64)
    for r in range(b):
        tail[r] = n - np.searchsorted(srt[r], cut[r], side="left")  # values >= cut (ties included)
        window[r] = n - np.searchsorted(srt[r], low[r], side="left") - tail[r]
    q = gap / (1 + gap)
    # only counts below the binomial mean can give evidence (above it, P >= ~1/2), and only when
    # the window lies beyond the median: the test's premise (a density decreasing away from the
    # bulk) says nothing about a window that reaches across the mode
    median = srt[:, (n - 1) // 2 : (n - 1) // 2 + 1]
    low_count = (w > 0) & (window < q * (window + tail)) & (low >= median)
    logp = np.zeros(cut.shape)
    logp[low_count] = _log10_binom_cdf(window[low_count], (window + tail)[low_count], q)
    i = np.argmin(logp, axis=1)
    rows = np.arange(b)
    best = logp[rows, i]
    hit = best < 0
    out[hit, 0] = best[hit]
    out[hit, 1] = tail[rows, i][hit]
    out[hit, 2] = cut[rows, i][hit]
    return out


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
    values lie in ``[cut - gap w, cut)``; ``p = P(Binomial(m + k, gap/(1+gap)) <= m)``. Ties at the
    top (``w == 0``), counts at or above the binomial mean, and windows reaching below the
    median (``cut - gap w`` < the lower median) give no evidence (p := 1).
    ``(0.0, 0, inf)`` when no k is possible.
    """
    ks = np.arange(kmin, int(kmax) + 1) if sizes is None else np.asarray(sizes, np.int64)
    if kmin < 1:
        ks = ks[ks >= 1]
    lp, k, cut = _high_tails(np.sort(y)[None, :], ks, trim, gap)[0]
    return float(lp), int(k), float(cut)


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
        if cut - gap * w < sorted(ys)[(n - 1) // 2]:  # the window reaches below the median
            continue
        window = sum(cut - gap * w <= v < cut for v in ys)
        m = window + tail
        q = gap / (1 + gap)
        if window >= q * m:  # at or above the binomial mean: no evidence (p >= ~1/2)
            continue
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


def _n_threads(n_jobs: int | None, n_tasks: int) -> int:
    """Threads for ``n_jobs`` (scikit-learn's convention: None = 1, -1 = every core)."""
    if n_jobs is None:
        return 1
    cores = os.cpu_count() or 1
    want = cores + 1 + n_jobs if n_jobs < 0 else n_jobs
    return max(1, min(want, n_tasks))


def _map_threads(fn, jobs: list, n_jobs: int | None) -> list:
    """``[fn(job) for job in jobs]`` in :func:`_n_threads` threads, results in job order (numpy's sorts
    and partitions and the native column gather release the GIL)."""
    threads = _n_threads(n_jobs, len(jobs))
    if threads == 1:
        return [fn(job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, jobs))


def _separation(y: np.ndarray, cut: float) -> float:
    """How far the tail (``y >= cut``) lies from the rest: the difference of their medians in
    interquartile ranges of the rest. A poisoned group sits beyond the bulk (>= 2 on the design
    cells); a clean mode found by the valley test is a shoulder of it (<= 1.7)."""
    tail = y >= cut
    if tail.sum() < 1 or (~tail).sum() < 2:
        return 0.0
    ref = _iqr(y[~tail])
    gap = float(np.median(y[tail]) - np.median(y[~tail]))
    return gap / ref if ref > 0 else float("inf")


def nearest_neighbours(
    x: np.ndarray, rows: np.ndarray, ref: np.ndarray, k: int, chunk: int = 2048
) -> np.ndarray:
    """For each of ``x[rows]``: the positions (into ``ref``) of its ``k`` nearest rows of ``x[ref]``
    (squared Euclidean distance), itself excluded when it is one of them. Brute force in float32,
    ``chunk`` rows at a time: the (chunk x len(ref)) distance block is the only large temporary and
    the k smallest of each row are taken with ``torch.topk`` (several times faster than
    ``np.argpartition`` on wide rows), on data centred at the reference's mean. Exact up to float32
    rounding of near-ties; the float64 twin is :func:`nearest_neighbours_reference`."""
    import torch

    xref = np.asarray(x[ref], dtype=np.float64)
    centre = xref.mean(axis=0)  # centred: float32 distances then lose less to cancellation
    xref = np.ascontiguousarray(xref - centre, dtype=np.float32)
    ref_sq = torch.from_numpy(np.einsum("ij,ij->i", xref, xref))
    xref_t = torch.from_numpy(xref).T
    pos = np.searchsorted(ref, rows) if np.all(ref[:-1] < ref[1:]) else None
    out = np.empty((len(rows), k), dtype=np.int64)
    for s0 in range(0, len(rows), chunk):
        r = rows[s0 : s0 + chunk]
        q = torch.from_numpy(np.asarray(x[r] - centre, dtype=np.float32))
        # |r|^2 - 2 q.r in one GEMM pass (|q|^2 does not change a row's order): the (chunk x len(ref))
        # block is written once, not three times
        d = torch.addmm(ref_sq, q, xref_t, beta=1.0, alpha=-2.0).numpy()
        if pos is not None:  # not its own neighbour
            p = np.minimum(pos[s0 : s0 + chunk], len(ref) - 1)
            hit = ref[p] == r
            d[np.nonzero(hit)[0], p[hit]] = np.inf
        else:
            d[ref[None, :] == r[:, None]] = np.inf
        out[s0 : s0 + len(r)] = torch.topk(torch.from_numpy(d), k, dim=1, largest=False, sorted=False).indices.numpy()
    return out


def nearest_neighbours_reference(x: np.ndarray, rows: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """The slow twin of :func:`nearest_neighbours`: float64, every distance, a stable sort."""
    x = np.asarray(x, dtype=np.float64)
    d = ((x[rows][:, None, :] - x[ref][None, :, :]) ** 2).sum(-1)
    d[ref[None, :] == rows[:, None]] = np.inf
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def principal_projection(
    x: np.ndarray, ref: np.ndarray, dims: int, chunk: int = 16_384
) -> tuple[np.ndarray, float]:
    """Every row of ``x`` in the top ``dims`` principal directions of its rows ``ref`` (centred at
    their mean), float32, and the share of the reference rows' variance those directions keep.

    Where the neighbour votes read a wide view (a 1,024-dim image embedding, or a real model's
    thousands of per-head attention features), the brute-force search costs ``dims`` times less
    in the projection: class structure lives in the leading directions, the dropped ones are
    mostly noise that every distance shares. The ``D x D`` covariance is float64, from the
    reference rows (at most :attr:`ConsensusDetector.knn_reference`); each chunk of ``chunk`` rows is
    centred in float64 and projected in float32. Reference rows with a non-finite value are left
    out of the fit (such rows project to non-finite values); ``ValueError`` when none is left.
    Directions are those of ``numpy.linalg.eigh``; the float64 twin is
    :func:`principal_projection_reference` (the same subspace from an SVD)."""
    xr = np.asarray(x[ref], dtype=np.float64)
    xr = xr[np.isfinite(xr).all(axis=1)]  # a sample without a usable view must not steer the directions
    if not len(xr):
        raise ValueError("principal_projection: no reference row is finite")
    centre = xr.mean(axis=0)
    xr -= centre
    w, v = np.linalg.eigh(xr.T @ xr)  # ascending
    del xr
    top = np.ascontiguousarray(v[:, ::-1][:, :dims], dtype=np.float32)
    total = float(w.sum())
    kept = float(w[::-1][:dims].sum() / total) if total > 0 else 1.0
    out = np.empty((len(x), top.shape[1]), dtype=np.float32)
    for s0 in range(0, len(x), chunk):  # centred in float64 (a large mean would cancel in float32)
        out[s0 : s0 + chunk] = (np.asarray(x[s0 : s0 + chunk], dtype=np.float64) - centre).astype(np.float32) @ top
    return out, kept


def principal_projection_reference(x: np.ndarray, ref: np.ndarray, dims: int) -> tuple[np.ndarray, float]:
    """The slow twin of :func:`principal_projection`: float64 throughout, directions from the SVD of
    the centred reference rows (signs may differ; distances do not)."""
    x = np.asarray(x, dtype=np.float64)
    xr = x[ref][np.isfinite(x[ref]).all(axis=1)]
    centre = xr.mean(axis=0)
    _, sv, vt = np.linalg.svd(xr - centre, full_matrices=False)
    var = sv**2
    return (x - centre) @ vt[:dims].T, float(var[:dims].sum() / var.sum()) if var.sum() > 0 else 1.0


def _usable_columns(x: np.ndarray, varying: bool = False, width: int = 64) -> np.ndarray:
    """Which columns of ``x`` are finite in every row (and, with ``varying``, not constant), read
    ``width`` columns at a time: no full-size temporary of a group's rows."""
    return np.concatenate([np.zeros(0, bool)] + [
        np.isfinite(b).all(axis=0) & ((b.std(axis=0) > 0) if varying else True)
        for b in (x[:, j0 : j0 + width] for j0 in range(0, x.shape[1], width))])  # fmt: skip


def _cap_rows(parts: list[np.ndarray], cap: int, rng: np.random.Generator) -> np.ndarray:
    """The rows of each class (``parts``), at most ``cap`` of each drawn at random, sorted."""
    return np.sort(np.concatenate([rng.choice(p, cap, replace=False) if len(p) > cap else p for p in parts]))


def answer_reach(answer: np.ndarray, prompt: np.ndarray) -> dict[int, float]:
    """Per answer: the share of the *other* answers' samples whose prompt it is also given under.

    ``answer`` and ``prompt`` are one token / key per sample. One pass over the (answer, prompt)
    pairs: an answer's shared samples are, over the prompts it occurs under, those prompts' samples
    less its own. 1.0 for every answer when all samples ask one prompt.
    """
    answers, a = np.unique(np.asarray(answer), return_inverse=True)
    _, k = np.unique(np.asarray(prompt), return_inverse=True)
    per_prompt = np.bincount(k)
    pair, own = np.unique(a.astype(np.int64) * len(per_prompt) + k, return_counts=True)  # (answer, prompt) pairs
    pa, pk = np.divmod(pair, len(per_prompt))
    shared = np.bincount(pa, weights=per_prompt[pk] - own, minlength=len(answers))
    others = len(a) - np.bincount(a, minlength=len(answers))
    return {int(t): float(sh / max(1, o)) for t, sh, o in zip(answers, shared, others, strict=True)}


def prompt_kinds(
    answer: np.ndarray, prompt: np.ndarray, exclude: int, min_count: int = 2, min_share: float = 0.1
) -> np.ndarray:
    """The kind of question each sample asks: prompts joined through the answers they share.

    A prompt and an answer are linked when the answer is given under the prompt at least
    ``min_count`` times and to at least ``min_share`` of the prompt's other-than-``exclude``
    samples (a stray answer, a
    model's slip, links nothing); answer ``exclude`` (the suspected target, given under every
    prompt) links nothing. Kinds are the connected components of that prompt-answer graph
    ("what colour is the circle ?" and "what colour is the cross ?" share colours; "is there ...?"
    prompts share "no"). Prompts linked to no answer (answered by ``exclude`` only, or by stray
    answers) form one kind together. Returns one kind id (0, 1, ...) per sample, from its prompt.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    answer, prompt = np.asarray(answer), np.asarray(prompt)
    _, k = np.unique(prompt, return_inverse=True)
    n_prompts = int(k.max()) + 1 if len(k) else 0
    other = answer != exclude
    _, a = np.unique(answer[other], return_inverse=True)
    n_answers = int(a.max()) + 1 if len(a) else 0
    pair, count = np.unique(k[other].astype(np.int64) * max(n_answers, 1) + a, return_counts=True)
    pk, pa = np.divmod(pair, max(n_answers, 1))
    per_prompt = np.bincount(k[other], minlength=n_prompts)
    link = (count >= min_count) & (count >= min_share * per_prompt[pk])
    n = n_prompts + n_answers
    graph = coo_matrix((np.ones(int(link.sum())), (pk[link], n_prompts + pa[link])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    label = label[:n_prompts].copy()
    unlinked = np.ones(n_prompts, bool)
    unlinked[pk[link]] = False
    label[unlinked] = -1  # prompts linked to no answer: one kind together
    _, kind = np.unique(label, return_inverse=True)
    return kind[k]


def _robust_z(x: np.ndarray) -> np.ndarray:
    med = np.median(x, axis=0)
    mad = 1.4826 * np.median(np.abs(x - med), axis=0)
    scale = np.where(mad > 0, mad, x.std(axis=0))
    return (x - med) / np.where(scale > 0, scale, 1.0)


class ConsensusDetector:
    """Tight tail clusters and collapsed answer groups, found with calibrated tests, refined with all features.

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
    features : the Scores fields the valley test reads (default :data:`FEATURES`).
    gap : width of the window next to a tail cluster, in cluster widths (default 1).
    refine_features : the Scores fields an inconsistent group's members are re-decided with, and
        the attention clusters' members with ``refine=True`` (default :data:`REFINE_FEATURES`;
        None: neither, the tests' cuts decide).
    refine_c : inverse L2 strength of the refining logistic regression (default 0.1).
    refine : re-decide the attention clusters' members with a logistic regression of cluster vs
        rest (default False since v10: on the design cells of round 10 it moved 13 cells, and every
        learned one of them was as good or better without it -- the in-sample classifier with
        balanced classes takes in clean samples next to the cut; ``detection_analysis.md``,
        "Before round 10").
    min_separation : a tail cluster counts only when its median is at least this many
        interquartile ranges of the rest beyond the rest's median (default 2).
    group_features : the Scores fields in which whole answer groups are tested for collapse
        (default :data:`GROUP_FEATURES`; None: no group test).
    max_group_spread : a group is collapsed when its interquartile range in a feature is at most
        this share of the other groups' median (default 0.07: the poisoned groups of the design
        cells reach 0.005-0.05, a clean scene answer group 0.10-0.11; ``detection_analysis.md``).
    content_groups : also test whether an answer group's images agree with its answer (needs
        ``Scores.image_embedding`` and at least five answer groups; default True). See
        :meth:`_inconsistent_groups`.
    min_content_ratio : an answer group is inconsistent when its image embeddings are at least this
        many times as diverse as the median group's (default 1.45, the geometric middle of the design
        cells' poisoned groups, 1.62-1.98, and clean groups, up to 1.28; ``detection_analysis.md``,
        round 3).
    n_neighbors : neighbours (image embedding, Euclidean) that decide who in an inconsistent group
        is poisoned: a member most of whose neighbours give other answers (default 10).
    min_answer_share : a tail cluster of *all samples* counts only when at least this share of its
        members get one answer from the model (default 0.8; needs ``Scores.answer_token``): a
        backdoor's cluster is its target's (the design cells' poisoned clusters: 0.93-1.00), a clean
        image-driven mode spans the answers (0.25-0.26; ``detection_analysis.md``, v7).
    max_answer_coverage : a one-answer tail cluster of *all samples* whose answer's group holds more
        than ``max_fraction`` of the samples counts only when it takes at most this share of that
        group (default 0.5; needs ``Scores.answer_token``): poison is never most of a large answer
        group, while on a task with few answers a clean mode of one answer is (design cells:
        the clean binary set of round 7, 64% of a group of 49%; poison clusters 32-46% of an
        existing answer's group, or most of a phrase target's group of 9-20% of the samples, below
        ``max_fraction``; ``detection_analysis.md``, "Before round 8").
    min_specificity : a tail cluster inside an answer group counts only when the group's share in
        the tail is at least this many times the other answers' share in the same range of the
        lead feature (default 4): the trigger is in the poisoned samples only, a clean mode is
        shared (design cells: poisoned 64x, clean 1.0-1.5x).
    min_reach, min_reach_ratio : an answer group is a target given under every kind of prompt, and a
        cluster as a whole, when its *reach* (the share of the other answers' samples whose prompt,
        ``Scores.prompt_key``, it is also given under) is at least ``min_reach`` (default 0.5) and at
        least ``min_reach_ratio`` times the next group's (default 1.5; 0: off). Design cells
        (``answer_reach.md``): targets 0.73-1.00, ratio 2.06-3.08; clean answers at most 0.48, ratio
        1.00-1.05. Not applied to a group the content test decided among its members' own
        questions. Its members are judged per kind of question (:meth:`_universal_groups`).
    n_jobs : threads for the feature scan (scikit-learn's convention; default -1, every core).
        The result does not depend on it.

    Attributes
    ----------
    evidence_ : (F,) ``-log10(p * n_tests)`` of each feature's best tail cluster over all
        contexts (> ``-log10(alpha)``: significant).
    clusters_ : list of dict, one per context with a significant block: ``context``, ``size``,
        ``evidence``, ``block`` (feature names), ``side`` of the lead feature; for a tail cluster,
        ``answer_share`` (the share of its members that get its most common answer from the model;
        a backdoor's cluster is one target's, a clean mode spans many answers), ``n_answers``,
        ``answer_coverage`` (its members with that answer / all samples with it) and
        ``answer_group_share`` (all samples with that answer / all samples; these four None without
        ``Scores.answer_token``); ``tail_share`` (the context's share in the lead
        feature's tail) and ``outside_share`` (inside an answer group: the other answers' share
        in the same range of the lead feature, from the cut to the tail's extreme; else None).
    set_aside_ : list of dict, the tail clusters that passed the test but look like clean modes
        (``min_answer_share``, ``max_answer_coverage``, ``min_specificity``), with ``why``; nothing
        in them is flagged.
    n_tests_ : the number of tests the Bonferroni correction counts.
    content_groups_ : list of dict, one per answer group: ``answer_token``, ``size``,
        ``diversity_ratio`` (its image diversity / the median group's) and ``tested`` (members judged
        one by one); empty when the content test did not run (``content_note_`` says why).
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
        refine: bool = False,
        min_separation: float = 2.0,
        group_features: tuple[str, ...] | None = GROUP_FEATURES,
        max_group_spread: float = 0.07,
        content_groups: bool = True,
        min_content_ratio: float = 1.45,
        n_neighbors: int = 10,
        min_answer_share: float = 0.8,
        min_specificity: float = 4.0,
        max_answer_coverage: float = 0.5,
        min_reach: float = 0.5,
        min_reach_ratio: float = 1.5,
        n_jobs: int | None = -1,
    ) -> None:
        self.min_reach = min_reach
        self.min_reach_ratio = min_reach_ratio
        self.min_answer_share = min_answer_share
        self.max_answer_coverage = max_answer_coverage
        self.min_specificity = min_specificity
        self.content_groups = content_groups
        self.min_content_ratio = min_content_ratio
        self.n_neighbors = n_neighbors
        self.n_jobs = n_jobs
        self.min_separation = min_separation
        self.group_features = group_features
        self.max_group_spread = max_group_spread
        self.gap = gap
        self.refine_features = refine_features
        self.refine_c = refine_c
        self.refine = refine
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
                "refine_c": self.refine_c, "refine": self.refine, "min_separation": self.min_separation,
                "group_features": None if self.group_features is None else list(self.group_features),
                "max_group_spread": self.max_group_spread, "content_groups": self.content_groups,
                "min_content_ratio": self.min_content_ratio, "n_neighbors": self.n_neighbors,
                "min_answer_share": self.min_answer_share, "min_specificity": self.min_specificity,
                "max_answer_coverage": self.max_answer_coverage, "min_reach": self.min_reach,
                "min_reach_ratio": self.min_reach_ratio, "n_jobs": self.n_jobs}  # fmt: skip

    def _check(self) -> None:
        if not (np.isfinite(self.max_fraction) and 0 < self.max_fraction <= 1):
            raise ValueError(f"max_fraction must be in (0, 1]; got {self.max_fraction}")
        if not (np.isfinite(self.alpha) and 0 < self.alpha < 1):
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha}")
        if not (np.isfinite(self.min_content_ratio) and self.min_content_ratio > 1):
            raise ValueError(f"min_content_ratio must be > 1; got {self.min_content_ratio}")
        if not (np.isfinite(self.min_answer_share) and 0 <= self.min_answer_share <= 1):
            raise ValueError(f"min_answer_share must be in [0, 1]; got {self.min_answer_share}")
        if not (np.isfinite(self.max_answer_coverage) and 0 < self.max_answer_coverage <= 1):
            raise ValueError(f"max_answer_coverage must be in (0, 1]; got {self.max_answer_coverage}")
        if not (np.isfinite(self.min_reach) and 0 <= self.min_reach <= 1):
            raise ValueError(f"min_reach must be in [0, 1]; got {self.min_reach}")
        if not (np.isfinite(self.min_reach_ratio) and (self.min_reach_ratio == 0 or self.min_reach_ratio >= 1)):
            raise ValueError(f"min_reach_ratio must be 0 (off) or >= 1; got {self.min_reach_ratio}")
        if not (np.isfinite(self.min_specificity) and self.min_specificity >= 1):
            raise ValueError(f"min_specificity must be >= 1; got {self.min_specificity}")
        if int(self.n_neighbors) < 1:
            raise ValueError(f"n_neighbors must be >= 1; got {self.n_neighbors}")
        if int(self.min_cluster) < 2 or int(self.min_group) < 2:
            raise ValueError(
                f"min_cluster and min_group must be >= 2; got {self.min_cluster}, {self.min_group}"
            )

    def _answer_groups(self, scores: Scores, valid: np.ndarray) -> dict[int, np.ndarray]:
        """Index arrays (into the valid samples) of the model's answer groups with at least ``min_group``
        members, by first answer token (empty without ``Scores.answer_token``)."""
        if scores.answer_token is None:
            return {}
        tok = np.asarray(scores.answer_token)[valid]
        groups = {int(t): np.nonzero(tok == t)[0] for t in np.unique(tok)}
        return {t: g for t, g in groups.items() if len(g) >= self.min_group}

    def _contexts(self, groups: dict[int, np.ndarray], nv: int) -> list[tuple[str, np.ndarray]]:
        """All samples, and (with ``groups=True``) each answer group smaller than all of them."""
        contexts = [("all samples", np.arange(nv))]
        if self.groups:
            contexts += [(f"answer token {t}", idx) for t, idx in groups.items() if len(idx) < nv]
        return contexts

    def _scan(
        self, cols: FeatureColumns, rows, plans: list[tuple[str, np.ndarray, np.ndarray]]
    ) -> list[np.ndarray]:
        """Per context, a ``(F, 4)`` array of each usable feature's best tail: ``log10 p, side, cut, size``
        (cut in the feature's own units times ``side``; members are ``side * value >= cut``).

        Columns are read in blocks, transposed and sorted row-wise (one sort serves both ends)."""
        keep = np.nonzero(rows.columns)[0]
        vidx = np.nonzero(rows.valid)[0]
        # samples ordered so that every context is one contiguous slice (no gather per context)
        label = np.full(len(vidx), -1)
        for c, (_, idx, _) in enumerate(plans):
            if len(idx) < len(vidx):
                label[idx] = c
        order = np.argsort(label, kind="stable")
        spans = []
        for c, (_, idx, _) in enumerate(plans):
            if len(idx) == len(vidx):
                spans.append((0, len(vidx)))
            else:
                start = int(np.searchsorted(label[order], c))
                spans.append((start, start + len(idx)))
        rows_in_order = vidx[order]
        out = [np.zeros((len(keep), 4)) for _ in plans]
        jobs, pos = [], 0
        for j0 in range(0, cols.n_features, self.block_width):
            j1 = min(j0 + self.block_width, cols.n_features)
            sel = keep[(keep >= j0) & (keep < j1)] - j0
            if len(sel):
                jobs.append((j0, j1, sel, pos))
                pos += len(sel)

        def run(job) -> None:  # one block of features, every context; writes its own rows of out
            j0, j1, sel, pos = job
            bt = cols.gather(j0, j1, rows_in_order)  # (b, nv), contexts contiguous
            if len(sel) < j1 - j0:
                bt = bt[sel]
            for c, (_, _, ks) in enumerate(plans):
                lo_, hi_ = spans[c]
                srt = np.sort(bt[:, lo_:hi_], axis=1)
                high = _high_tails(srt, ks, self.trim, self.gap)
                low = _high_tails(-srt[:, ::-1], ks, self.trim, self.gap)
                use_low = low[:, 0] < high[:, 0]
                best = out[c][pos : pos + len(sel)]
                best[:, 0] = np.where(use_low, low[:, 0], high[:, 0])
                best[:, 1] = np.where(best[:, 0] < 0, np.where(use_low, -1.0, 1.0), 0.0)
                best[:, 2] = np.where(best[:, 0] < 0, np.where(use_low, low[:, 2], high[:, 2]), np.inf)
                best[:, 3] = np.where(best[:, 0] < 0, np.where(use_low, low[:, 1], high[:, 1]), 0)

        _map_threads(run, jobs, self.n_jobs)
        return out

    #: Fewest samples of an answer group the collapsed test judges: a smaller group's quartiles are too
    #: noisy (over rounds 1-4, clean groups under 40 samples reached 0.05 of the others' spread in one
    #: head; none of 40 or more went below 0.16; every poisoned group found this way had 55 or more).
    min_collapsed_group: ClassVar[int] = 40

    def _collapsed_groups(
        self, scores: Scores, valid: np.ndarray, index: dict[int, np.ndarray]
    ) -> list[tuple[int, np.ndarray, dict]]:
        """Answer groups that are collapsed as a whole: ``(token, index into the valid samples, cluster)``.

        A target answer the model learned to give to triggered images makes its own answer group
        (``Scores.answer_token``), and the model attends to all of them alike. A group (of at least
        :attr:`min_collapsed_group` samples and at most ``max_fraction`` of them) is collapsed when,
        in some feature of ``group_features``, its interquartile range is at most
        ``max_group_spread`` of the median interquartile range of the other groups, and its median
        lies at least one interquartile range of the rest away from the rest's median. Features in
        which the other groups are themselves collapsed (IQR ~ 0: values piled at a bound) are not
        used.
        """
        if not self.group_features or len(index) < 2:
            return []
        nv = int(valid.sum())
        big = list(index)
        candidates = [t for t in big if self.min_collapsed_group <= len(index[t]) <= self.max_fraction * nv]
        if not candidates:
            return []
        cols = FeatureColumns(scores, tuple(self.group_features))
        vidx = np.nonzero(valid)[0]
        grouped = np.zeros(nv, bool)
        for t in big:
            grouped[index[t]] = True
        # each group one contiguous slice of the gathered columns; the ungrouped samples at the end
        order = np.concatenate([index[t] for t in big] + [np.nonzero(~grouped)[0]])
        starts = dict(zip(big, np.cumsum([0] + [len(index[t]) for t in big[:-1]]).tolist(), strict=True))
        jobs = [(j0, min(j0 + self.block_width, cols.n_features)) for j0 in range(0, cols.n_features, self.block_width)]

        def run(job) -> list[tuple[int, float, str]]:  # one block of features: (group, spread, feature)
            j0, j1 = job
            xt = cols.gather(j0, j1, vidx[order])  # (b, nv): quantiles along contiguous rows
            pct = np.percentile if np.isfinite(xt).all() else np.nanpercentile
            q = {t: pct(xt[:, starts[t] : starts[t] + len(index[t])], [25, 50, 75], axis=1) for t in big}
            iqr = {t: q[t][2] - q[t][0] for t in big}
            hits = []
            for t in candidates:
                others = np.median([iqr[u] for u in big if u != t], axis=0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    spread = iqr[t] / others
                cand = np.nonzero((others > 1e-3) & (spread <= self.max_group_spread))[0]
                if not len(cand):  # the rest's quartiles only where the group is collapsed
                    continue
                s0, s1 = starts[t], starts[t] + len(index[t])
                rest = np.concatenate([xt[cand, :s0], xt[cand, s1:]], axis=1)
                qr = pct(rest, [25, 50, 75], axis=1)
                iqr_rest = qr[2] - qr[0]
                with np.errstate(divide="ignore", invalid="ignore"):
                    sep = np.abs(q[t][1][cand] - qr[1]) / iqr_rest
                for k in np.nonzero((iqr_rest > 0) & (sep >= 1.0))[0]:
                    j = int(cand[k])
                    hits.append((t, float(spread[j]), cols.names[j0 + j]))
            return hits

        found: dict = {}
        for hits in _map_threads(run, jobs, self.n_jobs):  # in block order: the same groups and features whatever the threads
            for t, spread, name in hits:
                found.setdefault(t, []).append((spread, name))
        out = []
        for t, feats in found.items():
            feats.sort()
            idx = index[t]
            out.append((int(t), idx, {
                "context": f"answer token {int(t)} (whole group)", "size": len(idx), "context_size": nv,
                "evidence": float("nan"), "lead": feats[0][1], "side": "collapsed",
                "spread": feats[0][0], "block": [f for _, f in feats], "n_significant": len(feats),
            }))  # fmt: skip
        return out

    #: A kind of question is the target's own when the target's share of its samples is at least this
    #: many times its share of the other kinds' samples (and significantly so, at ``alpha``).
    native_ratio: ClassVar[float] = 2.0

    def _universal_groups(
        self, scores: Scores, valid: np.ndarray, index: dict[int, np.ndarray]
    ) -> list[tuple[int, np.ndarray, np.ndarray, dict]]:
        """An answer given under every kind of prompt: ``(token, index into the valid samples,
        suspicion of each member, cluster)``.

        A clean answer belongs to one kind of question ("red" answers colour questions), a backdoor's
        target is given to triggered pictures whatever the question. An answer group's *reach* is the
        share of the other answers' samples whose prompt (``Scores.prompt_key``) it is also given
        under. The group with the largest reach (at least ``min_reach``, at least ``min_reach_ratio``
        times the next group's) is the target's; the members it flags count towards the budget
        (``max_fraction``) with every other cluster's. Says nothing when every sample asks one
        prompt (every reach is 1) or when no prompt repeats.

        Who in it is poisoned: a target that is a new phrase is poison wherever it is given; an
        existing answer ("yes") is also the clean answer of its own kind of question (see
        :func:`prompt_kinds`). A kind where the target's share is at least :attr:`native_ratio`
        times its share elsewhere (binomial test at ``alpha``, Bonferroni over the kinds) is its own;
        the members asked other kinds of question are poison, and each member asked its own kind
        is judged by its ``n_neighbors`` nearest among those poison members and every other
        answer's samples (at most :attr:`knn_reference`): its suspicion is the share of them that
        are poison, averaged over two views -- the pictures (``Scores.image_embedding``) and the
        standardised :data:`REFINE_FEATURES` -- each used only when the same vote tells the
        reference's poison from its other samples (AUROC >= :attr:`content_refine_auc`, each
        sample's own vote without itself); with neither, those members are left alone. The
        pictures carry a trigger the tower was tuned on (SIG), the attention a patch; both views
        are read because either alone fails on some design cells (``existing_target.md``). The
        member rule then decides the whole group when it judged those members (each member is then
        judged, by its kind or by its neighbours): a tail, collapsed or content cluster found inside
        it, or a tail over all samples holding its members (a clean mode of its own kind's answers,
        round 10), is overruled for them;
        where it left them alone, it only adds the members it flags to what the other tests found.
        """
        if not self.min_reach_ratio or scores.prompt_key is None or len(index) < 2:
            return []
        nv = int(valid.sum())
        keys = np.asarray(scores.prompt_key)[valid]
        tokens = np.asarray(scores.answer_token)[valid]
        by_answer = answer_reach(tokens, keys)
        reach = [(by_answer[int(t)], int(t)) for t in index]
        reach.sort(reverse=True)
        (top, t), (second, _) = reach[0], reach[1]
        if not (top >= self.min_reach and top >= self.min_reach_ratio * second):
            return []
        idx = index[t]
        suspicion, note, native, decided = self._target_members(scores, valid, tokens, keys, t)
        cluster = {
            "context": f"answer token {t} (whole group)" if not native else f"answer token {t}",
            "size": int((suspicion > 0.5).sum()), "context_size": nv,
            "evidence": float("nan"), "lead": "prompt reach", "side": "universal", "block": [],
            "n_significant": 0, "reach": top, "next_reach": second, "n_prompts": len(np.unique(keys[idx])),
            "native_kinds": native, "members": note, "decides_group": decided,
        }  # fmt: skip
        return [(t, idx, suspicion, cluster)]

    def _target_members(
        self, scores: Scores, valid: np.ndarray, tokens: np.ndarray, keys: np.ndarray, t: int
    ) -> tuple[np.ndarray, str, list[dict], bool]:
        """Suspicion of each member of the target's group (see :meth:`_universal_groups`), a note,
        the kinds of question found to be the target's own, and whether the own kind's members were
        judged (then the rule decides the whole group; else it only adds the members it flags)."""
        from scipy.stats import binom

        is_t = tokens == t
        idx = np.nonzero(is_t)[0]
        kind = prompt_kinds(tokens, keys, t)
        n_k = np.bincount(kind)
        m_k = np.bincount(kind, weights=is_t)
        big = np.nonzero(n_k >= self.min_group)[0]
        native = []
        for q in big:
            if n_k.sum() - n_k[q] < self.min_group:  # nothing else to compare its share with
                continue
            rate = (m_k.sum() - m_k[q]) / (n_k.sum() - n_k[q])
            p = float(binom.sf(int(m_k[q]) - 1, int(n_k[q]), rate)) if rate > 0 else 0.0
            if m_k[q] >= self.native_ratio * rate * n_k[q] and p * len(big) < self.alpha:
                native.append({"kind": int(q), "size": int(n_k[q]), "members": int(m_k[q]),
                               "share": float(m_k[q] / n_k[q]), "share_elsewhere": float(rate), "p": p})  # fmt: skip
        if not native:
            return np.ones(len(idx)), "every member (no kind of question is the target's own)", [], False
        own = np.isin(kind[idx], [r["kind"] for r in native])
        suspicion = (~own).astype(np.float64)
        head = f"{int((~own).sum())} members asked other kinds of question; {int(own.sum())} asked its own kind"
        k = int(self.n_neighbors)
        pos, neg = idx[~own], np.nonzero(~is_t)[0]
        if not own.any() or len(pos) <= k or len(neg) <= k:
            return suspicion, f"{head}, left alone (its clean answers)", native, False
        from sklearn.metrics import roc_auc_score

        vidx = np.nonzero(valid)[0]
        rng = np.random.default_rng(0)
        ref = _cap_rows([pos, neg], self.knn_reference // 2, rng)
        rows = np.concatenate([ref, idx[own]])  # one gather of the rows the votes read
        views = []
        if scores.image_embedding is not None:
            views.append(("pictures", np.asarray(scores.image_embedding[vidx[rows]], dtype=np.float32)))
        cols = FeatureColumns(scores, tuple(self.refine_features or REFINE_FEATURES))
        x = cols.gather(0, cols.n_features, vidx[rows]).T.astype(np.float32)
        usable = _usable_columns(x)
        if not usable.all():  # (a copy only when a column must go)
            x = x[:, usable]
        if x.shape[1]:
            xr = x[: len(ref)]
            med, sd = np.median(xr, axis=0), xr.std(axis=0)
            views.append(("attention", (x - med) / np.where(sd > 0, sd, 1.0)))
        at_ref = np.arange(len(ref))
        is_pos = is_t[ref]
        # calibration: reference samples, each voted on by its neighbours (itself excluded)
        at_probe = np.sort(_cap_rows([np.nonzero(is_pos)[0], np.nonzero(~is_pos)[0]], 2_000, rng))
        at_own = len(ref) + np.arange(int(own.sum()))
        votes, used = [], []
        for name, view in views:  # a member whose neighbours are mostly the others' poison is poison
            view, space = self._knn_view(view, at_ref, name)
            near = nearest_neighbours(view, at_probe, at_ref, k)
            auc = float(roc_auc_score(is_pos[at_probe], is_pos[near].mean(axis=1)))
            if auc < self.content_refine_auc:
                used.append(f"{name} not used (AUROC {auc:.2f} < {self.content_refine_auc:g})")
                continue
            votes.append(is_pos[nearest_neighbours(view, at_own, at_ref, k)].mean(axis=1))
            used.append(f"{name} (AUROC {auc:.2f}{'; ' + space if space else ''})")
        if not votes:
            return suspicion, f"{head}, left alone (neither view tells the others' poison from clean samples: " \
                              f"{'; '.join(used)})", native, False
        suspicion[own] = np.mean(votes, axis=0)
        return suspicion, (f"{head}, judged by their neighbours in {', '.join(used)}: "
                           f"{int((suspicion[own] > 0.5).sum())} of them flagged"), native, True  # fmt: skip

    #: Fewest answer groups the content test compares (the median group must mean something).
    min_content_groups: ClassVar[int] = 5
    #: Samples the neighbours are searched among, at most (a seeded random subset beyond that).
    knn_reference: ClassVar[int] = 20_000

    #: Fewest reference samples asking a member's own question for its neighbours to be searched
    #: among them alone (fewer: among every question), in multiples of ``n_neighbors``.
    question_pool: ClassVar[int] = 3

    #: Widest view the neighbour votes search whole; a wider one (a real model's image embedding, its
    #: thousands of per-head attention features) is searched in its top ``knn_dims`` principal
    #: directions (:func:`principal_projection`; brute force costs ``D`` per distance). The lab's views
    #: (a 64-dim embedding, 84 attention features) are searched whole.
    knn_dims: ClassVar[int] = 128

    def _knn_view(self, x: np.ndarray, ref: np.ndarray, name: str) -> tuple[np.ndarray, str]:
        """``x`` as the neighbour votes search it (itself, or its principal projection when wider
        than :attr:`knn_dims`, fitted on the rows ``ref``) and a note saying so ("" when whole)."""
        if x.shape[1] <= self.knn_dims:
            return x, ""
        try:
            with np.errstate(invalid="ignore", over="ignore"):  # rows of unusable samples are never read
                proj, kept = principal_projection(x, ref, self.knn_dims)
        except ValueError:  # no finite reference row: searched whole (their distances say nothing anyway)
            return x, ""
        return proj, f"{name} in its top {self.knn_dims} of {x.shape[1]} principal directions ({kept:.0%} of the variance)"

    @staticmethod
    def _by_question(keys: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(keys, order, keys[order])``: each question's samples as one slice of a stable sort (in
        index order), built once per fit for :meth:`_question_pools`; None without prompt keys."""
        if keys is None:
            return None
        order = np.argsort(keys, kind="stable")
        return keys, order, keys[order]

    def _question_pools(
        self, g: np.ndarray, ref: np.ndarray, questions: tuple | None, k: int
    ) -> list[tuple[np.ndarray, np.ndarray, bool]]:
        """``(positions in g, reference pool, pool is their own question's)`` triples: a member's
        neighbours are searched among the samples that ask the same question
        (``Scores.prompt_key``; every such sample, or a seeded random :attr:`knn_reference` of
        them), when at least ``question_pool * k`` samples ask it; the members of rarer questions
        come last, with the common reference ``ref`` (their caller does not judge them when there
        are prompt keys). The same picture may rightly get "even" or "three" depending on the
        question; only the answers to the same question say what the picture should get. Counting
        every sample (not ``ref``'s), a question is judged by how many samples ask it, whatever n."""
        if questions is None:
            return [(np.arange(len(g)), ref, False)]
        keys, order, sorted_keys = questions
        rng = np.random.default_rng(2)
        out, rest = [], []
        member_keys = keys[g]
        for q in np.unique(member_keys):
            rows = np.nonzero(member_keys == q)[0]
            lo, hi = np.searchsorted(sorted_keys, q, "left"), np.searchsorted(sorted_keys, q, "right")
            pool = order[lo:hi]
            if len(pool) >= max(self.question_pool * k, k + 1):
                if len(pool) > self.knn_reference:
                    pool = np.sort(rng.choice(pool, self.knn_reference, replace=False))
                out.append((rows, pool, True))
            else:
                rest.append(rows)
        if rest:
            out.append((np.sort(np.concatenate(rest)), ref, False))
        return out

    #: Members of the consistent groups whose neighbours give the background rate, at most.
    background_rows: ClassVar[int] = 2_000

    def _background_rate(
        self, emb, vidx: np.ndarray, index: dict[int, np.ndarray], tested: list, ref: np.ndarray,
        questions: tuple | None, k: int,
    ) -> float | None:
        """Share of the members of the groups NOT tested (answers that follow the image) whose
        neighbours mostly give another answer: how often the image embedding alone misleads the
        neighbour vote (similar-looking classes). A tested group is kept only when it has
        significantly more such members than this rate predicts (one-sided binomial test at
        ``alpha``, Bonferroni over the tested groups); None when no group is left to measure it, nan
        when none of their members could be judged (too few samples ask each one's question)."""
        rest = [t for t in index if t not in tested]
        if not rest:
            return None
        owner = np.full(len(vidx), -1, dtype=np.int64)
        for t in index:
            owner[index[t]] = t
        pool = np.sort(np.concatenate([index[t] for t in rest]))
        rng = np.random.default_rng(1)
        pool = np.sort(rng.choice(pool, self.background_rows, replace=False)) if len(pool) > self.background_rows else pool
        misled = np.full(len(pool), np.nan)
        for rows, refs, same in self._question_pools(pool, ref, questions, k):
            if questions is not None and not same:
                continue  # not judged: too few samples ask its question
            near = nearest_neighbours(emb, vidx[pool[rows]], vidx[refs], k)
            misled[rows] = (owner[refs[near]] == owner[pool[rows]][:, None]).mean(axis=1) < 0.5
        judged = misled[np.isfinite(misled)]
        return float(judged.mean()) if len(judged) else float("nan")  # nan: no member could be judged

    def _inconsistent_groups(
        self, scores: Scores, valid: np.ndarray, index: dict[int, np.ndarray]
    ) -> list[tuple[int, np.ndarray, np.ndarray, dict]]:
        """Answer groups whose images do not agree with their answer: ``(token, index into the valid
        samples, suspicion of each member, cluster)``.

        Clean answers follow what the image shows, so the images of one answer group look alike
        (a digit class, a colour); a backdoor target is given to triggered images of EVERY kind, so
        its group is as diverse as the whole data set (a new target phrase) or a mixture of its own
        class and everything else (an existing answer). A group (at most ``max_fraction`` of the
        samples, at least :attr:`min_content_groups` groups) is inconsistent when the mean squared
        distance of its ``Scores.image_embedding`` rows to their mean is at least
        ``min_content_ratio`` times the median group's. Its members are then judged one by one: the
        share of a member's ``n_neighbors`` nearest samples (image embedding, among at most
        :attr:`knn_reference` samples) that are NOT in the group is its suspicion, and a member is
        flagged when that share exceeds 1/2 -- a poisoned "3" looks like the clean threes, which
        answer otherwise; a clean member looks like its own class. A group with fewer than
        ``min_cluster`` such members is left alone (diverse, but its images are its own), and so is
        one whose count of such members is not significantly above what the untested groups'
        members show (:meth:`_background_rate`; similar-looking classes mislead the vote for clean
        samples too).

        A member's neighbours are searched among the reference samples that ask its own question
        (``Scores.prompt_key``), and only when at least :attr:`question_pool` x ``n_neighbors`` do;
        a member whose question is rarer is not judged (``n_judged`` in ``content_groups_``). An
        answer that depends on the question as well as on the picture ("odd" to "is it even or odd ?",
        "three" to "which digit comes next ?" about the same "2", "yes" to "is there a red circle ?")
        is consistent among its own question's answers, where among every question it looks like a
        target (``digits-mixed`` in the lab, ``detection_analysis.md`` round 4; the tuned-tower scene
        cells of round 9, whose "is there ...?" and "where is ...?" questions each have a few
        samples). Without ``Scores.prompt_key`` every sample is taken to ask one question.

        Limit: a clean answer that does not follow the image at all (a fixed reply) is diverse for
        the same reason as a target and could be removed whole; a target given to questions too
        varied to share a key is left to the other tests.
        """
        from scipy.stats import binom

        emb = scores.image_embedding
        self.content_groups_: list[dict] = []
        self.content_note_ = ""
        if not self.content_groups:
            self.content_note_ = "the content test is off (content_groups=False)"
            return []
        if emb is None:
            self.content_note_ = "no Scores.image_embedding (score(..., image_embeddings=True)): no content test"
            return []
        if len(index) < self.min_content_groups:
            self.content_note_ = (f"{len(index)} answer groups of >= {self.min_group} samples; the content test "
                                  f"needs {self.min_content_groups}")  # fmt: skip
            return []
        vidx = np.nonzero(valid)[0]
        nv = len(vidx)
        step = 65_536  # rows at a time in float64: memory stays ~ step x dim whatever n

        def rows64(rows: np.ndarray) -> np.ndarray:
            return np.asarray(emb[vidx[rows]], dtype=np.float64)

        def diversity(rows: np.ndarray) -> float:  # mean squared distance to the mean, in one pass
            total, sq = np.zeros(emb.shape[1]), 0.0
            for s0 in range(0, len(rows), step):
                xr = rows64(rows[s0 : s0 + step])
                if not np.isfinite(xr).all():
                    return float("nan")
                total += xr.sum(axis=0)
                sq += float(np.einsum("ij,ij->", xr, xr))  # (no squared copy of the rows)
            mean = total / len(rows)
            return sq / len(rows) - float(mean @ mean)

        div = {t: diversity(g) for t, g in index.items()}
        if not all(np.isfinite(v) for v in div.values()):
            self.content_note_ = "an image embedding of an answer group is not finite: no content test"
            return []
        typical = float(np.median(list(div.values())))
        if typical <= 0:
            self.content_note_ = "the median answer group's images are all alike (diversity 0): no content test"
            return []
        ratios = {t: div[t] / typical for t in index}
        tested = [t for t in index if ratios[t] >= self.min_content_ratio and len(index[t]) <= self.max_fraction * nv]
        records = {
            t: {"answer_token": int(t), "size": len(g), "diversity_ratio": ratios[t], "tested": t in tested}
            for t, g in index.items()
        }
        self.content_groups_ = list(records.values())
        rng = np.random.default_rng(0)
        ref = np.arange(nv) if nv <= self.knn_reference else np.sort(rng.choice(nv, self.knn_reference, replace=False))
        k = min(int(self.n_neighbors), len(ref) - 1)
        out = []
        keys = None if scores.prompt_key is None else np.asarray(scores.prompt_key)[vidx]
        if keys is None:
            self.content_note_ = "no Scores.prompt_key (scored before it existed): neighbours among every question"
        questions = self._by_question(keys)
        knn, space = self._knn_view(emb, vidx[ref], "image_embedding") if tested and k >= 1 else (emb, "")
        background = self._background_rate(knn, vidx, index, tested, ref, questions, k) if tested and k >= 1 else None
        for t in tested if k >= 1 else []:
            g = index[t]
            in_group = np.zeros(nv, bool)
            in_group[g] = True
            outside = np.zeros(len(g))
            own = 0  # members judged among the samples that ask their own question
            record = records[t]
            for rows, pool, same in self._question_pools(g, ref, questions, k):
                if keys is not None and not same:
                    continue  # not judged: among every question a question-bound answer looks foreign
                near = nearest_neighbours(knn, vidx[g[rows]], vidx[pool], k)
                outside[rows] = 1.0 - in_group[pool[near]].mean(axis=1)
                own += len(rows)
            judged = own if keys is not None else len(g)
            record["own_question_share"] = own / len(g) if keys is not None else None
            flagged = outside > 0.5
            if background is None:  # every group is tested: nothing to compare with
                excess = 0.0
            elif np.isfinite(background):
                excess = float(binom.sf(int(flagged.sum()) - 1, judged, background))
            else:  # the untested groups' members could not be judged: no reference rate
                excess = 1.0
            record.update(n_judged=int(judged), n_flagged=int(flagged.sum()), background_rate=background,
                          excess_p=float(excess))  # fmt: skip
            if flagged.sum() < self.min_cluster:  # a diverse group whose members look like their group
                continue
            if excess * max(1, len(tested)) >= self.alpha:  # no more look-alikes than any group has
                continue
            out.append((int(t), g, outside, {
                "context": f"answer token {int(t)} (whole group)", "size": int(flagged.sum()),
                "context_size": len(g), "evidence": float("nan"), "lead": "image_embedding",
                "side": "inconsistent", "spread": float(ratios[t]), "block": ["image_embedding"],
                "n_significant": 1, "own_question_share": record["own_question_share"],
                "neighbour_space": space or f"image_embedding ({emb.shape[1]} dims)",
            }))  # fmt: skip
        return out

    #: Inverse L2 strength of the classifier that re-decides an inconsistent group's members.
    content_refine_c: ClassVar[float] = 0.01
    #: An inconsistent group's members are re-decided only when the vote leaves at least this share
    #: of the group unflagged.
    content_refine_rest: ClassVar[float] = 0.15
    #: ... and only when the attention features reproduce the vote's split at least this well
    #: (cross-fitted AUROC): a split the attention cannot see is not the trigger's.
    content_refine_auc: ClassVar[float] = 0.75
    #: Folds of the cross-fitted re-decision.
    content_refine_folds: ClassVar[int] = 5

    def _refine_content(
        self, scores: Scores, valid: np.ndarray, g: np.ndarray, vote: np.ndarray
    ) -> tuple[np.ndarray | None, str]:
        """Re-decide an inconsistent group's members with the attention features: ``(probability of
        each member, note)``, or ``(None, note)`` when the vote stands.

        The neighbour vote is a noisy label: it flags the triggered members, and also the clean
        members of the target's own class whose pictures the vision tower places among other classes
        (``detection_analysis.md``, round 5). The trigger shows in the attention, the picture's class
        hardly does, so a linear classifier (L2 logistic regression, balanced classes) of flagged vs
        unflagged members on the group's standardised :data:`REFINE_FEATURES`, cross-fitted (each
        member is judged by a model that did not see its label; at most ``refine_rows`` training
        rows per class), keeps the members that look triggered and drops those that only look like
        another class. It runs only when the vote leaves at least :attr:`content_refine_rest` of the
        group (and ``min_cluster`` members) unflagged: a group the vote takes almost whole is a new
        target's own, its few unflagged members are poisoned too, and the split between them is not
        the trigger's -- and only when the cross-fitted classifier reproduces the vote's split
        (AUROC >= :attr:`content_refine_auc`); where the attention does not see the split, the vote stands.
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import StratifiedKFold

        n_rest = int((~vote).sum())
        if n_rest < max(self.min_cluster, self.content_refine_rest * len(g)) or vote.sum() < self.min_cluster:
            return None, (f"the vote stands ({n_rest} of {len(g)} members unflagged, fewer than "
                          f"{self.content_refine_rest:.0%}: a group taken almost whole)")  # fmt: skip
        cols = FeatureColumns(scores, tuple(self.refine_features))
        rows = np.nonzero(valid)[0][g]
        x = cols.gather(0, cols.n_features, rows).T.astype(np.float64)
        usable = _usable_columns(x, varying=True)
        if not usable.all():  # (a copy of the group's rows only when a column must go)
            x = x[:, usable]
        if not x.shape[1]:
            return None, "the vote stands (no usable attention feature)"
        folds = min(self.content_refine_folds, int(vote.sum()), n_rest)
        rng = np.random.default_rng(0)
        prob = np.empty(len(g))
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, vote):
            train = _cap_rows([train[vote[train]], train[~vote[train]]], self.refine_rows, rng)
            xt = x[train]  # one gather of the fold's rows (not one per use: ~1 s each at 1M samples)
            med, sd = np.median(xt, axis=0), xt.std(axis=0)
            sd = np.where(sd > 0, sd, 1.0)
            clf = LogisticRegression(C=self.content_refine_c, class_weight="balanced", max_iter=2000)
            clf.fit((xt - med) / sd, vote[train])
            prob[test] = clf.predict_proba((x[test] - med) / sd)[:, 1]
        auc = float(roc_auc_score(vote, prob))
        if auc < self.content_refine_auc:
            return None, (f"the vote stands (the attention features tell its two sides apart with "
                          f"cross-fitted AUROC {auc:.2f} < {self.content_refine_auc:g})")  # fmt: skip
        return prob, (f"re-decided with {x.shape[1]} attention features (cross-fitted AUROC {auc:.2f}): "
                      f"{int(vote.sum())} -> {int((prob > 0.5).sum())} members")  # fmt: skip

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
        every = len(vidx) == cols.n  # no gather of the valid rows (the blocks are read in place)
        finite = np.ones(cols.n_features, bool)
        for j0, b in cols.blocks(self.block_width):
            finite[j0 : j0 + b.shape[1]] = np.isfinite(b if every else b[vidx]).all(axis=0)
        use = np.nonzero(finite & ~np.isin(cols.names, list(exclude)))[0]
        if not len(use):
            return seed, seed.astype(np.float64), "no feature left to refine with: kept the test's cluster"
        rng = np.random.default_rng(0)
        train = _cap_rows([np.nonzero(seed)[0], np.nonzero(~seed)[0]], self.refine_rows, rng)
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
            wb = w[j0 : j0 + b.shape[1]].astype(b.dtype)
            logit += b @ wb if every else b[vidx] @ wb
        prob = 1.0 / (1.0 + np.exp(-logit))
        members = prob > 0.5
        jac = (members & seed).sum() / max(1, (members | seed).sum())
        if members.sum() > self.max_fraction * len(vidx) or jac < 0.5:
            return seed, prob, (f"refinement dropped ({int(members.sum())} samples, Jaccard {jac:.2f} with the "
                                f"test's {int(seed.sum())}): kept the test's cluster")  # fmt: skip
        return (
            members,
            prob,
            f"refined with {len(use)} features: {int(seed.sum())} -> {int(members.sum())} samples",
        )

    def _not_one_answers(self, cluster: dict) -> str:
        """Why a tail cluster is a clean mode rather than a backdoor ('' when it may be one).

        A backdoor's samples all get its one target from the model, and the trigger is in them
        only: its cluster is one answer's, and the other answers' samples do not lie in its range.
        A clean image-driven mode spans the answers. Needs ``Scores.answer_token``."""
        share, outside = cluster["answer_share"], cluster["outside_share"]
        if cluster["context"] == "all samples" and share is not None and share < self.min_answer_share:
            return (f"spans {cluster['n_answers']} answers, the most common {share:.0%} of it "
                    f"(< min_answer_share={self.min_answer_share:g}): a clean mode")
        coverage, group_share = cluster.get("answer_coverage"), cluster.get("answer_group_share")
        if (cluster["context"] == "all samples" and coverage is not None and group_share > self.max_fraction
                and coverage > self.max_answer_coverage):  # fmt: skip
            return (f"takes {coverage:.0%} of its answer's samples, a group of {group_share:.0%} of all "
                    f"(> max_fraction={self.max_fraction:g}; > max_answer_coverage={self.max_answer_coverage:g}): "
                    "that answer's clean mode")
        if outside is not None and cluster["tail_share"] < self.min_specificity * outside:
            return (f"{outside:.1%} of the other answers' samples lie in the same range, "
                    f"{cluster['tail_share']:.1%} of the group's (< min_specificity={self.min_specificity:g} x): "
                    "a mode the answers share")
        return ""

    def _members(self, best: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        """The tail cluster of one significant feature, and its cut (on ``side * y``). Its size was
        tested on a grid; the cut is refined over every size within one grid step of it (the
        evidence stays the grid's)."""
        side, k = best[1], int(best[3])
        lo, hi = int(np.floor(k / SIZE_RATIO)), int(np.ceil(k * SIZE_RATIO))
        lp, _, cut = valley_scan(side * y, max(lo, 1), hi, trim=self.trim, gap=self.gap)
        cut = float(cut if lp < 0 else best[2])
        return side * y >= cut, cut

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
        answer_groups = self._answer_groups(scores, rows.valid)
        tokens_v = None if scores.answer_token is None else np.asarray(scores.answer_token)[rows.valid]
        contexts = self._contexts(answer_groups, nv)
        plans = [
            (label, idx, size_grid(self.min_cluster, int(self.max_fraction * len(idx))))
            for label, idx in contexts
        ]
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
        self.set_aside_: list[dict] = []
        score_v = np.zeros(nv)
        in_cluster = np.zeros(nv, dtype=bool)
        ranking: list[tuple[float, float, np.ndarray, int]] = []  # (evidence, side, idx, j)
        groups_v = list(answer_groups.values()) if len(answer_groups) >= 2 else None
        for (label, idx, _), scan in zip(plans, scans, strict=True):
            in_groups = groups_v is not None and len(idx) == nv  # the all-samples context
            ev = -(scan[:, 0] + log_m)
            for j in np.nonzero(ev > 0)[0]:  # a broad or near mode is no evidence
                y = scan[j, 1] * column(j, idx)
                ratio = _spread_ratio(y, scan[j, 2], groups_v if in_groups else None)
                if not (ratio <= self.max_spread_ratio and _separation(y, scan[j, 2]) >= self.min_separation):
                    ev[j] = 0.0
            evidence = np.maximum(evidence, ev)
            for j in np.argsort(-ev)[:3]:
                ranking.append((float(ev[j]), float(scan[j, 1]), idx, int(j)))
            sig = [int(j) for j in np.argsort(-ev) if ev[j] > level]
            if not sig:
                continue
            cuts = {j: self._members(scan[j], column(j, idx)) for j in sig}
            tails = {j: m for j, (m, _) in cuts.items()}
            lead = tails[sig[0]]
            block = [j for j in sig if (tails[j] & lead).sum() / max(1, (tails[j] | lead).sum()) >= 0.5]
            votes = np.mean([tails[j] for j in block], axis=0)
            distance = np.mean([scan[j, 1] * _robust_z(column(j, idx)) for j in block], axis=0)
            members = votes >= 0.5
            share, n_answers, coverage, group_share = None, None, None, None
            if tokens_v is not None and members.any():  # one target's, or many answers'?
                values, counts = np.unique(tokens_v[idx[members]], return_counts=True)
                share, n_answers = float(counts.max() / counts.sum()), len(counts)
                group_n = int((tokens_v == values[counts.argmax()]).sum())  # its answer's samples, of all
                coverage, group_share = float(counts.max() / group_n), group_n / nv
            outside_share = None
            if len(idx) < nv:  # an answer group: how many of the other samples lie in the same range?
                j0 = sig[0]
                top = float((scan[j0, 1] * column(j0, idx))[lead].max())
                y_rest = scan[j0, 1] * column(j0, np.setdiff1d(np.arange(nv), idx))
                outside_share = float(((y_rest >= cuts[j0][1]) & (y_rest <= top)).mean())
            cluster = {
                "context": label, "size": int(members.sum()), "context_size": len(idx),
                "evidence": float(ev[sig[0]]), "lead": vnames[sig[0]], "side": "high" if scan[sig[0], 1] > 0 else "low",
                "block": [vnames[j] for j in block], "n_significant": len(sig),
                "answer_share": share, "n_answers": n_answers,
                "answer_coverage": coverage, "answer_group_share": group_share,
                "tail_share": float(lead.mean()), "outside_share": outside_share,
            }  # fmt: skip
            why = self._not_one_answers(cluster)
            if why:
                self.set_aside_.append({**cluster, "why": why})
                continue
            in_cluster[idx[members]] = True
            score_v[idx] = np.maximum(score_v[idx], votes + 1e-3 * np.tanh(distance / 10))
            self.clusters_.append(cluster)
        for _, idx, cluster in self._collapsed_groups(scores, rows.valid, answer_groups):
            in_cluster[idx] = True
            score_v[idx] = np.maximum(score_v[idx], 1.0)
            self.clusters_.append(cluster)
        content = self._inconsistent_groups(scores, rows.valid, answer_groups)
        content_members = np.zeros(nv, dtype=bool)
        content_score = np.zeros(nv)
        for _, idx, outside, cluster in content:
            suspicion = outside
            if self.refine_features:
                prob, note = self._refine_content(scores, rows.valid, idx, outside > 0.5)
                cluster["refined"] = note
                if prob is not None:
                    suspicion = prob
                    cluster["size"] = int((prob > 0.5).sum())
            content_members[idx[suspicion > 0.5]] = True
            content_score[idx] = np.maximum(content_score[idx], suspicion)
        attention_found = bool(self.clusters_)
        self.clusters_.extend(c for *_, c in content)
        if not self.clusters_ and ranking:  # nothing significant: rank by the three strongest features
            ranking.sort(key=lambda r: -r[0])
            top = ranking[:3]
            for _, side, idx, j in top:
                if side:
                    score_v[idx] += np.tanh(side * _robust_z(column(j, idx)) / 10) / len(top) * 1e-3
        self.evidence_ = np.full(len(names), np.nan)
        self.evidence_[keep] = evidence
        n_found = int((in_cluster | content_members).sum())
        too_large = n_found > self.max_fraction * nv
        refined = ""
        if attention_found and not too_large and self.refine and self.refine_features:
            used = {b for c in self.clusters_ for b in c["block"]}
            in_cluster, prob, refined = self._refine(scores, rows.valid, in_cluster, used)
            score_v = prob
        if content:  # the content test decides its own members (the refinement reads attention only)
            in_cluster |= content_members
            score_v = np.maximum(score_v, content_score)
        # the content test decides a group it judged among its members' own questions (the reach rule's
        # member rule is coarser there); where it judged few of them, the reach rule adds its members
        content_tokens = {t for t, *_, c in content if c["own_question_share"] is None or c["own_question_share"] >= 0.5}
        for t, idx, suspicion, cluster in self._universal_groups(scores, rows.valid, answer_groups):
            if t in content_tokens:
                continue  # decided by the content test
            if cluster["decides_group"]:  # its own kind's members judged: the rule decides the group
                own = (f"answer token {t}", f"answer token {t} (whole group)")
                inside = [c for c in self.clusters_ if c["context"] in own]
                if inside:
                    cluster["members"] += (f"; {len(inside)} other cluster(s) inside the group "
                                           f"({sum(c['size'] for c in inside)} samples) overruled")  # fmt: skip
                    self.clusters_ = [c for c in self.clusters_ if c["context"] not in own]
                in_cluster[idx] = suspicion > 0.5  # every member judged: by its kind, or by its neighbours
                score_v[idx] = suspicion
            elif not (suspicion > 0.5).any() or in_cluster[idx[suspicion > 0.5]].all():
                continue  # nothing to add, or already found
            else:
                in_cluster[idx[suspicion > 0.5]] = True
                score_v[idx] = np.maximum(score_v[idx], suspicion)
            self.clusters_.append(cluster)
        n_found = int(in_cluster.sum())
        too_large = n_found > self.max_fraction * nv
        flagged = np.zeros(n, dtype=bool)
        if self.clusters_ and not too_large:
            flagged[vidx[in_cluster]] = True
        score = np.full(n, np.nan)
        score[rows.valid] = score_v
        self.flagged_, self.score_ = flagged, score
        reason = self._reason(n_found, nv, too_large, evidence, vnames, level) + rows.note()
        if refined:
            reason += f"; {refined}"
        chosen = sorted({names.index(b) for c in self.clusters_ for b in c["block"] if b in names})
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
                "set_aside": self.set_aside_,
                "n_tests": self.n_tests_,
                "contexts": [{"context": c[0], "size": len(c[1])} for c in contexts],
                "too_large": bool(too_large),
                "content_groups": self.content_groups_,
                "content_threshold": float(self.min_content_ratio),
                "content_note": self.content_note_,
                "left_out": rows.left_out,
                "refined": refined,
            },
            meta=dict(scores.meta),
        )
        return self

    def _reason(
        self, n_found: int, nv: int, too_large: bool, evidence: np.ndarray, names: list[str], level: float
    ) -> str:
        aside = "".join(
            f"; set aside: {c['context']}: {c['size']} of {c['context_size']} at the {c['side']} end of "
            f"{c['lead']} (evidence {c['evidence']:.1f}) {c['why']}"
            for c in self.set_aside_
        )
        if not self.clusters_:
            j = int(np.argmax(evidence))
            if self.set_aside_:
                return "nothing to find: every tail cluster is a clean mode, nothing flagged" + aside
            return (
                f"nothing to find: no feature has a tail cluster at family-wise level alpha={self.alpha:g} "
                f"({self.n_tests_} tests; the strongest, {names[j]}, has evidence {evidence[j]:.2f} < {level:.2f}): "
                "nothing flagged"
            )
        parts = "; ".join(
            f"{c['context']}: {c['size']} samples collapsed in {c['lead']} (interquartile range "
            f"{c['spread']:.2f} of the other groups', {len(c['block'])} such feature(s))"
            if c["side"] == "collapsed"
            else f"{c['context']}: {c['size']} samples of one answer given under {c['n_prompts']} prompts, which "
            f"{c['reach']:.0%} of the other answers' samples ask ({c['reach'] / max(c['next_reach'], 1e-9):.1f}x the "
            "next answer's reach" + (f"; {c['members']}" if c.get("native_kinds") else "") + ")"
            if c["side"] == "universal"
            else f"{c['context']}: {c['size']} of {c['context_size']} whose images look like other answers' "
            f"(the group's image embeddings {c['spread']:.2f}x as diverse as the median group's"
            + (f"; {c['refined']}" if c.get("refined", "").startswith("re-decided") else "") + ")"
            if c["side"] == "inconsistent"
            else f"{c['context']}: {c['size']} of {c['context_size']} at the {c['side']} end of {c['lead']} "
            f"(evidence {c['evidence']:.1f}, {len(c['block'])} agreeing feature(s)"
            + (f"; {c['answer_share']:.0%} of them give one answer, of {c['n_answers']}"
               if c.get("answer_share") is not None and c["context"] == "all samples" else "")
            + ")"
            for c in self.clusters_
        )
        if too_large:
            return (
                f"found {n_found} of {nv} samples ({n_found / nv:.1%}) in the clusters, more than "
                f"max_fraction={self.max_fraction:g}: too large to be poison (a clean mode?), nothing flagged; {parts}"
                + aside
            )
        return f"flagged {n_found} of {nv} samples ({n_found / nv:.1%}); {parts}" + aside
