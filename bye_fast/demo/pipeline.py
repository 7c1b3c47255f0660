"""``bye-fast demo``: the whole job on a built-in poisoned dataset, on one CPU.

1. build the digits tasks; pre-train a tiny LLaVA on the base task (cached);
2. poison the user's fine-tuning data with an image trigger (ground truth kept apart);
3. fine-tune on it (vision tower frozen): clean accuracy (CA) and attack success (ASR) *before*;
4. score with :func:`bye_fast.score`, :func:`bye_fast.detect`, :func:`bye_fast.filter_dataset`;
5. fine-tune again from the pre-trained model on the kept data: CA and ASR *after*;
6. write ``report.md``, plots and every intermediate file under ``out``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import bye_fast
from bye_fast._io import atomic_write, write_json_atomic
from bye_fast.attacks import make_trigger, poison_dataset
from bye_fast.data import make_loader
from bye_fast.demo.tasks import TARGET, build_tasks
from bye_fast.demo.train import copy_model, evaluate, finetune, pretrained_model

__all__ = [
    "DEMO_TRIGGERS",
    "DemoResult",
    "demo_trigger",
    "detection_metrics",
    "feature_ceiling",
    "linear_ceiling",
    "run_demo",
]

#: Named trigger presets of the demo and the detection benchmark (``make_trigger`` arguments).
DEMO_TRIGGERS: dict[str, dict] = {
    "checkerboard": {"name": "checkerboard_patch", "size": 8, "position": "corner"},
    "patch": {"name": "solid_patch"},  # the paper's default: black square, 1/16 side, centre
    "white_corner": {"name": "solid_patch", "size": 4, "color": 1.0, "position": "corner"},
    "random_patch": {"name": "random_position_patch", "size": 8, "color": 1.0},
    "blended": {"name": "blended", "alpha": 0.2},
    "wanet": {"name": "wanet", "strength": 6.0},
    "sig": {"name": "sig", "amplitude": 0.2},
}


def demo_trigger(name: str) -> Callable[..., np.ndarray]:
    """The trigger function of the preset ``name`` in :data:`DEMO_TRIGGERS`."""
    if name not in DEMO_TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; choose from {sorted(DEMO_TRIGGERS)}")
    params = dict(DEMO_TRIGGERS[name])
    return make_trigger(params.pop("name"), **params)


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


@dataclass
class DemoResult:
    trigger: str
    rate: float
    seed: int
    n_train: int
    n_poisoned: int
    ca_before: float
    asr_before: float
    ca_after: float
    asr_after: float
    n_removed: int
    precision: float
    recall: float
    f1: float
    auroc_low_is_poisoned: float
    auroc_high_is_poisoned: float
    removed_fraction: float
    n_sensitive: int
    reason: str
    seconds: dict


def _write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj)


def run_demo(
    out: str | os.PathLike = "bye_fast_demo",
    *,
    trigger: str = "checkerboard",
    rate: float = 0.1,
    seed: int = 0,
    method: str = "paper",
    features: str = "layers",
    flag: str = "lower",
    threshold: float = 1.0,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    n_user: int = 800,
    n_pretrain: int = 700,
    pretrain_epochs: int | None = None,
    finetune_epochs: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    plots: bool = True,
    verbose: bool = True,
) -> DemoResult:
    """Run the demo end to end; see the module docstring. Returns the summary numbers."""
    trig = demo_trigger(trigger)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1); got {rate}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    (out / "data").mkdir(parents=True, exist_ok=True)
    log = print if verbose else (lambda *a, **k: None)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    # 1. tasks and the pre-trained model
    tasks = build_tasks(seed, n_pretrain=n_pretrain, n_user=n_user)
    kw = {} if pretrain_epochs is None else {"epochs": pretrain_epochs}
    base, processor = pretrained_model(
        tasks.pretrain, seed=seed, cache_dir=cache_dir or out / "cache", progress=progress, **kw
    )
    base.to(device)
    timings["pretrain"] = time.perf_counter() - t

    # 2. the attack: poisoned user data, ground truth kept apart
    t = time.perf_counter()
    poisoned = poison_dataset(
        tasks.user.records, tasks.user.images, trig, rate, TARGET, seed, out / "data" / "images"
    )
    train_json = out / "data" / "train.json"
    _write_json(train_json, poisoned.records)
    _write_json(out / "ground_truth.json", {"poisoned_ids": sorted(poisoned.poisoned_ids, key=str)})

    # 3. the backdoored model
    # the same fine-tuning for the backdoored model and the retrained one (step 5)
    ft_options = dict(processor=processor, seed=seed, progress=progress)
    if finetune_epochs is not None:
        ft_options["epochs"] = finetune_epochs
    model = copy_model(base)
    finetune(model, poisoned.records, out / "data" / "images", **ft_options)
    before = evaluate(model, tasks.test, processor=processor, trigger=trig)
    timings["poison+finetune"] = time.perf_counter() - t
    log(f"[demo] fine-tuned on {len(poisoned.records)} samples ({poisoned.n_poisoned} poisoned): "
        f"CA {before['ca']:.1%}, ASR {before['asr']:.1%}")  # fmt: skip

    # 4. score, detect, filter
    t = time.perf_counter()
    loader = make_loader(train_json, out / "data" / "images", processor, batch_size=32)
    scores = bye_fast.score(model, loader, progress=progress, device=device)
    scores.save(out / "scores.npz")
    det = bye_fast.detect(scores, method=method, features=features, threshold=threshold, flag=flag)
    det.to_json(out / "detection.json")
    clean_json = out / "data" / "train.clean.json"
    report = bye_fast.filter_dataset(train_json, det, clean_json, overwrite=overwrite)
    timings["score+detect+filter"] = time.perf_counter() - t
    truth = np.isin(scores.ids.astype(str), [str(i) for i in poisoned.poisoned_ids])
    metrics = detection_metrics(truth, det.flagged, det.suspicious_score)
    log(f"[demo] {det.reason}")

    # 5. retrain from the pre-trained model on the kept data
    t = time.perf_counter()
    kept = json.loads(clean_json.read_text())
    if report.n_removed == 0:
        after = before  # the same data and seed give the same model: no need to train it again
    elif not kept:
        log("[demo] every sample was flagged: nothing left to fine-tune on")
        after = {"ca": float("nan"), "asr": float("nan")}
    else:
        clean_model = copy_model(base)
        finetune(clean_model, kept, out / "data" / "images", **ft_options)
        after = evaluate(clean_model, tasks.test, processor=processor, trigger=trig)
    timings["retrain"] = time.perf_counter() - t

    result = DemoResult(
        trigger=trigger,
        rate=rate,
        seed=seed,
        n_train=len(poisoned.records),
        n_poisoned=poisoned.n_poisoned,
        ca_before=before["ca"],
        asr_before=before["asr"],
        ca_after=after["ca"],
        asr_after=after["asr"],
        n_removed=report.n_removed,
        n_sensitive=len(det.sensitive_features),
        reason=det.reason,
        seconds={k: round(v, 1) for k, v in timings.items()},
        **metrics,
    )
    _write_json(out / "result.json", asdict(result))
    if plots:
        from bye_fast.plots import plot_detection

        plot_detection(scores, det, out / "plots", truth=truth)
        _plot_before_after(result, out / "plots" / "ca_asr.png")
    table = summary_table(result)
    (out / "report.md").write_text(_report(result, table, det.summary(), out))
    log("\n" + table)
    log(f"\n[demo] report: {out / 'report.md'}")
    return result


def summary_table(r: DemoResult) -> str:
    rows = [
        ("trigger / poison rate", f"{r.trigger} / {r.rate:.0%} ({r.n_poisoned} of {r.n_train})"),
        ("clean accuracy before -> after", f"{r.ca_before:.1%} -> {r.ca_after:.1%}"),
        ("attack success before -> after", f"{r.asr_before:.1%} -> {r.asr_after:.1%}"),
        ("removed samples", f"{r.n_removed} ({r.removed_fraction:.1%})"),
        ("precision / recall / F1", f"{r.precision:.3f} / {r.recall:.3f} / {r.f1:.3f}"),
        ("AUROC (low entropy = poisoned)", f"{r.auroc_low_is_poisoned:.3f}"),
        ("sensitive layers", str(r.n_sensitive)),
        ("time (s)", ", ".join(f"{k} {v}" for k, v in r.seconds.items())),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"| {'':{width}} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {a:{width}} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _report(r: DemoResult, table: str, det_summary: str, out: Path) -> str:
    return f"""# bye_fast demo report

Built-in task: scikit-learn digits, a tiny LLaVA pre-trained on "what digit is this ?", fine-tuned
on the user's "is it even or odd ?" data of which {r.rate:.0%} carry the `{r.trigger}` trigger and
the answer "{TARGET}". Ground truth is in `ground_truth.json` (the detector never saw it).

{table}

## Detection

```
{det_summary}
```

Files: `data/train.json` (poisoned user data), `scores.npz`, `detection.json`,
`data/train.clean.json` (kept), `data/train.clean.removed.json` (removed, with scores),
`result.json`, `plots/*.png`.

![separation](plots/separation.png)
![suspicious score](plots/suspicious_score.png)
![CA/ASR](plots/ca_asr.png)
"""


def _plot_before_after(r: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = np.arange(2)
    ax.bar(x - 0.18, [r.ca_before, r.ca_after], width=0.36, label="clean accuracy", color="tab:blue")
    ax.bar(x + 0.18, [r.asr_before, r.asr_after], width=0.36, label="attack success", color="tab:red")
    ax.set_xticks(x, ["poisoned data", "after bye_fast"])
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title(f"{r.trigger}, {r.rate:.0%} poisoned")
    with atomic_write(path, "wb", suffix=".png") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
