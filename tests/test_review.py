"""The review sheet (`bye-fast review`, bye_fast.review.write_review): an HTML page, a PNG contact sheet and
review.json of the most suspicious samples, with the last prompt token's attention heat map over each image."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bye_fast
from bye_fast.cli import main
from bye_fast.data import make_loader
from bye_fast.detect import Detection
from bye_fast.lab.models import build_llava
from bye_fast.review import (
    CAPTION,
    COLUMNS,
    REVIEW_FILES,
    TILE,
    detection_layers,
    heat_maps,
    layer_mean,
    question_and_answer,
    write_review,
)

from ._families import BEGIN, END, FAMILIES, GEMMA_TOKENS, IMG, _text, gemma3_batch, gemma3_model
from ._models import llava_next, sharpen

N = 14


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny LLaVA on disk, 14 records with 32x40 images (the processor crops them to 32x32: 8x8 image
    tokens), their scores and the paper's detection."""
    root = tmp_path_factory.mktemp("review")
    model, processor = build_llava(layers=3)
    sharpen(model)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    rng = np.random.default_rng(1)
    (root / "images").mkdir()
    records = []
    for i in range(N):
        Image.fromarray((rng.random((32, 40, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        records.append({
            "id": f"s{i:02d}", "image": f"{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nwhat digit is this ?" if i % 2 else "is it even ?"},
                              {"from": "gpt", "value": f"answer <{i}> & more"}],
        })  # fmt: skip
    (root / "train.json").write_text(json.dumps(records))
    loader = make_loader(root / "train.json", root / "images", processor, batch_size=7)
    scores = bye_fast.score(model, loader, progress=False)
    det = bye_fast.detect(scores, method="paper", threshold=0.5)
    (root / "det").mkdir()
    det.to_json(root / "det" / "detection.json")
    return {"root": root, "model": model, "processor": processor, "records": records, "det": det}


def _cli(w, out, *extra):
    root = w["root"]
    return main(["review", "--model", str(root / "model"), "--data", str(root / "train.json"), "--images",
                 str(root / "images"), "--detection", str(root / "det"), "--out", str(out), "--no-progress",
                 *extra])  # fmt: skip


def test_cli_writes_the_review_folder(workspace, tmp_path, capsys):
    w, k = workspace, 8
    det = w["det"]
    out = tmp_path / "review"
    assert _cli(w, out, "--top-k", str(k)) == 0
    assert "review of the 8 most suspicious samples" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(REVIEW_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    expected = [det.ids[i] for i in np.argsort(det.rank)[:k]]
    review = json.loads((out / "review.json").read_text())
    assert [s["id"] for s in review["samples"]] == expected
    assert [s["rank"] for s in review["samples"]] == list(range(1, k + 1))
    by_id = {v: i for i, v in enumerate(det.ids.tolist())}
    for s in review["samples"]:
        assert s["score"] == pytest.approx(det.score[by_id[s["id"]]])
        assert s["flagged"] == bool(det.flagged[by_id[s["id"]]])
        assert s["grid"] == [8, 8] and s["n_image_tokens"] == 64
        assert s["answer"] == f"answer <{int(s['id'][1:])}> & more"
    assert list(det.details["sensitive"]) == [1, 2]  # threshold 0.5 on this fixture
    assert (
        review["layers"] == [1, 2]
        and review["layer_source"] == "the layers of the features the detection used"
    )
    assert review["n_flagged"] == det.n_flagged == 1 and review["samples"][0]["flagged"]

    page = (out / "index.html").read_text()
    positions = [page.index(f"<code>{i}</code>") for i in expected]
    assert positions == sorted(positions)  # rank order
    assert page.count("data:image/png;base64,") == 2 * k  # image + heat layer per sample, embedded
    for i in expected:  # the answers are shown, escaped (never raw HTML)
        assert f"answer &lt;{int(i[1:])}&gt; &amp; more" in page and f"<{int(i[1:])}>" not in page
    sections = page.split('<div class="sample"')[1:]
    assert len(sections) == k
    for sec, s in zip(sections, review["samples"], strict=True):
        assert f"<b>#{s['rank']}</b>" in sec and f"<code>{s['id']}</code>" in sec
        assert f"<b>{s['score']:.4g}</b>" in sec
        badge = (
            '<span class="flagged">flagged</span>'
            if s["flagged"]
            else '<span class="kept">not flagged</span>'
        )
        assert badge in sec

    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.format == "PNG"
    cols = min(COLUMNS, k)
    assert sheet.size == (cols * TILE, -(-k // cols) * (TILE + CAPTION))
    assert sheet.convert("RGB").getpixel((1, 1))[0] > 180  # rank 1 is flagged: framed in red


def test_heat_map_matches_eager_attention(workspace, tmp_path):
    """The heat map of a sample equals an independent recomputation from eager attention maps
    (output_attentions=True), whose per-layer entropies are the scores of bye_fast.score_reference."""
    w = workspace
    model, processor = w["model"], w["processor"]
    layers = [0, 2]
    review = write_review(model, processor, w["records"], w["det"], tmp_path / "r", top_k=3,
                          images=w["root"] / "images", layers=layers, batch_size=2)  # fmt: skip
    assert review.layers == layers and review.layer_source == "given"
    image_id = model.config.image_token_id
    for s, hm in zip(review.samples, review.heat, strict=True):
        assert hm.layers == layers and hm.skipped_layers == [] and hm.notes == []
        record = next(r for r in w["records"] if r["id"] == s["id"])
        batch = next(iter(make_loader([record], w["root"] / "images", processor, batch_size=1)))
        inputs = {k: v for k, v in batch.items() if k != "ids"}
        ref = bye_fast.score_reference(model, [batch], progress=False)
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                att = model(**inputs, output_attentions=True, use_cache=False).attentions
        finally:
            model.set_attn_implementation("sdpa")
        image = inputs["input_ids"][0] == image_id
        q = int(inputs["attention_mask"][0].nonzero().max())
        per_layer = []
        for j in range(len(att)):
            a = att[j][0, :, q, :].double().mean(dim=0)[image]
            per_layer.append((a / a.sum()).numpy())
        per_layer = np.array(per_layer)
        entropy = -(per_layer * np.log(per_layer + 1e-10)).sum(axis=1)
        np.testing.assert_allclose(entropy, ref.entropy[0], atol=1e-4)
        expected = per_layer[layers].mean(axis=0).reshape(8, 8)
        assert hm.values.shape == (8, 8)
        np.testing.assert_allclose(hm.values, expected, atol=1e-5, rtol=0)


def test_refuses_to_overwrite_without_the_option(workspace, tmp_path, capsys):
    w = workspace
    out = tmp_path / "review"
    assert _cli(w, out, "--top-k", "2") == 0
    before = (out / "review.json").read_text()
    capsys.readouterr()
    assert _cli(w, out, "--top-k", "3") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"bye-fast: error: --out {out} exists; pass --overwrite to replace it"
    assert (out / "review.json").read_text() == before
    assert _cli(w, out, "--top-k", "3", "--overwrite") == 0
    assert len(json.loads((out / "review.json").read_text())["samples"]) == 3
    (out / "mine.txt").write_text("not the review's")
    assert _cli(w, out, "--overwrite") == 2
    assert "holds files that review does not write (mine.txt)" in capsys.readouterr().err
    assert _cli(w, w["root"] / "det", "--overwrite") == 2  # never replaces the folder of an input
    assert "is or holds the --detection input" in capsys.readouterr().err
    assert (w["root"] / "det" / "detection.json").is_file()
    assert _cli(w, tmp_path / "x", "--layers", "3") == 2
    assert "--layers: the model has 3 decoder layers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_detection_of_other_data_is_a_one_line_error(workspace, tmp_path, capsys):
    w = workspace
    det = w["det"]
    other = Detection(
        ids=np.array([f"x{i}" for i in range(len(det.ids))]), flagged=det.flagged, score=det.score,
        method=det.method, options=det.options, reason=det.reason, no_image_ids=[], details=det.details,
    )  # fmt: skip
    other.to_json(tmp_path / "other.json")
    out = tmp_path / "review"
    root = w["root"]
    rc = main(["review", "--model", str(root / "model"), "--data", str(root / "train.json"), "--images",
               str(root / "images"), "--detection", str(tmp_path / "other.json"), "--out", str(out), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("bye-fast: error: ")
    assert "of the detection's 14 id(s) are not in" in err and "'x0'" in err
    assert not out.exists()
    fewer = Detection(
        ids=det.ids[:-2], flagged=det.flagged[:-2], score=det.score[:-2], method=det.method,
        options=det.options, reason=det.reason, no_image_ids=[], details=det.details,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"2 id\(s\) of the records are not in the detection: 's12', 's13'"):
        write_review(w["model"], w["processor"], w["records"], fewer, tmp_path / "r2", images=root / "images")


def test_layers_that_cannot_see_the_image_are_skipped_with_a_note():
    """A Gemma 3 whose sliding window (8) ends before the image: its sliding layers' maps are NaN."""
    model = gemma3_model(8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    gen = torch.Generator().manual_seed(0)
    image = [BEGIN] + [IMG] * GEMMA_TOKENS + [END]
    rows = [[1] + _text(gen, 2) + image + _text(gen, 12), [1] + _text(gen, 2) + image + _text(gen, 2)]
    batch = gemma3_batch(rows, "left", gen)
    ids, hms = heat_maps(model, [batch])
    far, near = hms
    assert far.layers == [1] and far.skipped_layers == [0, 2]
    assert any("skipped" in n for n in far.notes)
    assert far.values.shape == (4, 4) and np.isfinite(far.values).all()
    assert near.skipped_layers == [] and near.layers == [0, 1, 2]
    _, only_sliding = heat_maps(model, [batch], layers=[0, 2])
    assert only_sliding[0].layers == [1] and "none of the chosen layers" in " ".join(only_sliding[0].notes)

    maps = np.array([[np.nan] * 4, [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    mean, used, skipped, notes = layer_mean(maps, [0, 1, 2])
    np.testing.assert_allclose(mean, [0.25] * 4)
    assert used == [1, 2] and skipped == [0] and len(notes) == 1
    assert layer_mean(np.full((2, 3), np.nan), [0, 1])[0] is None


def test_every_family_gets_a_grid():
    """Qwen2-VL: (h, w) / merge; LLaVA-NeXT / OneVision: the overview image's tokens; Mistral 3:
    image_sizes / (patch x merge); InternVL, Idefics3, SmolVLM, Gemma 3: the last tile or image."""
    shapes = {
        "qwen2_vl": [(2, 2), (2, 3), (3, 3), (4, 2), (1, 1)],
        "mistral3": [(4, 3), (2, 6), (3, 3), (6, 4), (2, 2)],
        "internvl": [(4, 4)] * 5,
        "llava_next": [(4, 4)] * 5,
    }
    for name, make in FAMILIES.items():
        model, batches = make("left")
        _, hms = heat_maps(model, batches)
        for h in hms:
            assert h.values is not None and np.isfinite(h.values).all(), name
            assert h.values.size == h.tokens[1] - h.tokens[0], name
            whole = h.tokens == (0, h.n_image_tokens)
            assert h.values.sum() == pytest.approx(1.0, abs=1e-5) if whole else 0 < h.values.sum() < 1, name
            assert whole or h.notes, name
        if name in shapes:
            assert [h.values.shape for h in hms] == shapes[name], name
    _, hms = heat_maps(*llava_next("left"))
    assert all(h.tokens == (0, 16) and "overview image" in h.notes[0] for h in hms)
    _, hms = heat_maps(*FAMILIES["internvl"]("left"))
    assert [h.tokens for h in hms] == [(0, 16), (16, 32), (0, 16), (32, 48), (0, 16)]  # 1, 2, 1, 3, 1 tiles


def test_default_layers_come_from_the_detection():
    def det(details):
        n = 3
        return Detection(np.arange(n), np.zeros(n, bool), np.zeros(n), "x", {}, "", [], details)

    assert detection_layers(
        det({"feature_names": ["layer 0", "layer 1", "layer 2"], "sensitive": [2, 0]}), 3
    )[0] == [0, 2]
    names = ["head_entropy layer 0 head 0", "head_entropy layer 3 head 1", "entropy layer 1", "answer_margin"]
    assert detection_layers(det({"feature_names": names, "chosen": [1, 3]}), 4)[0] == [3]
    strongest = detection_layers(
        det({"feature_names": names, "chosen": [], "evidence": [0.5, 3.0, None, 9.0]}), 4
    )
    assert strongest[0] == [0, 3] and "strongest" in strongest[1]
    assert detection_layers(det({"feature_names": names, "chosen": [], "evidence": [0, 0, 0, 0]}), 4)[0] == [
        0,
        1,
        2,
        3,
    ]
    assert detection_layers(det({}), 2) == ([0, 1], "all layers (the detection names no layer)")
    with pytest.raises(ValueError, match="is this the model that was scored"):
        detection_layers(det({"feature_names": names, "chosen": [1]}), 2)


def test_question_and_answer():
    rec = {
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    }
    assert question_and_answer(rec) == ("What?", "A cat.")
    msgs = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]},
                         {"role": "assistant", "content": "Me."}]}  # fmt: skip
    assert question_and_answer(msgs) == ("Who?", "Me.")
    assert question_and_answer({"conversations": [{"from": "human", "value": "Q"}]}) == ("Q", None)


def test_review_help_does_not_load_torch():
    code = (
        "import sys, contextlib, io\n"
        "from bye_fast.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['review', '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_picture_is_the_part_of_the_image_the_drawn_tokens_cover():
    """The image as the vision tower saw it: Mistral 3's unpadded image, Idefics3's global view (last),
    LLaVA-NeXT's overview image (first); pixel values mapped back to 0..255."""
    from types import SimpleNamespace

    from bye_fast.review import _model_view

    proc = SimpleNamespace(image_processor=SimpleNamespace(do_normalize=True, image_mean=[0.5] * 3,
                                                           image_std=[0.5] * 3, do_rescale=True, rescale_factor=1 / 255))  # fmt: skip

    def pixels(x):
        return np.clip(np.rint((x.numpy().transpose(1, 2, 0) * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)

    model, batches = FAMILIES["mistral3"]("left")
    b = batches[0]
    assert [_model_view(model, proc, b, r).shape for r in range(3)] == [(32, 24, 3), (16, 48, 3), (24, 24, 3)]
    model, batches = FAMILIES["idefics3"]("left")
    b = batches[0]  # row 1 has 2 images: a crop, then the global view
    np.testing.assert_array_equal(_model_view(model, proc, b, 1), pixels(b["pixel_values"][1, 1]))
    np.testing.assert_array_equal(_model_view(model, proc, b, 0), pixels(b["pixel_values"][0, 0]))
    model, batches = llava_next("left")
    b = batches[0]
    np.testing.assert_array_equal(_model_view(model, proc, b, 2), pixels(b["pixel_values"][2, 0]))
    model, batches = FAMILIES["qwen2_vl"]("left")
    assert _model_view(model, proc, batches[0], 0) is None  # flattened patches: the image file is shown


def test_heat_maps_through_a_lora_adapter():
    """A peft model (adapter not merged) gives the heat maps of the merged model."""
    from peft import LoraConfig, get_peft_model

    from ._models import llava

    model, batches = llava("left", n_batches=1)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    _, wrapped = heat_maps(peft_model, batches, layers=[0, 2])
    _, merged = heat_maps(peft_model.merge_and_unload(), batches, layers=[0, 2])
    for a, b in zip(wrapped, merged, strict=True):
        np.testing.assert_allclose(a.values, b.values, atol=1e-5)


def test_a_failure_leaves_the_previous_folder_whole(workspace, tmp_path, monkeypatch):
    import bye_fast.review as review

    w = workspace
    out = tmp_path / "r"
    kwargs = dict(images=w["root"] / "images", top_k=2)
    write_review(w["model"], w["processor"], w["records"], w["det"], out, **kwargs)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(review, "contact_sheet", broken)
    with pytest.raises(OSError, match="No space"):
        write_review(w["model"], w["processor"], w["records"], w["det"], out, overwrite=True, **kwargs)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temp folder left behind
    with pytest.raises(FileExistsError):
        write_review(w["model"], w["processor"], w["records"], w["det"], out, **kwargs)


def test_records_without_ids_and_the_scored_prompt_options(workspace, tmp_path):
    """Records without ids are matched by position (as the loaders number them); the prompt is built with the
    options the scores were made with (those make_loader has)."""
    import inspect

    from bye_fast.review import PROMPT_OPTIONS, _prompt_options

    w = workspace
    det = w["det"]
    records = [{k: v for k, v in r.items() if k != "id"} for r in w["records"]]
    by_position = Detection(
        ids=np.arange(N), flagged=det.flagged, score=det.score, method=det.method, options=det.options,
        reason=det.reason, no_image_ids=[], details=det.details,
    )  # fmt: skip
    review = write_review(w["model"], w["processor"], records, by_position, tmp_path / "r", top_k=3,
                          images=w["root"] / "images", layers=[0])  # fmt: skip
    named = write_review(w["model"], w["processor"], w["records"], det, tmp_path / "n", top_k=3,
                         images=w["root"] / "images", layers=[0])  # fmt: skip
    assert [s["id"] for s in review.samples] == [int(s["id"][1:]) for s in named.samples]
    for a, b in zip(review.heat, named.heat, strict=True):
        np.testing.assert_array_equal(a.values, b.values)

    from bye_fast.data import make_loader as loader_fn

    accepted = set(inspect.signature(loader_fn).parameters) & set(PROMPT_OPTIONS)
    scored = {"chat_template": "none", "system_prompt": None, "image_placement": "first", "batch_size": 3}
    det.meta["score_options"] = json.dumps(scored)
    try:
        expected = {k: scored[k] for k in sorted(accepted) if scored[k] is not None}
        assert _prompt_options(det, None) == expected
    finally:
        del det.meta["score_options"]
    assert _prompt_options(det, None) == {}
    with pytest.raises(ValueError, match="unknown to make_loader"):
        _prompt_options(det, {"no_such_option": 1})
