"""The bye-fast CLI: score -> detect -> filter round trip on a tiny random model and a 50-record fixture."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import bye_fast
from bye_fast.cli import main
from bye_fast.lab.models import build_llava

from ._models import sharpen


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, processor = build_llava(layers=3)
    sharpen(model)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    records = []
    for i in range(50):
        name = f"img_{i:03d}.png"
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "images" / name)
        question = "is it even or odd ?" if i % 2 else "what digit is this ?"
        records.append(
            {
                "id": f"r{i:03d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": "even" if i % 3 else "odd"},
                ],
                "source": "fixture",
            }
        )
    (root / "train.json").write_text(json.dumps(records))
    return root


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_score_keeps_image_embeddings_when_asked(workspace):
    w = workspace
    argv = ["score", "--model", str(w / "model"), "--data", str(w / "train.json"), "--images", str(w / "images"),
            "--batch-size", "16", "--no-progress", "--image-embeddings"]  # fmt: skip
    assert main([*argv, "--out", str(w / "fused.npz")]) == 0
    assert main([*argv, "--out", str(w / "ref.npz"), "--reference"]) == 0
    fused, ref = bye_fast.Scores.load(w / "fused.npz"), bye_fast.Scores.load(w / "ref.npz")
    assert fused.image_embedding.shape[0] == 50 and np.isfinite(fused.image_embedding).all()
    np.testing.assert_allclose(fused.image_embedding, ref.image_embedding, atol=1e-5, rtol=1e-5)


def test_round_trip(workspace, capsys):
    w = workspace
    src_hash = _sha(w / "train.json")
    rc = main(
        ["score", "--model", str(w / "model"), "--data", str(w / "train.json"), "--images", str(w / "images"),
         "--out", str(w / "scores.npz"), "--batch-size", "16", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    scores = bye_fast.Scores.load(w / "scores.npz")
    assert scores.n_samples == 50 and scores.ids.tolist() == [f"r{i:03d}" for i in range(50)]
    assert np.isfinite(scores.entropy).all()
    assert scores.image_embedding is None  # only with --image-embeddings

    # threshold 0 makes every layer "sensitive", so the final mixture flags something to remove
    rc = main(
        ["detect", str(w / "scores.npz"), "--out", str(w / "det"), "--method", "paper", "--threshold", "0"]
    )
    assert rc == 0
    det = json.loads((w / "det" / "detection.json").read_text())
    n_flagged = sum(det["flagged"])
    assert 0 < n_flagged < 50
    for name in ("suspicion.png", "features.png", "layer_entropy.png"):
        assert (w / "det" / "plots" / name).stat().st_size > 1000

    rc = main(["filter", "--data", str(w / "train.json"), "--detection", str(w / "det" / "detection.json"),
               "--out", str(w / "clean.json")])  # fmt: skip
    assert rc == 0
    kept = json.loads((w / "clean.json").read_text())
    removed = json.loads((w / "clean.removed.json").read_text())
    assert len(kept) + len(removed) == 50 and len(removed) == n_flagged
    original = json.loads((w / "train.json").read_text())
    assert kept == [r for r, f in zip(original, det["flagged"], strict=True) if not f]
    assert all('"score"' in json.dumps(r) and '"rank"' in json.dumps(r) for r in removed)
    assert _sha(w / "train.json") == src_hash

    # nothing is overwritten without --overwrite, and the input never
    capsys.readouterr()
    assert main(["detect", str(w / "scores.npz"), "--out", str(w / "det")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    rc = main(["filter", "--data", str(w / "train.json"), "--detection", str(w / "det" / "detection.json"),
               "--out", str(w / "train.json"), "--overwrite"])  # fmt: skip
    assert rc == 2
    assert "train.json" in capsys.readouterr().err
    assert _sha(w / "train.json") == src_hash
    # the plots are outputs too; and the detection input is never an output of filter
    det_json = w / "det.json"
    (w / "det" / "detection.json").rename(det_json)
    assert main(["detect", str(w / "scores.npz"), "--out", str(w / "det")]) == 2
    assert "det exists; pass --overwrite" in capsys.readouterr().err
    det_hash = _sha(det_json)
    for extra in (["--out", str(det_json)], ["--out", str(w / "c2.json"), "--removed", str(det_json)]):
        argv = ["filter", "--data", str(w / "train.json"), "--detection", str(det_json), "--overwrite", *extra]
        assert main(argv) == 2
        assert "is the --detection input" in capsys.readouterr().err
    assert _sha(det_json) == det_hash and not (w / "c2.json").exists()

    # the paper's threshold on a random model: a decision with its reason, on every layer
    assert main(["detect", str(w / "scores.npz"), "--out", str(w / "det_paper"), "--method", "paper",
                 "--no-plots"]) == 0  # fmt: skip
    paper = bye_fast.Detection.from_json(w / "det_paper" / "detection.json")
    assert paper.reason and len(paper.details["separation"]) == 3


def test_help_explains_every_command(capsys):
    out = subprocess.run(
        [sys.executable, "-m", "bye_fast", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("score", "detect", "filter", "demo"):
        assert cmd in out.stdout
    for cmd in ("score", "detect", "filter", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([cmd, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "--out" in text and "--overwrite" in text


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[]")
    argv = ["score", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "x.json"),
            "--out", str(tmp_path / "s.npz")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bye-fast: error: --model") and "no such file" in err


def test_demo_passes_every_option_on(monkeypatch, tmp_path, capsys):
    import bye_fast.lab.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    argv = ["demo", "--out", str(tmp_path / "d"), "--max-fraction", "0.25", "--task", "digits-ten"]
    assert main(argv + ["--trigger", "wanet", "--rate", "0.2", "--seed", "3", "--target", "existing"]) == 0
    assert seen["detect_options"] == {"max_fraction": 0.25} and seen["method"] == "consensus"  # noqa
    assert (seen["task"], seen["trigger"], seen["rate"], seen["seed"], seen["target"]) == (
        "digits-ten", "wanet", 0.2, 3, "existing")  # fmt: skip
    assert (seen["n_user"], seen["finetune"]) == (800, "lora")  # the paper's service by default
    assert main(["demo", "--out", str(tmp_path / "d"), "--task", "scenes", "--n-user", "2000", "--finetune",
                 "lora-vision"]) == 0  # fmt: skip
    assert (seen["task"], seen["n_user"], seen["finetune"]) == ("scenes", 2000, "lora-vision")
    assert main(["demo", "--out", str(tmp_path / "d"), "--n-user", "3"]) == 2
    assert "--n-user" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--method", "paper", "--threshold", "3"]) == 0
    assert seen["method"] == "paper" and seen["detect_options"] == {"threshold": 3.0}
    assert main(["demo", "--out", str(tmp_path / "d"), "--threshold", "3"]) == 2
    assert "--threshold applies to --method paper" in capsys.readouterr().err


def test_demo_no_progress_silences_transformers_bars_and_restores_them(monkeypatch, tmp_path):
    from transformers.utils import logging as hf_logging

    import bye_fast.lab.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.append(hf_logging.is_progress_bar_enabled()))
    hf_logging.enable_progress_bar()
    assert main(["demo", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert seen == [False, True]  # off during the --no-progress run only
    assert hf_logging.is_progress_bar_enabled()  # and back on after it


def test_help_and_version_do_not_load_torch():
    """`bye-fast --help`, `COMMAND --help` and `--version` answer without importing torch (fast)."""
    code = (
        "import sys, contextlib, io\n"
        "from bye_fast.cli import main\n"
        "for argv in (['--help'], ['score', '--help'], ['detect', '--help'], ['demo', '--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, argv\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    version = subprocess.run([sys.executable, "-m", "bye_fast", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"bye-fast {bye_fast.__version__}"


def test_demo_finetune_choices_are_the_labs_methods():
    """The CLI spells the lab's fine-tuning methods out (it imports the lab lazily); they must not drift."""
    from bye_fast.cli import build_parser
    from bye_fast.lab.train import METHODS

    demo = next(a for a in build_parser()._subparsers._group_actions[0].choices["demo"]._actions
                if a.dest == "finetune")  # fmt: skip
    assert tuple(demo.choices) == METHODS
