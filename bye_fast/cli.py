"""The ``bye-fast`` command line: score, detect, filter, demo.

    bye-fast score  --model DIR --data train.json --images IMG_DIR --out scores.npz
    bye-fast detect scores.npz --out detection/
    bye-fast filter --data train.json --detection detection/detection.json --out train.clean.json
    bye-fast demo   [--trigger checkerboard] [--rate 0.1] [--out bye_fast_demo]

Every command refuses to overwrite an existing output unless ``--overwrite``
is given, and never writes over its input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports torch and transformers only when a command needs them
    import torch
    from transformers import ProcessorMixin

__all__ = ["main"]


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SystemExit(f"bye-fast: {path} exists; pass --overwrite to replace it")


# --------------------------------------------------------------------------- model loading
def load_model_and_processor(
    model: str, processor: str | None, dtype: str, device: str
) -> tuple[torch.nn.Module, ProcessorMixin]:
    """A model from a local directory (weights), or random weights from a config.json.

    The processor comes from ``processor`` (a directory), else from the model's directory.
    Nothing is downloaded.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    torch_dtype = getattr(torch, dtype)
    path = Path(model)
    if not path.exists():
        raise SystemExit(
            f"bye-fast: --model {model}: no such file or directory (models are loaded from disk only)"
        )
    has_weights = path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))
    if has_weights:
        m = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    else:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        print(
            f"bye-fast: {model} has no weights: building {cfg.model_type} with RANDOM weights",
            file=sys.stderr,
        )
        m = AutoModelForImageTextToText.from_config(cfg, dtype=torch_dtype)
    proc_path = Path(processor) if processor else (path if path.is_dir() else path.parent)
    try:
        proc = AutoProcessor.from_pretrained(proc_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"bye-fast: cannot load a processor from {proc_path} ({err}); pass --processor DIR"
        ) from err
    return m.to(device).eval(), proc


