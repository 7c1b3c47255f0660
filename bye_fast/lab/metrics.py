"""Detection metrics and label-using ceilings (the lab: only these read the ground truth).

:func:`detection_metrics` scores a detection against the ground truth;
:func:`feature_ceiling` and :func:`linear_ceiling` say what the scores
themselves could reach if the ground truth chose the feature, the threshold or
a supervised linear combination: ceilings, not detectors.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["detection_metrics", "feature_ceiling", "linear_ceiling"]


def detection_metrics(truth: np.ndarray, flagged: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 of ``flagged`` and the AUROC of ``score`` (both directions)."""
    truth = np.asarray(truth, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    tp = int((truth & flagged).sum())
    precision = tp / flagged.sum() if flagged.sum() else float("nan")
    recall = tp / truth.sum() if truth.sum() else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    finite = np.isfinite(score)
    auroc_low = float("nan")
    if finite.any() and 0 < truth[finite].sum() < finite.sum():
        auroc_low = float(roc_auc_score(truth[finite], -score[finite]))  # low score = poisoned
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auroc_low_is_poisoned": auroc_low,
        "auroc_high_is_poisoned": 1.0 - auroc_low if np.isfinite(auroc_low) else float("nan"),
        "removed_fraction": float(flagged.mean()),
    }


def _best_f1(truth: np.ndarray, score: np.ndarray) -> float:
    """The best F1 of "flag every sample with score >= c" over all thresholds c (high = poisoned)."""
    order = np.argsort(-score, kind="stable")
    s, tp = score[order], np.cumsum(truth[order])
    k = np.arange(1, len(s) + 1)
    cut = np.r_[s[1:] != s[:-1], True]  # a threshold flags all tied values or none of them
    return float((2 * tp[cut] / (k[cut] + truth.sum())).max())


def feature_ceiling(truth: np.ndarray, x: np.ndarray) -> dict[str, float | int | str]:
    """What the best single feature could reach if the ground truth chose it: a ceiling, not a detector.

    For each column of ``x`` (n, F) and each direction (low or high = poisoned), the AUROC
    and the best F1 over every threshold. Returns the best column's AUROC (``ceiling_auroc``,
    its column ``ceiling_feature`` and ``ceiling_direction``) and the best F1 of any column and
    threshold (``ceiling_f1``). A detector that cuts one feature (as the paper's does, on a
    mean of features) cannot beat ``ceiling_f1`` on that feature set; where the ceiling is below a
    target, the target is out of reach of the score itself, whatever the cut.
    """
    truth = np.asarray(truth, dtype=bool)
    x = np.asarray(x, dtype=np.float64)
    out: dict[str, float | int | str] = {
        "ceiling_auroc": float("nan"), "ceiling_feature": -1, "ceiling_direction": "", "ceiling_f1": float("nan"),
    }  # fmt: skip
    finite = np.isfinite(x).all(axis=1)
    t = truth[finite]
    if not 0 < t.sum() < len(t):
        return out
    best_auc, best_f1 = -1.0, 0.0
    for j in range(x.shape[1]):
        col = x[finite, j]
        for direction, v in (("low", -col), ("high", col)):
            auc = float(roc_auc_score(t, v))
            if auc > best_auc:
                best_auc = auc
                out.update(ceiling_auroc=auc, ceiling_feature=j, ceiling_direction=direction)
            best_f1 = max(best_f1, _best_f1(t, v))
    out["ceiling_f1"] = best_f1
    return out


def linear_ceiling(truth: np.ndarray, x: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Best F1 of a SUPERVISED linear classifier on all columns of ``x``: a ceiling, not a detector.

    Logistic regression on the standardised features, out-of-fold probabilities
    (stratified ``folds``-fold cross-validation), then the best threshold chosen with the
    ground truth. An unsupervised detector that sees only ``x`` is not expected to beat it;
    NaN when there is nothing to separate.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    truth = np.asarray(truth, dtype=bool)
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x).all(axis=1)
    t, x = truth[finite], x[finite]
    if min(t.sum(), (~t).sum()) < folds:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    p = cross_val_predict(clf, x, t, cv=cv, method="predict_proba")[:, 1]
    return _best_f1(t, p)
