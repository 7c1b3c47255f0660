"""Pre-train the lab's base model and write the weights that ship with the package.

    python benchmarks/pretrain_base.py                      # the committed weights (seed 0)
    python benchmarks/pretrain_base.py --out /tmp/base.safetensors --scenes 2000 --epochs 2   # a quick try

Trains :data:`bye_fast.lab.models.BASE_MODEL` from random weights (seed
``--seed``) in two stages, as MLLMs are built: (1) the vision tower alone on
dense and global targets (:func:`bye_fast.lab.train.pretrain_vision`: per-patch
colour and shape; the objects, their positions, the count, the texture, the
digit), (2) projector and text decoder, vision tower frozen, on
:func:`bye_fast.lab.tasks.pretraining_split` (scene QA of five question types,
digit recognition, "say" samples). Then measures held-out accuracy per
question type on scenes and digits the model never saw and on the three user
tasks before any fine-tuning. Writes the
weights (safetensors), ``<out>.json`` (architecture, vocabulary, the command,
the accuracies) and ``benchmarks/results/base_model.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402

from bye_fast.lab.models import WEIGHTS_DIR, build_base_model, save_base_model  # noqa: E402
from bye_fast.lab.tasks import (  # noqa: E402
    PRETRAIN_QUESTION_TYPES,
    TASKS,
    Split,
    build_task,
    pretraining_split,
    vision_pretraining_data,
)
from bye_fast.lab.train import _encode_records, evaluate, fit, pretrain_vision  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def held_out(n_scenes: int) -> Split:
    """Scenes and digits the pre-training never saw, with the pre-training question types."""
    from bye_fast.lab import tasks as T
    from bye_fast.lab.digits import load_digits
    from bye_fast.lab.scenes import scene_samples

    images, qa, _ = scene_samples(900_000, n_scenes, PRETRAIN_QUESTION_TYPES, load_digits()[0])
    scenes = Split(T._records([x[1:] for x in qa], "held"), images, [x[0] for x in qa], "pretrain")
    _, rest = T._digit_index(0)
    digits = T._digit_split("digit", rest[:300], 901, "held-digit")
    import numpy as np

    return Split(
        scenes.records + digits.records,
        np.concatenate([scenes.images, digits.images]),
        scenes.qtypes + ["digit"] * len(digits),
        "pretrain",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR / "base.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=16000, help="scene questions (default 16000)")
    ap.add_argument("--say", type=int, default=1500, help='"say" samples (default 1500)')
    ap.add_argument("--digit-repeats", type=int, default=3)
    ap.add_argument(
        "--vision-scenes", type=int, default=8000, help="scenes of the vision stage (default 8000)"
    )
    ap.add_argument("--vision-epochs", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=12, help="epochs of the QA stage (default 12)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--eval-every", type=int, default=4, help="held-out accuracy every N epochs (0: at the end)"
    )
    ap.add_argument("--squares", type=float, default=0.0,
                    help="share of the vision stage's images that also get solid squares (default 0: the shipped weights)")
    ap.add_argument("--no-results", action="store_true", help="do not write benchmarks/results/base_model.md")
    args = ap.parse_args(argv)
    if args.squares and args.out == WEIGHTS_DIR / "base.safetensors":
        ap.error("--squares is an experiment: give --out (the shipped weights are made without squares)")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, processor = build_base_model(seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    images, targets = vision_pretraining_data(
        args.vision_scenes, seed=args.seed, digit_repeats=args.digit_repeats, squares=args.squares
    )
    print(f"vision stage on {len(images)} images", flush=True)
    vision_losses = pretrain_vision(
        model, processor, images, targets, epochs=args.vision_epochs, seed=args.seed
    )
    print(json.dumps({"vision_losses": [round(x, 4) for x in vision_losses],
                      "seconds": round(time.perf_counter() - t0)}), flush=True)  # fmt: skip
    del images, targets
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    split = pretraining_split(args.scenes, args.say, seed=args.seed, digit_repeats=args.digit_repeats)
    test = held_out(400)
    print(f"QA stage on {len(split)} samples, {n_params} parameters", flush=True)
    curve = []

    def on_epoch(epoch: int, loss: float) -> None:
        row = {"epoch": epoch + 1, "loss": round(loss, 4), "seconds": round(time.perf_counter() - t0)}
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            row["held_out_acc"] = round(evaluate(model, test, processor=processor)["ca"], 4)
        curve.append(row)
        print(json.dumps(row), flush=True)

    enc = _encode_records(processor, split.images, split.records)
    fit(
        model, enc, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        schedule="cosine", warmup=0.03, vision_frozen=True, desc="pretrain QA", on_epoch=on_epoch,
    )  # fmt: skip
    train_seconds = time.perf_counter() - t0
    acc = evaluate(model, test, processor=processor)
    # the user tasks before fine-tuning (the base model has never seen these questions)
    zero_shot = {name: evaluate(model, build_task(name, 0, n_user=0, n_test=300).test, processor=processor)["ca"]
                 for name in TASKS}  # fmt: skip
    command = "python benchmarks/pretrain_base.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {
        "command": command.strip(),
        "seed": args.seed,
        "vision_losses": [round(x, 4) for x in vision_losses],
        "pretraining": {"samples": len(split), "scenes": args.scenes, "say": args.say,
                        "vision_scenes": args.vision_scenes, "vision_epochs": args.vision_epochs,
                        "squares": args.squares,
                        "digit_repeats": args.digit_repeats, "epochs": args.epochs, "lr": args.lr,
                        "batch_size": args.batch_size, "threads": args.threads},
        "held_out_accuracy": round(acc["ca"], 4),
        "held_out_accuracy_by_type": {k: round(v, 4) for k, v in acc["ca_by_type"].items()},
        "user_tasks_before_finetuning": {k: round(v, 4) for k, v in zero_shot.items()},
        "train_seconds": round(train_seconds),
        "machine": describe(),
        "parameters": n_params,
        "curve": curve,
    }  # fmt: skip
    path = save_base_model(model, processor, args.out, info)
    print(json.dumps({k: v for k, v in info.items() if k != "curve"}, indent=1))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if not args.no_results:
        _write_results(info, path)
    return 0


def _write_results(info: dict, path: Path) -> None:
    rows = "\n".join(f"| {k} | {v:.1%} |" for k, v in info["held_out_accuracy_by_type"].items())
    zero = "\n".join(f"| {k} | {v:.1%} |" for k, v in info["user_tasks_before_finetuning"].items())
    curve = "\n".join(
        f"| {r['epoch']} | {r['loss']:.4f} | {r.get('held_out_acc', float('nan')):.1%} | {r['seconds']} |"
        for r in info["curve"]
    )
    text = f"""# The lab's base model

