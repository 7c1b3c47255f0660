"""Analysis: how the content test's target group is split on existing-answer cells, and what else was tried.

On an existing-answer cell the content test finds the target answer's group (its pictures do not
agree with the answer) and its neighbour vote flags the members whose nearest pictures answer
otherwise; v7 then re-decides the members with a cross-fitted classifier on the attention
features (``ConsensusDetector._refine_content``). This script puts that decision beside the
variants tried after round 6 and beside a ceiling (the same classifier trained on the truth), on
every prepared existing-answer cell of a protocol set. The truth is read by the metrics and the
ceiling only.

    python benchmarks/content_split.py --set design7 --work W    # cells prepared by detection.py under W

Writes benchmarks/results/content_split.csv and .md (with the machine) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import describe, write_csv, write_markdown  # noqa: E402
from detection import DEFAULT_WORK, cells_of  # noqa: E402

#: variant -> what decides the group's members (the table's rows); "v7" is the detector's own method.
VARIANTS = {
    "vote": "the neighbour vote alone",
    "v7": "v7: attention features, cross-fitted L2 LR on the vote's labels",
    "hidden": "... plus the last prompt token's hidden state",
    "c0.1": "... C = 0.1",
    "sure": "... trained only on members the vote is sure of (share outside >= 0.7 or <= 0.3)",
    "margin": "... members weighted by the vote's margin",
    "hidden+margin": "... hidden state and margin weights",
    "deconfounded": "... features with the image content regressed out (ridge on the image embedding, all samples)",
    "ceiling": "ceiling: the attention LR trained on the truth (cross-validated)",
}


def _f1(flag: np.ndarray, truth: np.ndarray) -> float:
    from bye_fast.lab.metrics import detection_metrics

    return detection_metrics(truth, flag, flag.astype(np.float64))["f1"]


def _crossfit(x: np.ndarray, label: np.ndarray, *, c: float = 0.01, weight=None, train_mask=None) -> np.ndarray:
    """Cross-fitted probabilities as ``_refine_content`` computes them (5 folds, median/std scaling)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    prob = np.empty(len(x))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, label):
        if train_mask is not None:
            train = train[train_mask[train]]
        xt = x[train]
        med, sd = np.median(xt, axis=0), xt.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
        clf.fit((xt - med) / sd, label[train], sample_weight=None if weight is None else weight[train])
        prob[test] = clf.predict_proba((x[test] - med) / sd)[:, 1]
    return prob


