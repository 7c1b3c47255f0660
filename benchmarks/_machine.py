"""Helpers for the benchmarks' results files: the machine they ran on, the CSV they write."""

from __future__ import annotations

import csv
import os
import platform
from pathlib import Path


def describe() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name()}")
    except ImportError:
        pass
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}")
    return "; ".join(parts)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """``rows`` as CSV with ``columns`` (other keys ignored), floats rounded to 4 decimals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def write_markdown(out: Path, lines: list[str]) -> str:
    """``lines`` as ``<out>.md`` (one trailing newline), printed too; returns the text."""
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    print(text)
    return text


def handwritten_notes(md: Path, generated: tuple[str, ...] = ()) -> list[str]:
    """The hand-written sections of an earlier results file ``md``: from its first ``## `` heading that
    is not one the script writes itself (those starting with one of ``generated``) to the end, a
    blank line first; none if there is no such heading. A script that rewrites its table must not
    erase what earlier rows were found to mean."""
    if not md.exists():
        return []
    lines = md.read_text().splitlines()
    first = next((i for i, line in enumerate(lines)
                  if line.startswith("## ") and not line[3:].startswith(generated)), None)  # fmt: skip
    return [] if first is None else ["", *lines[first:]]
