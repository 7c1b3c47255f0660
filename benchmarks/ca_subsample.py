"""How much clean accuracy a fine-tune loses to having fewer samples: the fair comparator of "CA after".

The detector issue's target compares the clean accuracy after a defence (fine-tuned again on the
kept samples: a 20%-poisoned cell keeps ~80% of its data) with the clean cell's (fine-tuned on all
800 clean samples). This script fine-tunes each clean cell of a protocol set again on a random
``--fraction`` of its samples (same seed, same settings; ``bye_fast.lab.cell.retrain``) and
reports both accuracies, so that a CA drop after a defence can be read against the drop that
fewer samples alone cause.

    python benchmarks/ca_subsample.py --set heldout7 --work W --fraction 0.8
    python benchmarks/ca_subsample.py --set heldout7 --work W --oracle   # poisoned cells, poison removed by the truth

``--oracle`` instead re-trains each poisoned cell (of ``--tasks``, at ``--rate``) on exactly its
clean samples, as a perfect detector would leave them: the CA a defence can reach at best (the
truth is read for that and nothing else).

Writes benchmarks/results/ca_subsample.csv and .md (with the machine) and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import describe, write_csv, write_markdown  # noqa: E402
from detection import DEFAULT_WORK, _init_worker, cells_of  # noqa: E402

COLUMNS = ["kind", "task", "trigger", "seed", "fraction", "n_kept", "ca_full", "ca_after", "drop", "seconds"]


def _retrain_row(kind: str, cell, keep, ca_full: float) -> dict:
    """Re-train ``cell`` on its ``keep`` samples (``bye_fast.lab.cell.retrain``): one table row."""
    from bye_fast.lab.cell import retrain

    spec = cell.spec
    t = time.perf_counter()
    after = retrain(cell, keep)
    return {"kind": kind, "task": spec.task, "trigger": spec.trigger if spec.rate > 0 else "clean", "seed": spec.seed,
            "fraction": float(keep.mean()), "n_kept": int(keep.sum()), "ca_full": ca_full, "ca_after": after["ca"],
            "drop": ca_full - after["ca"], "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip


def one(work: str, task: str, seed: int, fraction: float) -> dict:
    """Fine-tune the clean cell (task, seed) again on a seeded random ``fraction`` of its samples."""
    import numpy as np

    from bye_fast.lab.cell import CellSpec, prepare_cell

    spec = CellSpec(task=task, rate=0.0, seed=seed)
    cell = prepare_cell(spec, Path(work) / spec.name)
    n = cell.scores.n_samples
    keep = np.zeros(n, bool)
    keep[np.random.default_rng(seed).choice(n, round(fraction * n), replace=False)] = True
    return _retrain_row("subsample", cell, keep, cell.before["ca"])


def oracle(work: str, spec) -> dict:
    """Re-train a poisoned cell on its clean samples only (by the truth); CA against its clean cell's."""
    import json

    from bye_fast.lab.cell import prepare_cell

    cell = prepare_cell(spec, Path(work) / spec.name)
    clean = json.loads((Path(work) / replace(spec, rate=0.0).name / "before.json").read_text())
    return _retrain_row("oracle", cell, ~cell.truth, clean["ca"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="heldout7", help="a protocol set of benchmarks/detection.py (default heldout7)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--fraction", type=float, default=0.8, help="share of the clean samples kept (default 0.8)")
    ap.add_argument("--tasks", nargs="+", default=["digits-ten", "digits-mixed"])
    ap.add_argument("--oracle", action="store_true",
                    help="re-train the poisoned cells (phrase target, --rate) on their clean samples instead")
    ap.add_argument("--rate", type=float, default=0.2, help="with --oracle: the poisoned cells' rate (default 0.2)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ca_subsample")
    args = ap.parse_args(argv)
    if not 0 < args.fraction < 1:
        raise SystemExit(f"--fraction must be in (0, 1); got {args.fraction}")
    if args.oracle:
        specs = [s for _, s in cells_of(args.set)
                 if s.task in args.tasks and s.rate == args.rate and s.target == "phrase"]  # fmt: skip
        if not specs:
            raise SystemExit(f"no {args.rate:g} phrase cell of {args.tasks} in {args.set}")
        with ProcessPoolExecutor(args.workers, initializer=_init_worker) as pool:
            rows = list(pool.map(oracle, [str(args.work)] * len(specs), specs))
    else:
        todo = sorted({(s.task, s.seed) for _, s in cells_of(args.set) if s.rate == 0 and s.task in args.tasks})
        if not todo:
            raise SystemExit(f"no clean cell of {args.tasks} in {args.set}")
        with ProcessPoolExecutor(args.workers, initializer=_init_worker) as pool:
            rows = list(pool.map(one, *zip(*[(str(args.work), t, s, args.fraction) for t, s in todo], strict=True)))
    for r in rows:
        print(r, flush=True)
    write_csv(args.out.with_suffix(".csv"), rows, COLUMNS)
    drops = [r["drop"] for r in rows]
    what = (f"Each {args.rate:.0%}-phrase cell of `{args.set}` fine-tuned again on exactly its clean samples "
            "(the poisoned ones removed by the truth: a perfect defence), same seed and settings: CA full = the "
            "clean cell's (all 800 samples clean), CA after = the re-trained model's."
            if args.oracle else
            f"Each clean cell of `{args.set}` fine-tuned again on a random {args.fraction:.0%} of its samples "
            "(same seed and settings): CA full = the clean cell's, CA after = the re-trained model's.")  # fmt: skip
    lines = [
        "# Clean accuracy lost to fewer samples alone (the fair comparator of 'CA after')",
        "",
        f"Machine: {describe()}. Command: `python benchmarks/ca_subsample.py {' '.join(sys.argv[1:])}`.",
        what,
        "",
        "| task | trigger | seed | samples kept | CA full | CA after | drop (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['task']} | {r['trigger']} | {r['seed']} | {r['n_kept']} | {r['ca_full']:.3f} | "
              f"{r['ca_after']:.3f} | {100 * r['drop']:.1f} |" for r in rows]  # fmt: skip
    lines += ["", f"Drop median {100 * statistics.median(drops):.1f} points, worst {100 * max(drops):.1f}, "
                  f"best {100 * min(drops):.1f}."]  # fmt: skip
    write_markdown(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
