"""Detectors that were tried against the paper's procedure and NOT adopted, on the benchmark's cells.

    python benchmarks/detection.py --prepare-only ...        # fine-tune and score the cells once
    python benchmarks/detection_alternatives.py              # then compare detectors on their scores

Reads the cells that ``benchmarks/detection.py`` prepared under ``--work`` (scores + ground
truth) and runs each candidate below with NO retraining. Design cells are seed 0; seeds 1 and
2 are held out: a candidate is worth adopting only if it is better on the held-out seeds too,
and removes <= 1% of clean data. Writes ``benchmarks/results/detection_alternatives.{csv,md}``.

Candidates (all unsupervised; none sees the ground truth):
- ``paper``: ``bye_fast.detect`` defaults (per-layer 2-GMM, separation > 1, lower component).
- ``paper-minority``: the same, flagging the smaller final component.
- ``logkl``: ``bye_fast.detect`` on log(log T - H), the log of the KL divergence of the
  attention from uniform (undoes the pile-up of entropies just below log T), flagging the
  more-collapsed component; ``logkl-minority`` flags the smaller one.
- ``spectral-layers`` / ``spectral-heads``: the top principal direction of the robustly
  standardised layer (head) entropies (spectral-signature style), oriented towards lower
  entropy; 2-GMM on the projection, flag the minority component on the lower-entropy side
  when its separation exceeds 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.mixture import GaussianMixture

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

DESIGN_SEEDS = (0,)
LEARNED_ASR = 0.9


def _gmm2(v: np.ndarray):
    g = GaussianMixture(2, random_state=0).fit(v[:, None])
    order = np.argsort(g.means_.ravel())
    rank = np.empty_like(order)
    rank[order] = np.arange(2)
    means, stds = g.means_.ravel()[order], np.sqrt(g.covariances_.ravel()[order])
    return g.weights_[order], means, stds, rank[g.predict(v[:, None])]


def _separation(means, stds) -> float:
    return float(abs(means[1] - means[0]) / (2 * (stds[0] + stds[1])))


def spectral(x: np.ndarray, entropy: np.ndarray) -> np.ndarray:
    med = np.median(x, axis=0)
    iqr = np.subtract(*np.percentile(x, [75, 25], axis=0)) / 1.349
    z = (x - med) / np.maximum(iqr, 0.1 * x.std(axis=0) + 1e-9)
    zc = z - z.mean(axis=0)
    t = zc @ np.linalg.svd(zc, full_matrices=False)[2][0]
    if np.corrcoef(t, -entropy.mean(axis=1))[0, 1] < 0:
        t = -t  # positive = lower entropy (the paper's collapse)
    w, means, stds, lab = _gmm2(t)
    if _separation(means, stds) > 1.0 and w[1] < 0.5:
        return lab == 1
    return np.zeros(len(x), bool)


def clean_structure(scores, records: list[dict]) -> dict:
    """On CLEAN data: does the top principal direction of the head entropies split by answer?

    The smaller component of a 2-GMM on that projection, and how many of each answer it holds.
    """
    n = scores.n_samples
    x = scores.head_entropy.reshape(n, -1).astype(np.float64)
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-12)
    t = z @ np.linalg.svd(z, full_matrices=False)[2][0]
    w, means, stds, lab = _gmm2(t)
    small = lab == int(np.argmin(w))
    answers = np.array([r["conversations"][1]["value"] for r in records])
    return {
        "separation": _separation(means, stds),
        "share": float(small.mean()),
        "answers": {
            a: f"{int((small & (answers == a)).sum())}/{int((answers == a).sum())}"
            for a in np.unique(answers)
        },
    }


def candidates(scores) -> dict[str, np.ndarray]:
    import bye_fast

    n = scores.n_samples
    e = scores.entropy.astype(np.float64)
    he = scores.head_entropy.reshape(n, -1).astype(np.float64)
    logkl = np.log(np.maximum(np.log(scores.n_image_tokens.astype(np.float64))[:, None] - e, 1e-6))
    return {
        "paper": bye_fast.detect(scores).flagged,
        "paper-minority": bye_fast.detect(scores, flag="minority").flagged,
        # the paper's procedure itself, on -log KL (so that its "lower" side is the more collapsed one)
        "logkl": bye_fast.detect(bye_fast.Scores(entropy=-logkl, ids=scores.ids)).flagged,
        "logkl-minority": bye_fast.detect(
            bye_fast.Scores(entropy=-logkl, ids=scores.ids), flag="minority"
        ).flagged,
        "spectral-layers": spectral(e, e),
        "spectral-heads": spectral(he, e),
    }


def main() -> None:
    from _machine import describe, markdown_table

    import bye_fast
    from bye_fast.demo.pipeline import detection_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bye_fast_detection_bench")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    rows = []
    for folder in sorted(Path(args.work).glob("*-*-*")):
        if not (folder / "before.json").exists():
            continue
        trigger, rate, seed = folder.name.rsplit("-", 2)
        scores = bye_fast.Scores.load(folder / "scores.npz")
        truth = np.load(folder / "truth.npy")
        before = json.loads((folder / "before.json").read_text())
        for name, flagged in candidates(scores).items():
            m = detection_metrics(truth, flagged, np.zeros(len(truth)))
            rows.append({
                "trigger": trigger, "rate": float(rate), "seed": int(seed), "candidate": name,
                "asr_before": before["asr"], "f1": m["f1"], "precision": m["precision"],
                "recall": m["recall"], "removed": m["removed_fraction"],
            })  # fmt: skip
    structure = []
    for folder in sorted(Path(args.work).glob("*-0.0-*")):
        if (folder / "before.json").exists():
            got = clean_structure(
                bye_fast.Scores.load(folder / "scores.npz"), json.loads((folder / "train.json").read_text())
            )
            structure.append({"clean cell": folder.name, "separation": got["separation"], "smaller component": got["share"],
                              "answers in it": ", ".join(f"{a} {v}" for a, v in got["answers"].items())})  # fmt: skip
    if not rows:
        raise SystemExit(
            f"no prepared cell under {args.work}: run benchmarks/detection.py --prepare-only first"
        )
    out = Path(args.out)
    with open(out / "detection_alternatives.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = []
    for name in dict.fromkeys(r["candidate"] for r in rows):
        entry: dict = {"candidate": name}
        for split, keep in (
            ("design", lambda s: s in DESIGN_SEEDS),
            ("held-out", lambda s: s not in DESIGN_SEEDS),
        ):
            rs = [r for r in rows if r["candidate"] == name and keep(r["seed"])]
            learned = [r for r in rs if r["rate"] > 0 and r["asr_before"] >= LEARNED_ASR]
            at10 = [r for r in learned if r["rate"] == 0.1]
            clean = [r["removed"] for r in rs if r["rate"] == 0.0]
            entry[f"{split}: F1 learned 10% (n)"] = (
                f"{np.mean([r['f1'] for r in at10]):.3f} ({len(at10)})" if at10 else ""
            )
            entry[f"{split}: F1 all learned (n)"] = (
                f"{np.mean([r['f1'] for r in learned]):.3f} ({len(learned)})" if learned else ""
            )
            entry[f"{split}: min F1 learned"] = f"{min(r['f1'] for r in learned):.3f}" if learned else ""
            entry[f"{split}: clean removed max"] = f"{max(clean):.1%}" if clean else ""
        table.append(entry)
    text = [
        "# Detection: alternatives tried and not adopted",
        "",
        f"Machine: {describe()}.",
        "",
        "Command: `python benchmarks/detection_alternatives.py` (on the cells prepared by "
        "`benchmarks/detection.py`). Design cells: seed(s) "
        f"{list(DESIGN_SEEDS)}; held-out: the others. 'Learned': ASR before >= {LEARNED_ASR}. "
        "Targets: F1 >= 0.95 on learned 10% cells, <= 1% of clean data removed.",
        "",
        markdown_table(table, list(table[0])),
        "",
        "## Clean data has its own clusters",
        "",
        "On clean data (no poison), a 2-GMM on the top principal direction of the standardised head "
        "entropies; 'answers in it' counts each answer in the smaller component (of all samples with "
        "that answer). A separation > 1 passes the paper's bimodality rule: clean data alone would "
        "be cut in two by any detector that looks for a separated cluster.",
        "",
        markdown_table(structure, list(structure[0])) if structure else "(no clean cell)",
        "",
    ]
    (out / "detection_alternatives.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
