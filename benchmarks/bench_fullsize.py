"""A full-size run on CPU: score and score_reference on a LLaVA-1.5-7B-shaped model, each in its own process.

    OMP_NUM_THREADS=2 python benchmarks/bench_fullsize.py            # the 7B shape (~14 GB of weights)
    OMP_NUM_THREADS=1 python benchmarks/bench_fullsize.py --scale tiny --out /tmp/fullsize_tiny

The model is ``LlavaForConditionalGeneration`` with LLaVA-1.5-7B's configuration written here
(CLIP ViT-L/14-336 vision tower read at layer -2, 576 patch tokens; Llama-2-7B text decoder;
GELU projector), random weights in bfloat16. It is built cheaply: parameters are created on the
meta device (buffers such as the rotary frequencies on the CPU, as transformers computes them),
then each parameter gets bf16 storage filled in place (``normal_(0, 0.02)``; norm weights 1,
biases 0). No float32 copy of the model is ever made; the default initialisation is not run.

Input: ``--samples`` (2) samples, in batches of ``--batch-size`` (default 1: two batches of one
sample each, the smallest activations), every sample ``[bos, 576 x <image>, 40 text tokens]``
with attention_mask of ones and random bf16 pixel_values (n, 3, 336, 336).

``score`` (the fused path) and ``score_reference`` (eager attention, output_attentions=True)
each run in a fresh subprocess that builds the model, scores, and saves the Scores to a
temporary .npz; peak memory is that process's peak resident set, model building included:
``resource.getrusage`` ``ru_maxrss`` (column ru_maxrss_gb) and VmHWM (peak_rss_gb, used for the
verdict). They are equal when the launcher is small, as here (it imports neither torch nor the
model before the children ran); Linux carries the launcher's own peak over fork/exec into the
child's ru_maxrss, so under a big parent (e.g. pytest with torch imported) only VmHWM is the
child's own. The launcher compares the two paths' ``entropy`` from the .npz files.

Memory verdict: ``peak RSS - weights bytes`` is reported for both paths, split into the RSS
before building (the interpreter with torch, transformers and bye_fast imported) and ``extra =
peak RSS - RSS after building`` (what scoring added on top of the loaded model). score stays
"within weights + O(N)" when its extra is at most the budget ``32 x batch x N x max(text
intermediate, vision intermediate) x 4 bytes`` (32 float32 activations of the widest layer, N =
sequence length) plus a fixed 256 MiB for code and allocator pools the first forward pass
touches; the reference's extra holds O(N^2) attention maps (``layers x heads x N^2`` per
sample, as the paper's code keeps them), reported beside it.

Writes ``<out>.csv`` and ``<out>.md`` (default benchmarks/results/fullsize_cpu).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

IMAGE_TOKEN = 32000
BOS = 1

from bench_score import PRESETS, llava_config  # noqa: E402

IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px

SCALES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Llama-2-7B (bench_score's preset)
    "7b": PRESETS["llava-1.5-7b"],
    # the same token counts (576 image tokens), small widths and few layers: for the tests
    "tiny": dict(
        hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128,
        vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, patch_size=14,
        sizes={IMAGE_TOKENS: 336}, vision_feature_layer=-2,
    ),
}  # fmt: skip


def config(scale: str):
    """Llama-2's own norm epsilon and context on top of bench_score's LLaVA config."""
    return llava_config(SCALES[scale], IMAGE_TOKENS, rms_norm_eps=1e-5, max_position_embeddings=4096)[0]


def image_size(scale: str) -> int:
    return SCALES[scale]["sizes"][IMAGE_TOKENS]


def image_tokens(scale: str) -> int:
    return (image_size(scale) // SCALES[scale]["patch_size"]) ** 2


def build(scale: str, seed: int = 0):
    """The random-weight bf16 model: parameters made on meta, then given bf16 storage filled in place."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration._from_config(config(scale), dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    done: dict[int, torch.nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in done:  # a tied parameter: share the one made
                module._parameters[name] = done[id(p)]
                continue
            t = torch.empty(p.shape, dtype=torch.bfloat16)
            if name == "bias":
                t.zero_()
            elif "norm" in mod_name.rsplit(".", 1)[-1] and p.dim() == 1:  # RMSNorm / LayerNorm weights
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            new = torch.nn.Parameter(t, requires_grad=False)
            done[id(p)] = new
            module._parameters[name] = new
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    return model.eval()


