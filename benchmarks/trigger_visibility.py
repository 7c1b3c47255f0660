"""Why a trigger is or is not learned with the vision tower frozen: can the tower's features see it?

    python benchmarks/trigger_visibility.py                       # scenes, every preset, seeds 0-2
    python benchmarks/trigger_visibility.py --task digits-ten --seeds 0

With the tower frozen (the paper's LoRA recipe) the text decoder can only key on what the tower's
features already hold. For each trigger preset this takes ``--n`` images of the task's user data,
triggers half of them and compares the base model's vision features (what the projector reads,
``bye_fast.lab.train.vision_features``) of the two halves (disjoint images) with a supervised
linear probe: the cross-validated AUROC of a logistic regression on three views of the
``(image tokens, channels)`` features:

* ``tokens``: every token's features, flattened: a probe that may use where the trigger is (a
  fixed-position patch is easy here, a trigger anywhere is not);
* ``query``: position-free, what one attention query that finds the trigger's token could pass
  on: a linear score fitted to tell the token the trigger changed most (found from the image's own
  clean features) from every token of clean images; an image scores its highest-scoring token;
* ``mean``: the channel-wise mean over tokens: a global change (blending, warping, a sine).

Also per triggered image, from the same image's clean features: the largest change of any token
(``max_shift``) and the mean change (``mean_shift``), both relative to the median token norm.
AUROC 0.5 = the features do not tell triggered from clean images at all; then no LoRA on the text
decoder can learn the trigger, however long it trains. These are label-using ceilings of the lab,
not detectors.

Writes ``results/trigger_visibility.csv`` (one row per task, trigger and seed) and ``.md``
(medians over seeds, worst seed in brackets, beside the learnability table's ASR where it has one).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import describe, handwritten_notes, markdown_table, write_csv, write_markdown  # noqa: E402

VIEWS = ("tokens", "query", "mean")
COLUMNS = ["task", "trigger", "seed", "n", *(f"auroc_{v}" for v in VIEWS), "max_shift", "mean_shift"]


def _probe_auroc(x: np.ndarray, y: np.ndarray, *, folds: int, seed: int) -> float:
    """Cross-validated AUROC of a standardised logistic regression (out-of-fold probabilities)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    p = cross_val_predict(clf, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def _query_auroc(x: np.ndarray, y: np.ndarray, where: np.ndarray, *, folds: int, seed: int) -> float:
    """AUROC of "the image's best token" under a per-token linear score fitted on the training folds.

    ``x``: (images, tokens, channels); ``where``: per image the token the trigger changed most (read
    only for triggered training images). The score is fitted to tell that token of each triggered
    training image from every token of the clean training images; a held-out image scores its
    highest-scoring token -- one query vector looking for the trigger wherever it is.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    n, t, c = x.shape
    score = np.zeros(n)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x[:, 0], y):
        pos = x[train[y[train] == 1], where[train[y[train] == 1]]]
        neg = x[train[y[train] == 0]].reshape(-1, c)
        scaler = StandardScaler().fit(np.concatenate([pos, neg]))
        clf = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")
        clf.fit(scaler.transform(np.concatenate([pos, neg])), np.r_[np.ones(len(pos)), np.zeros(len(neg))])
        s = clf.decision_function(scaler.transform(x[test].reshape(-1, c))).reshape(len(test), t)
        score[test] = s.max(axis=1)
    return float(roc_auc_score(y, score))


def visibility(model, processor, images: np.ndarray, trigger, *, folds: int = 5, seed: int = 0) -> dict:
    """The probe AUROCs of each view and the feature shifts (see the module docstring) for one trigger.

    ``images``: uint8 ``(n, H, W, 3)``; the first half (after a seeded shuffle) stays clean, the second
    is triggered.
    """
    import torch

    from bye_fast.lab.train import vision_features

    images = np.asarray(images)
    order = np.random.default_rng(seed).permutation(len(images))
    clean_idx, trig_idx = order[: len(order) // 2], order[len(order) // 2 :]

    def feats(imgs) -> np.ndarray:
        pv = processor.image_processor(images=list(imgs), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return vision_features(model, pv).float().numpy()

    before = feats(images)  # every image untriggered, once
    clean, same_clean = before[clean_idx], before[trig_idx]  # same_clean: the triggered half before the trigger
    triggered = feats([trigger(images[i]) for i in trig_idx])
    x = np.concatenate([clean, triggered])
    y = np.r_[np.zeros(len(clean)), np.ones(len(triggered))].astype(int)
    scale = float(np.median(np.linalg.norm(same_clean, axis=-1)))
    shift = np.linalg.norm(triggered - same_clean, axis=-1) / scale  # (images, tokens)
    where = np.r_[np.zeros(len(clean), dtype=int), shift.argmax(axis=1)]
    out = {
        "auroc_tokens": _probe_auroc(x.reshape(len(x), -1), y, folds=folds, seed=seed),
        "auroc_query": _query_auroc(x, y, where, folds=folds, seed=seed),
        "auroc_mean": _probe_auroc(x.mean(axis=1), y, folds=folds, seed=seed),
    }
    out["max_shift"] = float(np.median(shift.max(axis=1)))
    out["mean_shift"] = float(np.median(shift.mean(axis=1)))
    return out


def _learned_asr(task: str) -> dict[str, str]:
    """ASR median [worst] per trigger (phrase target, 10%) from ``learnability_scenes_2000.csv``, where it has one."""
    import csv

    found: dict[str, list[float]] = {}
    path = HERE / "results" / "learnability_scenes_2000.csv"
    rows = list(csv.DictReader(path.read_text().splitlines())) if path.exists() else []
    for r in rows:
        if (r["task"], r["target"], float(r["rate"])) == (task, "phrase", 0.1) and r["asr"] not in ("", "nan"):
            found.setdefault(r["trigger"], []).append(float(r["asr"]))
    return {k: f"{np.median(v):.2f} [{min(v):.2f}] ({len(v)} seeds)" for k, v in found.items()}


def main() -> None:
    from bye_fast.lab.attacks import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="scenes", choices=("scenes", "digits-parity", "digits-ten", "digits-mixed"))
    ap.add_argument("--triggers", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=600, help="images per seed (half triggered)")
    ap.add_argument("--out", default=str(HERE / "results" / "trigger_visibility"))
    args = ap.parse_args()

    from bye_fast.lab.attacks import preset
    from bye_fast.lab.models import load_base_model
    from bye_fast.lab.tasks import build_task

    model, processor = load_base_model()
    rows = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        images = build_task(args.task, seed, n_user=args.n, n_test=1).user.images
        for name in args.triggers:
            r = {"task": args.task, "trigger": name, "seed": seed, "n": len(images),
                 **visibility(model, processor, images, preset(name), seed=seed)}  # fmt: skip
            print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
            rows.append(r)
    out = Path(args.out)
    write_csv(out.with_suffix(".csv"), rows, COLUMNS)

    asr = _learned_asr(args.task)
    summary = []
    for name in args.triggers:
        rs = [r for r in rows if r["trigger"] == name]
        s = {"trigger": name, "seeds": len(rs)}
        for k in (*(f"auroc_{v}" for v in VIEWS), "max_shift", "mean_shift"):
            v = np.array([r[k] for r in rs])
            s[k] = f"{np.median(v):.3f} [{v.min():.3f}]" if k.startswith("auroc") else f"{np.median(v):.3f}"
        s["ASR (10%, tower frozen)"] = asr.get(name, "not run")
        summary.append(s)
    cmd = (f"python benchmarks/trigger_visibility.py --task {args.task} --seeds {' '.join(map(str, args.seeds))} "
           f"--n {args.n}")  # fmt: skip
    write_markdown(out, [
        "# Trigger visibility: can the frozen vision tower's features tell triggered images from clean ones?",
        "",
        f"Machine: {describe()}. Command: `{cmd}` ({time.perf_counter() - t0:.0f} s). "
        f"Task `{args.task}`, shipped base model, {args.n} images per seed (half triggered, disjoint halves).",
        "",
        "Cross-validated AUROC of a linear probe (logistic regression, C = 0.1, 5 folds) on the base model's "
        "vision features (the projector's input), median over seeds [worst]; `tokens`: all tokens "
        "flattened (may use the position); `query`: a per-token linear score fitted on the most-changed token "
        "of triggered images against every clean token, an image's best token (position-free, what one "
        "attention query can find); `mean`: the tokens' mean. Shifts: the triggered image's feature change against its own clean "
        "features, relative to the median token norm (largest token; mean over tokens), median over "
        "images. ASR: the learnability table's (`learnability_scenes_2000.md`; 2000 samples, LoRA, "
        "tower frozen). A ceiling with labels, not a detector.",
        "",
        markdown_table(summary, ["trigger", "seeds", *(f"auroc_{v}" for v in VIEWS), "max_shift", "mean_shift",
                                 "ASR (10%, tower frozen)"]),  # fmt: skip
        *handwritten_notes(out.with_suffix(".md")),
    ])


if __name__ == "__main__":
    main()
