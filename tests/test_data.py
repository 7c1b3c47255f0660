"""Tests for bye_fast.data: reading LLaVA data, prompts, loaders, filtering."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bye_fast import data
from bye_fast.data import (
    FilterReport,
    LlavaCollator,
    LlavaDataset,
    build_prompt,
    filter_dataset,
    load_records,
    make_loader,
    shard_indices,
)
from bye_fast.lab.models import build_processor

N_RECORDS = 50
TOKENS_PER_IMAGE = 64  # image 32, patch 4


# ---------------------------------------------------------------------- fixtures
def _record(i: int) -> dict:
    """Record i: text-only, one image (with or without placeholder), or two images; ids mix str/int."""
    rid = i if i % 4 == 0 else f"s{i:03d}"
    extra = {"source": "test", "meta": {"k": i, "tags": ["a", "b"]}, "score": i / 3}
    if i == 5:
        extra["note"] = "unicode é \u2028 line-separator and \u00a0 nbsp"

    def conv(q):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": "even"}]

    if i % 10 == 9:
        return {"id": rid, "conversations": conv("is it even or odd ?"), **extra}
    if i % 7 == 3:
        images = [f"img/{i}a.png", f"img/{i}b.png"]
        q = "<image>\n<image>\nwhat digit is this ?"
        return {"id": rid, "image": images, "conversations": conv(q), **extra}
    q = "what digit is this ?" if i % 5 == 1 else "<image>\nwhat digit is this ?"
    return {"id": rid, "image": f"img/{i}.png", "conversations": conv(q), **extra}


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """A folder with data.json, data.jsonl and the images they name (varied sizes and modes)."""
    root = tmp_path_factory.mktemp("llava")
    rng = np.random.default_rng(0)
    records = [_record(i) for i in range(N_RECORDS)]
    (root / "img").mkdir()
    modes = ["RGB", "L", "RGBA"]
    for k, rec in enumerate(records):
        for rel in data._image_paths(rec):
            h, w = [(32, 32), (40, 48), (36, 32)][k % 3]
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(modes[k % 3]).save(root / rel)
    (root / "data.json").write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    with open(root / "data.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return root


@pytest.fixture
def records() -> list[dict]:
    return [_record(i) for i in range(N_RECORDS)]


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@dataclass
class Det:
    """A duck-typed detection, as another module will produce."""

    ids: object
    flagged: np.ndarray
    score: np.ndarray
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for k, v in self.extra.items():
            setattr(self, k, v)


def _detection(records, flag_every: int = 7, ids=None, **extra) -> Det:
    n = len(records)
    flagged = np.zeros(n, dtype=bool)
    flagged[::flag_every] = True
    ids = [r["id"] for r in records] if ids is None else ids
    return Det(ids, flagged, np.linspace(0.0, 1.0, n), extra)


# ------------------------------------------------------------------------ reading
@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_load_records_roundtrip(dataset_dir, records, name):
    assert load_records(dataset_dir / name) == records


def test_load_jsonl_named_json_and_blank_lines(tmp_path, records):
    p = tmp_path / "x.json"
    p.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n", encoding="utf-8")
    assert load_records(p) == records[:3]


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("bad.json", '[{"id": 1, ', "line 1"),
        ("bad.jsonl", '{"id": 1, "conversations": [{"from": "human", "value": "q"}]}\n\n{oops\n', "line 3"),
        ("obj.json", '{\n  "data": []\n}', "JSONL"),
        ("notobj.json", '[{"id": 0, "conversations": [{"from": "human", "value": "q"}]}, 7]', "record 1"),
        ("noid.json", '[{"conversations": [{"from": "human", "value": "q"}]}]', "record 0"),
        ("boolid.json", '[{"id": true, "conversations": [{"from": "human", "value": "q"}]}]', "bool"),
        (
            "noconv.jsonl",
            '{"id": "a", "conversations": [{"from": "human", "value": "q"}]}\n{"id": "zz"}\n',
            "'zz'",
        ),
        ("nohuman.json", '[{"id": "h1", "conversations": [{"from": "gpt", "value": "x"}]}]', "'h1'"),
        (
            "badimg.json",
            '[{"id": "i1", "image": 3, "conversations": [{"from": "human", "value": "q"}]}]',
            "'i1'",
        ),
    ],
)
def test_load_records_errors(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=name) as e:
        load_records(p)
    assert needle in str(e.value)


@pytest.mark.parametrize(("a", "b"), [('"x"', '"x"'), ("3", '"3"'), ("7", "7")])
def test_duplicate_ids_reported(tmp_path, a, b):
    turn = '"conversations": [{"from": "human", "value": "q"}]'
    p = tmp_path / "dup.jsonl"
    p.write_text(f'{{"id": {a}, {turn}}}\n{{"id": "y", {turn}}}\n{{"id": {b}, {turn}}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate id") as e:
        load_records(p)
    assert "line 3" in str(e.value) and str(json.loads(b)) in str(e.value) and "dup.jsonl" in str(e.value)


# ------------------------------------------------------------------------ prompts
def test_build_prompt_variants(processor, records):
    before = copy.deepcopy(records)
    assert build_prompt(records[0], processor) == "USER: <image> what digit is this ? ASSISTANT:"
    # no placeholder: images first
    assert build_prompt(records[1], processor) == "USER: <image> what digit is this ? ASSISTANT:"
    assert build_prompt(records[3], processor) == "USER: <image> <image> what digit is this ? ASSISTANT:"
    assert build_prompt(records[9], processor) == "USER: is it even or odd ? ASSISTANT:"
    assert records == before


def test_build_prompt_interleaved_and_first_turn_only(processor):
    rec = {
        "id": "m",
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "describe <image> and\n<image> ?"},
            {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "what digit is this ?"},
        ],
    }
    assert build_prompt(rec, processor) == "USER: describe <image> and <image> ? ASSISTANT:"


def test_build_prompt_placeholder_mismatch(processor):
    conv = [{"from": "human", "value": "<image> <image> q"}]
    rec = {"id": "mis-1", "image": "a.png", "conversations": conv}
    with pytest.raises(ValueError, match="mis-1"):
        build_prompt(rec, processor)
    rec = {"id": "mis-2", "conversations": [{"from": "human", "value": "<image> q"}]}
    with pytest.raises(ValueError, match="mis-2"):
        build_prompt(rec, processor)
    with pytest.raises(ValueError, match="mis-2"):
        LlavaDataset([rec], None, processor)


def test_build_prompt_without_chat_template(records):
    proc = build_processor()
    proc.chat_template = None
    assert build_prompt(records[0], proc) == "<image>\nwhat digit is this ?"
    assert build_prompt(records[1], proc) == "<image>\nwhat digit is this ?"
    assert build_prompt(records[9], proc) == "is it even or odd ?"
    other = SimpleNamespace(chat_template=None, image_token="<img>")
    assert build_prompt(records[3], other) == "<img>\n<img>\nwhat digit is this ?"
    assert build_prompt(records[1], other) == "<img>\nwhat digit is this ?"


#: A template that renders a system turn (the tiny processor's own has no system role).
SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}SYSTEM: {{ m['content'][0]['text'] }} "
    "{% else %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)


def test_prompt_chat_template_options(processor, records, tmp_path):
    rec = records[0]  # "<image>\nwhat digit is this ?"
    assert (
        build_prompt(rec, processor, chat_template="processor")
        == "USER: <image> what digit is this ? ASSISTANT:"
    )
    assert build_prompt(rec, processor, chat_template="none") == "<image>\nwhat digit is this ?"
    # the conversation template of LLaVA-1.5's own code, with its system prompt
    assert build_prompt(rec, processor, chat_template="llava_v1") == (
        f"{LLAVA_V1_SYSTEM} USER: <image>\nwhat digit is this ? ASSISTANT:"
    )
    assert build_prompt(records[9], processor, chat_template="llava_v1") == (
        f"{LLAVA_V1_SYSTEM} USER: is it even or odd ? ASSISTANT:"
    )
    jinja = "{% for m in messages %}Q {{ m['content'] | length }}{% endfor %} A"
    assert build_prompt(rec, processor, chat_template=jinja) == "Q 2 A"
    (tmp_path / "t.jinja").write_text(SYSTEM_TEMPLATE, encoding="utf-8")
    from_file = build_prompt(rec, processor, chat_template=tmp_path / "t.jinja")
    assert from_file == build_prompt(rec, processor, chat_template=SYSTEM_TEMPLATE)
    assert from_file == "USER: <image> what digit is this ? ASSISTANT:"
    with pytest.raises(ValueError, match="nope"):
        build_prompt(rec, processor, chat_template="nope")


def test_prompt_system_prompt_options(processor, records):
    rec = records[0]
    opts = {"chat_template": SYSTEM_TEMPLATE, "system_prompt": "be brief"}
    assert (
        build_prompt(rec, processor, **opts)
        == "SYSTEM: be brief USER: <image> what digit is this ? ASSISTANT:"
    )
    assert build_prompt(rec, processor, chat_template="none", system_prompt="be brief") == (
        "be brief\n<image>\nwhat digit is this ?"
    )
    assert build_prompt(rec, processor, chat_template="llava_v1", system_prompt="be brief") == (
        "be brief USER: <image>\nwhat digit is this ? ASSISTANT:"
    )
    # a record's own system turn goes into the prompt, and wins over --system-prompt
    own = {**rec, "conversations": [{"from": "system", "value": "own words"}, *rec["conversations"]]}
    assert (
        build_prompt(own, processor, **opts)
        == "SYSTEM: own words USER: <image> what digit is this ? ASSISTANT:"
    )
    messages = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "own words"}]},
            {"role": "user", "content": "<image>\nwhat digit is this ?"},
        ],
        "image": "0.png",
    }
    assert build_prompt(messages, processor, **opts) == build_prompt(own, processor, **opts)


def test_prompt_image_placement(processor):
    rec = {
        "id": "m",
        "image": ["a.png", "b.png"],
        "conversations": [{"from": "human", "value": "describe <image> and\n<image> ?"}],
    }
    assert (
        build_prompt(rec, processor) == "USER: describe <image> and <image> ? ASSISTANT:"
    )  # inline, the default
    # first: LLaVA's training code: the images in front, the text without its placeholders (stripped)
    assert (
        build_prompt(rec, processor, image_placement="first")
        == "USER: <image> <image> describe  and\n ? ASSISTANT:"
    )
    assert build_prompt(rec, processor, chat_template="none", image_placement="first") == (
        "<image><image>\ndescribe  and\n ?"
    )
    assert build_prompt(rec, processor, chat_template="none") == "describe <image> and\n<image> ?"
    parts = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "describe"}, {"type": "image"}]}],
        "images": ["a.png"],
    }
    assert build_prompt(parts, processor) == "USER: describe <image> ASSISTANT:"
    assert build_prompt(parts, processor, image_placement="first") == "USER: <image> describe ASSISTANT:"
    with pytest.raises(ValueError, match="image_placement"):
        build_prompt(rec, processor, image_placement="last")


def test_make_loader_passes_the_prompt_options(dataset_dir, records, processor):
    loader = make_loader(
        records[:2], dataset_dir, processor, chat_template=SYSTEM_TEMPLATE, system_prompt="be brief"
    )
    assert loader.dataset[0]["prompt"] == "SYSTEM: be brief USER: <image> what digit is this ? ASSISTANT:"
    ds = pickle.loads(pickle.dumps(loader.dataset))  # workers get the options too
    assert ds[0]["prompt"] == loader.dataset[0]["prompt"]
    first = make_loader(records[3:4], dataset_dir, processor, image_placement="first", chat_template="none")
    assert first.dataset[0]["prompt"] == "<image><image>\nwhat digit is this ?"


# ------------------------------------------------------------------ dataset/loader
def test_dataset_items(dataset_dir, records, processor):
    before = copy.deepcopy(records)
    ds = LlavaDataset(records, dataset_dir, processor)
    assert len(ds) == N_RECORDS
    for i in (0, 1, 2, 3, 9):
        item = ds[i]
        assert set(item) == {"id", "prompt", "images"}
        assert item["id"] == records[i]["id"]
        assert item["prompt"] == build_prompt(records[i], processor)
        assert len(item["images"]) == len(data._image_paths(records[i]))
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in item["images"])
    assert records == before


def test_dataset_missing_image(tmp_path, records, processor):
    ds = LlavaDataset(records, tmp_path, processor)
    with pytest.raises(FileNotFoundError, match="s001") as e:
        ds[1]
    assert str(tmp_path / "img" / "1.png") in str(e.value)


@pytest.mark.parametrize("side", ["left", "right"])
def test_loader_batches(dataset_dir, processor, side):
    proc = copy.deepcopy(processor)
    proc.tokenizer.padding_side = side
    records = load_records(dataset_dir / "data.json")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    seen = []
    for batch in make_loader(dataset_dir / "data.json", dataset_dir, proc, batch_size=8):
        ids, input_ids, mask = batch["ids"], batch["input_ids"], batch["attention_mask"]
        assert len(ids) == input_ids.shape[0] == mask.shape[0]
        by_id = {r["id"]: r for r in records}
        n_images = [len(data._image_paths(by_id[i])) for i in ids]
        assert (input_ids == image_id).sum(1).tolist() == [TOKENS_PER_IMAGE * k for k in n_images]
        if sum(n_images):
            assert batch["pixel_values"].shape == (sum(n_images), 3, 32, 32)
        lengths = mask.sum(1)
        assert lengths.min() < lengths.max() or len(ids) == 1  # mixed prompt lengths in a batch
        # real tokens are contiguous at the end (left) or start (right)
        col = torch.arange(mask.shape[1])
        start = mask.shape[1] - lengths if side == "left" else torch.zeros_like(lengths)
        expected = (col[None] >= start[:, None]) & (col[None] < (start + lengths)[:, None])
        assert torch.equal(mask.bool(), expected)
        assert (input_ids[~mask.bool()] == proc.tokenizer.pad_token_id).all()
        seen.extend(ids)
    assert seen == [r["id"] for r in records]


def test_collator_mixed_and_text_only(dataset_dir, records, processor):
    ds = LlavaDataset(records, dataset_dir, processor)
    collate = LlavaCollator(processor)
    text_only = collate([ds[9], ds[19]])
    assert "pixel_values" not in text_only and text_only["ids"] == ["s009", "s019"]
    mixed = collate([ds[9], ds[3], ds[0]])
    assert mixed["ids"] == ["s009", "s003", 0]
    assert mixed["pixel_values"].shape[0] == 3
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (mixed["input_ids"] == image_id).sum(1).tolist() == [0, 128, 64]


def test_collator_error_names_ids(processor):
    bad = {"id": "bad-7", "prompt": "USER: <image> q ASSISTANT:", "images": []}
    ok = {"id": "ok", "prompt": "USER: <image> q ASSISTANT:", "images": [Image.new("RGB", (32, 32))]}
    with pytest.raises(ValueError) as e:
        LlavaCollator(processor)([ok, bad])
    assert "bad-7" in "".join(getattr(e.value, "__notes__", [])) + str(e.value)


def test_collator_and_dataset_pickle(dataset_dir, records, processor):
    ds = pickle.loads(pickle.dumps(LlavaDataset(records, dataset_dir, processor)))
    collate = pickle.loads(pickle.dumps(LlavaCollator(processor)))
    assert collate([ds[0], ds[1]])["ids"] == [0, "s001"]


def test_loader_workers(dataset_dir, records, processor):
    loader = make_loader(records[:12], dataset_dir, processor, batch_size=4, num_workers=1)
    assert [i for b in loader for i in b["ids"]] == [r["id"] for r in records[:12]]


@pytest.mark.parametrize("n", range(21))
def test_shard_indices_cover(n):
    for world_size in range(1, 6):
        shards = [shard_indices(n, r, world_size) for r in range(world_size)]
        assert [i for s in shards for i in s] == list(range(n))  # each once, in order, contiguous
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("n", "rank", "ws", "exc"),
    [
        (-1, 0, 1, ValueError),
        (5, 2, 2, ValueError),
        (5, -1, 2, ValueError),
        (5, 0, 0, ValueError),
        (5.0, 0, 1, TypeError),
        (5, True, 2, TypeError),
    ],
)
def test_shard_indices_bad_args(n, rank, ws, exc):
    with pytest.raises(exc):
        shard_indices(n, rank, ws)


def test_make_loader_shards(dataset_dir, records, processor, monkeypatch):
    ids = []
    for rank in range(3):
        loader = make_loader(records, dataset_dir, processor, batch_size=16, rank=rank, world_size=3)
        ids.append([i for b in loader for i in b["ids"]])
    assert [len(x) for x in ids] == [17, 17, 16]
    assert sum(ids, []) == [r["id"] for r in records]
    with pytest.raises(ValueError, match="rank"):
        make_loader(records, dataset_dir, processor, rank=0)
    # defaults come from torch.distributed when initialised
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert len(make_loader(records, dataset_dir, processor).dataset) == 25
    assert make_loader(records, dataset_dir, processor).dataset.records[0] is records[25]


# ---------------------------------------------------------------------- filtering
def _strip(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != data.AUDIT_KEY}


@pytest.mark.parametrize("src_name", ["data.json", "data.jsonl"])
@pytest.mark.parametrize("dst_name", ["clean.json", "clean.jsonl", "clean.out"])
def test_filter_roundtrip(dataset_dir, tmp_path, src_name, dst_name):
    src = dataset_dir / src_name
    before = _digest(src)
    records = load_records(src)
    det = _detection(records)
    det.ids = list(reversed(det.ids))  # detection order need not be the file's
    det.flagged, det.score = det.flagged[::-1].copy(), det.score[::-1].copy()
    report = filter_dataset(src, det, tmp_path / dst_name)
    assert isinstance(report, FilterReport)
    assert (report.n_total, report.n_kept, report.n_removed) == (50, 42, 8)
    assert report.removed_path == tmp_path / "clean.removed.json"
    assert "kept 42 of 50" in str(report) and str(tmp_path / dst_name) in str(report)

    dst_text = (tmp_path / dst_name).read_text(encoding="utf-8")
    want_fmt = {"clean.json": "json", "clean.jsonl": "jsonl"}.get(dst_name, src_name.split(".")[1])
    assert dst_text.lstrip().startswith("[") == (want_fmt == "json")
    kept = load_records(tmp_path / dst_name)
    removed = json.loads(report.removed_path.read_text(encoding="utf-8"))
    assert kept == [r for i, r in enumerate(records) if i % 7]
    by_index = {e[data.AUDIT_KEY]["index"]: _strip(e) for e in removed}
    merged = [by_index[i] if i in by_index else None for i in range(len(records))]
    kept_iter = iter(kept)
    merged = [m if m is not None else next(kept_iter) for m in merged]
    assert merged == records  # kept + removed = src, all fields, original order
    for e in removed:
        i = e[data.AUDIT_KEY]["index"]
        assert e[data.AUDIT_KEY]["score"] == pytest.approx(i / 49)
    assert _digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dst_name, "clean.removed.json"])


def test_filter_id_matching(tmp_path, dataset_dir):
    src = dataset_dir / "data.json"
    records = load_records(src)
    # int ids in JSON vs a numpy *string* array from the detection: matched by text
    str_ids = np.array([str(r["id"]) for r in records])
    assert str_ids.dtype.kind == "U"
    report = filter_dataset(src, _detection(records, ids=str_ids), tmp_path / "a.json")
    assert report.n_removed == 8
    int_like = {"id": 12, "conversations": [{"from": "human", "value": "q"}]}
    p = tmp_path / "ints.json"
    p.write_text(json.dumps([{**int_like, "id": i} for i in range(5)]), encoding="utf-8")
    det = _detection(list(range(5)), ids=np.arange(5, dtype=np.int64))
    det.flagged = np.array([False, True, False, False, True])
    assert filter_dataset(p, det, tmp_path / "ints.clean.json").n_kept == 3

    wrong = [r["id"] for r in records]
    wrong[3] = "nope-1"
    with pytest.raises(ValueError, match="nope-1") as e:
        filter_dataset(src, _detection(records, ids=wrong), tmp_path / "b.json")
    assert "not in" in str(e.value)
    with pytest.raises(ValueError, match="s049"):  # src id not covered
        filter_dataset(src, _detection(records[:-1]), tmp_path / "c.json")
    dup = [r["id"] for r in records]
    dup[1] = "s002"
    with pytest.raises(ValueError, match="duplicate"):
        filter_dataset(src, _detection(records, ids=dup), tmp_path / "d.json")
    det = _detection(records)
    det.flagged = det.flagged.astype(int)
    with pytest.raises(TypeError, match="bool"):
        filter_dataset(src, det, tmp_path / "e.json")
    det = _detection(records)
    det.score = det.score[:-1]
    with pytest.raises(ValueError, match="one entry per sample"):
        filter_dataset(src, det, tmp_path / "f.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json",
        "a.removed.json",
        "ints.clean.json",
        "ints.clean.removed.json",
        "ints.json",
    ]


def test_filter_audit_info(tmp_path, dataset_dir):
    src = dataset_dir / "data.jsonl"
    records = load_records(src)
    n = len(records)
    det = _detection(
        records,
        posterior=np.full(n, 0.9),
        entropy=np.ones((n, 4)),
        kl=np.zeros(4),
        name="bye",
        labels=[f"c{i}" for i in range(n)],
    )
    det.score = det.score.copy()
    det.score[7] = np.nan
    report = filter_dataset(src, det, tmp_path / "clean.jsonl", removed_path=tmp_path / "audit.jsonl")
    audit = load_records(tmp_path / "audit.jsonl")  # the audit file is itself LLaVA-format
    info = {e["id"]: e[data.AUDIT_KEY] for e in audit}
    assert info["s007"] == {
        "index": 7,
        "score": None,
        "posterior": 0.9,
        "entropy": [1.0] * 4,
        "labels": "c7",
    }
    assert report.removed_path == tmp_path / "audit.jsonl"
    det.per_sample_fields = ("posterior",)
    filter_dataset(src, det, tmp_path / "x.json", removed_path=tmp_path / "x.audit.json")
    audit = json.loads((tmp_path / "x.audit.json").read_text(encoding="utf-8"))
    assert set(audit[0][data.AUDIT_KEY]) == {"index", "score", "posterior"}


def test_filter_refuses_src(tmp_path, dataset_dir):
    src = tmp_path / "train.json"
    src.write_bytes((dataset_dir / "data.json").read_bytes())
    before = _digest(src)
    det = _detection(load_records(src))
    (tmp_path / "link.json").symlink_to(src)
    os.link(src, tmp_path / "hard.json")
    (tmp_path / "sub").mkdir()
    for dst in (src, tmp_path / "sub" / ".." / "train.json", tmp_path / "link.json", tmp_path / "hard.json"):
        with pytest.raises(ValueError, match="source"):
            filter_dataset(src, det, dst, overwrite=True)
    with pytest.raises(ValueError, match="source"):
        filter_dataset(src, det, tmp_path / "ok.json", removed_path=src, overwrite=True)
    with pytest.raises(ValueError, match="same file"):
        filter_dataset(src, det, tmp_path / "ok.json", removed_path=tmp_path / "ok.json")
    assert _digest(src) == before
    assert not (tmp_path / "ok.json").exists()


def test_filter_overwrite(tmp_path, dataset_dir):
    src = dataset_dir / "data.json"
    det = _detection(load_records(src))
    dst = tmp_path / "clean.json"
    dst.write_text("old", encoding="utf-8")
    with pytest.raises(FileExistsError, match="clean.json"):
        filter_dataset(src, det, dst)
    assert dst.read_text(encoding="utf-8") == "old"
    dst.unlink()
    (tmp_path / "clean.removed.json").write_text("old audit", encoding="utf-8")
    with pytest.raises(FileExistsError, match="clean.removed.json"):
        filter_dataset(src, det, dst)
    assert not dst.exists()
    filter_dataset(src, det, dst, overwrite=True)
    assert len(load_records(dst)) == 42
    assert len(json.loads((tmp_path / "clean.removed.json").read_text(encoding="utf-8"))) == 8


def _failing_dump(real):
    def dump(obj, f, **kw):
        f.write('[{"partial": ')
        raise OSError("disk full (simulated)")

    return dump


def _failing_replace(monkeypatch, fail_on, exc: BaseException, *, after_rename: bool = False) -> None:
    """Patch ``os.replace`` to raise ``exc`` on the calls numbered in ``fail_on`` (1-based),
    before renaming or, with ``after_rename``, right after it."""
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(b)
        failing = len(calls) in fail_on
        if failing and not after_rename:
            raise exc
        real(a, b)
        if failing:
            raise exc

    monkeypatch.setattr(os, "replace", replace)


def _old_pair(folder):
    """An earlier filter's output in ``folder``: clean.json and its audit file."""
    dst, removed = folder / "clean.json", folder / "clean.removed.json"
    dst.write_text("old dataset\n", encoding="utf-8")
    removed.write_text("old audit\n", encoding="utf-8")
    return dst, removed