`{info["command"]}` -> `{path.relative_to(Path(__file__).resolve().parents[1]) if path.is_relative_to(Path(__file__).resolve().parents[1]) else path}`
({info["parameters"]:,} parameters; {info["train_seconds"]} s of training on {info["machine"]}).

Stage 1, vision tower alone: {info["pretraining"].get("vision_scenes", "?")} scenes and the pre-training digits,
{info["pretraining"].get("vision_epochs", "?")} epochs; targets per patch its colour, shape and pixels, per image the objects and their
positions, the count, the texture and the digit (epoch losses {", ".join(f"{x:.2f}" for x in info.get("vision_losses", []))}).

Stage 2, projector and text decoder (vision frozen): {info["pretraining"]["samples"]} samples ({info["pretraining"]["scenes"]} scene questions of the
types below, the 700 pre-training digits x {info["pretraining"]["digit_repeats"]} backgrounds, {info["pretraining"]["say"]} "say" samples),
{info["pretraining"]["epochs"]} epochs, AdamW {info["pretraining"]["lr"]} with cosine decay, batch {info["pretraining"]["batch_size"]}, seed {info["seed"]}.

## Held-out accuracy by question type (scenes and digits never seen in pre-training)

| question type | accuracy |
|---|---|
{rows}
| **all** | **{info["held_out_accuracy"]:.1%}** |

## The user tasks before any fine-tuning (questions the base model never saw)

| task | accuracy |
|---|---|
{zero}

## What it can and cannot do

Counting, digits and the positions of objects are learned; the questions that need binding a word of
the question to one object among several (the colour of the named shape, the shape of the named
colour, whether a given pair exists) stay near chance (chance: 1/6, 1/5, 1/2). A 6-layer text decoder
trained from scratch on 2 CPU cores does not learn to pick one object's image tokens by the question
within this budget; the user tasks and the backdoors do not need it (`learnability.md`).

Tried and dropped, in this order: (1) training everything end to end from random weights (2 x 20 min):
answers stayed at their priors, the text decoder never learned to read the image under 144 image
tokens of dilution; (2) a vision stage with dense and global targets but no pixel reconstruction:
scene QA 67%, but the frozen vision features lost low-level detail and the paper's black centre patch
was never learned on the digits (ASR 0 at 10% poison, also with 8 px aligned and 16 px squares). The
reconstruction target (each patch's pixels at a quarter of the resolution) made the same patch learned
(ASR 0.997 on digits-parity, seed 0).

## Training curve

| epoch | loss | held-out accuracy | seconds |
|---|---|---|---|
{curve}
"""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "base_model.md").write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
