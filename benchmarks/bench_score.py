"""Benchmark: bye_fast.score vs score_reference vs a plain forward, in separate processes.

    python benchmarks/bench_score.py                 # CPU defaults (the issue's shapes)
    python benchmarks/bench_score.py --quick         # tiny smoke run
    python benchmarks/bench_score.py --device cuda --preset llava-1.5-7b --dtype bfloat16

Each (mode, image tokens, batch) cell runs in a fresh subprocess so peak
memory is its own: CPU peak resident memory comes from VmHWM (reset through
/proc/self/clear_refs after the model is built and warmed up); CUDA peak from
torch.cuda.max_memory_allocated. Throughput is samples/s over timed batches
after one warm-up batch, on random (non-zero) inputs.

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


def build(preset: dict, image_tokens: int, dtype, device):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
        max_position_embeddings=8192,
        pad_token_id=0,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        vision_feature_select_strategy="default",
        vision_feature_layer=preset.get("vision_feature_layer", -1),
    )
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


def run_cell(args) -> dict:
    """Run one (mode, image_tokens, batch) cell in this process and return its measurements."""
    import torch

    import bye_fast

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    model, image_size = build(preset, args.image_tokens, dtype, device)
    batches = [
        make_batch(args.batch, args.image_tokens, image_size, args.text_tokens, device, seed=i)
        for i in range(args.repeats + 1)
    ]

    def one(batch):
        if args.mode == "forward":
            with torch.inference_mode():
                model.model(**batch, use_cache=False)
        elif args.mode == "score":
            bye_fast.score(model, [batch], progress=False)
        else:
            bye_fast.score_reference(model, [batch], progress=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    one(batches[0])  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _cpu_mem("VmRSS")
        _cpu_peak_reset()
    t0 = time.perf_counter()
    for b in batches[1:]:
        one(b)
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _cpu_mem("VmHWM")
    return {
        "mode": args.mode,
        "image_tokens": args.image_tokens,
        "batch": args.batch,
        "samples_per_s": args.batch * args.repeats / elapsed,
        "peak_mem_gb": peak / 1e9,
        "model_mem_gb": base / 1e9,
        "status": "ok",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-1b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--image-tokens", type=int, nargs="*", help="default: the preset's sizes")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--modes", nargs="*", default=["forward", "score", "reference"])
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2, help="timed batches per cell (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each cell (default: torch's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    p.add_argument("--tag", default="", help="suffix of the results files")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--quick", action="store_true", help="tiny preset, one batch size: a smoke run")
    p.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
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

    if args.quick:
        args.preset, args.batches, args.repeats = "tiny", [1, 2], 1
        args.tag = args.tag or "quick"
    sizes = args.image_tokens or sorted(PRESETS[args.preset]["sizes"])
    rows = []
    for tokens in sizes:
        for batch in args.batches:
            for mode in args.modes:
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


def write_results(rows: list[dict], args) -> None:
    from _machine import describe, markdown_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_score" + (f"_{args.tag}" if args.tag else "")
    cols = ["mode", "image_tokens", "batch", "samples_per_s", "peak_mem_gb", "model_mem_gb", "status"]
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
            if r["image_tokens"] == tokens and r["status"] == "ok":
                if r["mode"] not in best or r["samples_per_s"] > best[r["mode"]]["samples_per_s"]:
                    best[r["mode"]] = r
        line = {"image_tokens": tokens}
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
        f"Machine: {describe()}",
        "",
        f"Command: `python benchmarks/bench_score.py --preset {args.preset} --device {args.device} "
        f"--dtype {args.dtype} --batches {' '.join(map(str, args.batches))} --repeats {args.repeats}"
        + (f" --threads {args.threads}" if args.threads else "")
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