@pytest.mark.parametrize("fail", ["json.dump", "os.replace-1", "os.replace-2"])
def test_filter_atomic(tmp_path, dataset_dir, monkeypatch, fail):
    src = dataset_dir / "data.json"
    before = _digest(src)
    det = _detection(load_records(src))
    out = tmp_path / "out"
    out.mkdir()
    if fail == "json.dump":
        monkeypatch.setattr(json, "dump", _failing_dump(json.dump))
    else:
        _failing_replace(monkeypatch, {int(fail[-1])}, OSError("rename failed (simulated)"))
    with pytest.raises(OSError, match="simulated"):
        filter_dataset(src, det, out / "clean.json")
    monkeypatch.undo()
    assert list(out.iterdir()) == []  # no dst, no audit file, no temp files
    assert _digest(src) == before


def test_filter_atomic_keeps_old_dst(tmp_path, dataset_dir, monkeypatch):
    src = dataset_dir / "data.jsonl"
    dst = tmp_path / "clean.jsonl"
    dst.write_text("previous\n", encoding="utf-8")
    monkeypatch.setattr(json, "dump", _failing_dump(json.dump))
    with pytest.raises(OSError, match="simulated"):
        filter_dataset(src, _detection(load_records(src)), dst, overwrite=True)
    assert dst.read_text(encoding="utf-8") == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["clean.jsonl"]


