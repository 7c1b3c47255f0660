"""Detection benchmark: triggers x poison rates x seeds x detection options, on the demo task.

    python benchmarks/detection.py                       # the full sweep (long: see --help)
    python benchmarks/detection.py --triggers checkerboard --rates 0.1 --seeds 0   # one cell

For each (trigger, rate, seed) cell: poison the user data, fine-tune the
pre-trained tiny LLaVA on it (CA/ASR before) and score once with
``bye_fast.score`` (kept under ``--work``: a later run reuses the cell and only
detects again; ``--prepare-only`` stops there); then run ``bye_fast.detect``
with every option in ``OPTIONS`` and, for the DEFAULT option, retrain from the
pre-trained model on the kept data (CA/ASR after). Each cell also records the
label-using ceiling of one-feature cuts (``feature_ceiling``). Cells run in
``--workers`` processes with one torch thread each; pre-trained models are
cached per seed.

Writes benchmarks/results/detection.csv (one row per cell x option) and
detection.md (the targets, then every cell; naming the machine).
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

#: The detection options compared on every cell (``bye_fast.detect`` keyword arguments).
OPTIONS: list[dict] = [
    {"features": "layers", "flag": "lower"},  # the paper
    {"features": "layers", "flag": "minority"},
    {"features": "heads", "flag": "lower"},
    {"features": "heads", "flag": "minority"},
]
#: The option whose cleaned data is retrained on (CA/ASR after): ``detect``'s defaults.
DEFAULT: dict = OPTIONS[0]


def option_name(opts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in opts.items()) or "default"


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def cell_fingerprint(trigger: str) -> str:
    """A hash of what a prepared cell depends on: the trigger preset and the code of bye_fast."""
    import hashlib

    from bye_fast.demo.pipeline import DEMO_TRIGGERS

    h = hashlib.sha256(json.dumps(DEMO_TRIGGERS[trigger], sort_keys=True).encode())
    for path in sorted((HERE.parent / "bye_fast").rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cell_setup(trigger: str, seed: int, cache: str):
    """The seed's tasks, its cached pre-trained model and processor, and the trigger function."""
    from bye_fast.demo.pipeline import demo_trigger
    from bye_fast.demo.tasks import build_tasks
    from bye_fast.demo.train import pretrained_model

    tasks = build_tasks(seed)
    base, processor = pretrained_model(tasks.pretrain, seed=seed, cache_dir=cache, progress=False)
    return tasks, base, processor, demo_trigger(trigger)


def prepare_cell(trigger: str, rate: float, seed: int, work: str, cache: str) -> Path:
    """Poison, fine-tune (CA/ASR before) and score one cell; the results are kept in its folder.

    The folder holds ``train.json``, ``images/``, ``scores.npz``, ``truth.npy`` and
    ``before.json``; a folder that already has them is reused (fine-tuning is
    deterministic for a seed and a thread count), so detection options can be compared
    on the same scores without training again -- unless the trigger preset or the code
    that made it (``cell_fingerprint``) changed since, then the cell is made again.
    """
    import numpy as np
    import torch

    import bye_fast
    from bye_fast._io import write_json_atomic
    from bye_fast.attacks import poison_dataset
    from bye_fast.data import make_loader
    from bye_fast.demo.tasks import TARGET
    from bye_fast.demo.train import copy_model, evaluate, finetune

    torch.set_num_threads(1)
    folder = Path(work) / f"{trigger}-{rate}-{seed}"
    fingerprint = cell_fingerprint(trigger)
    if (folder / "before.json").exists():  # written last
        if json.loads((folder / "before.json").read_text()).get("fingerprint") == fingerprint:
            return folder
        print(f"{folder.name}: made by other code or another preset; making it again", flush=True)
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tasks, base, processor, trig = _cell_setup(trigger, seed, cache)
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
    scores.save(folder / "scores.npz")
    np.save(folder / "truth.npy", np.asarray(poisoned.is_poisoned, dtype=bool))
    write_json_atomic(folder / "before.json", {
        "ca": before["ca"], "asr": before["asr"], "score_s": round(t_score, 2),
        "prepare_s": round(time.perf_counter() - t0, 1), "fingerprint": fingerprint,
    })  # fmt: skip
    return folder


