"""Design check: an existing answer ("yes") as the target of a scene backdoor, simulated.

No design cell of rounds 1-9 holds a *learned* scene backdoor whose target is an existing answer,
so v10's member rule for the reach rule (``ConsensusDetector._universal_groups``: members asked
other kinds of question are poison, members asked the answer's own kind are judged by their
pictures' neighbours) is checked on a simulation: in each prepared scene cell with a fixed-phrase
target, the model's phrase answers (the phrase's first token) are relabelled to the largest answer the model
gives to the "is there ...?" questions ("yes" or "no"). The target's group then holds its clean
answers too, as a real existing-answer target's does; the pictures and the attention are the
learned backdoor's. The truth is read for the metrics only.

    python benchmarks/existing_target.py --set design10 --work W

Writes benchmarks/results/existing_target.csv and .md (with the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import describe, markdown_table, write_csv, write_markdown  # noqa: E402
from detection import DEFAULT_WORK, cells_of  # noqa: E402

COLUMNS = ["trigger", "rate", "seed", "method", "asr", "target_token", "n_poisoned", "clean_members",
           "f1", "precision", "recall", "removed", "f1_whole_group", "members"]  # fmt: skip


def one(folder: Path, spec, options: dict) -> dict | None:
    import bye_fast
    from bye_fast.lab.metrics import detection_metrics
    from bye_fast.lab.models import lab_processor
    from bye_fast.lab.tasks import TARGET, record_question

    if not (folder / "scores.npz").exists():
        return None
    s = bye_fast.Scores.load(folder / "scores.npz")
    truth = np.load(folder / "truth.npy")
    records = json.loads((folder / "data" / "train.json").read_text())
    phrase = lab_processor().tokenizer.convert_tokens_to_ids(TARGET.split()[0])
    answer = np.asarray(s.answer_token).copy()
    exists = np.array([record_question(r).startswith("is there") for r in records])
    values, counts = np.unique(answer[exists & (answer != phrase)], return_counts=True)
    target = int(values[counts.argmax()])
    answer[answer == phrase] = target
    s.answer_token = answer
    det = bye_fast.detect(s, **options)
    whole = answer == target
    m = detection_metrics(truth, det.flagged, det.score)
    m_whole = detection_metrics(truth, whole, whole.astype(float))
    (uni,) = [c for c in det.details["clusters"] if c["side"] == "universal"] or [{"members": "reach rule silent"}]
    return {"trigger": spec.trigger, "rate": spec.rate, "seed": spec.seed, "method": spec.method,
            "asr": json.loads((folder / "before.json").read_text())["asr"], "target_token": target,
            "n_poisoned": int(truth.sum()), "clean_members": int((whole & ~truth).sum()), "f1": m["f1"],
            "precision": m["precision"], "recall": m["recall"], "removed": m["removed_fraction"],
            "f1_whole_group": m_whole["f1"], "members": uni["members"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="design10", help="a protocol set of benchmarks/detection.py")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--options", default="{}", help="JSON keyword arguments of bye_fast.detect")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "existing_target")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    specs = {spec.name: spec for _, spec in cells_of(args.set)
             if spec.task == "scenes" and spec.rate > 0 and spec.target == "phrase"}  # fmt: skip
    rows = [r for name, spec in sorted(specs.items()) if (r := one(args.work / name, spec, json.loads(args.options)))]
    if not rows:
        raise SystemExit(f"no prepared scene phrase cell of --set {args.set} under {args.work}")
    write_csv(args.out.with_suffix(".csv"), rows, COLUMNS)
    learned = [r for r in rows if r["asr"] >= 0.9]
    f1 = [r["f1"] if r["f1"] == r["f1"] else 0.0 for r in learned]
    whole = [r["f1_whole_group"] for r in learned]
    lines = ["# An existing answer as the scene target (simulated from the phrase cells)", "",
             f"Machine: {describe()}. Command: `python benchmarks/existing_target.py {' '.join(sys.argv[1:])}` "
             f"({time.perf_counter() - t0:.0f} s). Each scene phrase cell's phrase answers relabelled to the "
             "model's largest answer to the \"is there ...?\" questions; `f1_whole_group`: flagging the whole "
             "relabelled group (what v9's reach rule did). The truth is read for the metrics only.", "",
             f"Learned cells (ASR >= 0.9): {len(learned)}; F1 median {statistics.median(f1):.3f}, worst {min(f1):.3f} "
             f"(whole group: median {statistics.median(whole):.3f}, worst {min(whole):.3f}).", "",
             markdown_table(rows, COLUMNS)]  # fmt: skip
    write_markdown(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
