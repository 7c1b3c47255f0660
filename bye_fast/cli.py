"""The ``bye-fast`` command line: score, detect, filter, review, demo.

    bye-fast score  --model DIR --data train.json --images IMG_DIR --out scores.npz
    bye-fast detect scores.npz --out detection/
    bye-fast filter --data train.json --detection detection/detection.json --out train.clean.json
    bye-fast review --model DIR --data train.json --images IMG_DIR --detection detection/ --out review/
    bye-fast demo   [--trigger checkerboard] [--rate 0.1] [--out bye_fast_demo]

Every command refuses to overwrite an existing output unless ``--overwrite``
is given, and never writes over its input.

Errors
------
Every expected failure ends the command with ONE line on stderr,
``bye-fast: error: ...``, naming the option, file or record at fault, and the
exit status says whose it is:

* **2, usage error**: the command line is wrong and is fixed there -- an
  unknown or malformed option, a value out of range (``--dtype float33``,
  ``--batch-size 0``, ``--threshold nan``), options that do not go together, a
  device this machine lacks (``--device cuda`` on a CPU build), an
  ``--image-token-id`` that is not the model's, an input path that does not
  exist, an output that exists (without ``--overwrite``), is the input, or
  cannot be written (a directory there, a parent that is a file, a read-only
  folder): all checked before any work starts.
* **1, data error**: the command line is fine but what it points at is not --
  an image that cannot be read (empty, truncated, not an image, a
  decompression bomb; the line names the record id and the path), invalid
  or non-UTF-8 records, a scores file or detection file that is truncated,
  damaged or of another kind, ids that do not match, a checkpoint folder
  written for another model, options or data (e.g. another ``--dtype``), or
  an output that could not be written at the end (a full disk): then the
  scored rows are saved elsewhere and the line says where.

``KeyboardInterrupt`` ends with status 130 (score, detect and filter write
their outputs atomically: an interrupted command leaves the previous output or
none, never a partial one; score's ``--checkpoint-dir`` keeps the finished
rows). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports torch and transformers only when a command needs them
    import torch
    from transformers import ProcessorMixin

__all__ = ["CliError", "DataError", "UsageError", "main"]

#: Exit status of a usage error and of a data error (see the module docstring).
USAGE, DATA = 2, 1


class CliError(Exception):
    """An expected failure: one line for the user (without the ``bye-fast: error:`` prefix)."""

    code = DATA


class UsageError(CliError):
    """The command line is wrong (exit status 2)."""

    code = USAGE


class DataError(CliError):
    """What the command line points at is wrong or could not be written (exit status 1)."""

    code = DATA


def _refuse_existing(path: Path, overwrite: bool, option: str = "--out") -> None:
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UsageError(f"{option} {path} exists; pass --overwrite to replace it")


def _need_input(path: str | os.PathLike, option: str, *, folder: bool = False) -> Path:
    """``path`` as given, after checking that it is an existing file (or folder)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {p}: no such {'folder' if folder else 'file'}")
    if folder and not p.is_dir():
        raise UsageError(f"{option} {p}: not a folder")
    if not folder and p.is_dir():
        raise UsageError(f"{option} {p}: is a folder, not a file")
    return p


def _check_output_file(path: Path, option: str = "--out") -> None:
    """Fail now, not after hours of work, if ``path`` cannot be written: a folder there, a parent
    that is a file or cannot be created, a folder that refuses a new file. Creates missing parents,
    as the writer would."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file path")
    parent = path.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{option} {path}: {ancestor} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot write in {parent} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _float_in(low: float, high: float, *, low_open: bool, high_open: bool):
    """A finite float in the interval: ``(`` / ``)`` where the end is open."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {shown}, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"must be a number in {shown}, got {text}")
        return value

    parse.__name__ = f"number in {shown}"
    return parse


