"""Quantized and offloaded models: score vs score_reference, time and peak memory (a gpu_check.sh step).

    python benchmarks/check_quantized.py --out $OUT                # on the GPU: cpu-1b preset, bf16
    python benchmarks/check_quantized.py --cpu --out /tmp/q        # the dry run: tiny preset, fp32, CPU

A LLaVA-shaped random-weight model (bench_score.py's presets, q/k sharpened so attention is
not uniform) is saved once, then loaded back in each case:

  plain    the saved model as it is (bf16 on the GPU; fp32 on the CPU): the baseline row
  8bit     BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0}
  4bit     BitsAndBytesConfig(load_in_4bit=True, nf4, bf16 compute), device_map={"": 0}
  offload  device_map="auto" with max_memory forcing about half the weights off the GPU (to CPU
           memory); on the CPU, off CPU memory to an offload folder on disk (as tests/test_offload.py)

For each case: score and score_reference on the same few samples (one untimed warm-up batch each
first), the largest |score - reference| over the float Scores fields both return (and which
field), the share of equal greedy answer tokens, each path's time, and on CUDA the peak of
torch.cuda.max_memory_allocated during each path. A case that cannot run is recorded with why:
"skipped: needs CUDA" (quantized cases on the CPU), "bitsandbytes not installed", "accelerate not
installed", "OOM", "failed (...)"; a difference above --tol is "mismatch".

Results: <out>/check_quantized[_<tag>].csv and .md. Exit status 1 if any case failed or mismatched
(skipped and not-installed cases do not fail the run; they are in the table).
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

CASES = ("plain", "8bit", "4bit", "offload")
COLUMNS = [
    "case", "status", "max_abs_diff", "worst_field", "answer_token_agree", "score_s", "reference_s",
    "score_peak_gb", "reference_peak_gb", "model_mem_gb", "placement", "device", "dtype", "samples",
    "image_tokens",
]  # fmt: skip


def _sharpen(model, factor: float) -> None:
    """Scale the text q/k projections so random attention is peaky (as the tests' ``sharpen``)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                p.mul_(factor)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _placement(model) -> str:
    """Where the modules went, e.g. ``0: 14, cpu: 9`` (hf_device_map counts), or the one device."""
    dm = getattr(model, "hf_device_map", None)
    if not dm:
        return str(next(model.parameters()).device)
    counts: dict[str, int] = {}
    for where in dm.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def compare(s, r) -> tuple[float, str, float]:
    """Largest |s - r| over the float fields both have (NaN where both are NaN counts as equal; NaN in one
    only as inf), the field it is in, and the share of equal answer tokens (NaN if absent)."""
    import numpy as np

    a, b = s.arrays(), r.arrays()
    worst, where = 0.0, "-"
    for name in a.keys() & b.keys():
        x, y = a[name], b[name]
        if x.dtype.kind != "f":
            continue
        if x.shape != y.shape:
            return float("inf"), f"{name} (shape {x.shape} vs {y.shape})", float("nan")
        both_nan = np.isnan(x) & np.isnan(y)
        d = np.where(both_nan, 0.0, np.abs(x.astype(np.float64) - y.astype(np.float64)))
        d = np.where(np.isnan(d), np.inf, d)
        m = float(d.max()) if d.size else 0.0
        if m > worst or where == "-":
            worst, where = m, name
    agree = float("nan")
    if "answer_token" in a and "answer_token" in b:
        agree = float((a["answer_token"] == b["answer_token"]).mean())
    return worst, where, agree


def _load(case: str, path: Path, args, dtype, weights: int, offload_dir: Path):
    """Load the saved model for ``case``; returns (model, None) or (None, why it cannot run here)."""
    from transformers import LlavaForConditionalGeneration

    cuda = args.device == "cuda"
    kw: dict = {"dtype": dtype}
    if case in ("8bit", "4bit"):
        if not cuda:
            return None, "skipped: needs CUDA"
        if importlib.util.find_spec("bitsandbytes") is None:
            return None, "bitsandbytes not installed"
        if importlib.util.find_spec("accelerate") is None:
            return None, "accelerate not installed"
        from transformers import BitsAndBytesConfig

        if case == "8bit":
            q = BitsAndBytesConfig(load_in_8bit=True)
        else:
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        kw.update(quantization_config=q, device_map={"": 0})
    elif case == "offload":
        if importlib.util.find_spec("accelerate") is None:
            return None, "accelerate not installed"
        if cuda:  # about half the weights on the GPU, the rest in CPU memory
            kw.update(device_map="auto", max_memory={0: weights // 2, "cpu": 4 * weights + 2**30})
        else:  # about half in CPU memory, the rest in the offload folder on disk
            kw.update(device_map="auto", max_memory={"cpu": weights // 2}, offload_folder=str(offload_dir))
    model = LlavaForConditionalGeneration.from_pretrained(path, **kw).eval()
    if case == "plain":
        model.to(args.device)
    elif case == "offload":
        placed = {str(v) for v in model.hf_device_map.values()}
        want = {"0", "cpu"} if cuda else {"cpu", "disk"}
        if not want <= placed:
            del model
            return (
                None,
                f"failed (device_map placed modules on {sorted(placed)}, not on both of {sorted(want)})",
            )
    return model, None


def run_case(case: str, path: Path, batches: list, args, dtype, weights: int, offload_dir: Path) -> dict:
    import torch

    import bye_fast

    cuda = args.device == "cuda"
    row: dict = {"case": case}
    model = None
    try:
        model, why = _load(case, path, args, dtype, weights, offload_dir)
        if why:
            row["status"] = why
            return row
        row["placement"] = _placement(model)
        if cuda:
            torch.cuda.synchronize()
            row["model_mem_gb"] = torch.cuda.memory_allocated() / 1e9
        results = {}
        for name, fn in (("score", bye_fast.score), ("reference", bye_fast.score_reference)):
            fn(model, batches[:1], progress=False)  # warm-up (Triton compile, lazy init)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            results[name] = fn(model, batches, progress=False)
            if cuda:
                torch.cuda.synchronize()
                row[f"{name}_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row[f"{name}_s"] = time.perf_counter() - t0
        diff, field, agree = compare(results["score"], results["reference"])
        row.update(max_abs_diff=diff, worst_field=field, answer_token_agree=agree)
        row["status"] = "ok" if diff <= args.tol else f"mismatch (> {args.tol:g})"
    except Exception as err:  # recorded, not raised: the other cases still run
        row["status"] = "OOM" if _is_oom(err) else f"failed ({type(err).__name__}: {str(err)[:160]})"
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def write_results(rows: list[dict], args, command: str) -> Path:
    from _machine import describe, markdown_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "check_quantized" + (f"_{args.tag}" if args.tag else "")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md = [
        f"# check_quantized ({args.preset}, {args.dtype}, {args.device})",
        "",
        f"Machine: {describe()}",
        "",
        f"Command: `{command}`",
        "",
        f"{args.samples} random samples of {args.image_tokens} image tokens + {args.text_tokens} text tokens, "
        f"batch {args.batch}, after one warm-up batch per path. max_abs_diff: largest |score - "
        f"score_reference| over the float Scores fields (tolerance {args.tol:g}); peak: "
        "torch.cuda.max_memory_allocated during that path (CUDA only); model_mem_gb: allocated after loading.",
        "",
        markdown_table(rows, COLUMNS),
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(md))
    return out / f"{stem}.csv"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cpu", action="store_true", help="the dry run: tiny preset, fp32, CPU (quantized cases skipped)"
    )
    p.add_argument("--preset", default=None, help="bench_score preset (default cpu-1b; with --cpu, tiny)")
    p.add_argument("--dtype", default=None, help="default bfloat16 (with --cpu, float32)")
    p.add_argument("--image-tokens", type=int, default=None, help="default: the preset's smallest size")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    p.add_argument("--sharpen", type=float, default=12.0, help="scale of the text q/k weights")
    p.add_argument("--tol", type=float, default=None, help="default 5e-2 (bf16/fp16), 1e-4 (fp32)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/check_quantized.py " + " ".join(sys.argv[1:] if argv is None else argv)

    import torch
    from bench_score import PRESETS, build, make_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        print("check_quantized: no CUDA device (use --cpu for the dry run)", file=sys.stderr)
        return 2
    args.preset = args.preset or ("tiny" if args.cpu else "cpu-1b")
    args.dtype = args.dtype or ("float32" if args.cpu else "bfloat16")
    dtype = getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    args.image_tokens = args.image_tokens or min(preset["sizes"])
    if args.tol is None:
        args.tol = 1e-4 if dtype == torch.float32 else 5e-2

    model, image_size = build(preset, args.image_tokens, dtype, torch.device("cpu"))
    _sharpen(model, args.sharpen)
    weights = _weight_bytes(model)
    sizes = [min(args.batch, args.samples - i) for i in range(0, args.samples, args.batch)]
    batches = [
        make_batch(b, args.image_tokens, image_size, args.text_tokens, torch.device(args.device), seed=i)
        for i, b in enumerate(sizes)
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="check_quantized_") as tmp:
        path = Path(tmp) / "model"
        model.save_pretrained(path)
        del model
        gc.collect()
        print(
            f"check_quantized: {args.preset} ({weights / 1e9:.2f} GB of {args.dtype} weights) saved",
            flush=True,
        )
        for case in args.cases:
            t0 = time.perf_counter()
            row = run_case(case, path, batches, args, dtype, weights, Path(tmp) / f"offload_{case}")
            row.update(
                device=args.device, dtype=args.dtype, samples=args.samples, image_tokens=args.image_tokens
            )
            rows.append(row)
            diff = row.get("max_abs_diff")
            print(
                f"check_quantized: {case}: {row['status']}"
                + (f", max |score - reference| {diff:.2e} ({row['worst_field']})" if diff is not None else "")
                + f" [{time.perf_counter() - t0:.1f}s]",
                flush=True,
            )
            write_results(
                rows, args, command
            )  # rewritten after every case: a killed run keeps what it measured
    csv_path = write_results(rows, args, command)
    print(f"check_quantized: results in {csv_path} and .md")
    bad = [r for r in rows if r["status"].startswith(("failed", "mismatch", "OOM"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
