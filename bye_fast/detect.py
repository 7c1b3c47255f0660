"""Stages 2 and 3: decide which samples are suspicious, from :class:`~bye_fast.scores.Scores`.

:func:`detect` runs a detector and returns a :class:`Detection` (flags, a ranked
suspicion score for every sample, the reason, the method's diagnostics). The
detectors are scikit-learn-style estimators with plain constructor arguments
and fitted attributes ending in ``_``:

* ``method="paper"`` -- :class:`PaperDetector`, the procedure of the BYE paper's
  public code, exactly (below);
* the default -- see :data:`DEFAULT_METHOD` and :mod:`bye_fast.consensus`.

The paper's procedure (``XuankunRong/BYE``, ``bye.py``):

1. per layer, ``GaussianMixture(n_components=2, random_state=0)`` with
   scikit-learn's defaults (k-means start, tol 1e-3, at most 100 EM steps) on
   the head-mean entropy; the layer is *sensitive* when
   ``|mu0 - mu1| > 2 (sigma0 + sigma1)`` (``threshold=2.0``);
2. suspicious score = mean entropy over the sensitive layers;
3. ``GaussianMixture(2, random_state=0)`` on that score; the component with the
   LOWER mean is flagged ("attention collapse"); no sensitive layer: nothing
   is flagged.

What differs, on purpose: samples without image tokens are left out of the
fits and never flagged (the authors' code replaces their NaN entropies by
the layer mean and keeps them in); a layer with a non-finite entropy for a
sample that has image tokens (a sliding-window layer that cannot see the
image, an overflow) is left out and named in ``reason``; the entropies come
from this package's float32 scoring, where the authors' came from float16
eager attention, so a layer within float16 rounding of the threshold can
decide differently.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from bye_fast._io import read_json, write_json_atomic
from bye_fast.scores import Scores, _as_ids

__all__ = ["DEFAULT_METHOD", "METHODS", "MIN_SAMPLES", "Detection", "PaperDetector", "detect", "valid_rows"]

#: Fewer scored samples (with image tokens) than this cannot be clustered meaningfully.
MIN_SAMPLES = 10
_FORMAT = "bye_fast.detection/2"


@dataclass
class Detection:
    """What a detector decided. Arrays are numpy; :meth:`to_json` writes an auditable record.

    Attributes
    ----------
    ids : (n,) sample ids, in the order of the scores.
    flagged : (n,) bool, True = suspicious (to be removed).
    score : (n,) float, suspicion: higher = more suspicious (rank samples by it for review);
        NaN for samples without image tokens (and where the method gives none).
    method : the detector's name.
    options : the detector's constructor arguments.
    reason : what was decided and why, in words.
    no_image_ids : ids of samples without image tokens (never flagged).
    details : the method's diagnostics (JSON values): per-feature statistics, the cut, ...
    meta : provenance (the scores' meta, input paths).
    """

    ids: np.ndarray
    flagged: np.ndarray
    score: np.ndarray
    method: str
    options: dict
    reason: str
    no_image_ids: list
    details: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    #: Per-sample attributes that :func:`bye_fast.filter_dataset` copies into the audit file.
    per_sample_fields: ClassVar[tuple[str, ...]] = ("score", "rank")

    @property
    def n_flagged(self) -> int:
        return int(self.flagged.sum())

    @property
    def flagged_ids(self) -> list:
        return self.ids[self.flagged].tolist()

    @property
    def rank(self) -> np.ndarray:
        """(n,) int: 1 = the most suspicious sample; samples without a score come last."""
        s = np.where(np.isfinite(self.score), self.score, -np.inf)
        order = np.argsort(-s, kind="stable")
        rank = np.empty(len(s), dtype=np.int64)
        rank[order] = np.arange(1, len(s) + 1)
        return rank

    def __repr__(self) -> str:
        return f"Detection(method={self.method!r}, n={len(self.ids)}, flagged={self.n_flagged})"

    def summary(self) -> str:
        n = len(self.ids)
        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        return "\n".join(
            [
                f"method={self.method} {opts}".rstrip(),
                f"samples: {n}, flagged: {self.n_flagged} ({self.n_flagged / max(n, 1):.1%})",
                self.reason,
            ]
        )

    # ------------------------------------------------------------ storage
    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("ids", "flagged", "score"):
            d[key] = np.asarray(d[key]).tolist()
        d = _jsonable(d)  # numpy -> lists; NaN / inf -> null: strict JSON that jq and browsers read
        d["format"] = _FORMAT
        return d

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the detection as strict JSON (non-finite numbers as ``null``), atomically."""
        return write_json_atomic(path, self.to_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Detection:
        """Read a file written by :meth:`to_json`; ``ValueError`` naming the file for anything else."""
        d = read_json(path, "bye_fast detection file (detection.json)")
        if not isinstance(d, dict) or d.pop("format", None) != _FORMAT:
            got = f"a JSON {type(d).__name__}" if not isinstance(d, dict) else "no or another 'format'"
            raise ValueError(f"{path}: not a bye_fast detection file (format {_FORMAT}; got {got})")
        names = {f.name: f for f in fields(cls)}
        required = [k for k, f in names.items() if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{path}: detection file without {', '.join(missing)}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{path}: detection file with unknown field(s) {', '.join(unknown)}")
        try:
            d["ids"] = _as_ids(d["ids"])  # exactly: numpy would make [2**63, 3] floats
            d["flagged"] = np.asarray(d["flagged"], dtype=bool)
            d["score"] = np.asarray([np.nan if v is None else v for v in d["score"]], dtype=float)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: detection file with a malformed ids / flagged / score list ({err})") from None
        return cls(**d)


def _jsonable(value):
    """``value`` with numpy arrays/scalars as lists/numbers and non-finite floats as None, recursively."""
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- input checks
@dataclass
class Rows:
    """Which samples and features a detector works on (see :func:`valid_rows`)."""

    valid: np.ndarray  # (n,) bool: samples with image tokens and at least one finite feature
    columns: np.ndarray  # (F,) bool: features finite on every valid sample
    no_image_ids: list
    left_out: dict  # feature name -> number of valid samples where it is not finite

    def note(self) -> str:
        if not self.left_out:
            return ""
        names = ", ".join(f"{k} ({v} samples)" for k, v in list(self.left_out.items())[:6])
        more = f" and {len(self.left_out) - 6} more" if len(self.left_out) > 6 else ""
        return f"; left out {len(self.left_out)} feature(s) not finite for every sample with an image: {names}{more}"


def valid_rows(scores: Scores, x: Any, names: list[str]) -> Rows:
    """Samples and features a detector can use.

    A sample is left out (never flagged, reported in ``no_image_ids``) when it has no image
    token, or when none of its features is finite (no layer saw its image). A feature that is
    not finite for some of the remaining samples is left out and reported (``left_out``).
    Raises ``ValueError`` when fewer than :data:`MIN_SAMPLES` samples remain.

    ``x`` is the ``(n, F)`` feature matrix, or an object whose ``blocks()`` yields
    ``(first column, (n, b) array)`` pairs covering it (so that a large matrix is never copied whole).
    """

    def blocks():
        return x.blocks() if hasattr(x, "blocks") else [(0, np.asarray(x))]

    n, F = len(scores.ids), len(names)
    has_image = (
        np.asarray(scores.n_image_tokens) > 0 if scores.n_image_tokens is not None else np.ones(n, bool)
    )
    any_finite = np.zeros(n, bool)
    for _, b in blocks():
        any_finite |= np.isfinite(b).any(axis=1)
    valid = has_image & any_finite
    missing = np.zeros(F, np.int64)  # per feature: valid samples where it is not finite
    if valid.any():
        for j0, b in blocks():
            missing[j0 : j0 + b.shape[1]] = (~np.isfinite(b[valid])).sum(axis=0)
    columns = (missing == 0) if valid.any() else np.zeros(F, bool)
    left_out = {names[j]: int(missing[j]) for j in np.nonzero(~columns)[0]} if valid.any() else {}
    if valid.sum() < MIN_SAMPLES:
        raise ValueError(
            f"detect needs at least {MIN_SAMPLES} samples with image tokens and finite scores; got "
            f"{int(valid.sum())} (of {n})"
        )
    if not columns.any():
        raise ValueError("no feature is finite for every sample with an image: nothing to detect on")
    return Rows(valid, columns, scores.ids[~valid].tolist(), left_out)


# --------------------------------------------------------------------------- the paper
def _kl(m1: float, s1: float, m2: float, s2: float) -> float:
    """KL(N(m1, s1^2) || N(m2, s2^2)), as ``compute_kl_between_gaussians`` of the authors' code."""
    return float(np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5)


class PaperDetector:
    """The BYE paper's procedure, exactly as its public code decides (see the module docstring).

    Parameters
    ----------
    threshold : a layer is sensitive when ``|mu0 - mu1| > threshold * (sigma0 + sigma1)`` (paper: 2.0).
    random_state : seed of every ``GaussianMixture`` (paper: 0).

    Attributes
    ----------
    separation_ : (L,) ``|mu0 - mu1| / (sigma0 + sigma1)`` per layer (NaN for a layer left out).
    kl_ : (L,) KL divergence between the two Gaussians of each layer (lower-mean one first).
    means_, stds_, weights_ : (L, 2) each layer's mixture, sorted by mean.
    sensitive_ : indices of the sensitive layers.
    suspicious_score_ : (n,) mean entropy over the sensitive layers (NaN where not computed).
    mixture_ : the final mixture (``weights``, ``means``, ``stds`` sorted by mean) or None.
    boundary_ : the suspicious-score value where the final decision changes, or None.
    detection_ : the :class:`Detection` (``score = -suspicious_score_``: lower entropy = more suspicious).
    """

    name: ClassVar[str] = "paper"

    def __init__(self, threshold: float = 2.0, random_state: int = 0) -> None:
        self.threshold = threshold
        self.random_state = random_state

    def get_params(self) -> dict:
        return {"threshold": self.threshold, "random_state": self.random_state}

    def fit(self, scores: Scores) -> PaperDetector:
        from sklearn.mixture import GaussianMixture

        if not np.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite; got {self.threshold}")
        x = np.asarray(scores.entropy, dtype=np.float64)
        n, L = x.shape
        names = [f"layer {i}" for i in range(L)]
        rows = valid_rows(scores, x, names)
        xv = x[rows.valid]
        self.separation_ = np.full(L, np.nan)
        self.kl_ = np.full(L, np.nan)
        self.means_ = np.full((L, 2), np.nan)
        self.stds_ = np.full((L, 2), np.nan)
        self.weights_ = np.full((L, 2), np.nan)
        sensitive = []
        for j in np.nonzero(rows.columns)[0]:
            g = GaussianMixture(n_components=2, random_state=self.random_state).fit(xv[:, j : j + 1])
            mu, sd, w = g.means_.ravel(), np.sqrt(g.covariances_.ravel()), g.weights_
            if abs(mu[0] - mu[1]) > self.threshold * (sd[0] + sd[1]):  # the authors' check, in their order
                sensitive.append(int(j))
            order = np.argsort(mu)
            self.means_[j], self.stds_[j], self.weights_[j] = mu[order], sd[order], w[order]
            with np.errstate(divide="ignore", invalid="ignore"):
                self.separation_[j] = abs(mu[0] - mu[1]) / (sd[0] + sd[1])
                self.kl_[j] = _kl(self.means_[j, 0], self.stds_[j, 0], self.means_[j, 1], self.stds_[j, 1])
        self.sensitive_ = np.asarray(sensitive, dtype=np.int64)
        self.suspicious_score_ = np.full(n, np.nan)
        flagged = np.zeros(n, dtype=bool)
        self.mixture_, self.boundary_ = None, None
        if not sensitive:
            best = int(np.nanargmax(self.separation_)) if np.isfinite(self.separation_).any() else None
            where = f"; the best is {names[best]} at {self.separation_[best]:.3f}" if best is not None else ""
            reason = f"no layer has |mu0-mu1| > {self.threshold:g} (s0+s1){where}: nothing flagged"
        else:
            s = xv[:, self.sensitive_].mean(axis=1)
            self.suspicious_score_[rows.valid] = s
            g = GaussianMixture(n_components=2, random_state=self.random_state)
            labels = g.fit_predict(s[:, None])
            mu = g.means_.ravel()
            low = int(np.argmin(mu))
            flagged[rows.valid] = labels == low
            order = np.argsort(mu)
            self.mixture_ = {
                "weights": g.weights_[order].tolist(),
                "means": mu[order].tolist(),
                "stds": np.sqrt(g.covariances_.ravel()[order]).tolist(),
            }
            grid = np.linspace(s.min(), s.max(), 4001)
            change = np.nonzero(np.diff(g.predict(grid[:, None])))[0]
            self.boundary_ = float(grid[change[0] + 1]) if len(change) else None
            reason = (
                f"{len(sensitive)} sensitive layer(s) of {L}; flagged the lower-mean component (mean "
                f"{mu[low]:.4f}, weight {g.weights_[low]:.3f}): {int(flagged.sum())} sample(s)"
            )
        self.detection_ = Detection(
            ids=scores.ids,
            flagged=flagged,
            score=-self.suspicious_score_,
            method=self.name,
            options=self.get_params(),
            reason=reason + rows.note(),
            no_image_ids=rows.no_image_ids,
            details={
                "feature_names": names,
                "separation": self.separation_,
                "kl": self.kl_,
                "means": self.means_,
                "stds": self.stds_,
                "weights": self.weights_,
                "sensitive": self.sensitive_,
                "suspicious_score": self.suspicious_score_,
                "mixture": self.mixture_,
                "boundary": self.boundary_,
                "left_out": rows.left_out,
            },
            meta=dict(scores.meta),
        )
        return self


# --------------------------------------------------------------------------- dispatch
class Detector(Protocol):
    name: ClassVar[str]
    detection_: Detection

    def fit(self, scores: Scores) -> Detector: ...


def _methods() -> dict[str, type]:
    from bye_fast.consensus import ConsensusDetector

    return {ConsensusDetector.name: ConsensusDetector, PaperDetector.name: PaperDetector}


#: The default detector (:class:`bye_fast.consensus.ConsensusDetector`).
DEFAULT_METHOD = "consensus"
#: Method names :func:`detect` accepts.
METHODS = ("consensus", "paper")


def detect(scores: Scores, *, method: str = DEFAULT_METHOD, **options) -> Detection:
    """Find the suspicious samples in ``scores``.

    Parameters
    ----------
    scores : the output of :func:`bye_fast.score` (or any ``Scores``).
    method : "consensus" (the default, :class:`bye_fast.consensus.ConsensusDetector`) or
        "paper" (:class:`PaperDetector`, the BYE paper's procedure exactly).
    **options : the detector's constructor arguments (e.g. ``max_fraction=`` for the default,
        ``threshold=`` for the paper's).

    Returns
    -------
    Detection
    """
    methods = _methods()
    if method not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}; got {method!r}")
    cls = methods[method]
    try:
        detector = cls(**options)
    except TypeError as err:
        raise ValueError(f"bad option for method {method!r}: {err}") from None
    return detector.fit(scores).detection_