def batches(scale: str, samples: int, batch_size: int, text_tokens: int, seed: int = 0) -> list[dict]:
    """``samples`` rows ``[bos, n_image x <image>, text_tokens random ids]`` in batches of ``batch_size``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_img = image_tokens(scale)
    out = []
    for start in range(0, samples, batch_size):
        b = min(batch_size, samples - start)
        text = torch.randint(2, IMAGE_TOKEN, (b, text_tokens), generator=gen)
        ids = torch.cat([torch.full((b, 1), BOS), torch.full((b, n_img), IMAGE_TOKEN), text], dim=1).long()
        pixels = torch.randn(b, 3, image_size(scale), image_size(scale), generator=gen).to(torch.bfloat16)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "pixel_values": pixels,
                "ids": list(range(start, start + b)),
            }
        )
    return out


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _hwm_bytes() -> int:
    """This process's own peak RSS (VmHWM: the high-water mark of its address space since exec)."""
    return _status_bytes("VmHWM")


def run_path(mode: str, scale: str, samples: int, batch_size: int, text_tokens: int, npz: str) -> dict:
    """In this process: build the model, score with ``mode`` ("score" or "reference"), save the Scores."""
    import accelerate  # noqa: F401  (imported before the baseline is read: their code is not model memory)
    import torch
    import transformers.models.llava.modeling_llava  # noqa: F401

    import bye_fast

    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    model = build(scale)
    build_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_built = _rss_bytes()
    loader = batches(scale, samples, batch_size, text_tokens)
    fn = bye_fast.score if mode == "score" else bye_fast.score_reference
    t0 = time.perf_counter()
    scores = fn(model, loader, progress=False)
    score_s = time.perf_counter() - t0
    scores.save(npz)
    return {
        "mode": mode,
        "samples": samples,
        "batch_size": batch_size,
        "seq_len": int(loader[0]["input_ids"].shape[1]),
        "image_tokens": int(scores.n_image_tokens[0]) if scores.n_image_tokens is not None else "",
        "threads": torch.get_num_threads(),
        "build_s": build_s,
        "score_s": score_s,
        "s_per_sample": score_s / samples,
        "weights_gb": weights / 1e9,
        "rss_before_build_gb": rss_before / 1e9,
        "rss_after_build_gb": rss_built / 1e9,
        "ru_maxrss_gb": _peak_rss_bytes() / 1e9,
        "peak_rss_gb": _hwm_bytes() / 1e9,
        "peak_minus_weights_gb": (_hwm_bytes() - weights) / 1e9,
        "extra_gb": (_hwm_bytes() - rss_built) / 1e9,
    }


def _child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    row = run_path(args.mode, args.scale, args.samples, args.batch_size, args.text_tokens, args.npz)
    print("ROW " + json.dumps(row), flush=True)


def run_subprocess(mode: str, args, npz: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", "--mode", mode, "--scale", args.scale, "--npz", npz,
        "--samples", str(args.samples), "--batch-size", str(args.batch_size),
        "--text-tokens", str(args.text_tokens),
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "status": f"timeout > {args.timeout:.0f}s"}
    rows = [json.loads(line[4:]) for line in res.stdout.splitlines() if line.startswith("ROW {")]
    if res.returncode != 0 or not rows:
        print(res.stderr[-3000:], file=sys.stderr)
        oom = res.returncode in (-9, 137) or "out of memory" in res.stderr.lower()
        return {"mode": mode, "status": "killed (out of memory?)" if oom else f"failed (rc={res.returncode})"}
    row = rows[-1]
    row.update(status="ok", process_s=time.perf_counter() - t0)
    return row


