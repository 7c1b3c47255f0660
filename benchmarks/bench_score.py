"""Benchmark: bye_fast.score vs score_reference vs a plain forward, in separate processes.

    python benchmarks/bench_score.py                 # CPU defaults (the issue's shapes)
    python benchmarks/bench_score.py --quick         # tiny smoke run
    python benchmarks/bench_score.py --device cuda --preset llava-1.5-7b --dtype bfloat16
    python benchmarks/bench_score.py --device cuda --preset llava-1.5-7b --dtype bfloat16 \
        --grouped --batches 1 4 --ref-batches 1 2 4 8 --out $OUT       # what gpu_check.sh runs

Each (mode, image tokens, batch) cell runs in a fresh subprocess so peak
memory is its own: CPU peak resident memory comes from VmHWM (reset through
/proc/self/clear_refs after the model is built and warmed up); CUDA peak from
torch.cuda.max_memory_allocated. Throughput is samples/s over timed batches
after one warm-up batch, on random (non-zero) inputs.

With --grouped, all cells of one image-token count share one process (the
model is built once, which matters for a 7B model): CUDA peak memory is still
per cell (reset_peak_memory_stats), an out-of-memory cell is recorded as OOM
and the process goes on; the reference path tries --ref-batches in increasing
order and stops at the first that runs out of memory, so its best batch is the
best that fits. A grouped run also checks, at batch 1, the largest difference
between score's and score_reference's entropies (column max_abs_diff_vs_ref).
On CPU, grouped peak memory is less clean (freed memory of earlier cells may
stay resident).

Modes:
  forward    model.model(...) with SDPA, no LM head, no cache: one prefill pass (the floor)
  score      bye_fast.score (fused statistics, no attention maps)
  reference  bye_fast.score_reference (eager, output_attentions=True: the paper's path)

Results: benchmarks/results/bench_score[_<tag>].csv and .md (naming the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PRESETS = {
    # the CPU shape: text hidden 1024, 8 layers, 16 heads, 4 kv heads
    "cpu-1b": dict(
        hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816,
        vision_hidden=256, vision_layers=2, vision_heads=4, patch_size=4,
        sizes={576: 96, 2304: 192},
    ),
    # LLaVA-1.5-7B: Llama-2-7B text, CLIP ViT-L/14-336 (576 image tokens), projector reads layer -2
    "llava-1.5-7b": dict(
        hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
        vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096, patch_size=14,
        sizes={576: 336, 2916: 756, 5184: 1008}, vision_feature_layer=-2,
    ),
    "tiny": dict(
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
        vision_hidden=32, vision_layers=1, vision_heads=2, patch_size=4, sizes={64: 32, 256: 64},
    ),
}  # fmt: skip


def llava_config(preset: dict, image_tokens: int, **text_overrides):
    """The LLaVA config of ``preset`` at ``image_tokens`` image tokens, and its image size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    image_size = preset["sizes"][image_tokens]
    vision = CLIPVisionConfig(
        hidden_size=preset["vision_hidden"],
        intermediate_size=preset.get("vision_intermediate", 4 * preset["vision_hidden"]),
        num_hidden_layers=preset["vision_layers"],
        num_attention_heads=preset["vision_heads"],
        image_size=image_size,
        patch_size=preset["patch_size"],
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=preset["hidden"],
        intermediate_size=preset["intermediate"],
        num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"],
        num_key_value_heads=preset["kv_heads"],
        **{"max_position_embeddings": 8192, "pad_token_id": 0, **text_overrides},
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        vision_feature_select_strategy="default",
        vision_feature_layer=preset.get("vision_feature_layer", -1),
    )
    return cfg, image_size


def build(preset: dict, image_tokens: int, dtype, device):
    import torch
    from transformers import LlavaForConditionalGeneration

    cfg, image_size = llava_config(preset, image_tokens)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval(), image_size


def make_batch(batch: int, image_tokens: int, image_size: int, text_tokens: int, device, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    pre = text_tokens // 4
    ids = torch.randint(1, 31999, (batch, text_tokens + image_tokens), generator=g)
    ids[:, pre : pre + image_tokens] = 32000
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g).to(device),
    }


