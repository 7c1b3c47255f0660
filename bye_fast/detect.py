"""Stages 2 and 3 of BYE: profile which features are bimodal, cluster, flag.

:func:`detect` takes :class:`~bye_fast.scores.Scores` and returns a
:class:`Detection`. The per-feature 2-component mixtures are fitted by the
native streaming statistics (:class:`bye_fast.stats.BimodalStats`); the final
1-D clustering of the suspicious score uses scikit-learn's ``GaussianMixture``.

``method="paper"`` is the paper's procedure, exactly:

1. per layer, a 2-component 1-D GMM on the head-mean entropy; a layer is
   *sensitive* when ``|mu1 - mu2| > 2 (sigma1 + sigma2)``, i.e.
   ``separation > threshold`` with ``threshold=1``;
2. suspicious score = mean entropy over the sensitive layers;
3. ``GaussianMixture(2, random_state=0)`` on that score; the component with the
   LOWER mean is flagged ("attention collapse").

If no layer is sensitive nothing is flagged and ``Detection.reason`` says why:
a clean dataset comes out whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from sklearn.mixture import GaussianMixture

from bye_fast._io import write_json_atomic
from bye_fast.scores import Scores

if TYPE_CHECKING:
    from bye_fast.stats import BimodalFit

__all__ = ["Detection", "detect", "MIN_SAMPLES"]

#: Fewer scored samples than this cannot be clustered meaningfully.
MIN_SAMPLES = 10

_FEATURES = ("layers", "heads")
_FLAG = ("lower", "minority")


@dataclass
class Detection:
    """What :func:`detect` found. Arrays are numpy; ``to_json`` writes an auditable record.

    Attributes
    ----------
    ids : (n,) sample ids, in the order of the scores.
    flagged : (n,) bool, True = suspicious (to be removed).
    suspicious_score : (n,) float, mean feature value over the sensitive features
        (NaN for samples without image tokens, or when no feature is sensitive).
    method, features, flag, threshold : the options used.
    feature_names : names of the features profiled ("layer 3" or "layer 3 head 5").
    separation, kl : (F,) per-feature ``|mu1-mu2| / (2 (s1+s2))`` and KL divergence
        between the two fitted Gaussians.
    feature_weights, feature_means, feature_stds : (F, 2) per-feature mixture, sorted by mean.
    sensitive_features : indices of the features with ``separation > threshold``.
    mixture : the final 2-component mixture on the suspicious score
        (``weights``, ``means``, ``stds``, sorted by mean) or None.
    flagged_component : index (0 = lower mean) of the flagged component, or None.
    boundary : suspicious-score value where the decision changes (for plots), or None.
    no_image_ids : ids that had no image token (never flagged).
    reason : a sentence saying what was decided and why.
    """

    ids: np.ndarray
    flagged: np.ndarray
    suspicious_score: np.ndarray
    method: str
    features: str
    flag: str
    threshold: float
    feature_names: list[str]
    separation: np.ndarray
    kl: np.ndarray
    feature_weights: np.ndarray
    feature_means: np.ndarray
    feature_stds: np.ndarray
    sensitive_features: np.ndarray
    mixture: dict | None
    flagged_component: int | None
    boundary: float | None
    no_image_ids: list
    reason: str
    meta: dict = field(default_factory=dict)

    #: Per-sample attributes that :func:`bye_fast.filter_dataset` copies into the audit file.
    per_sample_fields: ClassVar[tuple[str, ...]] = ("suspicious_score",)

    @property
    def n_flagged(self) -> int:
        return int(self.flagged.sum())

    @property
    def flagged_ids(self) -> list:
        return self.ids[self.flagged].tolist()

    def __repr__(self) -> str:
        return (
            f"Detection(method={self.method!r}, features={self.features!r}, n={len(self.ids)}, "
            f"flagged={self.n_flagged}, sensitive={len(self.sensitive_features)}/{len(self.separation)})"
        )

    def summary(self) -> str:
        lines = [
            f"method={self.method} features={self.features} flag={self.flag} threshold={self.threshold}",
            f"samples: {len(self.ids)}, flagged: {self.n_flagged} ({self.n_flagged / max(len(self.ids), 1):.1%})",
            f"sensitive features: {len(self.sensitive_features)} of {len(self.separation)}",
            self.reason,
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------ storage
    def to_dict(self) -> dict:
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, np.ndarray):
                d[key] = value.tolist()
        d = _finite_or_none(d)  # NaN / inf -> null: strict JSON that jq and browsers read
        d["format"] = "bye_fast.detection/1"
        return d

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the detection as strict JSON (non-finite numbers as ``null``), atomically."""
        return write_json_atomic(path, self.to_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Detection:
        with open(path) as f:
            d = json.load(f)
        if d.pop("format", None) != "bye_fast.detection/1":
            raise ValueError(f"{path}: not a bye_fast detection file")
        d["ids"] = np.asarray(d["ids"])
        d["flagged"] = np.asarray(d["flagged"], dtype=bool)
        for key in (
            "suspicious_score",
            "separation",
            "kl",
            "feature_weights",
            "feature_means",
            "feature_stds",
        ):
            d[key] = np.asarray(d[key], dtype=float)  # null -> NaN
        if d.get("mixture") is not None:
            d["mixture"] = {k: [np.nan if v is None else v for v in vs] for k, vs in d["mixture"].items()}
        d["sensitive_features"] = np.asarray(d["sensitive_features"], dtype=np.int64)
        return cls(**d)


def _finite_or_none(value):
    """``value`` with every non-finite float replaced by None, recursively."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _feature_matrix(scores: Scores, features: str) -> tuple[np.ndarray, list[str]]:
    if features == "layers":
        x = scores.entropy
        names = [f"layer {i}" for i in range(x.shape[1])]
    elif features == "heads":
        if scores.head_entropy is None:
            raise ValueError("features='heads' needs scores.head_entropy, which these scores do not have")
        n, L, H = scores.head_entropy.shape
        x = scores.head_entropy.reshape(n, L * H)
        names = [f"layer {i} head {h}" for i in range(L) for h in range(H)]
    else:
        raise ValueError(f"features must be one of {_FEATURES}; got {features!r}")
    return np.asarray(x, dtype=np.float64), names


def fit_features(x: np.ndarray, *, bins: int = 4096) -> BimodalFit:
    """Per-column 2-component mixtures via the native streaming statistics."""
    from bye_fast.stats import BimodalStats

    finite = x[np.isfinite(x)]
    lo, hi = float(finite.min()), float(finite.max())
    pad = max(1e-6, 1e-3 * (hi - lo))
    stats = BimodalStats(x.shape[1], lo - pad, hi + pad, bins=bins)
    stats.update(x)
    return stats.fit()


def _boundary(gmm: GaussianMixture, lo: float, hi: float) -> float | None:
    """Where the predicted component changes between the two means (for plots)."""
    grid = np.linspace(lo, hi, 4001)[:, None]
    labels = gmm.predict(grid)
    change = np.nonzero(np.diff(labels))[0]
    return float(grid[change[0] + 1, 0]) if len(change) else None


def detect(
    scores: Scores,
    *,
    method: str = "paper",
    features: str = "layers",
    threshold: float = 1.0,
    flag: str = "lower",
    bins: int = 4096,
    random_state: int = 0,
) -> Detection:
    """Find the suspicious samples in ``scores``.

    Parameters
    ----------
    scores : the output of :func:`bye_fast.score` (or any ``Scores``).
    method : "paper" — the paper's procedure (see the module docstring).
    features : "layers" (``scores.entropy``, the paper's) or "heads"
        (``scores.head_entropy``, one feature per layer and head).
    threshold : a feature is sensitive when its ``separation`` exceeds this
        (1.0 = the paper's ``|mu1-mu2| > 2 (s1+s2)``).
    flag : which component of the final mixture to flag: "lower" (the lower-mean
        one, the paper's "attention collapse") or "minority" (the smaller one,
        whichever side it lies on).
    bins : histogram bins of the per-feature mixture fits.
    random_state : seed of the final ``GaussianMixture``.

    Returns
    -------
    Detection
    """
    if method != "paper":
        raise ValueError(f"method must be 'paper'; got {method!r}")
    if flag not in _FLAG:
        raise ValueError(f"flag must be one of {_FLAG}; got {flag!r}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold}")
    x, names = _feature_matrix(scores, features)
    n = x.shape[0]
    finite = np.isfinite(x).all(axis=1)
    if scores.n_image_tokens is not None:
        no_image = np.asarray(scores.n_image_tokens) == 0
    else:  # scores built by hand: a row with no finite value is a sample without image tokens
        no_image = ~np.isfinite(x).any(axis=1)
    broken = ~finite & ~no_image
    if broken.any():
        first = scores.ids[broken][:5].tolist()
        raise ValueError(
            f"{int(broken.sum())} sample(s) with image tokens have non-finite {features} entropies "
            f"(ids {first}{' ...' if broken.sum() > 5 else ''}): an overflow (score in float32) or a "
            "layer that never reported; they would be neither flagged nor kept knowingly, so detect refuses"
        )
    valid = finite & ~no_image
    no_image_ids = scores.ids[no_image].tolist()
    if valid.sum() < MIN_SAMPLES:
        raise ValueError(
            f"detect needs at least {MIN_SAMPLES} samples with finite scores; got {int(valid.sum())} "
            f"(of {n}; {n - int(valid.sum())} without image tokens)"
        )
    xv = x[valid]
    fit = fit_features(xv, bins=bins)
    separation = np.asarray(fit.separation, dtype=float)
    sensitive = np.nonzero(separation > threshold)[0]
    common = dict(
        ids=scores.ids,
        method=method,
        features=features,
        flag=flag,
        threshold=float(threshold),
        feature_names=names,
        separation=separation,
        kl=np.asarray(fit.kl, dtype=float),
        feature_weights=np.asarray(fit.weights, dtype=float),
        feature_means=np.asarray(fit.means, dtype=float),
        feature_stds=np.asarray(fit.stds, dtype=float),
        sensitive_features=sensitive.astype(np.int64),
        no_image_ids=no_image_ids,
    )
    suspicious = np.full(n, np.nan)
    if len(sensitive) == 0:
        best = int(np.nanargmax(separation)) if np.isfinite(separation).any() else None
        where = f"; the best is {names[best]} at {separation[best]:.3f}" if best is not None else ""
        return Detection(
            flagged=np.zeros(n, dtype=bool),
            suspicious_score=suspicious,
            mixture=None,
            flagged_component=None,
            boundary=None,
            reason=f"no feature has separation > {threshold}{where}: nothing flagged",
            **common,
        )
    s = xv[:, sensitive].mean(axis=1)
    suspicious[valid] = s
    gmm = GaussianMixture(2, random_state=random_state).fit(s[:, None])
    order = np.argsort(gmm.means_.ravel())
    means = gmm.means_.ravel()[order]
    stds = np.sqrt(gmm.covariances_.ravel()[order])
    weights = gmm.weights_[order]
    component = 0 if flag == "lower" else int(np.argmin(weights))
    labels = _sorted_labels(gmm, s, order)
    flagged = np.zeros(n, dtype=bool)
    flagged[valid] = labels == component
    side = "lower" if component == 0 else "higher"
    return Detection(
        flagged=flagged,
        suspicious_score=suspicious,
        mixture={"weights": weights.tolist(), "means": means.tolist(), "stds": stds.tolist()},
        flagged_component=component,
        boundary=_boundary(gmm, float(s.min()), float(s.max())),
        reason=(
            f"{len(sensitive)} sensitive feature(s) of {len(separation)}; flagged the {side}-mean component "
            f"(mean {means[component]:.4f}, weight {weights[component]:.3f}): {int(flagged.sum())} sample(s)"
        ),
        **common,
    )


def _sorted_labels(gmm: GaussianMixture, s: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Component labels renumbered so that 0 is the lower-mean component."""
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[gmm.predict(s[:, None])]
