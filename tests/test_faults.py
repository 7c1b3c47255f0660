"""Fault injection (issue 12): bad input never costs a run, never passes silently, and always gets one
clear line.

Every failing case asserts the exact behaviour of ``bye_fast.cli.main``: exit status 2 for a usage
error or 1 for a data error (see the module docstring of :mod:`bye_fast.cli`), and exactly one
line ``bye-fast: error: ...`` on stderr naming the option, file or record at fault; nothing lost
or overwritten; or the documented skip. Corrupt files are made here, in ``tmp_path``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bye_fast
import bye_fast.scores
from bye_fast import cli
from bye_fast.cli import main
from bye_fast.detect import Detection
from bye_fast.lab.models import build_llava
from bye_fast.scores import Scores

from ._models import sharpen

N = 24


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny saved LLaVA, N records with images, their scores.npz and a detection (paper, threshold 0)."""
    root = tmp_path_factory.mktemp("faults")
    model, processor = build_llava(layers=2)
    sharpen(model)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    records = []
    for i in range(N):
        name = f"img_{i:03d}.png"
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "images" / name)
        records.append({"id": f"r{i:03d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nwhat digit is this ?"}, {"from": "gpt", "value": "odd"}]})  # fmt: skip
    (root / "train.json").write_text(json.dumps(records))
    assert main(_score_argv(root, root / "scores.npz")) == 0
    assert main(["detect", "--method", "paper", str(root / "scores.npz"), "--out", str(root / "det"), "--threshold", "0",
                 "--no-plots"]) == 0  # fmt: skip
    return root


