"""The short table that ``gpu_check.sh`` prints last (and saves as ``gpu_check_summary.md``).

    python benchmarks/gpu_check_summary.py STEPS_TSV BENCH_CSV OUT_MD [QUANTIZED_CSV]

Never fails on missing or partial inputs: what is missing is shown as such.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def _read(path: Path, delimiter: str = ",") -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter=delimiter))
    except OSError:
        return []


def _num(value: str | None, fmt: str) -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return "-"


def _cell(rows: list[dict]) -> str:
    """``samples/s (peak GB)`` of an ok row, else its status."""
    if not rows:
        return "-"
    r = rows[0]
    if r.get("status") != "ok":
        return r.get("status") or "-"
    return f"{_num(r['samples_per_s'], '.3g')}/s ({_num(r['peak_mem_gb'], '.3g')} GB)"


def bench_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no benchmark results)"]
    out = [
        "| image tokens | forward b=1 | forward best | score b=1 | score best | reference b=1 | reference best | "
        "score/ref best | max abs d entropy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tokens in sorted({int(r["image_tokens"]) for r in rows}):
        mine = [r for r in rows if int(r["image_tokens"]) == tokens]
        line = [str(tokens)]
        best_rate = {}
        for mode in ("forward", "score", "reference"):
            at1 = [r for r in mine if r["mode"] == mode and r["batch"] == "1"]
            ok = [r for r in mine if r["mode"] == mode and r.get("status") == "ok"]
            best = max(ok, key=lambda r: float(r["samples_per_s"]), default=None)
            line.append(_cell(at1))
            line.append(f"b={best['batch']}: {_cell([best])}" if best else "-")
            best_rate[mode] = float(best["samples_per_s"]) if best else None
        s, r = best_rate["score"], best_rate["reference"]
        line.append(f"{s / r:.2f}x" if s and r else "-")
        check = [r for r in mine if r["mode"] == "check"]
        line.append(_num(check[0].get("max_abs_diff_vs_ref"), ".2e") if check else "-")
        out.append("| " + " | ".join(line) + " |")
    return out


def quantized_table(rows: list[dict]) -> list[str]:
    """check_quantized.py's cases: status, score vs reference, time and peak memory of each path."""
    if not rows:
        return ["(no quantized/offload results)"]
    out = [
        "| case | status | max abs d (field) | score s | reference s | score peak GB | reference peak GB | placement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = _num(r.get("max_abs_diff"), ".2e")
        if diff != "-" and r.get("worst_field"):
            diff += f" ({r['worst_field']})"
        cells = [r.get("case") or "-", r.get("status") or "-", diff, _num(r.get("score_s"), ".3g"),
                 _num(r.get("reference_s"), ".3g"), _num(r.get("score_peak_gb"), ".3g"),
                 _num(r.get("reference_peak_gb"), ".3g"), r.get("placement") or "-"]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str]) -> int:
    steps_path, bench_path, out_md = map(Path, argv[1:4])
    quant_path = Path(argv[4]) if len(argv) > 4 else None
    steps = _read(steps_path, "\t")
    lines = ["## gpu_check steps", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
    lines += ["", f"## bench_score ({bench_path.name}): samples/s (peak GB)", ""]
    lines += bench_table(_read(bench_path))
    if quant_path is not None:
        lines += ["", f"## quantized and offloaded models ({quant_path.name}): score vs score_reference", ""]
        lines += quantized_table(_read(quant_path))
    text = "\n".join(lines) + "\n"
    try:
        out_md.write_text(text)
    except OSError as err:
        print(f"gpu_check_summary: cannot write {out_md}: {err}", file=sys.stderr)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
