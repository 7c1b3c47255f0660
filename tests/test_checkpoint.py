"""Resumable scoring: a run killed part-way and rerun equals an uninterrupted run; stale checkpoints are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bye_fast
from bye_fast.checkpoint import MANIFEST

from ._ckpt_worker import N_BATCHES, data
from ._models import llava

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("entropy", "head_entropy", "image_mass", "n_image_tokens", "ids")


def _identical(a, b):
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.meta == b.meta


def _count_forwards(model):
    inner = model.model
    original = inner.forward
    calls = []

    def forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    inner.forward = forward
    return calls


def _listed_shards(folder: Path) -> int:
    try:
        return len(json.loads((folder / MANIFEST).read_text())["shards"])
    except (OSError, ValueError):
        return 0


def test_killed_run_resumes_to_identical_scores(tmp_path):
    folder = tmp_path / "ckpt"
    env = {**os.environ, "BYE_TEST_SLEEP": "1.0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests._ckpt_worker", str(folder)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        model, batches = data()  # meanwhile: the same model and data here
        reference = bye_fast.score(model, batches, progress=False)
        deadline = time.monotonic() + 120
        while _listed_shards(folder) < 2:
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the worker wrote no 2 shards in 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        out, _ = proc.communicate()
    assert b"finished" not in out and proc.returncode == -signal.SIGKILL
    stored = sum(s["n_batches"] for s in json.loads((folder / MANIFEST).read_text())["shards"])
    assert 2 <= stored < N_BATCHES

    calls = _count_forwards(model)
    resumed = bye_fast.score(model, batches, progress=False, checkpoint_dir=folder, checkpoint_every=1)
    _identical(resumed, reference)
    assert len(calls) == N_BATCHES - stored  # stored batches were not run again
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["complete"] and manifest["n_batches"] == N_BATCHES
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    calls.clear()  # a finished checkpoint: no model work at all
    again = bye_fast.score(model, batches, progress=False, checkpoint_dir=folder, checkpoint_every=5)
    _identical(again, reference)
    assert calls == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    model, batches = llava(n_batches=3, batch_size=2)
    batches = [{**b, "ids": [f"r{2 * i + j}" for j in range(2)]} for i, b in enumerate(batches)]
    bye_fast.score(model, batches, progress=False, checkpoint_dir=folder, checkpoint_every=2)
    return folder, model, batches


def test_other_model_config_is_refused(finished):
    folder, _, batches = finished
    other, _ = llava(n_batches=1)
    other.config.text_config.rms_norm_eps = 1e-3
    with pytest.raises(
        ValueError, match=r"another model config \(text_config.rms_norm_eps: 1e-06 -> 0.001\).*new"
    ):
        bye_fast.score(other, batches, progress=False, checkpoint_dir=folder)


def test_other_weights_are_refused(finished):
    folder, _, batches = finished
    other, _ = llava(seed=1, n_batches=1)
    with pytest.raises(ValueError, match="same config but other weights"):
        bye_fast.score(other, batches, progress=False, checkpoint_dir=folder)


def test_other_data_or_order_is_refused(finished):
    folder, model, batches = finished
    calls = _count_forwards(model)
    with pytest.raises(ValueError, match=r"batches 0..1 \(ids \['r4', 'r5', 'r2', 'r3'\]\) differ .* order"):
        bye_fast.score(model, batches[::-1], progress=False, checkpoint_dir=folder)
    with pytest.raises(ValueError, match="yielded 2 batches but .* holds 3"):
        bye_fast.score(model, batches[:2], progress=False, checkpoint_dir=folder)
    with pytest.raises(ValueError, match="more batches than the finished run"):
        bye_fast.score(model, batches + batches[:1], progress=False, checkpoint_dir=folder)
    renamed = [dict(b) for b in batches]
    renamed[2]["ids"] = ["x4", "x5"]
    with pytest.raises(ValueError, match="batches 2..2"):
        bye_fast.score(model, renamed, progress=False, checkpoint_dir=folder)
    assert calls == []  # refused without running the model
    ok = bye_fast.score(model, batches, progress=False, checkpoint_dir=folder)
    assert ok.ids.tolist() == [f"r{i}" for i in range(6)]


def test_other_options_and_foreign_folders_are_refused(finished, tmp_path):
    folder, model, batches = finished
    with pytest.raises(ValueError, match="other scoring options .*backend: 'auto' -> 'torch'"):
        bye_fast.score(model, batches, progress=False, checkpoint_dir=folder, backend="torch")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty .*notes.txt.* not a bye_fast checkpoint"):
        bye_fast.score(model, batches, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        bye_fast.score(model, batches, progress=False, checkpoint_dir=tmp_path / "new", checkpoint_every=0)


def test_mixed_int_and_str_ids_resume(tmp_path):
    # a file may mix int and str ids; Scores stores them as strings, the resume must agree
    model, batches = llava(n_batches=3, batch_size=2)
    batches = [{**b, "ids": [2 * i, f"s{2 * i + 1}"]} for i, b in enumerate(batches)]
    first = bye_fast.score(model, batches, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    calls = _count_forwards(model)
    again = bye_fast.score(model, batches, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert calls == [] and again.ids.tolist() == first.ids.tolist() == ["0", "s1", "2", "s3", "4", "s5"]