def run_cell(trigger: str, rate: float, seed: int, work: str, cache: str, retrain: bool = True) -> list[dict]:
    """Every detection option on one prepared cell; for the default, retrain on the kept data."""
    import numpy as np
    import torch

    import bye_fast
    from bye_fast.demo.pipeline import detection_metrics, feature_ceiling, linear_ceiling
    from bye_fast.demo.train import copy_model, evaluate, finetune

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    folder = prepare_cell(trigger, rate, seed, work, cache)
    scores = bye_fast.Scores.load(folder / "scores.npz")
    truth = np.load(folder / "truth.npy")
    before = json.loads((folder / "before.json").read_text())
    records = json.loads((folder / "train.json").read_text())
    n = len(truth)
    ceil_l = feature_ceiling(truth, scores.entropy)
    ceil_h = feature_ceiling(truth, scores.head_entropy.reshape(n, -1))
    ceilings = {  # label-using ceilings of single features: what any one-feature cut could reach
        "ceil_layer_auroc": ceil_l["ceiling_auroc"], "ceil_layer_dir": ceil_l["ceiling_direction"],
        "ceil_layer_f1": ceil_l["ceiling_f1"], "ceil_head_auroc": ceil_h["ceiling_auroc"],
        "ceil_head_f1": ceil_h["ceiling_f1"],
        "ceil_linear_f1": linear_ceiling(truth, np.concatenate([scores.entropy, scores.head_entropy.reshape(n, -1)], 1)),
    }  # fmt: skip
    rows = []
    for opts in OPTIONS:
        t = time.perf_counter()
        det = bye_fast.detect(scores, **opts)
        t_detect = time.perf_counter() - t
        m = detection_metrics(truth, det.flagged, det.suspicious_score)
        row = {
            "trigger": trigger, "rate": rate, "seed": seed, "option": option_name(opts),
            "n_poisoned": int(truth.sum()), "ca_before": before["ca"], "asr_before": before["asr"],
            "n_sensitive": len(det.sensitive_features), **m,
            "score_s": before["score_s"], "detect_s": round(t_detect, 3), **ceilings,
        }  # fmt: skip
        if opts == DEFAULT and retrain:
            if det.n_flagged:
                tasks, base, processor, trig = _cell_setup(trigger, seed, cache)
                kept = [r for r, f in zip(records, det.flagged, strict=True) if not f]
                clean = copy_model(base)
                finetune(clean, kept, folder / "images", processor=processor, seed=seed, progress=False)
                after = evaluate(clean, tasks.test, processor=processor, trigger=trig)
            else:
                after = before  # nothing removed: the same data, the same model
            row.update(ca_after=after["ca"], asr_after=after["asr"])
        rows.append(row)
    for r in rows:
        r["cell_s"] = round(time.perf_counter() - t0 + before["prepare_s"], 1)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--triggers",
        nargs="*",
        default=["checkerboard", "white_corner", "wanet", "patch", "random_patch", "blended", "sig"],
    )
    p.add_argument("--rates", type=float, nargs="*", default=[0.0, 0.05, 0.1, 0.2])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument(
        "--cells", nargs="*", default=None, help="explicit TRIGGER:RATE:SEED cells (replace the grid)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--prepare-only", action="store_true",
        help="only poison, fine-tune and score the cells (kept under --work for later runs)",
    )  # fmt: skip
    p.add_argument("--no-retrain", action="store_true", help="skip the retraining on the kept data")
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
        # clean data (rate 0) does not depend on the trigger: one clean cell per seed, under the first trigger
        cells = [(t, r, s) for t in args.triggers for r in args.rates for s in args.seeds
                 if r > 0 or t == args.triggers[0]]  # fmt: skip
    for seed in sorted({c[2] for c in cells}):  # pre-train once per seed, before the workers share the cache
        pretrained_model(build_tasks(seed).pretrain, seed=seed, cache_dir=cache, progress=False)
    rows: list[dict] = _read_csv(args.append) if args.append else []
    stem = "detection" + (f"_{args.tag}" if args.tag else "")
    with ProcessPoolExecutor(args.workers, initializer=_init_worker) as pool:
        if args.prepare_only:
            for fut in [pool.submit(prepare_cell, t, r, s, args.work, cache) for t, r, s in cells]:
                print(fut.result(), flush=True)
            return
        futures = {pool.submit(run_cell, t, r, s, args.work, cache, not args.no_retrain): (t, r, s)
                   for t, r, s in cells}  # fmt: skip
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
        return [{k: (v if k in ("trigger", "option", "error", "ceil_layer_dir") else parse(v)) for k, v in r.items() if v != ""}
                for r in csv.DictReader(f)]  # fmt: skip


#: The issue's targets for the default option (see the results file).
LEARNED_ASR = 0.9  # a cell counts as "the model learned the backdoor" when ASR before >= this
TARGET_F1, TARGET_ASR_AFTER, TARGET_CLEAN_REMOVED = 0.95, 0.02, 0.01


