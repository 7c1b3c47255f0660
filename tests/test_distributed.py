"""Distributed scoring on CPU (gloo): 2 ranks give what 1 process gives, in order, for 7 samples in batches of 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bye_fast
from bye_fast.data import make_loader
from bye_fast.distributed import merge_stats_across_ranks

from ._dist_worker import BATCH_SIZE, FakeStats, model_and_processor

ROOT = Path(__file__).resolve().parents[1]
N = 7  # not a multiple of the world size: rank 0 scores 4 samples, rank 1 scores 3
FIELDS = ("entropy", "head_entropy", "image_mass", "n_image_tokens", "ids")


def _dataset(root: Path, n: int = N) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        question = "is it even or odd ?" if i % 2 else "what digit is this number ? describe the image"
        records.append(
            {
                "id": f"r{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": "x"},
                ],
            }
        )
    (root / "train.json").write_text(json.dumps(records))
    return root


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def test_two_ranks_match_one_process(tmp_path):
    data = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._dist_worker",
                str(r),
                "2",
                str(tmp_path / "init"),
                str(data),
                str(out),
            ],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        model, processor = model_and_processor()  # meanwhile: the one-process run
        loader = make_loader(data / "train.json", data / "images", processor, batch_size=BATCH_SIZE)
        single = bye_fast.score(model, loader, progress=False, image_embeddings=True)
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-4000:]
    finally:
        for p in procs:  # a rank left waiting in a collective must not outlive the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert single.ids.tolist() == [f"r{i}" for i in range(N)]
    reports = [json.loads((out / f"report{r}.json").read_text()) for r in range(2)]
    assert reports[0]["shard_ids"] == ["r0", "r1", "r2", "r3"] and reports[1]["shard_ids"] == [
        "r4",
        "r5",
        "r6",
    ]
    for r in range(2):
        gathered = bye_fast.Scores.load(out / f"gathered{r}.npz")
        for f in (*FIELDS, "image_embedding"):  # same batches, same rows: bit-identical on CPU
            np.testing.assert_array_equal(getattr(gathered, f), getattr(single, f), err_msg=f"rank {r}: {f}")
        local = bye_fast.Scores.load(out / f"local{r}.npz")
        assert local.ids.tolist() == reports[r]["shard_ids"]
        rep = reports[r]
        assert rep["default_ids"] == list(range(N))  # renumbered over all ranks, as one process would
        assert rep["empty_rank"] == ["r0", "r1", "r2", "r3"]
        assert rep["empty_rank_embedding"] == [4 if r == 0 else 0, single.image_embedding.shape[1]]
        assert "ValueError: id 'r0' was scored by rank 0 and rank 1" in rep["duplicate"]
        assert "shard_indices" in rep["duplicate"]
        assert rep["checkpoint_rerun_equal"]
        assert rep["merged"] == [3, 30.0]
    assert "ValueError: batch 0: has no 'input_ids'" in reports[1]["failure"]
    assert (
        "RuntimeError: bye_fast: rank 1 failed while scoring its shard: ValueError: batch 0"
        in reports[0]["failure"]
    )
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["rank0of2", "rank1of2"]
    # the reference path gathers the same way, and a failing rank stops the others too
    assert reports[0]["reference_ids"] == reports[1]["reference_ids"] == [f"r{i}" for i in range(N)]
    assert "ValueError: batch 0: has no 'input_ids'" in reports[1]["reference_failure"]
    assert "RuntimeError: bye_fast: rank 1 failed" in reports[0]["reference_failure"]


def test_merge_stats_without_process_group_is_a_copy():
    stats = FakeStats(2, 3.0)
    merged = merge_stats_across_ranks(stats)
    assert merged is not stats and (merged.n, merged.total) == (2, 3.0)
    merged.merge(FakeStats(1, 1.0))  # the caller's object is never the result, so never modified
    assert (stats.n, stats.total) == (2, 3.0)
    with pytest.raises(TypeError, match="to_bytes"):
        merge_stats_across_ranks(object())


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m bye_fast score`: rank 0 writes what one process writes."""
    data = _dataset(tmp_path / "data")
    model, processor = model_and_processor()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    common = ["score", "--model", str(tmp_path / "model"), "--data", str(data / "train.json"),
              "--images", str(data / "images"), "--batch-size", str(BATCH_SIZE), "--device", "cpu", "--no-progress"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*torchrun, "-m", "bye_fast", *common, "--out", str(tmp_path / "two.npz"), "--checkpoint-dir", str(tmp_path / "ck")],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # torchrun and its workers: the whole session
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("bye-fast: scored 7 samples x 3 layers on 2 ranks") == 1  # rank 0 only
    res = subprocess.run(
        [sys.executable, "-m", "bye_fast", *common, "--out", str(tmp_path / "one.npz")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    two, one = bye_fast.Scores.load(tmp_path / "two.npz"), bye_fast.Scores.load(tmp_path / "one.npz")
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(two, f), getattr(one, f), err_msg=f)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["rank0of2", "rank1of2"]