def split_cell(folder: Path) -> list[dict]:
    """Every variant on the content test's groups of one prepared cell: rows of the table."""
    from sklearn.linear_model import Ridge

    import bye_fast
    from bye_fast.consensus import ConsensusDetector, FeatureColumns

    scores = bye_fast.Scores.load(folder / "scores.npz")
    truth = np.load(folder / "truth.npy")
    before = json.loads((folder / "before.json").read_text())
    full = ConsensusDetector().fit(scores)
    det = ConsensusDetector()
    valid = np.ones(scores.n_samples, bool)
    groups = det._answer_groups(scores, valid)
    # every sample's features, once per cell: attention (the re-decision's), + hidden state, and
    # both with the image content regressed out (ridge on the standardised embedding)
    cols = FeatureColumns(scores, tuple(det.refine_features))
    every = cols.gather(0, cols.n_features, np.arange(scores.n_samples)).T.astype(np.float64)
    attn_all = every[:, np.isfinite(every).all(axis=0) & (every.std(axis=0) > 0)]
    both_all = np.hstack([attn_all, np.asarray(scores.hidden, np.float64)])
    z = (both_all - both_all.mean(axis=0)) / (both_all.std(axis=0) + 1e-12)
    e = np.asarray(scores.image_embedding, np.float64)
    e = (e - e.mean(axis=0)) / (e.std(axis=0) + 1e-12)
    deconf = z - Ridge(alpha=10.0).fit(e, z).predict(e)
    rows = []
    for token, g, outside, _ in det._inconsistent_groups(scores, valid, groups):
        vote = outside > 0.5
        attn, both = attn_all[g], both_all[g]
        margin = np.abs(outside - 0.5) * 2 + 0.05
        prob_v7, _ = det._refine_content(scores, valid, g, vote)
        decided = {
            "vote": vote,
            "v7": vote if prob_v7 is None else prob_v7 > 0.5,
            "hidden": _crossfit(both, vote) > 0.5,
            "c0.1": _crossfit(attn, vote, c=0.1) > 0.5,
            "sure": _crossfit(attn, vote, train_mask=(outside >= 0.7) | (outside <= 0.3)) > 0.5,
            "margin": _crossfit(attn, vote, weight=margin) > 0.5,
            "hidden+margin": _crossfit(both, vote, weight=margin) > 0.5,
            "deconfounded": _crossfit(deconf[g], vote) > 0.5,
            "ceiling": _crossfit(attn, truth[g]) > 0.5,
        }
        rest = full.flagged_.copy()
        rest[g] = False  # what v7 flags outside the group stays as it is
        for name, members in decided.items():
            cell = rest.copy()
            cell[g[members]] = True
            rows.append({
                "cell": folder.name, "asr_before": round(before["asr"], 3), "group": int(token), "group_size": len(g),
                "group_poisoned": int(truth[g].sum()), "variant": name, "group_f1": round(_f1(members, truth[g]), 4),
                "cell_f1": round(_f1(cell, truth), 4),
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="design7", help="a protocol set of benchmarks/detection.py (default design7)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "content_split")
    args = ap.parse_args(argv)
    folders = sorted({args.work / spec.name for _, spec in cells_of(args.set)
                      if spec.target == "existing" and spec.rate > 0 and (args.work / spec.name / "scores.npz").exists()})  # fmt: skip
    if not folders:
        raise SystemExit(f"no prepared existing-answer cell of {args.set} under {args.work}")
    rows = []
    for folder in folders:
        rows += split_cell(folder)
        print(f"{folder.name}: " + ", ".join(f"{r['variant']} {r['cell_f1']:.3f}" for r in rows if r["cell"] == folder.name), flush=True)
    write_csv(args.out.with_suffix(".csv"), rows, list(rows[0]))
    learned = [r for r in rows if r["asr_before"] >= 0.9]
    n_learned = len({r["cell"] for r in learned})
    lines = [
        "# The content test's target group on existing-answer cells: v7's split and the variants tried",
        "",
        f"Machine: {describe()}. Command: `python benchmarks/content_split.py {' '.join(sys.argv[1:])}`.",
        f"Cells: the {len(folders)} prepared existing-answer cells of `{args.set}`; the table is over the "
        f"{n_learned} learned ones (ASR >= 0.9). Cell F1: v7's flags with the group's members decided by the "
        "variant. The truth is read by the metrics and the ceiling only.",
        "",
        "| how the group's members are decided | cell F1 median [worst] | cells < 0.85 | better / worse than v7 |",
        "|---|---|---|---|",
    ]
    v7 = {r["cell"]: r["cell_f1"] for r in learned if r["variant"] == "v7"}
    for name, text in VARIANTS.items():
        f = [r["cell_f1"] for r in learned if r["variant"] == name]
        if not f:
            continue
        better = sum(r["cell_f1"] > v7[r["cell"]] + 1e-9 for r in learned if r["variant"] == name)
        worse = sum(r["cell_f1"] < v7[r["cell"]] - 1e-9 for r in learned if r["variant"] == name)
        lines.append(f"| {text} | {np.median(f):.3f} [{min(f):.3f}] | {sum(x < 0.85 for x in f)} | "
                     f"{'--' if name == 'v7' else f'{better} / {worse}'} |")  # fmt: skip
    write_markdown(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
