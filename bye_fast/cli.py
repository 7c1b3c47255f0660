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
    model: str, processor: str | None, dtype: str, device: str, adapter: str | None = None
) -> tuple[torch.nn.Module, ProcessorMixin]:
    """A model from a local directory (weights), or random weights from a config.json.

    The processor comes from ``processor`` (a directory), else from the model's directory.
    ``adapter``: a peft adapter directory (``adapter_config.json`` + weights, e.g. a LoRA fine-tune of
    ``model``), loaded onto the model unmerged (:func:`bye_fast.score` scores through it).
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
    if adapter is not None:
        m = _with_adapter(m, Path(adapter))
    proc_path = Path(processor) if processor else (path if path.is_dir() else path.parent)
    try:
        proc = AutoProcessor.from_pretrained(proc_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"bye-fast: cannot load a processor from {proc_path} ({err}); pass --processor DIR"
        ) from err
    return m.to(device).eval(), proc


def _with_adapter(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """``model`` with the peft adapter of the directory ``adapter`` injected (not merged)."""
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"bye-fast: --adapter {adapter}: no adapter_config.json there (a peft adapter directory)")
    return PeftModel.from_pretrained(model, adapter, is_trainable=False, local_files_only=True)


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
    _resolve_device_dtype(args)
    joined, device = _join_process_group(args.device)
    try:
        dist = rank_and_world_size()
        rank = dist[0] if dist else 0
        model, processor = load_model_and_processor(
            args.model, args.processor, args.dtype, device, adapter=args.adapter
        )
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
        if args.adapter is not None:
            scores.meta.update(adapter_path=str(args.adapter))
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


def _detect_kwargs(args: argparse.Namespace) -> dict:
    """bye_fast.detect keyword arguments from the detection options that were given."""
    opts = {"method": args.method}
    for name in _DETECT_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            if args.method not in _DETECT_OPTIONS[name][1]:
                raise SystemExit(f"bye-fast: --{name.replace('_', '-')} applies to --method {_DETECT_OPTIONS[name][1][0]}, "
                                 f"not {args.method}")  # fmt: skip
            opts[name] = value
    return opts


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
    det = bye_fast.detect(scores, **_detect_kwargs(args))
    det.meta.update(scores=str(Path(args.scores).resolve()))
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

    from bye_fast.lab.demo import run_demo

    # training is bit-reproducible for a seed AND a thread count; 1 thread matches the benchmarks
    torch.set_num_threads(args.threads)
    opts = _detect_kwargs(args)
    run_demo(
        out=args.out,
        task=args.task,
        trigger=args.trigger,
        rate=args.rate,
        seed=args.seed,
        target=args.target,
        method=opts.pop("method"),
        detect_options=opts,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    return 0


# --------------------------------------------------------------------------- parser
#: Detection options of the CLI: name -> (help, the methods it applies to).
_DETECT_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "max_fraction": ("the largest share of the data the default method will remove; a group found that "
                     "is larger is reported, not removed (default 0.3)", ("consensus",)),
    "threshold": ("paper: a layer is sensitive when |mu0-mu1| > THRESHOLD (s0+s1) (default 2.0, the paper's)",
                  ("paper",)),
}  # fmt: skip


def _detect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="consensus", choices=["consensus", "paper"],
                   help="detector: consensus (the default: per-head evidence, either side, a calibrated "
                        "'nothing to find' test and a removal budget) or paper (the BYE paper's procedure, exactly)")  # fmt: skip
    for name, (text, _) in _DETECT_OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    from bye_fast import __version__

    parser = argparse.ArgumentParser(
        prog="bye-fast",
        description="Find and remove backdoor-poisoned samples from multimodal fine-tuning data "
        "(Believe Your Eyes, NeurIPS 2025), fast and in little memory.",
    )
    parser.add_argument("--version", action="version", version=f"bye-fast {__version__}")
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
    p.add_argument("--adapter", default=None,
                   help="peft adapter directory (e.g. the LoRA fine-tune being checked) to load onto --model")  # fmt: skip
    p.add_argument("--processor", help="processor directory (default: the model's directory)")
    p.add_argument("--data", required=True, help="LLaVA-format training data (.json list or .jsonl)")
    p.add_argument("--images", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="where to write the scores (.npz)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument(
        "--device", default="auto", help="torch device (default auto: cuda if available, else cpu)"
    )
    p.add_argument("--dtype", default="auto",
                   help="model dtype: float32, bfloat16, float16 (default auto: bfloat16 on a GPU, else float32)")  # fmt: skip
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
        help="the whole job on a built-in poisoned dataset: LoRA-fine-tune the shipped tiny MLLM on "
        "poisoned data, detect, clean, fine-tune again, and report the attack before/after",
    )
    p.add_argument("--task", default="scenes", choices=["scenes", "digits-parity", "digits-ten"],
                   help="built-in user task (default: scenes, six question types)")  # fmt: skip
    p.add_argument("--trigger", default="patch",
                   help="image trigger of the attack: patch (the paper's, default), random_patch, two_patches, "
                        "blended, sig, wanet")  # fmt: skip
    p.add_argument(
        "--rate", type=float, default=0.1, help="share of the fine-tuning data poisoned (default 0.1)"
    )
    p.add_argument("--target", default="phrase", choices=["phrase", "existing"],
                   help="the attacker's answer: the phrase 'backdoor attack !' (default) or an answer the task "
                        "already has")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of data, attack and training (default 0)")
    _detect_options(p)
    p.add_argument("--out", default="bye_fast_demo", help="output folder (default: ./bye_fast_demo)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: results are reproducible for a seed and a thread count, and "
        "1 thread reproduces the cells of benchmarks/results/detection.md)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="reuse an existing, non-empty --out folder")
    p.set_defaults(func=cmd_demo)
    return parser


def _resolve_device_dtype(args: argparse.Namespace) -> None:
    """``auto`` device and dtype, decided when a command runs (so that --help never imports torch)."""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        print(f"bye-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