FIXED_ALLOWANCE = 256 * 2**20  # code, kernels and allocator pools first touched by the forward pass


def budget_bytes(scale: str, batch_size: int, seq_len: int) -> int:
    """The O(N) budget: 32 float32 tensors of (batch, N, widest intermediate), plus FIXED_ALLOWANCE."""
    s = SCALES[scale]
    return 32 * batch_size * seq_len * max(s["intermediate"], s["vision_intermediate"]) * 4 + FIXED_ALLOWANCE


def attention_map_bytes(scale: str, batch_size: int, seq_len: int) -> int:
    """What eager attention with output_attentions keeps for one batch: every layer's (B, H, N, N) in bf16."""
    s = SCALES[scale]
    return s["layers"] * batch_size * s["heads"] * seq_len * seq_len * 2


def compare(npz_score: str, npz_ref: str) -> dict:
    import numpy as np

    with np.load(npz_score) as a, np.load(npz_ref) as b:
        ea, eb = a["entropy"].astype(np.float64), b["entropy"].astype(np.float64)
    diff = np.abs(ea - eb)
    return {
        "max_abs_diff": float(np.nanmax(diff)),
        "max_rel_diff": float(np.nanmax(diff / np.maximum(np.abs(eb), 1e-12))),
        "entropy_shape": list(ea.shape),
    }


def command_line(args) -> str:
    cmd = "python benchmarks/bench_fullsize.py"
    if args.scale != "7b":
        cmd += f" --scale {args.scale}"
    if args.samples != 2:
        cmd += f" --samples {args.samples}"
    if args.batch_size != 1:
        cmd += f" --batch-size {args.batch_size}"
    if args.text_tokens != 40:
        cmd += f" --text-tokens {args.text_tokens}"
    if args.threads:
        cmd += f" --threads {args.threads}"
    if args.out != DEFAULT_OUT:
        cmd += f" --out {shlex.quote(str(args.out))}"
    omp = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={omp} " if omp else "") + cmd


def verdict(rows: list[dict], args) -> str:
    by = {r["mode"]: r for r in rows if r.get("status") == "ok"}
    if "score" not in by:
        return "score did not finish: no memory verdict."
    s = by["score"]
    budget = budget_bytes(args.scale, args.batch_size, s["seq_len"]) / 1e9
    within = s["extra_gb"] <= budget
    line = (
        f"score {'stayed' if within else 'did NOT stay'} within weights + O(N): peak RSS"
        f" {s['peak_rss_gb']:.3f} GB - weights {s['weights_gb']:.3f} GB = {s['peak_minus_weights_gb']:.3f} GB,"
        f" of which {s['rss_before_build_gb']:.3f} GB is the interpreter with torch, transformers and bye_fast"
        f" before the model was built, and {s['extra_gb']:.3f} GB was added while scoring (O(N) budget"
        f" {budget:.3f} GB: 32 x batch {args.batch_size} x N {s['seq_len']} x widest intermediate x 4 bytes"
        f" + {FIXED_ALLOWANCE / 1e9:.3f} GB fixed)"
    )
    if "reference" in by:
        r = by["reference"]
        maps = attention_map_bytes(args.scale, args.batch_size, r["seq_len"]) / 1e9
        line += (
            f"; reference: peak RSS - weights = {r['peak_minus_weights_gb']:.3f} GB, {r['extra_gb']:.3f} GB"
            f" added while scoring (its O(N^2) attention maps alone are {maps:.3f} GB per batch)"
        )
    return line + "."


