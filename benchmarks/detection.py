"""Detection benchmark: triggers x poison rates x seeds x detection options, on the demo task.

    python benchmarks/detection.py                       # the full sweep (long: see --help)
    python benchmarks/detection.py --triggers checkerboard --rates 0.1 --seeds 0   # one cell

For each (trigger, rate, seed) cell: poison the user data, fine-tune the
pre-trained tiny LLaVA on it (CA/ASR before), score once with
``bye_fast.score``, run ``bye_fast.detect`` with every option combination
(features x flag), and for the DEFAULT option retrain from the pre-trained
model on the kept data (CA/ASR after). Cells run in ``--workers`` processes
with one torch thread each; pre-trained models are cached per seed.

Writes benchmarks/results/detection.csv (one row per cell x option) and
detection.md (tables naming the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

OPTIONS = [  # (features, flag)
    ("layers", "lower"),  # the paper
    ("layers", "minority"),
    ("heads", "lower"),
    ("heads", "minority"),
]
DEFAULT = ("layers", "lower")


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_cell(trigger: str, rate: float, seed: int, work: str, cache: str) -> list[dict]:
    import numpy as np
    import torch

    import bye_fast
    from bye_fast.attacks import make_trigger, poison_dataset
    from bye_fast.data import make_loader
    from bye_fast.demo.pipeline import DEMO_TRIGGERS, detection_metrics
    from bye_fast.demo.tasks import TARGET, build_tasks
    from bye_fast.demo.train import copy_model, evaluate, finetune, pretrained_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    folder = Path(work) / f"{trigger}-{rate}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = build_tasks(seed)
    base, processor = pretrained_model(tasks.pretrain, seed=seed, cache_dir=cache, progress=False)
    params = dict(DEMO_TRIGGERS[trigger])
    trig = make_trigger(params.pop("name"), **params)
    poisoned = poison_dataset(
        tasks.user.records, tasks.user.images, trig, rate, TARGET, seed, folder / "images"
    )
    model = copy_model(base)
    finetune(model, poisoned.records, folder / "images", processor=processor, seed=seed, progress=False)
    before = evaluate(model, tasks.test, processor=processor, trigger=trig)
    (folder / "train.json").write_text(json.dumps(poisoned.records))
    t_score = time.perf_counter()
    scores = bye_fast.score(model, make_loader(folder / "train.json", folder / "images", processor, batch_size=32),
                            progress=False)  # fmt: skip
    t_score = time.perf_counter() - t_score
    truth = poisoned.is_poisoned
    rows = []
    for features, flag in OPTIONS:
        t = time.perf_counter()
        det = bye_fast.detect(scores, features=features, flag=flag)
        t_detect = time.perf_counter() - t
        m = detection_metrics(truth, det.flagged, det.suspicious_score)
        row = {
            "trigger": trigger, "rate": rate, "seed": seed, "features": features, "flag": flag,
            "n_poisoned": int(truth.sum()), "ca_before": before["ca"], "asr_before": before["asr"],
            "n_sensitive": len(det.sensitive_features), **m,
            "score_s": round(t_score, 2), "detect_s": round(t_detect, 3),
        }  # fmt: skip
        if (features, flag) == DEFAULT:
            if det.n_flagged:
                kept = [r for r, f in zip(poisoned.records, det.flagged, strict=True) if not f]
                clean = copy_model(base)
                finetune(clean, kept, folder / "images", processor=processor, seed=seed, progress=False)
                after = evaluate(clean, tasks.test, processor=processor, trigger=trig)
            else:
                after = before  # nothing removed: the same data, the same model
            row.update(ca_after=after["ca"], asr_after=after["asr"])
        rows.append(row)
    for r in rows:
        r["cell_s"] = round(time.perf_counter() - t0, 1)
    del np
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--triggers", nargs="*", default=["checkerboard", "patch", "random_patch", "blended", "wanet", "sig"]
    )
    p.add_argument("--rates", type=float, nargs="*", default=[0.0, 0.05, 0.1, 0.2])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument(
        "--cells", nargs="*", default=None, help="explicit TRIGGER:RATE:SEED cells (replace the grid)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="/tmp/bye_fast_detection_bench")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="")
    p.add_argument(
        "--append", default=None, help="a previous results CSV whose rows are kept (cells are added)"
    )
    args = p.parse_args()

    from bye_fast.demo.tasks import build_tasks
    from bye_fast.demo.train import pretrained_model

    cache = str(Path(args.work) / "cache")
    if args.cells:
        cells = [(c.split(":")[0], float(c.split(":")[1]), int(c.split(":")[2])) for c in args.cells]
    else:
        cells = [(t, r, s) for t in args.triggers for r in args.rates for s in args.seeds]
    for seed in sorted({c[2] for c in cells}):  # pre-train once per seed, before the workers share the cache
        pretrained_model(build_tasks(seed).pretrain, seed=seed, cache_dir=cache, progress=False)
    rows: list[dict] = _read_csv(args.append) if args.append else []
    stem = "detection" + (f"_{args.tag}" if args.tag else "")
    with ProcessPoolExecutor(args.workers, initializer=_init_worker) as pool:
        futures = {pool.submit(run_cell, t, r, s, args.work, cache): (t, r, s) for t, r, s in cells}
        for fut in futures:
            t, r, s = futures[fut]
            try:
                got = fut.result()
            except Exception as err:  # a failing cell is recorded, the sweep goes on
                got = [{"trigger": t, "rate": r, "seed": s, "error": repr(err)}]
            rows.extend(got)
            print(json.dumps(got[0]), flush=True)
            write(rows, args, stem)


def _read_csv(path: str) -> list[dict]:
    def parse(v: str):
        if v == "":
            return v
        try:
            return float(v) if any(c in v for c in ".en") or v.lower() == "nan" else int(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: (v if k in ("trigger", "features", "flag", "error") else parse(v)) for k, v in r.items() if v != ""}
                for r in csv.DictReader(f)]  # fmt: skip


def write(rows: list[dict], args, stem: str) -> None:
    import numpy as np
    from _machine import describe, markdown_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    # mean over seeds per (trigger, rate, option)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" in r:
            continue
        groups.setdefault((r["trigger"], r["rate"], r["features"], r["flag"]), []).append(r)
    table = []
    for (trig, rate, feat, flag), rs in groups.items():

        def mean(k, rs=rs):
            vals = [x[k] for x in rs if k in x and x[k] == x[k]]
            return float(np.mean(vals)) if vals else float("nan")

        table.append({
            "trigger": trig, "rate": rate, "features": feat, "flag": flag, "seeds": len(rs),
            "ASR before": mean("asr_before"), "CA before": mean("ca_before"),
            "P": mean("precision"), "R": mean("recall"), "F1": mean("f1"),
            "AUROC(low)": mean("auroc_low_is_poisoned"), "removed": mean("removed_fraction"),
            "ASR after": mean("asr_after") if (feat, flag) == DEFAULT else "",
            "CA after": mean("ca_after") if (feat, flag) == DEFAULT else "",
            "cell s": mean("cell_s"),
        })  # fmt: skip
    table.sort(key=lambda r: (r["trigger"], r["rate"], r["features"], r["flag"]))
    cols_md = list(table[0]) if table else []
    text = [
        "# Detection benchmark (built-in digits task, tiny LLaVA)",
        "",
        f"Machine: {describe()}; {args.workers} worker process(es), 1 torch thread each.",
        "",
        "Command"
        + (f" (adding to the rows of {Path(args.append).name})" if args.append else "")
        + ": `python benchmarks/detection.py "
        + (
            f"--cells {' '.join(args.cells)}"
            if args.cells
            else f"--triggers {' '.join(args.triggers)} --rates "
            f"{' '.join(map(str, args.rates))} --seeds {' '.join(map(str, args.seeds))}"
        )
        + "`",
        "",
        "Means over seeds. ASR/CA after cleaning are measured for the default option "
        f"(features={DEFAULT[0]}, flag={DEFAULT[1]}) only: one retraining per cell.",
        "",
        markdown_table(table, cols_md),
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