def targets(rows: list[dict]) -> list[dict]:
    """The default option against the targets: 10% poison on learned cells (per seed), and clean data."""
    import numpy as np

    default = option_name(DEFAULT)
    rows = [r for r in rows if "error" not in r and r["option"] == default]
    out = []
    learned = [r for r in rows if r["rate"] == 0.1 and r["asr_before"] >= LEARNED_ASR]
    for trig in sorted({r["trigger"] for r in learned}):
        rs = [r for r in learned if r["trigger"] == trig]
        f1 = [r["f1"] for r in rs]
        asr = [r["asr_after"] for r in rs if "asr_after" in r]
        out.append({
            "cells": f"{trig} 10%, learned seeds {[r['seed'] for r in rs]}",
            "F1 by seed": " / ".join(f"{v:.2f}" for v in f1),
            "ASR after by seed": " / ".join(f"{v:.2f}" for v in asr),
            "ceiling F1 by seed (layer, head, linear)": " / ".join(
                f"{r['ceil_layer_f1']:.2f}, {r['ceil_head_f1']:.2f}, {r['ceil_linear_f1']:.2f}" for r in rs),
            f"F1 >= {TARGET_F1}": "met" if min(f1) >= TARGET_F1 else "**missed**",
            f"ASR after <= {TARGET_ASR_AFTER:.0%}": ("met" if max(asr) <= TARGET_ASR_AFTER else "**missed**") if asr else "not measured",
        })  # fmt: skip
    clean = [r for r in rows if r["rate"] == 0.0]
    if clean:
        removed = [r["removed_fraction"] for r in clean]
        out.append({
            "cells": f"clean data, seeds {[r['seed'] for r in clean]}",
            "F1 by seed": "", "ASR after by seed": "", "ceiling F1 by seed (layer, head, linear)": "",
            f"F1 >= {TARGET_F1}": "removed " + " / ".join(f"{v:.1%}" for v in removed),
            f"ASR after <= {TARGET_ASR_AFTER:.0%}": f"<= {TARGET_CLEAN_REMOVED:.0%} removed: "
            + ("met" if max(removed) <= TARGET_CLEAN_REMOVED else "**missed**"),
        })  # fmt: skip
    del np
    return out


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
        groups.setdefault((r["trigger"], r["rate"], r["option"]), []).append(r)
    table = []
    default = option_name(DEFAULT)
    for (trig, rate, option), rs in groups.items():

        def mean(k, rs=rs):
            vals = [x[k] for x in rs if k in x and x[k] == x[k]]
            return float(np.mean(vals)) if vals else float("nan")

        table.append({
            "trigger": trig, "rate": rate, "option": option, "seeds": len(rs),
            "ASR before": mean("asr_before"), "CA before": mean("ca_before"),
            "P": mean("precision"), "R": mean("recall"), "F1": mean("f1"),
            "AUROC(low)": mean("auroc_low_is_poisoned"), "removed": mean("removed_fraction"),
            "ASR after": mean("asr_after") if option == default else "",
            "CA after": mean("ca_after") if option == default else "",
            "ceil F1 layer": mean("ceil_layer_f1"), "ceil F1 head": mean("ceil_head_f1"),
            "ceil F1 linear": mean("ceil_linear_f1"),
            "cell s": mean("cell_s"),
        })  # fmt: skip
    table.sort(key=lambda r: (r["trigger"], r["rate"], r["option"] != default, r["option"]))
    cols_md = list(table[0]) if table else []
    tgt = targets(rows)
    command = "python benchmarks/detection.py " + (
        f"--cells {' '.join(args.cells)}"
        if args.cells
        else f"--triggers {' '.join(args.triggers)} --rates "
        f"{' '.join(map(str, args.rates))} --seeds {' '.join(map(str, args.seeds))}"
    )
    text = [
        "# Detection benchmark (built-in digits task, tiny LLaVA)",
        "",
        f"Machine: {describe()}; {args.workers} worker process(es), 1 torch thread each.",
        "",
        "Command" + (f" (adding to the rows of {Path(args.append).name})" if args.append else "") + ":",
        "",
        f"```bash\n{command}\n```",
        "",
        "What the numbers mean, which cells chose what, and what was tried and not adopted: "
        "[detection_analysis.md](detection_analysis.md).",
        "",
        f"## Targets (default option: `{default}`)",
        "",
        f"A cell counts when the model learned the backdoor (ASR before >= {LEARNED_ASR}).",
        "",
        markdown_table(tgt, list(tgt[0])) if tgt else "(no cell of the targets ran)",
        "",
        "## Every cell",
        "",
        "Means over seeds. ASR/CA after cleaning are measured for the default option "
        f"({default}) only: one retraining per cell. Ceilings use the ground truth and are not "
        "detectors: `ceil F1 layer/head` is the best F1 that ONE feature (a layer's head-mean "
        "entropy / one head's entropy) reaches at its best threshold; `ceil F1 linear` is a "
        "supervised logistic regression on all layer and head entropies (5-fold out-of-fold "
        "probabilities, best threshold).",
        "",
        markdown_table(table, cols_md),
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
