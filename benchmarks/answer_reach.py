"""Analysis: does an answer that is given to every kind of question mark a backdoor's target?

A clean answer belongs to one kind of question ("red" answers colour questions, "two" counting
ones), while a backdoor's target is given to triggered pictures whatever the question. For each
answer group of a cell (the model's first answer token, ``Scores.answer_token``, at least
``--min-group`` samples) its **reach** is the share of the *other* answers' samples whose prompt
(``Scores.prompt_key``) this answer is also given to. The script reports, per prepared cell of a
protocol set, the two largest reaches and the share of poison in the top group (the truth is read
for that column only). Candidate for a later round (``detection_analysis.md``, "Round 8, held
out"); no detector uses it.

    python benchmarks/answer_reach.py --set all8 --work W

Writes benchmarks/results/answer_reach.csv and .md (with the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import describe, markdown_table, write_csv, write_markdown  # noqa: E402
from detection import DEFAULT_WORK, cells_of  # noqa: E402

COLUMNS = ["task", "method", "trigger", "rate", "target", "seed", "asr", "n_groups", "n_prompts", "top_reach",
           "second_reach", "ratio", "top_size", "top_poison_share"]  # fmt: skip


def reach(answer: np.ndarray, prompt: np.ndarray, min_group: int) -> list[tuple[float, int, int]]:
    """(reach, size, answer) of every answer group with at least ``min_group`` samples, largest reach
    first (:func:`bye_fast.consensus.answer_reach`, the statistic the default's rule reads)."""
    from bye_fast.consensus import answer_reach

    sizes = dict(zip(*np.unique(answer, return_counts=True), strict=True))
    return sorted(((r, int(sizes[a]), a) for a, r in answer_reach(answer, prompt).items() if sizes[a] >= min_group),
                  reverse=True)  # fmt: skip


def one(folder: Path, spec, min_group: int) -> dict | None:
    import bye_fast

    if not (folder / "scores.npz").exists():
        return None
    s = bye_fast.Scores.load(folder / "scores.npz")
    if s.answer_token is None or s.prompt_key is None:
        return None
    truth = np.load(folder / "truth.npy")
    answer, prompt = np.asarray(s.answer_token), np.asarray(s.prompt_key)
    groups = reach(answer, prompt, min_group)
    top, second = groups[0], (groups[1] if len(groups) > 1 else (float("nan"), 0, -1))
    return {"task": spec.task, "method": spec.method, "trigger": spec.trigger if spec.rate > 0 else "clean",
            "rate": spec.rate, "target": spec.target if spec.rate > 0 else "-", "seed": spec.seed,
            "asr": json.loads((folder / "before.json").read_text())["asr"], "n_groups": len(groups),
            "n_prompts": len(np.unique(prompt)), "top_reach": top[0], "second_reach": second[0],
            "ratio": top[0] / second[0] if second[0] > 0 else float("nan"), "top_size": top[1],
            "top_poison_share": float(truth[answer == top[2]].mean())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="all8", help="a protocol set of benchmarks/detection.py (default all8)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--min-group", type=int, default=20)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "answer_reach")
    args = ap.parse_args(argv)
    rows = [r for _, spec in cells_of(args.set) if (r := one(args.work / spec.name, spec, args.min_group))]
    if not rows:
        raise SystemExit(f"no prepared cell of --set {args.set} under {args.work}")
    write_csv(args.out.with_suffix(".csv"), rows, COLUMNS)
    lines = ["# Answer reach: is the target the answer given to every kind of question?", "",
             f"Machine: {describe()}. Command: `python benchmarks/answer_reach.py {' '.join(sys.argv[1:])}` "
             f"({len(rows)} prepared cells). Reach of an answer: the share of the other answers' samples whose "
             "prompt it is also given to; ratio: the top group's reach over the second's. Poison share: the "
             "truth, read for this column only.", ""]  # fmt: skip
    families: dict[tuple, list[dict]] = {}
    for r in rows:
        kind = "clean" if r["trigger"] == "clean" else ("learned" if r["asr"] >= 0.9 else "not learned")
        families.setdefault((r["task"], r["method"], kind), []).append(r)
    summary = []
    for (task, method, kind), rs in sorted(families.items()):
        summary.append({"task": task, "method": method, "cells": f"{kind} ({len(rs)})",
                        "top reach median [range]": f"{statistics.median(r['top_reach'] for r in rs):.2f} "
                        f"[{min(r['top_reach'] for r in rs):.2f}-{max(r['top_reach'] for r in rs):.2f}]",
                        "ratio median [range]": f"{statistics.median(r['ratio'] for r in rs):.2f} "
                        f"[{min(r['ratio'] for r in rs):.2f}-{max(r['ratio'] for r in rs):.2f}]",
                        "top group's poison share, median": f"{statistics.median(r['top_poison_share'] for r in rs):.2f}"})  # fmt: skip
    lines += [markdown_table(summary, list(summary[0])), "", "## Every cell", "", markdown_table(rows, COLUMNS)]
    write_markdown(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