COLUMNS = [
    "mode", "status", "samples", "batch_size", "seq_len", "image_tokens", "threads", "build_s", "score_s",
    "s_per_sample", "weights_gb", "rss_before_build_gb", "rss_after_build_gb", "ru_maxrss_gb", "peak_rss_gb",
    "peak_minus_weights_gb", "extra_gb",
    "max_abs_diff_entropy", "max_rel_diff_entropy",
]  # fmt: skip


def write_results(rows: list[dict], cmp: dict | None, args) -> tuple[Path, Path]:
    from _machine import describe, markdown_table

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if cmp is not None and r.get("status") == "ok":
            r["max_abs_diff_entropy"] = cmp["max_abs_diff"]
            r["max_rel_diff_entropy"] = cmp["max_rel_diff"]
    csv_path, md_path = out.with_name(out.name + ".csv"), out.with_name(out.name + ".md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    s = SCALES[args.scale]
    agree = (
        f"max |entropy difference| score vs reference: {cmp['max_abs_diff']:.3g}"
        f" (relative {cmp['max_rel_diff']:.3g}) over {cmp['entropy_shape'][0]} samples x"
        f" {cmp['entropy_shape'][1]} layers"
        if cmp
        else "entropy not compared (a path failed)"
    )
    md = [
        f"# bench_fullsize ({'LLaVA-1.5-7B shape' if args.scale == '7b' else args.scale + ' scale'}, "
        "random bf16 weights, CPU)",
        "",
        f"Machine: {describe()}",
        "",
        f"Command: `{command_line(args)}`",
        "",
        f"Model: LlavaForConditionalGeneration, vision {s['vision_layers']} layers x {s['vision_hidden']}"
        f" ({image_size(args.scale)}px / patch {s['patch_size']} -> {image_tokens(args.scale)} image tokens,"
        f" feature layer -2), text {s['layers']} layers x {s['hidden']} ({s['heads']} heads,"
        f" intermediate {s['intermediate']}, vocab 32064). Input: {args.samples} samples in batches of"
        f" {args.batch_size}, each [bos, {image_tokens(args.scale)} x <image>, {args.text_tokens} text tokens].",
        "",
        "Each path ran in its own fresh process: build the model (meta device, then bf16 storage filled"
        " in place), score, save. peak_rss_gb is that process's own peak RSS (VmHWM, model building"
        " included); ru_maxrss_gb is getrusage's, which also counts the launcher's peak at spawn;"
        " peak_minus_weights_gb = peak - weights; extra_gb = peak - RSS after building (what scoring"
        " added); build_s and score_s are wall times.",
        "",
        markdown_table(rows, COLUMNS),
        "",
        f"- {agree}",
        f"- {verdict(rows, args)}",
        "",
    ]
    md_path.write_text("\n".join(md))
    return csv_path, md_path


DEFAULT_OUT = str(HERE / "results" / "fullsize_cpu")


def main(argv: list[str] | None = None) -> tuple[Path, Path] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scale", default="7b", choices=sorted(SCALES), help="7b: LLaVA-1.5-7B shape; tiny: tests"
    )
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1, help="samples per batch (default 1)")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per path")
    p.add_argument("--modes", nargs="*", default=["score", "reference"], choices=["score", "reference"])
    p.add_argument("--out", default=DEFAULT_OUT, help="prefix of the .csv and .md written")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--npz", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_fullsize_") as tmp:
        npz = {m: os.path.join(tmp, f"{m}.npz") for m in args.modes}
        for mode in args.modes:  # one after the other: never two models in memory
            row = run_subprocess(mode, args, npz[mode])
            rows.append(row)
            print(json.dumps(row), flush=True)
        ok = {r["mode"] for r in rows if r.get("status") == "ok"}
        cmp = compare(npz["score"], npz["reference"]) if {"score", "reference"} <= ok else None
    paths = write_results(rows, cmp, args)
    print(paths[1].read_text())
    return paths


if __name__ == "__main__":
    main()
