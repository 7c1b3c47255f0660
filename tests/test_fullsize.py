"""benchmarks/bench_fullsize.py: the full-size CPU run (score vs score_reference, each in its own process).

The fast tests run the script at its tiny scale (same 576 image tokens, small widths) and check the
LLaVA-1.5-7B configuration on the meta device (no memory); the slow one runs the 7B shape itself
(~14 GB of bf16 weights, two processes one after the other; `python -m pytest -m slow`) into a
temporary folder: the recorded results, benchmarks/results/fullsize_cpu.csv and .md, come from
running the benchmark itself (`OMP_NUM_THREADS=1 python benchmarks/bench_fullsize.py`), never
from a test run.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from ._bench import load_benchmark


def _bench():
    return load_benchmark("bench_fullsize")


def _run_and_check(scale: str, out: Path) -> list[dict]:
    """Run the script with ``--out out`` and check what it wrote."""
    bench = _bench()
    csv_path, md_path = bench.main(["--scale", scale, "--out", str(out)])
    assert csv_path == out.with_name(out.name + ".csv") and md_path == out.with_name(out.name + ".md")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["score", "reference"]
    for r in rows:
        assert r["status"] == "ok", r
        assert int(r["samples"]) == 2 and int(r["image_tokens"]) == 576 and int(r["seq_len"]) == 1 + 576 + 40
        assert float(r["peak_rss_gb"]) >= float(r["rss_after_build_gb"]) > 0
        assert float(r["score_s"]) > 0 and float(r["build_s"]) > 0
        assert float(r["max_rel_diff_entropy"]) <= 1e-2  # bf16: the two paths agree to 1e-2 relative
    assert rows[0]["weights_gb"] == rows[1]["weights_gb"]
    md = md_path.read_text()
    assert "Machine: " in md and "Command: `" in md and "bench_fullsize.py" in md
    assert "| score | ok |" in md and "| reference | ok |" in md
    assert "within weights + O(N)" in md and "max |entropy difference|" in md
    return rows


def test_tiny_scale_writes_both_paths(tmp_path):
    rows = _run_and_check("tiny", tmp_path / "fullsize_tiny")
    score = rows[0]
    bench = _bench()
    budget = bench.budget_bytes("tiny", 1, int(score["seq_len"])) / 1e9
    assert float(score["extra_gb"]) <= budget  # the fused path adds no more than O(N) on top of the model


def test_7b_configuration_shape():
    """The 7B configuration on the meta device (nothing allocated): LLaVA-1.5-7B's parameter count."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    bench = _bench()
    cfg = bench.config("7b")
    assert bench.image_tokens("7b") == 576
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == 32000 and cfg.text_config.vocab_size == 32064
    with init_empty_weights():
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert math.isclose(n, 7.06e9, rel_tol=0.01), n  # Llama-2-7B (32k vocab) + CLIP ViT-L/14-336 + projector


@pytest.mark.slow
def test_7b_shape_two_samples(tmp_path):
    """The full-size run: 2 samples, LLaVA-1.5-7B shape, random bf16 weights, score and reference
    (needs ~16 GB free). Written under ``tmp_path``: a test run does not overwrite the recorded
    results (another thread count, another machine)."""
    rows = _run_and_check("7b", tmp_path / "fullsize_cpu")
    score, ref = rows
    weights = float(score["weights_gb"])
    assert 13.5 < weights < 14.5
    bench = _bench()
    budget = bench.budget_bytes("7b", 1, int(score["seq_len"])) / 1e9
    assert float(score["extra_gb"]) <= budget  # within weights + O(N)
    assert float(score["peak_rss_gb"]) <= float(ref["peak_rss_gb"])
