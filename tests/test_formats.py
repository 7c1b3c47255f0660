"""Data formats besides LLaVA JSON: messages JSON/JSONL, parquet files and folders, HF datasets folders.

Each is read, loaded into batches, and filtered with a hand-made detection: the kept and removed
records, the output's format, and an untouched input are checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bye_fast.data import (
    AUDIT_KEY,
    build_prompt,
    filter_dataset,
    load_records,
    make_loader,
    read_dataset,
)
from bye_fast.lab.models import build_processor

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

N = 6
QUESTIONS = ["what digit is this ?", "is it even or odd ?"]


@dataclass
class Det:
    ids: object
    flagged: np.ndarray
    score: np.ndarray


def _detection(ids, flag) -> Det:
    flagged = np.array([i in flag for i in range(len(ids))])
    return Det(list(ids), flagged, np.linspace(0.0, 1.0, len(ids)))


def _png(k: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 20 * k, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with its hash and mtime: an untouched input keeps it."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): f"{hashlib.sha256(f.read_bytes()).hexdigest()} {f.stat().st_mtime_ns}" for f in files}


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for k in range(N):
        (root / f"{k}.png").write_bytes(_png(k))
    return root


def _messages(k: int) -> dict:
    """Messages record k (no id): string content with a placeholder, a list of parts, or text only."""
    q = QUESTIONS[k % 2]
    if k % 3 == 0:
        content = f"<image>\n{q}"
    elif k % 3 == 1:
        content = [{"type": "image"}, {"type": "text", "text": q}]
    else:
        content = q
    rec = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "even"}]}
    if k % 3 != 2:
        rec["images"] = [f"{k}.png"]
    rec["meta"] = {"k": k}
    return rec


def _llava_twin(rec: dict) -> dict:
    """The LLaVA record with the same question and images."""
    content = rec["messages"][0]["content"]
    text = content if isinstance(content, str) else "<image>\n" + content[1]["text"]
    out = {"id": "x", "conversations": [{"from": "human", "value": text}]}
    if "images" in rec:
        out["image"] = rec["images"]
    return out


# ------------------------------------------------------------------------ messages files
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_messages_file_roundtrip(tmp_path, image_dir, processor, suffix):
    records = [_messages(k) for k in range(N)]
    src = tmp_path / f"train{suffix}"
    if suffix == ".json":
        src.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    before = _tree_digest(src)
    source = read_dataset(src)
    assert source.format == suffix[1:] and source.ids == list(range(N))  # no ids: the row index
    assert load_records(src) == records
    for rec in records:  # the same prompt as the LLaVA record it stands for
        assert build_prompt(rec, processor) == build_prompt(_llava_twin(rec), processor)
    batches = list(make_loader(src, image_dir, processor, batch_size=4))
    assert [i for b in batches for i in b["ids"]] == list(range(N))
    assert batches[0]["pixel_values"].shape[0] == 3  # records 0, 1, 3 of the first batch have an image

    det = _detection(np.array([str(i) for i in range(N)]), flag={1, 4})  # ids as saved in a .npz
    report = filter_dataset(src, det, tmp_path / f"clean{suffix}")
    assert (report.n_kept, report.n_removed) == (4, 2)
    assert load_records(tmp_path / f"clean{suffix}") == [r for k, r in enumerate(records) if k not in (1, 4)]
    text = (tmp_path / f"clean{suffix}").read_text(encoding="utf-8")
    assert text.lstrip().startswith("[") == (suffix == ".json")  # the format it read
    audit = json.loads(report.removed_path.read_text(encoding="utf-8"))
    assert [e[AUDIT_KEY]["index"] for e in audit] == [1, 4]
    assert [{k: v for k, v in e.items() if k != AUDIT_KEY} for e in audit] == [records[1], records[4]]
    assert _tree_digest(src) == before


def test_messages_system_turn_and_image_parts(processor):
    rec = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "describe"}, {"type": "image"}]},
        ],
        "image": "a.png",
    }
    proc = build_processor()
    proc.chat_template = None
    assert build_prompt(rec, proc) == "be brief\ndescribe\n<image>"


@pytest.mark.parametrize(
    ("records", "needle"),
    [
        ([{"messages": [{"role": "user", "content": "q"}]}, {"messages": [{"role": "user", "content": [{"type": "video"}]}]}],
         "record 1"),
        ([{"messages": [{"role": "assistant", "content": "a"}]}], "no human turn"),
        ([{"id": "a", "messages": [{"role": "user", "content": "q"}]}, {"messages": [{"role": "user", "content": "q"}]}],
         "other records have one"),
        ([{"messages": [{"role": "user", "content": "<image> q"}], "images": ["a.png", "b.png"]}], "record 0"),
        ([{"messages": [{"role": "user", "content": "q"}], "images": [3]}], "'images' must be an image"),
    ],
)  # fmt: skip
def test_messages_bad_records_are_named(tmp_path, processor, records, needle):
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(ValueError, match=needle) as e:
        make_loader(src, None, processor)
    assert "bad.jsonl" in str(e.value) or "record 0" in str(e.value)


# ------------------------------------------------------------------------------ parquet
def _table(embedded: bool, ids: bool = False):
    """LLaVA-schema rows with an image column of {bytes, path} structs (embedded) or of paths."""
    rows = {
        "conversations": [[{"from": "human", "value": f"<image>\n{QUESTIONS[k % 2]}"}] for k in range(N)],
        "image": [{"bytes": _png(k), "path": f"{k}.png"} if embedded else f"{k}.png" for k in range(N)],
        "label": list(range(N)),
    }
    if ids:
        rows = {"id": [f"r{k}" for k in range(N)], **rows}
    return pa.table(rows)


@pytest.mark.parametrize("embedded", [True, False])
def test_parquet_file_roundtrip(tmp_path, image_dir, processor, embedded):
    table = _table(embedded)
    src = tmp_path / "train.parquet"
    pq.write_table(table, src)
    before = _tree_digest(src)
    source = read_dataset(src)
    assert source.format == "parquet" and source.ids == list(range(N))
    loader = make_loader(src, None if embedded else image_dir, processor, batch_size=4)
    batches = list(loader)
    assert [i for b in batches for i in b["ids"]] == list(range(N))
    assert sum(b["pixel_values"].shape[0] for b in batches) == N

    report = filter_dataset(src, _detection(range(N), flag={0, 5}), tmp_path / "clean.parquet")
    kept = pq.read_table(tmp_path / "clean.parquet")
    assert kept.schema == table.schema
    assert kept.to_pylist() == [r for k, r in enumerate(table.to_pylist()) if k not in (0, 5)]
    audit = json.loads(report.removed_path.read_text(encoding="utf-8"))
    assert [e["label"] for e in audit] == [0, 5] and [e[AUDIT_KEY]["index"] for e in audit] == [0, 5]
    if embedded:  # the audit file names the image, it does not copy it
        assert audit[0]["image"] == {
            "path": "0.png",
            "n_bytes": len(_png(0)),
            "sha256": hashlib.sha256(_png(0)).hexdigest(),
        }
    assert _tree_digest(src) == before
    with pytest.raises(ValueError, match="parquet"):
        filter_dataset(src, _detection(range(N), flag={0}), tmp_path / "other.json")


def test_parquet_folder_roundtrip(tmp_path, processor):
    table = _table(embedded=True, ids=True)
    src = tmp_path / "shards"
    src.mkdir()
    pq.write_table(table.slice(0, 4), src / "part-0.parquet")
    pq.write_table(table.slice(4, 2), src / "part-1.parquet")
    before = _tree_digest(src)
    source = read_dataset(src)
    assert source.format == "parquet-dir" and source.ids == [f"r{k}" for k in range(N)]
    assert [i for b in make_loader(src, None, processor, batch_size=4) for i in b["ids"]] == source.ids

    det = _detection(source.ids, flag={1, 4})
    report = filter_dataset(src, det, tmp_path / "clean")
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["part-0.parquet", "part-1.parquet"]
    assert pq.read_table(tmp_path / "clean" / "part-0.parquet")["id"].to_pylist() == ["r0", "r2", "r3"]
    assert pq.read_table(tmp_path / "clean" / "part-1.parquet")["id"].to_pylist() == ["r5"]
    assert report.removed_path == tmp_path / "clean.removed.json"
    assert [e["id"] for e in json.loads(report.removed_path.read_text())] == ["r1", "r4"]
    assert _tree_digest(src) == before
    with pytest.raises(ValueError, match="inside the source"):
        filter_dataset(src, det, src / "clean")


def test_parquet_bad_row_is_named(tmp_path, processor):
    table = _table(embedded=True)
    rows = table.to_pylist()
    rows[2]["conversations"] = [{"from": "gpt", "value": "no question"}]
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), src)
    with pytest.raises(ValueError, match=r"bad.parquet: row 2.*no human turn"):
        read_dataset(src)


# ------------------------------------------------------------------------- HF datasets
@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    images = [Image.open(io.BytesIO(_png(k))) for k in range(N)]
    parts = [[{"type": "image", "text": None}, {"type": "text", "text": QUESTIONS[k % 2]}] for k in range(N)]
    ds = datasets.Dataset.from_dict(
        {"messages": [[{"role": "user", "content": p}] for p in parts], "images": [[im] for im in images]},
        features=datasets.Features(
            {
                "messages": [{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"),
                                                                            "text": datasets.Value("string")}]}],
                "images": datasets.Sequence(datasets.Image()),
            }
        ),
    )  # fmt: skip
    root = tmp_path_factory.mktemp("hf")
    datasets.disable_progress_bars()
    ds.save_to_disk(str(root / "train"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(root / "dict"))
    return root


def test_datasets_folder_roundtrip(tmp_path, hf_dataset, processor):
    import datasets

    src = hf_dataset / "train"
    before = _tree_digest(src)
    source = read_dataset(src)
    assert source.format == "hf" and source.ids == list(range(N))
    batches = list(make_loader(src, None, processor, batch_size=4))
    assert [i for b in batches for i in b["ids"]] == list(range(N))
    assert sum(b["pixel_values"].shape[0] for b in batches) == N
    assert batches[0]["pixel_values"].shape[1:] == (3, 32, 32)
    prompt = build_prompt(source.records[1], processor)
    assert prompt == "USER: <image> is it even or odd ? ASSISTANT:"

    dst = tmp_path / "clean"
    report = filter_dataset(src, _detection(range(N), flag={2, 3}), dst)
    kept = datasets.load_from_disk(str(dst))
    assert kept.features == source.dataset.features
    assert kept.data.table.to_pylist() == [
        r for k, r in enumerate(source.table.to_pylist()) if k not in (2, 3)
    ]
    assert [e[AUDIT_KEY]["index"] for e in json.loads(report.removed_path.read_text())] == [2, 3]
    assert _tree_digest(src) == before
    # overwrite replaces the folder as a whole
    report = filter_dataset(src, _detection(range(N), flag={0}), dst, overwrite=True)
    assert datasets.load_from_disk(str(dst)).num_rows == N - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "clean.removed.json"]


def test_datasets_failed_placing_keeps_the_old_pair(tmp_path, hf_dataset, monkeypatch):
    import datasets

    src = hf_dataset / "train"
    dst = tmp_path / "clean"
    filter_dataset(src, _detection(range(N), flag={2}), dst)
    old_audit = (tmp_path / "clean.removed.json").read_text()
    real, calls = os.replace, []

    def replace(a, b):  # 1: the audit file, 2: the old folder aside, 3: the new folder in place
        calls.append(b)
        if len(calls) == 3:
            raise OSError("rename failed (simulated)")
        real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        filter_dataset(src, _detection(range(N), flag={0, 1}), dst, overwrite=True)
    monkeypatch.undo()
    assert datasets.load_from_disk(str(dst)).num_rows == N - 1  # the old dataset
    assert (tmp_path / "clean.removed.json").read_text() == old_audit  # and its own audit file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "clean.removed.json"]


def test_datasets_dict_folder_is_refused(hf_dataset):
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['test', 'train'\]"):
        read_dataset(hf_dataset / "dict")


def test_folder_without_a_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        read_dataset(tmp_path)


# --------------------------------------------------------------------------------- CLI
def test_cli_filter_writes_the_format_it_read(tmp_path, hf_dataset, capsys):
    import datasets

    from bye_fast.cli import main
    from bye_fast.detect import Detection

    det = Detection(ids=np.arange(N), flagged=np.isin(np.arange(N), [1]), score=np.zeros(N), method="hand",
                    options={}, reason="by hand", no_image_ids=[])  # fmt: skip
    det.to_json(tmp_path / "detection.json")
    argv = ["filter", "--data", str(hf_dataset / "train"), "--detection", str(tmp_path / "detection.json")]
    assert main([*argv, "--out", str(tmp_path / "clean")]) == 0
    assert "kept 5 of 6" in capsys.readouterr().out
    assert datasets.load_from_disk(str(tmp_path / "clean")).num_rows == N - 1
    assert main([*argv, "--out", str(tmp_path / "clean")]) == 2  # exists: a usage error
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--out", str(hf_dataset / "train" / "clean")]) == 2
    assert "inside the --data folder" in capsys.readouterr().err
    assert not (hf_dataset / "train" / "clean").exists()


def test_cli_score_parquet_with_prompt_options(tmp_path, capsys):
    import bye_fast
    from bye_fast.cli import main
    from bye_fast.lab.models import build_llava

    model, proc = build_llava(layers=1)
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    pq.write_table(_table(embedded=True), tmp_path / "train.parquet")  # no ids, images in the file
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                        "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}ASSISTANT:")  # fmt: skip
    argv = ["score", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.parquet"),
            "--out", str(tmp_path / "s.npz"), "--no-progress", "--image-placement", "first",
            "--system-prompt", "be brief"]  # fmt: skip
    assert main([*argv, "--chat-template", str(tmp_path / "nope.jinja")]) == 2
    assert "--chat-template" in capsys.readouterr().err
    assert main([*argv, "--chat-template", str(template)]) == 0
    scores = bye_fast.Scores.load(tmp_path / "s.npz")
    assert [int(i) for i in scores.ids] == list(range(N))  # row indices
    options = json.loads(scores.meta["score_options"])
    assert options["chat_template"] == str(template.resolve())
    assert (options["system_prompt"], options["image_placement"]) == ("be brief", "first")


def test_parquet_loader_with_a_worker_and_shards(tmp_path, processor):
    src = tmp_path / "train.parquet"
    pq.write_table(_table(embedded=True), src)
    loader = make_loader(src, None, processor, batch_size=2, num_workers=1)
    assert [i for b in loader for i in b["ids"]] == list(range(N))
    # shards keep the row-index ids of the whole file
    ids = [
        [i for b in make_loader(src, None, processor, rank=r, world_size=2) for i in b["ids"]] for r in (0, 1)
    ]
    assert ids == [[0, 1, 2], [3, 4, 5]]
