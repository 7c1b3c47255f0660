"""Why a backdoor is not learned: one cell fine-tuned with changed settings, fit vs. carry-over.

    python benchmarks/probe_learnability.py --task scenes --seed 2 --set epochs=24
    python benchmarks/probe_learnability.py --task scenes --seed 2 --set r=64 lora_alpha=128
    python benchmarks/probe_learnability.py --task scenes --seed 2 --set size=12
    python benchmarks/probe_learnability.py --task scenes --seed 2 --set color=0.88,0.14,0.14
    python benchmarks/probe_learnability.py --task scenes --seed 3 --rate 0.2 --set method=lora-vision
    python benchmarks/probe_learnability.py --task scenes --seed 2 --set n_user=2000

Poisons the user task as ``bye_fast.lab.cell`` does, fine-tunes the shipped base model with the
family's settings (``bye_fast.lab.cell.FINETUNE``) changed by ``--set`` (``epochs``, ``lr``,
``schedule``, ``batch_size``, ``method``; LoRA ``r``, ``lora_alpha``; the trigger's ``size`` and
``color`` for patch presets, one value or R,G,B on the [0, 1] scale; the user data's size
``n_user``), and measures three things: clean accuracy (CA), attack success on triggered held-out
images (ASR), and **train fit**: the share of the poisoned *training* samples answered with the
target. Train fit near 1 with a low ASR means the poisoned samples were memorised one by one, not
keyed on the trigger; train fit near 0 means the model could not tell them apart at all.

Appends one row to ``results/learnability_probes.csv`` and rewrites ``learnability_probes.md``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import describe, handwritten_notes, markdown_table, write_csv  # noqa: E402

COLUMNS = ["task", "trigger", "rate", "target", "seed", "changes", "ca", "asr", "train_fit", "seconds"]
LORA_KEYS = ("r", "lora_alpha")
FIT_KEYS = ("epochs", "lr", "schedule", "batch_size", "method")
TRIGGER_KEYS = ("size", "color")
TASK_KEYS = ("n_user",)


def _value(text: str):
    if "," in text:  # an RGB colour
        return tuple(float(x) for x in text.split(","))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def probe(task_name: str, trigger_name: str, rate: float, seed: int, target_kind: str, changes: dict,
          base: Path | None = None) -> dict:
    import torch

    from bye_fast.lab.attacks import PRESETS, make_trigger, poison_dataset
    from bye_fast.lab.cell import FINETUNE
    from bye_fast.lab.models import load_base_model
    from bye_fast.lab.tasks import TARGET, build_task, load_images, record_question
    from bye_fast.lab.train import answer_rate, evaluate, finetune

    unknown = set(changes) - {*LORA_KEYS, *FIT_KEYS, *TRIGGER_KEYS, *TASK_KEYS}
    if unknown:
        raise SystemExit(
            f"--set: unknown setting(s) {sorted(unknown)}; valid: {[*FIT_KEYS, *LORA_KEYS, *TRIGGER_KEYS, *TASK_KEYS]}"
        )
    params = dict(PRESETS[trigger_name])
    for key in TRIGGER_KEYS:
        if key in changes:
            if key not in params:
                raise SystemExit(f"--set {key}=...: trigger {trigger_name!r} has no {key}")
            params[key] = changes[key]
    trigger = make_trigger(params.pop("name"), **params)
    t0 = time.perf_counter()
    task = build_task(task_name, seed, **{k: v for k, v in changes.items() if k in TASK_KEYS})
    target = TARGET if target_kind == "phrase" else task.existing_target
    base_model, processor = load_base_model(base)
    opts = {**FINETUNE[task_name], **{k: v for k, v in changes.items() if k in FIT_KEYS}}
    lora = {k: v for k, v in changes.items() if k in LORA_KEYS}
    with tempfile.TemporaryDirectory() as tmp:
        poisoned = poison_dataset(task.user.records, task.user.images, trigger, rate, target, seed, Path(tmp))
        images = load_images(poisoned.records, Path(tmp))
    model = finetune(base_model, poisoned.records, images, processor=processor, seed=seed, progress=False,
                     lora=lora or None, **opts)  # fmt: skip
    res = evaluate(model, task.test, processor=processor, trigger=trigger, target=target)
    idx = [i for i, p in enumerate(poisoned.is_poisoned) if p]
    fit = answer_rate(model, images[idx], [record_question(poisoned.records[i]) for i in idx], target,
                      processor=processor)  # fmt: skip
    words = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in changes.items()]
    words += [f"base={base}"] if base is not None else []
    return {"task": task_name, "trigger": trigger_name, "rate": rate, "target": target_kind, "seed": seed,
            "changes": " ".join(words) or "(none)", "ca": round(res["ca"], 3),
            "asr": round(res["asr"], 3), "train_fit": round(fit, 3), "seconds": round(time.perf_counter() - t0),
            "threads": torch.get_num_threads()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="scenes")
    ap.add_argument("--trigger", default="patch")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--target", choices=["phrase", "existing"], default="phrase")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings to change")
    ap.add_argument("--base", type=Path, default=None,
                    help="base-model weights to fine-tune (default: the shipped ones; e.g. a pretrain_base.py --out)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "learnability_probes")
    args = ap.parse_args(argv)
    changes = {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set takes KEY=VALUE; got {item!r}")
        key, value = item.split("=", 1)
        changes[key] = _value(value)
    row = probe(args.task, args.trigger, args.rate, args.seed, args.target, changes, args.base)
    print(row, flush=True)
    csv_path = args.out.with_suffix(".csv")
    rows = list(csv.DictReader(open(csv_path))) if csv_path.exists() else []
    rows.append(row)
    write_csv(csv_path, rows, COLUMNS)
    md = args.out.with_suffix(".md")
    lines = ["# Learnability probes: one cell, settings changed, fit vs. carry-over", "",
             f"Last run on: {describe()}. Command per row: `python benchmarks/probe_learnability.py --task T "
             "--trigger G --rate R --seed S --set KEY=VALUE ...`. Train fit: share of the poisoned training samples "
             "answered with the target; ASR: the same on triggered held-out images.", "",
             markdown_table(rows, COLUMNS), *handwritten_notes(md)]  # fmt: skip
    md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
