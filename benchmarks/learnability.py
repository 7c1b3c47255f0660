"""Learnability matrix: which backdoors the lab's model learns, per task family, trigger, rate and seed.

    python benchmarks/learnability.py                                  # the committed matrix
    python benchmarks/learnability.py --tasks scenes --triggers patch --rates 0.1 --seeds 0   # one cell

Each cell (``bye_fast.lab.cell``): poison the user task, LoRA-fine-tune the
shipped base model on it, measure clean accuracy (CA) and attack success
(ASR) on held-out data, score the training data. The clean cell of each task
and seed (no poison) gives the reference CA. Cells are kept under ``--work``
and reused by later runs (and by ``benchmarks/detection.py``); they run in
``--workers`` processes with one torch thread each.

Writes ``benchmarks/results/learnability.csv`` (one row per cell) and
``learnability.md`` (medians over seeds, the targets, the machine). With ``--held-out N``
(scenes only) CA and ASR are measured again on N held-out samples
(``bye_fast.lab.cell.held_out``): the CA drop is then paired with the clean cell's answers to the
same questions and given with its standard error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import describe, handwritten_notes, write_csv  # noqa: E402

from bye_fast.lab.attacks import PRESETS  # noqa: E402
from bye_fast.lab.cell import CellSpec, held_out, prepare_cell, train_fit  # noqa: E402
from bye_fast.lab.tasks import TASKS  # noqa: E402
from bye_fast.lab.train import METHODS  # noqa: E402

DEFAULT_WORK = Path("/tmp/bye_fast_cells")
#: The paper's trigger first, then the five other families the issue names.
TRIGGERS = ("patch", "random_patch", "two_patches", "blended", "sig", "wanet")
COLUMNS = [
    "task",
    "trigger",
    "rate",
    "target",
    "seed",
    "ca",
    "asr",
    "train_fit",
    "ca_clean",
    "ca_drop",
    "n_poisoned",
    "seconds",
]
#: Added with ``--held-out N``: the same measures on N held-out samples, the CA drop paired.
HELD_OUT_COLUMNS = ["n_held_out", "ca_held_out", "asr_held_out", "ca_drop_held_out", "ca_drop_held_out_se"]

#: The sections write_results makes; any other ``## `` section of an earlier table is kept as written.
GENERATED_SECTIONS = ("Clean fine-tuning", "Targets", "Cells asked for but not run", "A larger held-out set")


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_one(spec: CellSpec, work: str, n_held_out: int = 0) -> dict:
    t = time.perf_counter()
    cell = prepare_cell(spec, Path(work) / spec.name)
    b = cell.before
    row = {**asdict(spec), "ca": b["ca"], "asr": b["asr"], "train_fit": train_fit(cell), "ca_by_type": b["ca_by_type"],
           "n_poisoned": b["n_poisoned"], "seconds": b["seconds"]["total"]}  # fmt: skip
    if n_held_out:
        ho = held_out(cell, n_held_out)
        row.update(n_held_out=n_held_out, ca_held_out=ho["ca"], asr_held_out=ho["asr"], hits=ho["hits"])
    return {**row, "wall": round(time.perf_counter() - t, 1)}


def specs(args) -> list[CellSpec]:
    out = []
    fit = {"method": args.method, "n_user": args.n_user, "epochs": args.epochs}  # shared by every cell
    for task in args.tasks:
        for seed in args.seeds:
            out.append(CellSpec(task=task, rate=0.0, seed=seed, **fit))  # the clean cell
            for target in args.targets:
                rates = args.rates if target == "phrase" else args.existing_rates
                triggers = args.triggers if target == "phrase" else [t for t in args.triggers if t in args.existing_triggers]
                for trigger in triggers:
                    for rate in rates:
                        out.append(CellSpec(task=task, trigger=trigger, rate=rate, seed=seed, target=target,
                                            **fit))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--triggers", nargs="+", default=list(TRIGGERS), choices=list(PRESETS))
    ap.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    ap.add_argument("--targets", nargs="+", default=["phrase", "existing"], choices=["phrase", "existing"])
    ap.add_argument("--existing-rates", nargs="+", type=float, default=[0.1],
                    help="rates of the existing-answer target (default 0.1)")  # fmt: skip
    ap.add_argument("--existing-triggers", nargs="+", default=["patch"],
                    help="triggers run with the existing-answer target too (default: patch)")  # fmt: skip
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--method", default="lora", choices=METHODS,
                    help="fine-tuning method (default lora, the vision tower frozen; lora-vision: adapters on it too)")
    ap.add_argument("--n-user", type=int, default=800, help="user (training) samples per cell (default 800)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="fine-tuning epochs (default: the family's, bye_fast.lab.cell.FINETUNE)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"cell folders (default {DEFAULT_WORK})")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "learnability",
                    help="results prefix: writes .csv and .md (default benchmarks/results/learnability)")  # fmt: skip
    ap.add_argument("--existing-only", action="store_true",
                    help="only cells already prepared under --work (the others are listed as not run)")  # fmt: skip
    ap.add_argument("--held-out", type=int, default=0, metavar="N",
                    help="also measure CA and ASR on N held-out samples, the CA drop paired with the clean "
                         "cell's (scenes only; default 0: off)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.held_out and set(args.tasks) != {"scenes"}:
        ap.error("--held-out needs --tasks scenes (the digits tasks have no held-out data to spare)")
    todo = specs(args)
    args.not_run = []
    if args.existing_only:
        args.not_run = [s for s in todo if not (args.work / s.name / "before.json").exists()]
        todo = [s for s in todo if (args.work / s.name / "before.json").exists()]
    print(f"{len(todo)} cells, {args.workers} workers; cells in {args.work}", flush=True)
    t0 = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(args.workers, initializer=_init_worker) as pool:
        futures = [pool.submit(run_one, s, str(args.work), args.held_out) for s in todo]
        for k, f in enumerate(futures):
            r = f.result()
            rows.append(r)
            print(f"[{k + 1}/{len(todo)}] {r['task']} {r['trigger'] if r['rate'] else 'clean'} {r['rate']:g} "
                  f"{r['target']} s{r['seed']}: CA {r['ca']:.3f} ASR {r['asr']:.3f} ({r['wall']} s)", flush=True)  # fmt: skip
    wall = time.perf_counter() - t0
    write_results(rows, args, wall)
    return 0


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def write_results(rows: list[dict], args, wall: float) -> None:
    clean = {(r["task"], r["seed"]): r["ca"] for r in rows if r["rate"] == 0}
    for r in rows:
        r["ca_clean"] = clean.get((r["task"], r["seed"]), float("nan"))
        r["ca_drop"] = r["ca_clean"] - r["ca"]
    held = args.held_out > 0
    if held:
        _pair_held_out(rows)
    write_csv(args.out.with_suffix(".csv"), rows, COLUMNS + (HELD_OUT_COLUMNS if held else []))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["rate"] > 0:
            groups.setdefault((r["task"], r["target"], r["trigger"], r["rate"]), []).append(r)
    epochs = "the family's epochs" if args.epochs is None else f"{args.epochs} epochs"
    lines = [
        "# Learnability matrix: which backdoors the lab's model learns",
        "",
        f"Machine: {describe()}. Command: `python benchmarks/learnability.py "
        + " ".join(sys.argv[1:])
        + f"` ({wall / 60:.0f} min wall, {args.workers} workers x 1 thread; "
        f"median cell {statistics.median(r['seconds'] for r in rows):.0f} s).",
        "",
        f"Each cell fine-tunes the shipped base model on the poisoned user task (`bye_fast.lab.cell`; "
        f"method `{args.method}`, {args.n_user} user samples, {epochs}). CA: clean accuracy on held-out "
        "data (exact answer); ASR: share of "
        "held-out samples whose answer is not the target that answer the target once the trigger is "
        "applied. Train fit: share of the poisoned training samples answered with the target (near 1 "
        "with a low ASR: memorised one by one, not keyed on the trigger). "
        "CA drop: the clean cell's CA (same task and seed, no poison) minus the cell's. "
        "Medians over seeds, worst seed in brackets; learned = ASR >= 0.9 in every seed.",
        "",
        "| task | target | trigger | rate | seeds | ASR median [worst] | train fit median | CA median | "
        "CA drop median [worst] | learned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, target, trigger, rate), rs in sorted(groups.items()):
        asr = [r["asr"] for r in rs]
        drop = [r["ca_drop"] for r in rs]
        learned = "yes" if min(asr) >= 0.9 else ("some seeds" if max(asr) >= 0.9 else "**no**")
        lines.append(
            f"| {task} | {target} | {trigger} | {rate:g} | {len(rs)} | {_fmt(statistics.median(asr))} "
            f"[{_fmt(min(asr))}] | {_fmt(statistics.median(r['train_fit'] for r in rs))} | "
            f"{_fmt(statistics.median(r['ca'] for r in rs))} | "
            f"{_fmt(statistics.median(drop))} [{_fmt(max(drop))}] | {learned} |"
        )
    lines += [
        "",
        "## Clean fine-tuning (no poison)",
        "",
        "| task | seed | CA | CA by question type |",
        "|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["rate"] == 0), key=lambda r: (r["task"], r["seed"])):
        by = ", ".join(f"{k} {v:.2f}" for k, v in r["ca_by_type"].items())
        lines.append(f"| {r['task']} | {r['seed']} | {r['ca']:.3f} | {by} |")
    if held:
        lines += ["", *_held_out_table(groups, args.held_out)]
    lines += ["", _targets(groups, args.method, held_out=args.held_out), ""]
    if args.not_run:
        count: dict[tuple, int] = {}
        for spec in args.not_run:
            count[(spec.task, spec.seed)] = count.get((spec.task, spec.seed), 0) + 1
        asked: dict[tuple, int] = {}
        for task, seed in [(s.task, s.seed) for s in args.not_run] + [(r["task"], r["seed"]) for r in rows]:
            asked[(task, seed)] = asked.get((task, seed), 0) + 1
        lines += [f"## Cells asked for but not run ({len(args.not_run)} of {len(args.not_run) + len(rows)})", "",
                  "Not prepared (time); per task and seed, cells not run of those asked for: "
                  + ", ".join(f"{t} s{sd} {n}/{asked[(t, sd)]}" for (t, sd), n in sorted(count.items())) + ".",
                  ""]  # fmt: skip
    md = args.out.with_suffix(".md")
    while lines and not lines[-1]:
        lines.pop()
    md.write_text("\n".join(lines + handwritten_notes(md, GENERATED_SECTIONS)) + "\n")


def _pair_held_out(rows: list[dict]) -> None:
    """Each cell's CA drop on the larger held-out set, paired with its clean cell's answers to the same
    questions: the mean of (clean right) - (cell right) and its standard error over the questions."""
    clean = {(r["task"], r["seed"]): r for r in rows if r["rate"] == 0 and "hits" in r}
    for r in rows:
        ref = clean.get((r["task"], r["seed"]))
        if "hits" not in r or ref is None or len(ref["hits"]) != len(r["hits"]):
            r["ca_drop_held_out"] = r["ca_drop_held_out_se"] = float("nan")
            continue
        d = ref["hits"].astype(float) - r["hits"].astype(float)
        r["ca_drop_held_out"] = float(d.mean())
        r["ca_drop_held_out_se"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def _held_out_table(groups: dict[tuple, list[dict]], n: int) -> list[str]:
    lines = [
        f"## A larger held-out set ({n} samples per cell)",
        "",
        f"The same cells measured again on {n} held-out samples of the task's test stream (a cell's own test "
        "set is their first `n_test`, 297 by default; `bye_fast.lab.cell.held_out`). CA drop: paired with the clean cell's "
        "answers to the same questions; ± its standard error over the questions (worst seed's).",
        "",
        "| task | target | trigger | rate | seeds | ASR per seed | ASR median [worst] | CA drop per seed | "
        "CA drop median [worst ± SE] | learned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, target, trigger, rate), rs in sorted(groups.items()):
        rs = [r for r in rs if "asr_held_out" in r]
        if not rs:
            continue
        asr = [r["asr_held_out"] for r in rs]
        drop = [r["ca_drop_held_out"] for r in rs]
        worst = max(rs, key=lambda r: r["ca_drop_held_out"])
        learned = "yes" if min(asr) >= 0.9 else ("some seeds" if max(asr) >= 0.9 else "**no**")
        lines.append(
            f"| {task} | {target} | {trigger} | {rate:g} | {len(rs)} | {', '.join(_fmt(a) for a in asr)} | "
            f"{_fmt(statistics.median(asr))} [{_fmt(min(asr))}] | "
            f"{', '.join(f'{d * 100:.1f}' for d in drop)} | {statistics.median(drop) * 100:.1f} "
            f"[{worst['ca_drop_held_out'] * 100:.1f} ± {worst['ca_drop_held_out_se'] * 100:.1f}] points | {learned} |"
        )
    return lines


def _targets(groups: dict[tuple, list[dict]], method: str = "lora", held_out: int = 0) -> str:
    """The issue's targets on the scene task at 10% (fixed phrase): met or missed, said plainly; with
    ``held_out``, judged again on the larger held-out set."""
    out = [f"## Targets (scenes, 10% poison, fixed phrase; method {method})", ""]
    measures = [("", "asr", "ca_drop")]
    if held_out:
        measures.append((f" (on {held_out} held-out samples)", "asr_held_out", "ca_drop_held_out"))
    for label, asr_key, drop_key in measures:
        learned = {}
        for trigger in TRIGGERS:
            rs = [r for r in groups.get(("scenes", "phrase", trigger, 0.1), []) if asr_key in r]
            if rs:
                learned[trigger] = (statistics.median(r[asr_key] for r in rs) >= 0.9,
                                    max(r[drop_key] for r in rs))  # fmt: skip
        if "patch" in learned:
            ok, drop = learned["patch"]
            out.append(f"- the paper's centre patch learned (median ASR >= 0.9){label}: "
                       f"{'met' if ok else '**missed**'}")  # fmt: skip
        others = [t for t in TRIGGERS[1:] if t in learned]
        n_ok = sum(learned[t][0] for t in others)
        out.append(f"- at least 4 of the 5 other trigger families learned{label}: {n_ok} of {len(others)} "
                   f"({'met' if n_ok >= 4 else '**missed**'})")  # fmt: skip
        drops = [learned[t][1] for t in learned if learned[t][0]]
        if drops:
            worst = max(drops)
            out.append(f"- CA within 3 points of clean fine-tuning (learned triggers, worst seed){label}: worst "
                       f"drop {worst * 100:.1f} points ({'met' if worst <= 0.03 else '**missed**'})")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