def _cpu_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cpu_mem(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _runner(model, mode: str):
    import torch

    import bye_fast

    def one(batch):
        if mode == "forward":
            with torch.inference_mode():
                model.model(**batch, use_cache=False)
        elif mode == "score":
            return bye_fast.score(model, [batch], progress=False)
        else:
            return bye_fast.score_reference(model, [batch], progress=False)

    return one


def time_cell(model, mode: str, batches: list, device) -> dict:
    """Warm up on batches[0], then time batches[1:]: samples/s and peak memory."""
    import torch

    one = _runner(model, mode)
    one(batches[0])  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _cpu_mem("VmRSS")
        _cpu_peak_reset()
    t0 = time.perf_counter()
    for b in batches[1:]:
        one(b)
    _sync(device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _cpu_mem("VmHWM")
    n = batches[0]["input_ids"].shape[0] * (len(batches) - 1)
    return {
        "samples_per_s": n / elapsed,
        "peak_mem_gb": peak / 1e9,
        "model_mem_gb": base / 1e9,
        "status": "ok",
    }


def run_cell(args) -> dict:
    """Run one (mode, image_tokens, batch) cell in this process and return its measurements."""
    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    model, image_size = build(preset, args.image_tokens, dtype, device)
    batches = [
        make_batch(args.batch, args.image_tokens, image_size, args.text_tokens, device, seed=i)
        for i in range(args.repeats + 1)
    ]
    row = time_cell(model, args.mode, batches, device)
    return {"mode": args.mode, "image_tokens": args.image_tokens, "batch": args.batch, **row}


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def run_group(args) -> None:
    """All cells of one image-token count in this process; prints one ``CELL {json}`` line per cell."""
    import gc

    import numpy as np
    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tokens = args.image_tokens
    model, image_size = build(PRESETS[args.preset], tokens, dtype, device)

    def batches_of(b: int) -> list:
        return [
            make_batch(b, tokens, image_size, args.text_tokens, device, seed=i)
            for i in range(args.repeats + 1)
        ]

    def emit(row: dict) -> None:
        print("CELL " + json.dumps({"image_tokens": tokens, **row}), flush=True)

    def cell(mode: str, b: int) -> dict:
        try:
            row = time_cell(model, mode, batches_of(b), device)
        except Exception as err:  # one failing cell must not lose the others
            row = {"status": "OOM" if _is_oom(err) else f"failed ({type(err).__name__}: {str(err)[:120]})"}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row.update(mode=mode, batch=b)
        emit(row)
        return row

    plan = [(m, b) for b in args.batches for m in args.modes if m != "reference"]
    for mode, b in plan:
        cell(mode, b)
    ref_fits_1 = False
    if "reference" in args.modes:
        oom_at = None
        for b in sorted(args.ref_batches):
            if oom_at is not None:
                emit({"mode": "reference", "batch": b, "status": f"skipped (OOM at batch {oom_at})"})
                continue
            status = cell("reference", b)["status"]
            ref_fits_1 |= b == 1 and status == "ok"
            if status == "OOM":
                oom_at = b
    if "score" in args.modes and ref_fits_1:  # correctness on the real shape, batch 1
        try:
            batch = batches_of(1)[0]
            s = _runner(model, "score")(batch)
            r = _runner(model, "reference")(batch)
            diff = float(np.nanmax(np.abs(s.entropy - r.entropy)))
            emit({"mode": "check", "batch": 1, "status": "ok", "max_abs_diff_vs_ref": diff})
        except Exception as err:  # recorded, not raised
            status = "OOM" if _is_oom(err) else f"failed ({type(err).__name__}: {str(err)[:120]})"
            emit({"mode": "check", "batch": 1, "status": status})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-1b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--image-tokens", type=int, nargs="*", help="default: the preset's sizes")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument(
        "--ref-batches", type=int, nargs="*", default=None, help="reference-path batches (default: --batches)"
    )
    p.add_argument(
        "--grouped",
        action="store_true",
        help="one process per image-token count (model built once); reference batches stop at the first OOM",
    )
    p.add_argument("--modes", nargs="*", default=["forward", "score", "reference"])
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2, help="timed batches per cell (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each cell (default: torch's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    p.add_argument("--tag", default="", help="suffix of the results files")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--quick", action="store_true", help="tiny preset, one batch size: a smoke run")
    p.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--group", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.cell:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.image_tokens = args.image_tokens[0]
        print(json.dumps(run_cell(args)))
        return
    if args.group:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.image_tokens = args.image_tokens[0]
        run_group(args)
        return

    if args.quick:
        args.preset, args.batches, args.repeats = "tiny", [1, 2], 1
        args.tag = args.tag or "quick"
    if args.ref_batches is None:
        args.ref_batches = list(args.batches)
    sizes = args.image_tokens or sorted(PRESETS[args.preset]["sizes"])
    if args.grouped:
        rows = []
        for tokens in sizes:  # results are rewritten after every group: a killed run keeps what it measured
            rows += _run_group_process(args, tokens)
            write_results(rows, args)
        return
    rows = []
    for tokens in sizes:
        plan = [(m, b) for b in args.batches for m in args.modes if m != "reference"]
        if "reference" in args.modes:
            plan += [("reference", b) for b in args.ref_batches]
        for mode, batch in plan:
            cmd = [
                sys.executable, __file__, "--cell", "--mode", mode, "--batch", str(batch),
                "--image-tokens", str(tokens), "--preset", args.preset, "--device", args.device,
                "--dtype", args.dtype, "--text-tokens", str(args.text_tokens), "--repeats", str(args.repeats),
            ]  # fmt: skip
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
                if res.returncode == 0 and last.startswith("{"):
                    row = json.loads(last)
                else:
                    oom = "out of memory" in res.stderr.lower() or res.returncode in (-9, 137)
                    row = {"status": "OOM" if oom else f"failed (rc={res.returncode})"}
                    if not oom:
                        print(res.stderr[-2000:], file=sys.stderr)
            except subprocess.TimeoutExpired:
                row = {"status": f"timeout > {args.timeout:.0f}s"}
            row.update(mode=mode, image_tokens=tokens, batch=batch)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(rows, args)


