"""benchmarks/gpu_check.sh --cpu-dry-run: the GPU check's steps run end to end on the CPU and print the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_help_and_bad_argument():
    ok = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert ok.returncode == 0 and "--cpu-dry-run" in ok.stdout and "$OUT" in ok.stdout
    bad = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--gpu"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown argument --gpu" in bad.stderr


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    tail = out[out.index("## gpu_check steps") :]  # the table comes last, then where results went
    for line in (
        "| environment | ok |",
        "| tests | ok |",
        "| bench_score | ok |",
        "| build | skipped (dry run",
    ):
        assert line in tail
    assert "| 64 | " in tail and "| 256 | " in tail  # one bench row per image-token count, no cell failed
    assert "failed" not in tail and "OOM" not in tail
    assert out.rstrip().splitlines()[-1].startswith("gpu_check: ") and str(tmp_path) in out.splitlines()[-1]
    for name in ("gpu_check_steps.tsv", "gpu_check_summary.md", "bench_score_gpu_check_dryrun.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "gpu_check_logs" / "tests.log").read_text().count("passed") == 1
