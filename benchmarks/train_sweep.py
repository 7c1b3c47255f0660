"""Measure which triggers the demo's tiny LLaVA actually learns (CA / ASR per epoch).

For each trigger preset: poison the demo's user data at ``--rate``, fine-tune a
copy of the pre-trained model, evaluate clean accuracy (CA) and attack success
rate (ASR) on the held-out set after every epoch, and optionally re-fine-tune
from the same pre-trained weights on the truly clean samples only (the best a
detector can do) to time the whole demo.

    OMP_NUM_THREADS=1 python benchmarks/train_sweep.py --presets checker8_corner blended \\
        --rate 0.1 --epochs 10 --refit --json out/sweep.jsonl

Prints a markdown table; one JSON line per run goes to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bye_fast.attacks import make_trigger, poison_dataset
from bye_fast.demo import TARGET, build_tasks, copy_model, evaluate, finetune, pretrained_model

#: preset name -> (trigger name, parameters)
PRESETS: dict[str, tuple[str, dict]] = {
    "paper_patch": ("solid_patch", {}),  # 2x2 black square at the centre
    "black4_center": ("solid_patch", {"size": 4}),
    "white4_center": ("solid_patch", {"size": 4, "color": 1.0}),
    "white8_center": ("solid_patch", {"size": 8, "color": 1.0}),
    "grey8_center": ("solid_patch", {"size": 8, "color": 0.5}),
    "white4_corner": ("solid_patch", {"size": 4, "color": 1.0, "position": "corner"}),
    "white8_corner": ("solid_patch", {"size": 8, "color": 1.0, "position": "corner"}),
    "checker4_corner": ("checkerboard_patch", {"size": 4}),
    "checker8_corner": ("checkerboard_patch", {"size": 8}),
    "checker8_center": ("checkerboard_patch", {"size": 8, "position": "center"}),
    "random_white4": ("random_position_patch", {"size": 4, "color": 1.0}),
    "random_white8": ("random_position_patch", {"size": 8, "color": 1.0}),
    "random_black8": ("random_position_patch", {"size": 8}),
    "blended": ("blended", {"alpha": 0.2}),
    "blended10": ("blended", {"alpha": 0.1}),
    "blended_block4": ("blended", {"alpha": 0.2, "block": 4}),
    "wanet": ("wanet", {}),  # WaNet defaults s=0.5, k=4: sub-pixel
    "wanet2": ("wanet", {"strength": 2.0}),
    "wanet4": ("wanet", {"strength": 4.0}),
    "wanet6": ("wanet", {"strength": 6.0}),
    "sig": ("sig", {}),
    "sig02": ("sig", {"amplitude": 0.2}),
}


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} thread(s)), "
        f"transformers {transformers.__version__}, numpy {np.__version__}, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["checker8_corner"], choices=sorted(PRESETS))
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--schedule", default="linear")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="cache the pre-trained model here")
    ap.add_argument("--refit", action="store_true", help="also re-fine-tune on the clean samples only")
    ap.add_argument("--json", default=None, help="append one JSON line per run")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"machine: {machine()}")
    tasks = build_tasks(args.seed)
    t0 = time.perf_counter()
    base, processor = pretrained_model(
        tasks.pretrain, seed=args.seed, cache_dir=args.cache_dir, epochs=args.pretrain_epochs, progress=False
    )
    t_pre = time.perf_counter() - t0
    base_ca = evaluate(base, tasks.test.as_task("base"))["ca"]
    print(f"pretrain: {t_pre:.1f} s, base-task accuracy {base_ca:.3f}")
    print(
        "| preset | trigger | rate | epochs | CA | ASR | per-epoch ASR | finetune s | clean refit CA/ASR/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ft_options = dict(  # the same fine-tuning for the poisoned run and the clean refit
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        schedule=args.schedule,
        seed=args.seed,
        progress=False,
    )
    for name in args.presets:
        trig_name, params = PRESETS[name]
        trigger = make_trigger(trig_name, **params)
        with tempfile.TemporaryDirectory() as tmp:
            res = poison_dataset(
                tasks.user.records,
                tasks.user.images,
                trigger,
                args.rate,
                TARGET,
                args.seed,
                Path(tmp) / "img",
            )
            model = copy_model(base)
            curve: list[dict] = []
            t_eval = 0.0

            def on_epoch(epoch: int, loss: float, model=model, curve=curve, trigger=trigger) -> None:
                nonlocal t_eval
                t = time.perf_counter()
                curve.append(
                    {"epoch": epoch + 1, "loss": loss, **evaluate(model, tasks.test, trigger=trigger)}
                )
                t_eval += time.perf_counter() - t

            t1 = time.perf_counter()
            finetune(model, res.records, res.image_folder, on_epoch=on_epoch, **ft_options)
            t_ft = time.perf_counter() - t1 - t_eval
            row = {
                "preset": name,
                "trigger": repr(trigger),
                "rate": args.rate,
                "epochs": args.epochs,
                "lr": args.lr,
                "schedule": args.schedule,
                "seed": args.seed,
                "ca": curve[-1]["ca"],
                "asr": curve[-1]["asr"],
                "curve": curve,
                "pretrain_s": t_pre,
                "finetune_s": t_ft,
                "base_ca": base_ca,
            }
            refit = ""
            if args.refit:
                clean = [r for r, p in zip(res.records, res.is_poisoned, strict=True) if not p]
                model2 = copy_model(base)
                t2 = time.perf_counter()
                finetune(model2, clean, res.image_folder, **ft_options)
                t_re = time.perf_counter() - t2
                ev = evaluate(model2, tasks.test, trigger=trigger)
                row.update(refit_ca=ev["ca"], refit_asr=ev["asr"], refit_s=t_re)
                refit = f"{ev['ca']:.3f} / {ev['asr']:.3f} / {t_re:.0f}"
        per_epoch = " ".join(f"{c['asr']:.2f}" for c in curve)
        print(
            f"| {name} | {trigger!r} | {args.rate} | {args.epochs} | {row['ca']:.3f} | {row['asr']:.3f} "
            f"| {per_epoch} | {t_ft:.0f} | {refit} |",
            flush=True,
        )
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