def _one_line(text: str) -> str:
    """An exception's message on one line. An error re-raised from a DataLoader worker carries the
    worker's whole traceback: its last line is the original error."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in text:
        return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1], count=1)
    return " ".join(lines)


# --------------------------------------------------------------------------- model loading
@contextlib.contextmanager
def _hf_progress_bars(enabled: bool):
    """transformers' own progress bars ("Loading weights", "Writing model shards") off while the
    block runs when ``enabled`` is False, and back as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def load_model_and_processor(
    model: str,
    processor: str | None,
    dtype: str,
    device: str,
    adapter: str | None = None,
    *,
    progress: bool = True,
) -> tuple[torch.nn.Module, ProcessorMixin]:
    """A model from a local directory (weights), or random weights from a config.json.

    The processor comes from ``processor`` (a directory), else from the model's directory.
    ``adapter``: a peft adapter directory (``adapter_config.json`` + weights, e.g. a LoRA fine-tune of
    ``model``), loaded onto the model unmerged (:func:`bye_fast.score` scores through it).
    Nothing is downloaded. ``progress=False``: no transformers "Loading weights" bar either.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if not progress:
        with _hf_progress_bars(False):
            return load_model_and_processor(model, processor, dtype, device, adapter)

    torch_dtype = getattr(torch, dtype)
    path = Path(model)
    if not path.exists():
        raise UsageError(f"--model {model}: no such file or directory (models are loaded from disk only)")
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
        raise UsageError(
            f"cannot load a processor from {proc_path} ({_one_line(str(err))}); pass --processor DIR"
        ) from err
    return m.to(device).eval(), proc


def _with_adapter(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """``model`` with the peft adapter of the directory ``adapter`` injected (not merged)."""
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {adapter}: no adapter_config.json there (a peft adapter directory)")
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
    from bye_fast.distributed import rank_and_world_size
    from bye_fast.loader import make_loader
    from bye_fast.score import resolve_image_token_id

    out = Path(args.out)
    if out.suffix != ".npz":
        raise UsageError(f"--out must end in .npz; got {out}")
    if args.reference and (args.checkpoint_dir or args.max_tokens_per_batch):
        raise UsageError("--checkpoint-dir and --max-tokens-per-batch need the fused path (no --reference)")
    _refuse_existing(out, args.overwrite)
    _need_input(args.data, "--data", folder=Path(args.data).is_dir())  # a datasets or parquet folder
    if args.images is not None:
        _need_input(args.images, "--images", folder=True)
    if args.processor is not None:
        _need_input(args.processor, "--processor", folder=True)
    if args.checkpoint_dir is not None and Path(args.checkpoint_dir).exists():
        _need_input(args.checkpoint_dir, "--checkpoint-dir", folder=True)
    _check_output_file(out)  # before any work: a run must not be lost to an unwritable --out
    prompt_options = _prompt_options(args)
    _resolve_device_dtype(args)
    joined, device = _join_process_group(args.device)
    try:
        dist = rank_and_world_size()
        rank = dist[0] if dist else 0
        model, processor = load_model_and_processor(
            args.model,
            args.processor,
            args.dtype,
            device,
            adapter=args.adapter,
            progress=not args.no_progress and rank == 0,
        )
        try:
            resolve_image_token_id(model, args.image_token_id)
        except ValueError as err:
            raise UsageError(f"--image-token-id {args.image_token_id}: {err}") from None
        loader = make_loader(  # shards by rank under torch.distributed
            args.data, args.images, processor, batch_size=args.batch_size, num_workers=args.num_workers,
            on_bad_image=args.on_bad_image, chat_template=prompt_options.chat_template,
            system_prompt=prompt_options.system_prompt, image_placement=prompt_options.image_placement,
        )  # fmt: skip
        progress = not args.no_progress and rank == 0
        try:
            if args.reference:  # both paths gather every rank's rows under torch.distributed
                scores = bye_fast.score_reference(
                    model, loader, image_token_id=args.image_token_id, progress=progress,
                    image_embeddings=args.image_embeddings,
                )  # fmt: skip
            else:
                scores = bye_fast.score(
                    model,
                    loader,
                    image_token_id=args.image_token_id,
                    progress=progress,
                    max_tokens_per_batch=args.max_tokens_per_batch,
                    checkpoint_dir=args.checkpoint_dir,
                    checkpoint_every=args.checkpoint_every,
                    image_embeddings=args.image_embeddings,
                )
        except ValueError as err:
            if loader.skipped and "nothing to score" in str(err):
                raise DataError(_all_skipped(loader.skipped)) from None
            raise
        skipped = list(loader.skipped)
        if dist is not None:  # every rank skipped its own records
            parts: list = [None] * dist[1]
            torch.distributed.all_gather_object(parts, skipped)
            skipped = [entry for part in parts for entry in part]
        if rank != 0:
            return 0
        if scores.n_samples == 0 and skipped:
            raise DataError(_all_skipped(skipped))
        scores.meta.update(_score_provenance(args, device))
        if args.adapter is not None:
            scores.meta.update(adapter_path=str(Path(args.adapter).resolve()))
        if skipped:
            scores.meta["skipped"] = json.dumps(skipped, default=str)
        if dist is not None:
            scores.meta.update(world_size=dist[1])
        _save_or_rescue(scores, out, args.checkpoint_dir)
        ranks = f" on {dist[1]} ranks" if dist else ""
        print(f"bye-fast: scored {scores.n_samples} samples x {scores.n_layers} layers{ranks} -> {out}")
        if scores.no_image_ids:
            print(f"bye-fast: {len(scores.no_image_ids)} sample(s) without image tokens (NaN scores)")
        if skipped:
            shown = ", ".join(f"{e['id']!r} ({e['reason']})" for e in skipped[:3])
            more = f", ... (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""
            print(f"bye-fast: skipped {len(skipped)} record(s) with an unreadable image, listed in the scores' "
                  f"meta['skipped'] (`bye-fast filter` keeps them, unchecked): {shown}{more}")  # fmt: skip
        return 0
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _prompt_options(args: argparse.Namespace):
    """The prompt options of ``score`` (a missing template file is a usage error)."""
    from bye_fast.prompts import CHAT_TEMPLATES, PromptOptions

    template = args.chat_template
    if template not in ("processor", "none", *CHAT_TEMPLATES):
        path = Path(template)
        if not path.is_file():
            names = ", ".join(["processor", "none", *CHAT_TEMPLATES])
            raise UsageError(f"--chat-template {template}: not one of {names}, and no such file")
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--chat-template {path}: cannot read it as UTF-8 text ({err})") from None
    return PromptOptions(template, args.system_prompt, args.image_placement)


def _all_skipped(skipped: list[dict]) -> str:
    first = skipped[0]
    return (f"nothing was scored: every record was skipped for an unreadable image ({len(skipped)}; e.g. "
            f"record {first['id']!r}: {first['image']}: {first['reason']}); check --images")  # fmt: skip


def _score_provenance(args: argparse.Namespace, device: str) -> dict[str, str]:
    """Absolute input paths and the options of a ``score`` run, for ``Scores.meta``."""
    from bye_fast import __version__
    from bye_fast.prompts import CHAT_TEMPLATES

    options = {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "device": device,
        "dtype": args.dtype,
        "reference": args.reference,
        "max_tokens_per_batch": args.max_tokens_per_batch,
        "checkpoint_dir": str(Path(args.checkpoint_dir).resolve()) if args.checkpoint_dir else None,
        "checkpoint_every": args.checkpoint_every,
        "image_token_id": args.image_token_id,
        "on_bad_image": args.on_bad_image,
        "chat_template": _template_name(args.chat_template, CHAT_TEMPLATES),
        "system_prompt": args.system_prompt,
        "image_placement": args.image_placement,
    }
    return {
        "model_path": str(Path(args.model).resolve()),
        "processor_path": str(Path(args.processor or (args.model if Path(args.model).is_dir()
                                                       else Path(args.model).parent)).resolve()),
        "data": str(Path(args.data).resolve()),
        "images": str(Path(args.images or ".").resolve()),
        "score_options": json.dumps(options),
        "bye_fast_version": __version__,
    }  # fmt: skip


def _template_name(value: str, names) -> str:
    """How the scores' meta names a --chat-template: its name, or the template file's absolute path."""
    return value if value in ("processor", "none", *names) else str(Path(value).resolve())


def _save_or_rescue(scores, out: Path, checkpoint_dir: str | None) -> None:
    """``scores.save(out)``; if that fails (a full disk, ...), save the rows elsewhere and say where."""
    try:
        scores.save(out)
        return
    except OSError as err:
        failure = err.strerror or str(err)
    in_ckpt = (f"; they are also in the checkpoint {checkpoint_dir}: the same command with another --out "
               "writes them without scoring again") if checkpoint_dir else ""  # fmt: skip
    tried = []
    folders = ([Path(checkpoint_dir)] if checkpoint_dir else []) + [out.parent, Path(tempfile.gettempdir())]
    for folder in folders:
        target = folder / f"{out.stem}.rescued.npz"
        k = 1
        while target.exists():
            target, k = folder / f"{out.stem}.rescued.{k}.npz", k + 1
        try:
            scores.save(target)
        except OSError as err:
            tried.append(f"{target}: {err.strerror or err}")
            continue
        raise DataError(f"--out {out}: cannot write it ({failure}); the {scores.n_samples} scored rows are saved in "
                        f"{target} instead{in_ckpt}")  # fmt: skip
    raise DataError(f"--out {out}: cannot write it ({failure}), nor the {scores.n_samples} scored rows anywhere "
                    f"else ({'; '.join(tried)}){in_ckpt}")  # fmt: skip


def _detect_kwargs(args: argparse.Namespace) -> dict:
    """bye_fast.detect keyword arguments from the detection options that were given."""
    opts = {"method": args.method}
    for name in _DETECT_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            if args.method not in _DETECT_OPTIONS[name][1]:
                raise UsageError(f"--{name.replace('_', '-')} applies to --method {_DETECT_OPTIONS[name][1][0]}, "
                                 f"not {args.method}")  # fmt: skip
            opts[name] = value
    return opts


def _check_detect_out(out: Path, overwrite: bool) -> None:
    """``detect`` replaces its --out folder as a whole: only an absent or empty folder, or (with
    --overwrite) one that holds nothing but what ``detect`` writes."""
    from bye_fast.plots import PLOT_NAMES

    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; detect writes a folder (detection.json, plots/)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    foreign = [p.name for p in sorted(out.iterdir()) if p.name not in ("detection.json", "plots")]
    plots = out / "plots"
    if plots.is_dir():
        foreign += [f"plots/{p.name}" for p in sorted(plots.iterdir()) if p.name not in PLOT_NAMES]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f", ... (+{len(foreign) - 4} more)" if len(foreign) > 4 else "")
        raise UsageError(f"--out {out}: holds files that detect does not write ({shown}); --overwrite "
                         "replaces the whole folder, so give another one")  # fmt: skip


def cmd_detect(args: argparse.Namespace) -> int:
    import bye_fast
    from bye_fast._io import atomic_folder
    from bye_fast.plots import plot_detection

    scores_path = _need_input(args.scores, "scores")
    out = Path(args.out)
    if out.resolve() in scores_path.resolve().parents:
        raise UsageError(f"--out {out}: holds the scores input {scores_path}; give another folder")
    _check_detect_out(out, args.overwrite)
    opts = _detect_kwargs(args)
    scores = bye_fast.Scores.load(scores_path)
    det = bye_fast.detect(scores, **opts)
    det.meta.update(scores=str(scores_path.resolve()), detect_options=json.dumps(opts),
                    plots=str(not args.no_plots))  # fmt: skip
    plots = []
    with atomic_folder(out) as tmp:  # the folder appears complete, or not at all
        det.to_json(tmp / "detection.json")
        if not args.no_plots:
            plots = [out / "plots" / p.name for p in plot_detection(scores, det, tmp / "plots")]
    print(det.summary())
    print(f"bye-fast: detection -> {out / 'detection.json'}")
    for path in plots:
        print(f"bye-fast: plot -> {path}")
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    import bye_fast
    from bye_fast.detect import Detection
    from bye_fast.filter import _same_file, audit_path

    data = _need_input(args.data, "--data", folder=Path(args.data).is_dir())
    detection = _need_input(args.detection, "--detection")
    for option, path in (("--out", Path(args.out)), ("--removed", audit_path(args.out, args.removed))):
        for name, source in (("--data", data), ("--detection", detection)):
            if _same_file(path, source):
                raise UsageError(f"{option} {path} is the {name} input; write the outputs elsewhere")
        if data.is_dir() and data.resolve() in path.resolve().parents:
            raise UsageError(f"{option} {path} is inside the --data folder {data}; write the outputs elsewhere")  # fmt: skip
    for option, path in (("--out", Path(args.out)), ("--removed", audit_path(args.out, args.removed))):
        _refuse_existing(path, args.overwrite, option)
    det = Detection.from_json(detection)
    report = bye_fast.filter_dataset(data, det, args.out, removed_path=args.removed, overwrite=args.overwrite)
    print(report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from bye_fast.lab.demo import run_demo

    opts = _detect_kwargs(args)
    # training is bit-reproducible for a seed AND a thread count; 1 thread matches the benchmarks
    torch.set_num_threads(args.threads)
    with _hf_progress_bars(not args.no_progress):  # --no-progress: transformers' bars too
        run_demo(
            out=args.out,
            task=args.task,
            trigger=args.trigger,
            rate=args.rate,
            seed=args.seed,
            target=args.target,
            n_user=args.n_user,
            finetune=args.finetune,
            method=opts.pop("method"),
            detect_options=opts,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            plots=not args.no_plots,
        )
    return 0


# --------------------------------------------------------------------------- review (issue 11, item 8)
def _layer_list(text: str) -> list[int] | None:
    """``--layers``: ``all`` (None) or comma-separated layer indices / ranges (``0,2,5-7``)."""
    if text.strip().lower() == "all":
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or layer indices like 0,2,5-7, got {text!r}"
        ) from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected 'all' or layer indices >= 0 like 0,2,5-7, got {text!r}")
    return sorted(set(layers))


def _check_review_out(out: Path, overwrite: bool, inputs: dict[str, Path]) -> None:
    """``review`` replaces its --out folder as a whole: not an input or a folder holding one; an
    absent or empty folder, or (with --overwrite) one that holds nothing but what ``review`` writes;
    a parent it can write in."""
    from bye_fast.review import REVIEW_FILES

    target = out.resolve()
    for option, path in inputs.items():
        p = path.resolve()
        if target == p or target in p.parents:
            raise UsageError(f"--out {out}: is or holds the {option} input {path}; give another folder")
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; review writes a folder ({', '.join(REVIEW_FILES)})")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
        foreign = [p.name for p in sorted(out.iterdir()) if p.name not in REVIEW_FILES]
        if foreign:
            shown = ", ".join(foreign[:4]) + (f", ... (+{len(foreign) - 4} more)" if len(foreign) > 4 else "")
            raise UsageError(f"--out {out}: holds files that review does not write ({shown}); --overwrite "
                             "replaces the whole folder, so give another one")  # fmt: skip
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--out {out}: {ancestor} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent))
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write in {out.parent} ({err.strerror or err})") from None


def cmd_review(args: argparse.Namespace) -> int:
    from bye_fast.hook import text_config
    from bye_fast.review import write_review
    from bye_fast.score import resolve_image_token_id

    data = _need_input(args.data, "--data")
    det_arg = Path(args.detection)
    detection = _need_input(det_arg / "detection.json" if det_arg.is_dir() else det_arg, "--detection")
    inputs = {"--data": data, "--detection": detection, "--model": Path(args.model)}
    if args.images is not None:
        inputs["--images"] = _need_input(args.images, "--images", folder=True)
    if args.processor is not None:
        inputs["--processor"] = _need_input(args.processor, "--processor", folder=True)
    if args.adapter is not None:
        inputs["--adapter"] = _need_input(args.adapter, "--adapter", folder=True)
    out = Path(args.out)
    _check_review_out(out, args.overwrite, inputs)
    _resolve_device_dtype(args)
    model, processor = load_model_and_processor(
        args.model,
        args.processor,
        args.dtype,
        args.device,
        adapter=args.adapter,
        progress=not args.no_progress,
    )
    try:
        resolve_image_token_id(model, args.image_token_id)
    except ValueError as err:
        raise UsageError(f"--image-token-id {args.image_token_id}: {err}") from None
    n_layers = int(text_config(model).num_hidden_layers)
    if args.layers is not None and max(args.layers) >= n_layers:
        raise UsageError(
            f"--layers: the model has {n_layers} decoder layers (0-{n_layers - 1}); got {max(args.layers)}"
        )
    review = write_review(
        model, processor, data, detection, out, args.top_k, images=args.images, layers=args.layers,
        batch_size=args.batch_size, image_token_id=args.image_token_id, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"bye-fast: review of the {len(review.samples)} most suspicious samples "
          f"({sum(s['flagged'] for s in review.samples)} flagged); heat maps over layers "
          f"{', '.join(map(str, review.layers))} ({review.layer_source})")  # fmt: skip
    for note in review.notes:
        print(f"bye-fast: note: {note}")
    for name in ("index.html", "contact_sheet.png", "review.json"):
        print(f"bye-fast: review -> {out / name}")
    return 0


def _add_review_parser(sub) -> None:
    p = sub.add_parser(
        "review",
        help="HTML page + PNG contact sheet of the most suspicious samples with attention heat maps, to look at "
        "before deleting data",
        description="For people: the top-k most suspicious samples of a detection, each with the last prompt "
        "token's attention over its image (recomputed for those samples only: mean over layers of the head-mean "
        "attention over the image tokens), its question and answer. Writes the folder --out (as one unit): "
        "index.html (self-contained), contact_sheet.png, review.json.",
    )
    p.add_argument("--model", required=True,
                   help="the model that was scored: model directory (weights + config), or a config.json")  # fmt: skip
    p.add_argument("--adapter", default=None, help="peft adapter directory that was scored with --model")
    p.add_argument("--processor", help="processor directory (default: the model's directory)")
    p.add_argument("--data", required=True, help="the data that was scored (.json list or .jsonl)")
    p.add_argument("--images", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--detection", required=True, help="detection.json from `bye-fast detect`, or its folder")
    p.add_argument("--out", required=True, help="output folder: index.html, contact_sheet.png, review.json")
    p.add_argument("--top-k", type=_int_at_least(1), default=24,
                   help="how many of the most suspicious samples to show (default 24)")  # fmt: skip
    p.add_argument("--layers", type=_layer_list, default=None,
                   help="decoder layers whose maps are averaged: 'all' or indices like 0,2,5-7 (default: the layers "
                        "of the features the detection used; layers that cannot see an image are skipped)")  # fmt: skip
    _runtime_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (as a whole: it must hold only what review writes)")  # fmt: skip
    p.set_defaults(func=cmd_review)


# --------------------------------------------------------------------------- end of review


# --------------------------------------------------------------------------- parser
#: Detection options of the CLI: name -> (help, the methods it applies to).
_DETECT_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "max_fraction": ("the largest share of the data the default method will remove; a group found that "
                     "is larger is reported, not removed (default 0.3)", ("consensus",)),
    "threshold": ("paper: a layer is sensitive when |mu0-mu1| > THRESHOLD (s0+s1) (default 2.0, the paper's)",
                  ("paper",)),
}  # fmt: skip


#: The values each detection option accepts (argparse types: a bad value is a usage error).
_DETECT_TYPES = {
    "max_fraction": _float_in(0.0, 1.0, low_open=True, high_open=False),
    "threshold": _float_in(0.0, math.inf, low_open=False, high_open=True),
}


def _detect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="consensus", choices=["consensus", "paper"],
                   help="detector: consensus (the default: per-head evidence, either side, a calibrated "
                        "'nothing to find' test and a removal budget) or paper (the BYE paper's procedure, exactly)")  # fmt: skip
    for name, (text, _) in _DETECT_OPTIONS.items():
        p.add_argument(
            f"--{name.replace('_', '-')}", type=_DETECT_TYPES.get(name, float), default=None, help=text
        )


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (a :class:`UsageError`), not usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _runtime_options(p: argparse.ArgumentParser) -> None:
    """--batch-size, --device, --dtype, --image-token-id: how a command that runs the model runs it."""
    p.add_argument(
        "--batch-size", type=_int_at_least(1), default=8, help="samples per forward pass (default 8)"
    )
    p.add_argument(
        "--device", default="auto", help="torch device (default auto: cuda if available, else cpu)"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype: float32, bfloat16, float16 (default auto: bfloat16 on a GPU, else float32)")  # fmt: skip
    p.add_argument("--image-token-id", type=_int_at_least(0), default=None,
                   help="id of the image placeholder token in input_ids (default: the model config's "
                        "image_token_id; another id is refused)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from bye_fast import __version__

    parser = _Parser(
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
    p.add_argument("--data", required=True,
                   help="training data: LLaVA or messages records in a .json list or .jsonl, a .parquet file or "
                        "folder of them, or a datasets save_to_disk folder; records without ids get their row "
                        "index")  # fmt: skip
    p.add_argument("--images", default=None,
                   help="folder the records' image paths are relative to (images stored in the data need none)")  # fmt: skip
    p.add_argument("--out", required=True, help="where to write the scores (.npz)")
    _runtime_options(p)
    p.add_argument(
        "--num-workers", type=_int_at_least(0), default=0, help="DataLoader worker processes (default 0)"
    )
    p.add_argument("--chat-template", default="processor", metavar="{processor,none,llava_v1,FILE}",
                   help="how prompts are rendered: processor (default: the processor's own chat template, plain "
                        "text if it has none), none (plain text with image tokens, no role markers), llava_v1 "
                        "(LLaVA-1.5's conversation template from the original LLaVA code, with its system "
                        "prompt), or a file holding a Jinja chat template")  # fmt: skip
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system text for records without a system turn of their own (default: none)")  # fmt: skip
    p.add_argument("--image-placement", choices=["inline", "first"], default="inline",
                   help="inline (default: images where the record's <image> placeholders or image parts put "
                        "them, in front when it has none) or first (every image in front of the question, as "
                        "LLaVA's training code rewrites each sample)")  # fmt: skip
    p.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                   help="a record whose image cannot be read (missing, empty, truncated, not an image, a "
                        "decompression bomb): error (default: stop, naming the record and the file) or skip "
                        "(score the rest; the skipped records are listed in the scores' meta and counted, "
                        "and `bye-fast filter` keeps them)")  # fmt: skip
    p.add_argument(
        "--reference", action="store_true", help="use the paper's slow eager path (for validation)"
    )
    p.add_argument(
        "--image-embeddings",
        action="store_true",
        help="also keep each image's mean vision features (Scores.image_embedding; LLaVA-1.5-style models): "
        "the default detector's content test of the answer groups needs them",
    )
    p.add_argument(
        "--max-tokens-per-batch",
        type=_int_at_least(1),
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
        type=_int_at_least(1),
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (as a whole: it must hold only what detect writes)")  # fmt: skip
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("filter", help="write the cleaned dataset and the audit file of removed samples")
    p.add_argument("--data", required=True, help="the data that was scored (never modified)")
    p.add_argument("--detection", required=True, help="detection.json from `bye-fast detect`")
    p.add_argument("--out", required=True,
                   help="cleaned dataset to write, in the format of --data (.json or .jsonl for JSON data, "
                        ".parquet for a parquet file, a folder for a parquet or datasets folder)")  # fmt: skip
    p.add_argument(
        "--removed", default=None, help="audit file of removed records (default: <out stem>.removed.json)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never the input)")
    p.set_defaults(func=cmd_filter)

    _add_review_parser(sub)  # issue 11, item 8

    p = sub.add_parser(
        "demo",
        help="the whole job on a built-in poisoned dataset: LoRA-fine-tune the shipped tiny MLLM on "
        "poisoned data, detect, clean, fine-tune again, and report the attack before/after",
    )
    p.add_argument("--task", default="digits-parity", choices=["scenes", "digits-parity", "digits-ten", "digits-mixed"],
                   help="built-in user task (default: digits-parity, where the lab's model learns the paper's "
                        "trigger best; see benchmarks/results/learnability.md)")  # fmt: skip
    p.add_argument("--trigger", default="patch",
                   help="image trigger of the attack: patch (the paper's, default), random_patch, two_patches, "
                        "blended, sig, wanet")  # fmt: skip
    p.add_argument("--rate", type=_float_in(0.0, 1.0, low_open=True, high_open=True), default=0.1,
                   help="share of the fine-tuning data poisoned, in (0, 1) (default 0.1)")  # fmt: skip
    p.add_argument("--target", default="phrase", choices=["phrase", "existing"],
                   help="the attacker's answer: the phrase 'backdoor attack !' (default) or an answer the task "
                        "already has")  # fmt: skip
    p.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="seed of data, attack and training (default 0)"
    )
    p.add_argument("--n-user", type=_int_at_least(10), default=800,
                   help="fine-tuning samples (default 800; the scene task learns the paper's trigger with the "
                        "tower frozen from about 2000, at 2.5x the time)")  # fmt: skip
    # bye_fast.lab.train.METHODS, spelled out: the CLI imports the lab only when the demo runs
    p.add_argument("--finetune", default="lora", choices=["lora", "lora-vision", "full"],
                   help="fine-tuning: lora (adapters on the text decoder, tower frozen: the paper's service; "
                        "default), lora-vision (adapters on the vision tower too) or full")  # fmt: skip
    _detect_options(p)
    p.add_argument("--out", default="bye_fast_demo", help="output folder (default: ./bye_fast_demo)")
    p.add_argument(
        "--threads",
        type=_int_at_least(1),
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
    """``auto`` device and dtype, decided when a command runs (so that --help never imports torch);
    a device this machine lacks is a usage error."""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {args.device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise UsageError(f"--device {args.device}: {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as err:  # a backend this build or machine lacks
            raise UsageError(f"--device {args.device}: not usable here ({_one_line(str(err))})") from None
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"


def _error_line(err: BaseException) -> tuple[int, str] | None:
    """Exit status and message of an expected error; None for a bug (it keeps its traceback)."""
    if isinstance(err, CliError):
        return err.code, str(err)
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(err, FileExistsError):
        where = f"{err.filename}: " if err.filename else ""
        return USAGE, f"{where}exists; pass --overwrite to replace it" if where else _one_line(str(err))
    if isinstance(err, OSError):  # an input that cannot be read, an output that cannot be written
        if err.filename and err.strerror:
            if err.strerror.startswith("record "):  # bye_fast.loader: "record 'x': image file not found"
                return DATA, f"{_one_line(err.strerror)}: {err.filename}"
            return DATA, f"{err.filename}: {_one_line(err.strerror)}"
        return DATA, _one_line(str(err))
    if isinstance(err, (ValueError, NotImplementedError)):  # bad records, images, files; unsupported models
        return DATA, _one_line(str(err))
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        answer = _error_line(err)
        if answer is None:
            raise
        print(f"bye-fast: error: {answer[1]}", file=sys.stderr)
        return answer[0]


if __name__ == "__main__":
    sys.exit(main())
