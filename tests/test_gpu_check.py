"""benchmarks/gpu_check.sh --cpu-dry-run: the GPU check's steps run end to end on the CPU and print the table."""

from __future__ import annotations

import csv
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
        "| quantized | ok |",
        "| build | skipped (dry run",
        "| 8bit | skipped: needs CUDA |",
        "| 4bit | skipped: needs CUDA |",
        "| offload | ok |",
    ):
        assert line in tail
    assert "| 64 | " in tail and "| 256 | " in tail  # one bench row per image-token count, no cell failed
    assert "failed" not in tail and "OOM" not in tail
    assert out.rstrip().splitlines()[-1].startswith("gpu_check: ") and str(tmp_path) in out.splitlines()[-1]
    for name in (
        "gpu_check_steps.tsv",
        "gpu_check_summary.md",
        "bench_score_gpu_check_dryrun.csv",
        "check_quantized_gpu_check_dryrun.csv",
    ):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "gpu_check_logs" / "tests.log").read_text().count("passed") == 1


def test_check_quantized_cpu_mode(tmp_path):
    """The quantized/offload step's CPU mode: the offload case (device_map="auto", half the weights on disk)
    scores as the reference path; the bitsandbytes cases are recorded as needing CUDA, not dropped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "benchmarks/check_quantized.py", "--cpu", "--threads", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(tmp_path / "check_quantized.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["plain", "8bit", "4bit", "offload"]
    for case in ("plain", "offload"):
        assert rows[case]["status"] == "ok", rows[case]
        assert float(rows[case]["max_abs_diff"]) < 1e-4 and float(rows[case]["answer_token_agree"]) == 1.0
        assert float(rows[case]["score_s"]) > 0 and float(rows[case]["reference_s"]) > 0
    assert "disk" in rows["offload"]["placement"] and "cpu" in rows["offload"]["placement"]
    for case in ("8bit", "4bit"):
        assert rows[case]["status"] == "skipped: needs CUDA" and rows[case]["max_abs_diff"] == ""
    assert "| offload | ok |" in (tmp_path / "check_quantized.md").read_text()


def test_check_quantized_records_missing_packages(monkeypatch, tmp_path):
    """On a GPU machine without bitsandbytes (or accelerate) the case says so instead of failing."""
    import argparse
    import importlib.util as util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import check_quantized as cq
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    real = util.find_spec
    args = argparse.Namespace(device="cuda")
    monkeypatch.setattr(
        util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    for case in ("8bit", "4bit"):
        assert cq._load(case, tmp_path, args, None, 0, tmp_path) == (None, "bitsandbytes not installed")
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    assert cq._load("offload", tmp_path, args, None, 0, tmp_path) == (None, "accelerate not installed")