# --------------------------------------------------------------------------- commands
def _join_process_group(device: str) -> tuple[bool, str]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join the process group; return (joined here, device).

    ``--device cuda`` becomes ``cuda:$LOCAL_RANK`` (one GPU per process) with
    the NCCL backend; CPU runs use gloo.
    """
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if device == "cuda":
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend)
    return True, device


def cmd_score(args: argparse.Namespace) -> int:
    import torch

    import bye_fast
    from bye_fast.data import make_loader
    from bye_fast.distributed import rank_and_world_size

    out = Path(args.out)
    if out.suffix != ".npz":
        raise SystemExit(f"bye-fast score: --out must end in .npz; got {out}")
    if args.reference and (args.checkpoint_dir or args.max_tokens_per_batch):
        raise SystemExit(
            "bye-fast score: --checkpoint-dir and --max-tokens-per-batch need the fused path (no --reference)"
        )
    _refuse_existing(out, args.overwrite)
    joined, device = _join_process_group(args.device)
    try:
        dist = rank_and_world_size()
        rank = dist[0] if dist else 0
        model, processor = load_model_and_processor(args.model, args.processor, args.dtype, device)
        loader = make_loader(  # shards by rank under torch.distributed
            args.data, args.images, processor, batch_size=args.batch_size, num_workers=args.num_workers
        )
        progress = not args.no_progress and rank == 0
        if args.reference:  # both paths gather every rank's rows under torch.distributed
            scores = bye_fast.score_reference(model, loader, progress=progress)
        else:
            scores = bye_fast.score(
                model,
                loader,
                progress=progress,
                max_tokens_per_batch=args.max_tokens_per_batch,
                checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every,
            )
        if rank != 0:
            return 0
        scores.meta.update(model_path=str(args.model), data=str(args.data))
        if dist is not None:
            scores.meta.update(world_size=dist[1])
        scores.save(out)
        ranks = f" on {dist[1]} ranks" if dist else ""
        print(f"bye-fast: scored {scores.n_samples} samples x {scores.n_layers} layers{ranks} -> {out}")
        if scores.no_image_ids:
            print(f"bye-fast: {len(scores.no_image_ids)} sample(s) without image tokens (NaN scores)")
        return 0
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def cmd_detect(args: argparse.Namespace) -> int:
    import bye_fast
    from bye_fast.plots import PLOT_NAMES, plot_detection

    scores = bye_fast.Scores.load(args.scores)
    out = Path(args.out)
    det_path = out / "detection.json"
    _refuse_existing(det_path, args.overwrite)
    if not args.no_plots:
        for name in PLOT_NAMES:
            _refuse_existing(out / "plots" / name, args.overwrite)
    det = bye_fast.detect(
        scores, method=args.method, features=args.features, threshold=args.threshold, flag=args.flag
    )
    det.to_json(det_path)
    print(det.summary())
    print(f"bye-fast: detection -> {det_path}")
    if not args.no_plots:
        for p in plot_detection(scores, det, out / "plots"):
            print(f"bye-fast: plot -> {p}")
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    import bye_fast
    from bye_fast.data import _same_file, audit_path
    from bye_fast.detect import Detection

    for path in (Path(args.out), audit_path(args.out, args.removed)):
        if _same_file(path, Path(args.detection)):
            raise SystemExit(f"bye-fast: {path} is the --detection input; write the outputs elsewhere")
    det = Detection.from_json(args.detection)
    report = bye_fast.filter_dataset(
        args.data, det, args.out, removed_path=args.removed, overwrite=args.overwrite
    )
    print(report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from bye_fast.demo.pipeline import run_demo

    # training is bit-reproducible for a seed AND a thread count; 1 thread matches the benchmarks
    torch.set_num_threads(args.threads)

    run_demo(
        out=args.out,
        trigger=args.trigger,
        rate=args.rate,
        seed=args.seed,
        method=args.method,
        features=args.features,
        flag=args.flag,
        threshold=args.threshold,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0


# --------------------------------------------------------------------------- parser
def _detect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method", default="paper", choices=["paper"], help="detection procedure (default: paper)"
    )
    p.add_argument(
        "--features",
        default="layers",
        choices=["layers", "heads"],
        help="profile per layer (head-mean entropy, the paper's) or per layer and head (default: layers)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=1.0,
        help="a feature is sensitive when |mu1-mu2| / (2 (s1+s2)) exceeds this (default 1.0, the paper's rule)",
    )
    p.add_argument(
        "--flag",
        default="lower",
        choices=["lower", "minority"],
        help="flag the lower-mean cluster (paper: attention collapse) or the smaller one, on either side "
        "(default: lower)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bye-fast",
        description="Find and remove backdoor-poisoned samples from multimodal fine-tuning data "
        "(Believe Your Eyes, NeurIPS 2025), fast and in little memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "score",
        help="attention entropy of every sample (stage 1) -> scores .npz",
        description="Attention entropy of every sample (stage 1) -> scores .npz. "
        "Several GPUs: torchrun --nproc_per_node N -m bye_fast score ... (or torchrun ... $(which bye-fast) "
        "score ...): every rank scores its contiguous shard of --data on cuda:$LOCAL_RANK (NCCL; gloo with "
        "--device cpu), the rows are gathered in the original order, and only rank 0 writes --out. "
        "With --checkpoint-dir, a killed run rerun with the same arguments resumes where it stopped "
        "(each rank in its own subfolder rank<r>of<N>).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory (weights + config), or a config.json for random weights",
    )
    p.add_argument("--processor", help="processor directory (default: the model's directory)")
    p.add_argument("--data", required=True, help="LLaVA-format training data (.json list or .jsonl)")
    p.add_argument("--images", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="where to write the scores (.npz)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument(
        "--device", default="cuda" if _cuda() else "cpu", help="torch device (default: cuda if available)"
    )
    p.add_argument(
        "--dtype", default="bfloat16" if _cuda() else "float32", help="model dtype (default: bf16 on GPU)"
    )
    p.add_argument(
        "--reference", action="store_true", help="use the paper's slow eager path (for validation)"
    )
    p.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=None,
        help="cut batches into groups of at most this many rows x seq_len tokens (bounds memory for long "
        "image sequences; default: no cutting)",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="folder for resumable runs: finished rows are saved there, and a rerun with the same model, "
        "data and options skips them; a folder written for anything else is refused",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="with --checkpoint-dir: save the rows every this many batches (default 100)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (only rank 0 shows one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("detect", help="profile layers, cluster, flag (stages 2-3) -> detection.json + plots")
    p.add_argument("scores", help="scores .npz from `bye-fast score`")
    p.add_argument("--out", required=True, help="output folder: detection.json and plots/*.png")
    _detect_options(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--overwrite", action="store_true", help="replace an existing detection.json")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("filter", help="write the cleaned dataset and the audit file of removed samples")
    p.add_argument("--data", required=True, help="the LLaVA-format data that was scored (never modified)")
    p.add_argument("--detection", required=True, help="detection.json from `bye-fast detect`")
    p.add_argument("--out", required=True, help="cleaned dataset to write (.json or .jsonl)")
    p.add_argument(
        "--removed", default=None, help="audit file of removed records (default: <out stem>.removed.json)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never the input)")
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser(
        "demo",
        help="the whole job on a built-in poisoned dataset: train a tiny LLaVA with a backdoor, detect, "
        "clean, retrain, and report the attack before/after",
    )
    p.add_argument(
        "--trigger", default="checkerboard", help="image trigger of the attack (default: checkerboard)"
    )
    p.add_argument(
        "--rate", type=float, default=0.1, help="share of the fine-tuning data poisoned (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data, attack and training (default 0)")
    _detect_options(p)
    p.add_argument("--out", default="bye_fast_demo", help="output folder (default: ./bye_fast_demo)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: results are reproducible for a seed and a thread count, and "
        "1 thread reproduces the cells of benchmarks/results/detection.md)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="reuse an existing, non-empty --out folder")
    p.set_defaults(func=cmd_demo)
    return parser


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        print(f"bye-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