def test_filter_failing_overwrite_keeps_the_old_pair(tmp_path, dataset_dir, monkeypatch):
    # dst and its audit file exist; the new audit file is placed, then placing dst fails:
    # the old audit file must come back, or the old dst would be left without one
    src = dataset_dir / "data.json"
    dst, removed = _old_pair(tmp_path)
    _failing_replace(monkeypatch, {2}, OSError("rename failed (simulated)"))
    with pytest.raises(OSError, match="simulated"):
        filter_dataset(src, _detection(load_records(src)), dst, overwrite=True)
    monkeypatch.undo()
    assert dst.read_text(encoding="utf-8") == "old dataset\n"
    assert removed.read_text(encoding="utf-8") == "old audit\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.json", "clean.removed.json"]


def test_outputs_get_the_umask_permissions_not_owner_only(tmp_path, dataset_dir):
    from bye_fast._io import default_file_mode, write_json_atomic

    old = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        path = write_json_atomic(tmp_path / "x.json", {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_filter_interrupted_after_placing_dst_keeps_the_new_pair(tmp_path, dataset_dir, monkeypatch):
    src = dataset_dir / "data.json"
    dst, removed = _old_pair(tmp_path)
    # dst is in place, then the user presses Ctrl-C
    _failing_replace(monkeypatch, {2}, KeyboardInterrupt(), after_rename=True)
    with pytest.raises(KeyboardInterrupt):
        filter_dataset(src, _detection(load_records(src)), dst, overwrite=True)
    monkeypatch.undo()
    kept, audit = json.loads(dst.read_text()), json.loads(removed.read_text())  # both new, a pair
    assert len(kept) + len(audit) == len(load_records(src)) and audit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.json", "clean.removed.json"]


def test_filter_failed_restore_never_loses_the_old_audit_file(tmp_path, dataset_dir, monkeypatch):
    src = dataset_dir / "data.json"
    dst, removed = _old_pair(tmp_path)
    # placing dst fails, and so does putting the old audit file back
    _failing_replace(monkeypatch, {2, 3}, OSError("rename failed (simulated)"))
    with pytest.raises(OSError, match="simulated"):
        filter_dataset(src, _detection(load_records(src)), dst, overwrite=True)
    monkeypatch.undo()
    assert dst.read_text(encoding="utf-8") == "old dataset\n"
    texts = [p.read_text(encoding="utf-8") for p in tmp_path.iterdir()]
    assert "old audit\n" in texts  # left beside it under a temp name, not deleted