def _score_argv(w: Path, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["score", "--model", str(w / "model"), "--data", str(data or w / "train.json"),
            "--images", str(w / "images"), "--out", str(out), "--batch-size", "8", "--no-progress", *extra]  # fmt: skip


def _fails(capsys, argv: list[str], code: int, *needles: str) -> str:
    """``main(argv)`` returns ``code`` and prints exactly one line, ``bye-fast: error: ...``, with the needles."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("bye-fast: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(seed: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG header announcing 100000 x 100000 pixels: PIL refuses it on open (DecompressionBombError)."""
    raw = _png()
    body = b"IHDR" + struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return raw[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + raw[33:]


BAD_IMAGES = {
    "truncated": (lambda: _png()[: len(_png()) // 2], "image file is truncated"),
    "empty": (lambda: b"", "empty file (0 bytes)"),
    "not_an_image": (lambda: b"these are not the pixels you are looking for\n", "not an image file"),
    "bomb": (_bomb_png, "too large to decode safely"),
}


def _data_with_bad_images(w: Path, tmp: Path, bad: dict[int, bytes | None]) -> Path:
    """train.json with record i's image replaced by a file of the given bytes (None: a missing file)."""
    records = json.loads((w / "train.json").read_text())
    for i, content in bad.items():
        path = tmp / f"bad_{i}.png"
        if content is not None:
            path.write_bytes(content)
        records[i]["image"] = str(path)  # an absolute path is used as it is
    data = tmp / "bad.json"
    data.write_text(json.dumps(records))
    return data


# --------------------------------------------------------------------------- lost work
def test_unwritable_out_is_refused_before_any_work(ws, tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded before --out is checked")

    monkeypatch.setattr(cli, "load_model_and_processor", no_model)
    (tmp_path / "afile").write_text("x")
    _fails(capsys, _score_argv(ws, tmp_path / "afile" / "scores.npz"), 2, "afile is a file, not a folder")
    _fails(capsys, _score_argv(ws, tmp_path / "afile" / "deeper" / "s.npz"), 2, "afile is a file, not a folder")
    (tmp_path / "dir.npz").mkdir()
    _fails(capsys, _score_argv(ws, tmp_path / "dir.npz", "--overwrite"), 2, "dir.npz: is a folder")
    _fails(capsys, _score_argv(ws, tmp_path / "s.txt"), 2, "--out must end in .npz")
    _fails(capsys, _score_argv(ws, ws / "scores.npz"), 2, "scores.npz exists; pass --overwrite")
    _fails(capsys, _score_argv(ws, tmp_path / "s.npz", "--checkpoint-dir", str(tmp_path / "afile")), 2,
           "--checkpoint-dir", "not a folder")  # fmt: skip
    if os.geteuid() != 0:  # root writes through a read-only mode
        (tmp_path / "ro").mkdir(mode=0o555)
        _fails(capsys, _score_argv(ws, tmp_path / "ro" / "s.npz"), 2, "cannot write in", "Permission denied")
    assert not list(tmp_path.rglob("*.probe"))


def test_full_disk_at_save_keeps_the_rows_and_says_where(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "sub" / "scores.npz"  # missing parents are created
    real = bye_fast.scores.atomic_write

    def full_disk(path, *a, **k):
        if Path(path) == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(bye_fast.scores, "atomic_write", full_disk)
    ck = tmp_path / "ck"
    argv = _score_argv(ws, out, "--checkpoint-dir", str(ck), "--dtype", "float32")
    rescued = ck / "scores.rescued.npz"
    _fails(capsys, argv, 1, f"--out {out}: cannot write it (No space left on device)",
           f"the {N} scored rows are saved in {rescued} instead", f"also in the checkpoint {ck}")  # fmt: skip
    assert not out.exists()
    assert Scores.load(rescued).ids.tolist() == Scores.load(ws / "scores.npz").ids.tolist()
    # nowhere to write at all: the line says so, and where the rows still are
    monkeypatch.setattr(bye_fast.scores, "atomic_write", lambda p, *a, **k: full_disk(out, *a, **k))
    _fails(capsys, argv, 1, "cannot write it (No space left on device), nor the", f"checkpoint {ck}")
    # resuming that checkpoint with another dtype names the dtype, not "other weights"
    monkeypatch.setattr(bye_fast.scores, "atomic_write", real)
    err = _fails(capsys, [*argv[:-1], "bfloat16"], 1, f"checkpoint_dir {ck}", "dtype: 'float32' -> 'bfloat16'")
    assert "other weights" not in err


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_is_one_line_naming_record_and_file(ws, tmp_path, capsys, kind):
    make, reason = BAD_IMAGES[kind]
    data = _data_with_bad_images(ws, tmp_path, {3: make()})
    _fails(capsys, _score_argv(ws, tmp_path / "s.npz", data=data), 1,
           f"record 'r003': cannot read image {tmp_path / 'bad_3.png'}: {reason}")  # fmt: skip
    assert not (tmp_path / "s.npz").exists()


def test_bad_image_in_a_worker_is_one_line_too(ws, tmp_path, capsys):
    data = _data_with_bad_images(ws, tmp_path, {1: b""})
    _fails(capsys, _score_argv(ws, tmp_path / "s.npz", "--num-workers", "1", data=data), 1,
           "record 'r001': cannot read image", "empty file (0 bytes)")  # fmt: skip


def test_missing_image_names_record_and_file(ws, tmp_path, capsys):
    data = _data_with_bad_images(ws, tmp_path, {5: None})
    _fails(capsys, _score_argv(ws, tmp_path / "s.npz", data=data), 1,
           f"record 'r005': image file not found: {tmp_path / 'bad_5.png'}")  # fmt: skip


def test_skip_bad_images_scores_the_rest_and_filter_keeps_them(ws, tmp_path, capsys):
    data = _data_with_bad_images(ws, tmp_path, {2: _png()[:40], 9: None})
    out = tmp_path / "s.npz"
    capsys.readouterr()
    assert main(_score_argv(ws, out, "--on-bad-image", "skip", data=data)) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 record(s) with an unreadable image" in printed and "'r002'" in printed
    scores = Scores.load(out)
    assert scores.n_samples == N - 2 and {"r002", "r009"}.isdisjoint(scores.ids.tolist())
    skipped = json.loads(scores.meta["skipped"])
    assert [e["id"] for e in skipped] == ["r002", "r009"] and skipped[1]["reason"] == "file not found"
    assert main(["detect", "--method", "paper", str(out), "--out", str(tmp_path / "det"), "--threshold", "0", "--no-plots"]) == 0
    det = Detection.from_json(tmp_path / "det" / "detection.json")
    capsys.readouterr()
    assert main(["filter", "--data", str(data), "--detection", str(tmp_path / "det" / "detection.json"),
                 "--out", str(tmp_path / "clean.json")]) == 0  # fmt: skip
    assert "2 of the kept records were not scored" in capsys.readouterr().out
    kept = [r["id"] for r in json.loads((tmp_path / "clean.json").read_text())]
    removed = [r["id"] for r in json.loads((tmp_path / "clean.removed.json").read_text())]
    assert {"r002", "r009"} <= set(kept) and len(kept) + len(removed) == N
    assert sorted(removed) == sorted(det.flagged_ids)
    # a detection that lists a record as skipped but also scored it is inconsistent
    bad = json.loads((tmp_path / "det" / "detection.json").read_text())
    bad["meta"]["skipped"] = json.dumps([{"id": "r000", "image": "x", "reason": "y"}])
    (tmp_path / "bad_det.json").write_text(json.dumps(bad))
    _fails(capsys, ["filter", "--data", str(data), "--detection", str(tmp_path / "bad_det.json"),
                    "--out", str(tmp_path / "c2.json")], 1, "'r000' as skipped (not scored) but it is scored too")  # fmt: skip


def test_every_image_skipped_is_an_error(ws, tmp_path, capsys):
    data = _data_with_bad_images(ws, tmp_path, dict.fromkeys(range(N), b""))
    _fails(capsys, _score_argv(ws, tmp_path / "s.npz", "--on-bad-image", "skip", data=data), 1,
           f"nothing was scored: every record was skipped for an unreadable image ({N}", "check --images")  # fmt: skip


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--dtype", "float33"], "argument --dtype: invalid choice: 'float33'"),
        (["--device", "nonsense"], "--device nonsense: not a torch device"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--batch-size", "two"], "argument --batch-size: expected an integer >= 1, got 'two'"),
        (["--num-workers", "-1"], "argument --num-workers: must be >= 0"),
        (["--checkpoint-every", "0"], "argument --checkpoint-every: must be >= 1"),
        (["--max-tokens-per-batch", "0"], "argument --max-tokens-per-batch: must be >= 1"),
        (["--image-token-id", "-3"], "argument --image-token-id: must be >= 0"),
        (["--on-bad-image", "ignore"], "argument --on-bad-image: invalid choice: 'ignore'"),
        (["--reference", "--checkpoint-dir", "x"], "--checkpoint-dir and --max-tokens-per-batch need the fused"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_bad_score_options_are_usage_errors(ws, tmp_path, capsys, extra, needle):
    _fails(capsys, _score_argv(ws, tmp_path / "s.npz", *extra), 2, needle)
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine has CUDA")
def test_cuda_on_a_cpu_machine_is_a_usage_error(ws, tmp_path, capsys):
    _fails(capsys, _score_argv(ws, tmp_path / "s.npz", "--device", "cuda"), 2, "--device cuda: ", "--device cpu")


def test_image_token_id_that_is_not_the_models(ws, tmp_path, capsys):
    _fails(capsys, _score_argv(ws, tmp_path / "s.npz", "--image-token-id", "5"), 2,
           "--image-token-id 5: image_token_id=5 is not the image placeholder")  # fmt: skip
    config = json.loads((ws / "model" / "config.json").read_text())
    image_token_id = config.get("image_token_id", config.get("image_token_index"))
    assert main(_score_argv(ws, tmp_path / "s.npz", "--image-token-id", str(image_token_id))) == 0
    assert json.loads(Scores.load(tmp_path / "s.npz").meta["score_options"])["image_token_id"] == image_token_id


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["detect", "S", "--out", "D", "--threshold", "nan"], "argument --threshold: must be a number in [0, inf)"),
        (["detect", "S", "--out", "D", "--threshold", "inf"], "argument --threshold: must be a number in [0, inf)"),
        (["detect", "S", "--out", "D", "--threshold", "-1"], "argument --threshold: must be a number in [0, inf)"),
        (["detect", "S", "--out", "D", "--threshold", "x"], "argument --threshold: expected a number"),
        (["detect", "S", "--out", "D", "--max-fraction", "0"], "argument --max-fraction: must be a number in (0, 1]"),
        (["detect", "S", "--out", "D", "--max-fraction", "1.5"], "argument --max-fraction: must be a number in (0, 1]"),
        (["detect", "S", "--out", "D", "--method", "magic"], "argument --method: invalid choice: 'magic'"),
        (["detect", "NOPE.npz", "--out", "D"], "scores NOPE.npz: no such file"),
        (["demo", "--rate", "0"], "argument --rate: must be a number in (0, 1)"),
        (["demo", "--rate", "1"], "argument --rate: must be a number in (0, 1)"),
        (["demo", "--rate", "1.5"], "argument --rate: must be a number in (0, 1)"),
        (["demo", "--threads", "0"], "argument --threads: must be >= 1"),
        (["demo", "--seed", "-1"], "argument --seed: must be >= 0"),
        (["filter", "--data", "NOPE.json", "--detection", "D", "--out", "o.json"], "--data NOPE.json: no such file"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_options_are_usage_errors(ws, capsys, monkeypatch, argv, needle):
    import bye_fast.lab.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda **kw: pytest.fail("the demo must not start"))
    argv = [str(ws / "scores.npz") if a == "S" else str(ws / "nope_det") if a == "D" else a for a in argv]
    _fails(capsys, argv, 2, needle)
    assert not (ws / "nope_det").exists()


def test_numeric_options_accept_their_range(monkeypatch):
    assert cli._DETECT_TYPES["max_fraction"]("1") == 1.0 and cli._DETECT_TYPES["threshold"]("0") == 0.0
    import bye_fast.lab.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    assert main(["demo", "--rate", "0.5", "--threads", "1", "--no-progress"]) == 0 and seen["rate"] == 0.5


# --------------------------------------------------------------------------- files
def test_bad_scores_files(ws, tmp_path, capsys):
    good = (ws / "scores.npz").read_bytes()
    cases = {
        "truncated.npz": good[: len(good) // 2],
        "empty.npz": b"",
        "p.npz": pickle.dumps({"entropy": [1.0]}),  # np.load would offer allow_pickle=True
        "array.npy": (lambda b: (np.save(b, np.zeros(3)), b.getvalue())[1])(io.BytesIO()),
        "text.npz": b"hello\n",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        err = _fails(capsys, ["detect", str(tmp_path / name), "--out", str(tmp_path / "d")], 1,
                     f"{tmp_path / name}: not a bye_fast scores file", "truncated, or another kind of file")  # fmt: skip
        assert "pickle" not in err.lower()  # never suggest loading pickles from a user's file
    assert not (tmp_path / "d").exists()


def test_bad_detection_files(ws, tmp_path, capsys):
    det = json.loads((ws / "det" / "detection.json").read_text())
    no_options = {k: v for k, v in det.items() if k != "options"}
    cases = {
        "list.json": (json.dumps([det]), "not a bye_fast detection file (format bye_fast.detection/2; got a JSON list)"),
        "missing.json": (json.dumps(no_options), "detection file without options"),
        "unknown.json": (json.dumps({**det, "colour": 1}), "detection file with unknown field(s) colour"),
        "invalid.json": ('{"ids": [', "not a bye_fast detection file (detection.json): invalid JSON at line 1"),
        "scores.npz": ((ws / "scores.npz").read_bytes(), "not UTF-8 text (byte 0x"),
        "latin1.json": ('{"format": "caf\xe9"}'.encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 15)"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        argv = ["filter", "--data", str(ws / "train.json"), "--detection", str(path), "--out", str(tmp_path / "o.json")]
        _fails(capsys, argv, 1, f"{path}: ", needle)
    assert "zip archive" in _fails(capsys, [*argv[:4], str(tmp_path / "scores.npz"), *argv[5:]], 1)
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[{\"id\": \"caf\xe9\"}]".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 12)"),
        (b'{"data": [{"id": "r000"}]}', "holds one JSON object (keys 'data'), not a list of records"),
        (b'{\n "info": 1,\n "data": []\n}\n', "holds one JSON object (keys 'info', 'data')"),
        (b'[{"id": 1.5, "conversations": [{"from": "human", "value": "q"}]}]',
         "record 0: an id must be a str or an int, not float (1.5)"),
        (b'[{"id": 2.0, "conversations": [{"from": "human", "value": "q"}]}]', "not float (2.0)"),
    ],
)
def test_bad_data_files(ws, tmp_path, capsys, content, needle):
    data = tmp_path / "data.json"
    data.write_bytes(content)
    argv = ["filter", "--data", str(data), "--detection", str(ws / "det" / "detection.json"),
            "--out", str(tmp_path / "o.json")]  # fmt: skip
    err = _fails(capsys, argv, 1, f"{data}: ", needle)
    assert "has no 'id'" not in err and not (tmp_path / "o.json").exists()


def test_int_ids_are_kept_exactly():
    """Float ids are refused (bye_fast.data, and Scores); int ids beyond int64 are kept, as text."""
    big = [2**63 + 5, 3, -(2**70)]
    scores = Scores(np.zeros((3, 2)), ids=big)
    assert scores.ids.tolist() == [str(i) for i in big]
    assert Scores(np.zeros((2, 2)), ids=[2**62, 3]).ids.dtype == np.int64
    with pytest.raises(ValueError, match="ids must be str or int"):
        Scores(np.zeros((1, 2)), ids=[1.0])


def test_filter_refuses_to_write_its_inputs(ws, tmp_path, capsys):
    before = _sha(ws / "train.json")
    det = str(ws / "det" / "detection.json")
    _fails(capsys, ["filter", "--data", str(ws / "train.json"), "--detection", det, "--out", str(ws / "train.json"),
                    "--overwrite"], 2, "is the --data input")  # fmt: skip
    _fails(capsys, ["filter", "--data", str(ws / "train.json"), "--detection", det, "--out",
                    str(tmp_path / "x.json"), "--removed", det, "--overwrite"], 2, "is the --detection input")  # fmt: skip
    assert _sha(ws / "train.json") == before


# --------------------------------------------------------------------------- the detect folder
def test_detect_writes_its_folder_as_one_unit(ws, tmp_path, capsys, monkeypatch):
    import bye_fast.plots

    out = tmp_path / "det"
    scores = str(ws / "scores.npz")
    labels = []
    real_save = bye_fast.plots._save
    monkeypatch.setattr(bye_fast.plots, "_save", lambda fig, path: (
        labels.append([t.get_text() for t in fig.axes[0].get_xticklabels()]), real_save(fig, path))[1])  # fmt: skip
    assert main(["detect", "--method", "paper", scores, "--out", str(out), "--threshold", "0"]) == 0
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(bye_fast.plots.PLOT_NAMES)
    assert ["0", "1"] in labels  # the per-layer plot's axis: integer layer numbers
    det = json.loads((out / "detection.json").read_text())
    assert det["meta"]["scores"] == str((ws / "scores.npz").resolve()) and Path(det["meta"]["data"]).is_absolute()
    assert json.loads(det["meta"]["detect_options"]) == {"method": "paper", "threshold": 0.0}
    assert json.loads(det["meta"]["score_options"])["batch_size"] == 8
    # --overwrite --no-plots: the previous run's plots go with it
    assert main(["detect", "--method", "paper", scores, "--out", str(out), "--no-plots", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["detection.json"]
    before = _sha(out / "detection.json")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    # an interrupt between the JSON and the plots leaves the old folder, or none, and nothing else
    monkeypatch.setattr(bye_fast.plots, "plot_detection", interrupted)
    _fails(capsys, ["detect", "--method", "paper", scores, "--out", str(out), "--overwrite", "--threshold", "0"], 130, "interrupted")
    assert _sha(out / "detection.json") == before and sorted(p.name for p in out.iterdir()) == ["detection.json"]
    fresh = tmp_path / "fresh"
    _fails(capsys, ["detect", "--method", "paper", scores, "--out", str(fresh)], 130, "interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det"]  # no partial folder, no temp folder
    monkeypatch.undo()
    assert main(["detect", "--method", "paper", scores, "--out", str(fresh), "--no-plots"]) == 0  # the rerun is not refused
    # a folder with files detect did not write is never replaced; a file is not a folder
    (out / "notes.txt").write_text("mine")
    _fails(capsys, ["detect", scores, "--out", str(out), "--overwrite"], 2, "holds files that detect does not write (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine"
    _fails(capsys, ["detect", scores, "--out", str(out / "notes.txt")], 2, "is a file; detect writes a folder")
    _fails(capsys, ["detect", scores, "--out", str(ws), "--overwrite"], 2, "holds the scores input")


def test_scores_record_absolute_paths_and_options(ws):
    meta = Scores.load(ws / "scores.npz").meta
    for key in ("model_path", "processor_path", "data", "images"):
        assert Path(meta[key]).is_absolute() and Path(meta[key]).exists(), key
    options = json.loads(meta["score_options"])
    assert options["batch_size"] == 8 and options["dtype"] == "float32" and options["on_bad_image"] == "error"
    assert "skipped" not in meta and meta["bye_fast_version"] == bye_fast.__version__
