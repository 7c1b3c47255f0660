"""Benchmark the fused image-attention-statistics kernel (CUDA only; not a test).

Compares, per decoder layer call, on LLaVA-7B-like shapes (H=32, D=128, bf16):

* ``triton``        :func:`attn_image_stats_triton` (one fused launch);
* ``torch``         :func:`attn_image_stats_torch` (fp32 (B, H, N) scores of the one row);
* ``materialised``  what an eager attention path does for that row: repeat the
  kv heads, full softmax row (B, H, N), then the image statistics.

Timings are medians of ``triton.testing.do_bench``; "extra MiB" is the peak
allocation above the inputs during one call. Results go to
``benchmarks/results/bench_kernel_<gpu>.{csv,md}``.

    python benchmarks/bench_kernel.py
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bye_fast.kernels.attn_entropy import (  # noqa: E402
    AttnImageStats,
    attn_image_stats_torch,
    attn_image_stats_triton,
)

RESULTS = Path(__file__).resolve().parent / "results"
NS = (576, 2880, 5000)
BS = (1, 8)
HKVS = (32, 8)
H, D, DTYPE = 32, 128, torch.bfloat16


def materialised(q, k, qpos, key_valid, image_mask, scaling) -> AttnImageStats:
    """Baseline: repeat_kv copy + full softmax row, as eager attention would give it."""
    B, Hq, _, _ = q.shape
    rows = q[torch.arange(B, device=q.device), :, qpos][:, :, None]  # (B, H, 1, D)
    kr = k.repeat_interleave(Hq // k.shape[1], dim=1)  # (B, H, N, D) copy
    s = (rows @ kr.transpose(-1, -2)).squeeze(2).float() * scaling  # (B, H, N)
    s = s.masked_fill(~key_valid[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    probs = torch.softmax(s, -1)
    img = probs * image_mask[:, None]
    mass = img.sum(-1)
    p = img / mass[..., None]
    ent = -torch.special.xlogy(p, p).sum(-1)
    return AttnImageStats(lse, ent, mass, img.sum(1))


def make_inputs(B: int, Hkv: int, N: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    # transformers layout: (B, L, H, D) storage viewed as (B, H, L, D)
    q = torch.randn(B, N, H, D, device="cuda", dtype=DTYPE, generator=g).transpose(1, 2)
    k = torch.randn(B, N, Hkv, D, device="cuda", dtype=DTYPE, generator=g).transpose(1, 2)
    qpos = torch.full((B,), N - 1, device="cuda", dtype=torch.long)
    key_valid = torch.ones(B, N, device="cuda", dtype=torch.bool)
    image_mask = torch.zeros(B, N, device="cuda", dtype=torch.bool)
    image_mask[:, 32 : N - 32] = True  # text prefix and suffix around the image tokens
    return q, k, qpos, key_valid, image_mask


def peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_kernel: no CUDA device here; this benchmark only runs on a GPU. Nothing to do.")
        return 0
    try:
        from triton.testing import do_bench
    except ImportError:
        print("bench_kernel: triton is not installed; nothing to benchmark.")
        return 0

    gpu = torch.cuda.get_device_name()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    scaling = D**-0.5
    methods = {
        "triton": attn_image_stats_triton,
        "torch": attn_image_stats_torch,
        "materialised": materialised,
    }
    rows = []
    for B in BS:
        for Hkv in HKVS:
            for N in NS:
                args = make_inputs(B, Hkv, N)
                ref = attn_image_stats_torch(*args, scaling)
                out = attn_image_stats_triton(*args, scaling)
                err = (out.head_entropy - ref.head_entropy).abs().max().item()
                row = dict(gpu=gpu, B=B, H=H, Hkv=Hkv, N=N, D=D, dtype="bf16", max_abs_err_entropy=err)
                for name, fn in methods.items():
                    call = lambda fn=fn, a=args: fn(*a, scaling)  # noqa: E731
                    row[f"{name}_ms"] = do_bench(call, warmup=25, rep=100, return_mode="median")
                    row[f"{name}_extra_mib"] = peak_extra_mib(call)
                # K is read twice by the kernel (two passes over N).
                k_bytes = 2 * B * Hkv * N * D * args[1].element_size()
                row["triton_GBps"] = k_bytes / row["triton_ms"] / 1e6
                rows.append(row)
                print(
                    f"B={B} Hkv={Hkv} N={N}: triton {row['triton_ms']:.4f} ms, "
                    f"torch {row['torch_ms']:.4f} ms, "
                    f"materialised {row['materialised_ms']:.4f} ms (entropy err {err:.1e})",
                    flush=True,
                )
                del args, ref, out

    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / f"bench_kernel_{slug}.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    lines = [
        f"# attn_image_stats kernel benchmark on {gpu}",
        "",
        f"H={H}, D={D}, bf16, one query row per sample, all keys attended, N-64 image keys. "
        "Median ms from triton.testing.do_bench; extra MiB = peak allocation above the inputs; "
        "GB/s = the kernel's two passes over K.",
        "",
        "| B | Hkv | N | triton ms | torch ms | materialised ms | vs torch | vs materialised "
        "| triton MiB | torch MiB | materialised MiB | triton GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['Hkv']} | {r['N']} | {r['triton_ms']:.4f} | {r['torch_ms']:.4f} "
            f"| {r['materialised_ms']:.4f} | {r['torch_ms'] / r['triton_ms']:.2f}x "
            f"| {r['materialised_ms'] / r['triton_ms']:.2f}x | {r['triton_extra_mib']:.2f} "
            f"| {r['torch_extra_mib']:.2f} | {r['materialised_extra_mib']:.2f} | {r['triton_GBps']:.0f} |"
        )
    md = "\n".join(lines) + "\n"
    (RESULTS / f"bench_kernel_{slug}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