def _run_group_process(args, tokens: int) -> list[dict]:
    """Run ``--group`` for one image-token count in a subprocess; cells it did not report are failures."""
    cmd = [
        sys.executable, __file__, "--group", "--image-tokens", str(tokens), "--preset", args.preset,
        "--device", args.device, "--dtype", args.dtype, "--text-tokens", str(args.text_tokens),
        "--repeats", str(args.repeats), "--batches", *map(str, args.batches),
        "--ref-batches", *map(str, args.ref_batches), "--modes", *args.modes,
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        stdout, stderr, why = res.stdout, res.stderr, f"failed (rc={res.returncode})"
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        why = f"timeout > {args.timeout:.0f}s"
    rows = [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("CELL {")]
    for row in rows:
        print(json.dumps(row), flush=True)
    expected = [(m, b) for b in args.batches for m in args.modes if m != "reference"]
    if "reference" in args.modes:
        expected += [("reference", b) for b in sorted(args.ref_batches)]
    done = {(r["mode"], r["batch"]) for r in rows}
    missing = [(m, b) for m, b in expected if (m, b) not in done]
    if missing:
        print(
            f"bench_score: group {tokens} image tokens: {why} after {time.perf_counter() - t0:.0f}s",
            file=sys.stderr,
        )
        print(stderr[-3000:], file=sys.stderr)
        for m, b in missing:
            row = {"mode": m, "image_tokens": tokens, "batch": b, "status": why}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def write_results(rows: list[dict], args) -> None:
    from _machine import describe, markdown_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_score" + (f"_{args.tag}" if args.tag else "")
    cols = ["mode", "image_tokens", "batch", "samples_per_s", "peak_mem_gb", "model_mem_gb", "status"]
    if any("max_abs_diff_vs_ref" in r for r in rows):
        cols.append("max_abs_diff_vs_ref")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    # summary: per image-token count, batch 1 and best batch per mode, ratios vs forward and reference
    summary = []
    for tokens in sorted({r["image_tokens"] for r in rows}):
        cell = {
            r["mode"]: r
            for r in rows
            if r["image_tokens"] == tokens and r["batch"] == 1 and r["status"] == "ok"
        }
        best = {}
        for r in rows:
            if r["image_tokens"] == tokens and r["status"] == "ok" and r["mode"] != "check":
                if r["mode"] not in best or r["samples_per_s"] > best[r["mode"]]["samples_per_s"]:
                    best[r["mode"]] = r
        line = {"image_tokens": tokens}
        if "reference" in best:
            line["reference best batch"] = best["reference"]["batch"]
        check = [
            r for r in rows if r["image_tokens"] == tokens and r["mode"] == "check" and r["status"] == "ok"
        ]
        if check:
            line["score vs reference max abs diff entropy (b=1)"] = check[0]["max_abs_diff_vs_ref"]
        if "score" in cell and "forward" in cell:
            line["score/forward time (b=1)"] = (
                cell["forward"]["samples_per_s"] / cell["score"]["samples_per_s"]
            )
            line["score/forward peak mem (b=1)"] = (
                cell["score"]["peak_mem_gb"] / cell["forward"]["peak_mem_gb"]
            )
        if "score" in best and "reference" in best:
            line["score/reference throughput (best batch each)"] = (
                best["score"]["samples_per_s"] / best["reference"]["samples_per_s"]
            )
        if "score" in cell and "reference" in cell:
            line["score/reference throughput (b=1)"] = (
                cell["score"]["samples_per_s"] / cell["reference"]["samples_per_s"]
            )
            line["reference/score peak mem (b=1)"] = (
                cell["reference"]["peak_mem_gb"] / cell["score"]["peak_mem_gb"]
            )
        summary.append(line)
    sum_cols = sorted({k for s in summary for k in s}, key=lambda k: (k != "image_tokens", k))
    md = [
        f"# bench_score ({args.preset}, {args.dtype}, {args.device})",
        "",
        f"Machine: {describe()}"
        + (f" (this launcher); every cell ran with {args.threads} torch thread(s)" if args.threads else ""),
        "",
        f"Command: `python benchmarks/bench_score.py --preset {args.preset} --device {args.device} "
        f"--dtype {args.dtype} --batches {' '.join(map(str, args.batches))} --repeats {args.repeats}"
        + (
            f" --ref-batches {' '.join(map(str, args.ref_batches))}"
            if args.ref_batches != args.batches
            else ""
        )
        + (" --grouped" if args.grouped else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --tag {args.tag}" if args.tag else "")
        + "`",
        "",
        "Each cell is a fresh process; peak memory is the peak during the timed batches "
        "(CPU: resident set, VmHWM reset after warm-up; CUDA: max_memory_allocated).",
        "",
        markdown_table(rows, cols),
        "",
        "## Summary",
        "",
        markdown_table(summary, sum_cols),
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md[-len(summary) - 4 :]))


if __name__ == "__main__":
    main()
