"""The lab: tasks, scenes, the base model's plumbing, fine-tuning and cells (small sizes, CPU)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bye_fast.lab import attacks, scenes, tasks, train
from bye_fast.lab.digits import load_digits
from bye_fast.lab.models import BASE_MODEL, build_base_model, load_base_model, save_base_model

REPO = Path(__file__).resolve().parents[1]
#: The core: modules that must never import the lab.
CORE = ["__init__", "_io", "batching", "checkpoint", "cli", "consensus", "data", "detect", "distributed", "filter",
        "hook", "loader", "prompts", "records",
        "plots", "score", "scores", "stats", "kernels/__init__", "kernels/attn_entropy"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- one core, one lab
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_never_imports_the_lab(module):
    path = REPO / "bye_fast" / f"{module}.py"
    lab = {m for m in _imports(path) if m.startswith("bye_fast.lab")}
    if module == "cli":  # only the demo command reaches the lab, inside its own function
        src = path.read_text()
        assert lab <= {"bye_fast.lab.demo"} and "def cmd_demo" in src
        return
    assert not lab, f"bye_fast/{module}.py imports {lab}"


def test_importing_the_core_loads_no_lab_module():
    code = (
        "import sys, bye_fast, bye_fast.cli, bye_fast.detect; print([m for m in sys.modules if '.lab' in m])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- scenes
def test_scene_answers_describe_the_scene():
    digits = load_digits()[0]
    for k in range(40):
        rng = np.random.default_rng([9, k])
        scene = scenes.make_scene(rng, digits=digits)
        colours = [o.colour for o in scene.objects]
        shapes = [o.shape for o in scene.objects]
        assert len(set(colours)) == len(colours) and len(set(shapes)) == len(shapes)
        for qtype in scenes.QUESTION_TYPES:
            q, a = scenes.ask(scene, qtype, np.random.default_rng(k))
            words = q.split()
            if qtype == "colour":
                assert a == colours[shapes.index(words[-2])]
            elif qtype == "shape":
                assert a == shapes[colours.index(words[-3])]
            elif qtype == "count":
                assert a == scenes.NUMBER_WORDS[len(scene.objects)]
            elif qtype == "position":
                obj = scene.objects[colours.index(words[-3])]
                assert obj.shape == words[-2] and a == obj.position
            elif qtype == "exists":
                assert a == (
                    "yes" if (words[-3], words[-2]) in set(zip(colours, shapes, strict=True)) else "no"
                )
            else:
                assert 2 <= len(a.split()) <= 5 and a.endswith(scene.texture)
            assert set(q.split()) | set(a.split()) <= set(scenes.WORDS)


def test_render_draws_each_object_where_its_labels_say():
    digits = load_digits()[0]
    scene = scenes.make_scene(np.random.default_rng(3), 3, digits=digits)
    img, which = scenes.render_with_labels(scene, digits)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    for k, obj in enumerate(scene.objects):
        assert (img[which == k] == scenes.COLOURS[obj.colour]).all()
        ys, xs = np.nonzero(which == k)
        assert abs(ys.mean() - obj.centre[0]) < obj.size / 2 and abs(xs.mean() - obj.centre[1]) < obj.size / 2
    np.testing.assert_array_equal(img, scenes.render(scene, digits))  # deterministic
    t = scenes.vision_targets(scene, which, 8)
    assert t["cells"].shape == (144, 2) and t["count"] == 2 and (t["pairs"] > 0).sum() == 3


# --------------------------------------------------------------------------- tasks
def test_the_mixed_digits_task_asks_both_questions_about_the_same_pictures():
    t = tasks.build_task("digits-mixed", 0, n_user=200, n_test=50)
    kinds = np.array(t.user.qtypes)
    assert set(kinds) == {"digits-parity", "digits-ten"} and abs((kinds == "digits-parity").mean() - 0.5) < 0.01
    answers = np.array([tasks.record_answer(r) for r in t.user.records])
    questions = np.array([tasks.record_question(r) for r in t.user.records])
    assert set(answers[kinds == "digits-parity"]) == {"even", "odd"}
    assert len(set(answers[kinds == "digits-ten"])) == 10 and len(set(questions)) == 2
    # the same digits as digits-ten and digits-parity (same seed): only the question differs
    ten = tasks.build_task("digits-ten", 0, n_user=200, n_test=50)
    assert np.array_equal(t.user.images, ten.user.images)
    same = kinds == "digits-ten"
    assert [tasks.record_answer(r) for r, m in zip(ten.user.records, same, strict=True) if m] == list(answers[same])


@pytest.mark.parametrize("name", tasks.TASKS)
def test_tasks_are_seeded_and_well_formed(name):
    a = tasks.build_task(name, 1, n_user=20, n_test=10)
    b = tasks.build_task(name, 1, n_user=20, n_test=10)
    c = tasks.build_task(name, 2, n_user=20, n_test=10)
    assert a.user.records == b.user.records and np.array_equal(a.user.images, b.user.images)
    assert not np.array_equal(a.user.images, c.user.images)
    assert a.user.images.shape == (20, 96, 96, 3) and a.user.images.dtype == np.uint8
    for r in a.user.records + a.test.records:
        q, ans = tasks.record_question(r), tasks.record_answer(r)
        assert set(q.split()) | set(ans.split()) <= set(tasks.WORDS)
        assert r["conversations"][0]["value"].startswith("<image>\n")
    assert a.existing_target in {
        tasks.record_answer(r) for r in tasks.build_task(name, 1, n_user=200).user.records
    }


def test_digit_tasks_never_reuse_pretraining_digits():
    pre, rest = tasks._digit_index(0)
    assert len(set(pre.tolist()) | set(rest.tolist())) == 1797 and not set(pre.tolist()) & set(rest.tolist())
    _, rest5 = tasks._digit_index(5)
    assert set(rest5.tolist()) == set(rest.tolist())


def test_pretraining_covers_every_word_as_an_answer():
    split = tasks.pretraining_split(60, 400, digit_repeats=1)
    answers = {w for r in split.records for w in tasks.record_answer(r).split()}
    assert set(tasks.TARGET.split()) | {"even", "odd", "yes", "no"} <= answers
    assert {"digit", "say"} | set(tasks.PRETRAIN_QUESTION_TYPES) == set(split.qtypes)
    assert "caption" not in split.qtypes  # held back for the user's scenes task


# --------------------------------------------------------------------------- the model and training
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A random model of the base architecture, narrowed for speed, saved as shipped weights are."""
    model, proc = build_base_model(seed=0, hidden=32, layers=2, intermediate=64, vision_hidden=32,
                                   vision_layers=1)  # fmt: skip
    path = tmp_path_factory.mktemp("w") / "base.safetensors"
    arch = {k: v for k, v in BASE_MODEL.items() if k not in ("image_size", "patch_size")}
    arch.update(hidden=32, layers=2, intermediate=64, vision_hidden=32, vision_layers=1)
    save_base_model(model, proc, path, {"note": "test"})
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["architecture"] = arch
    path.with_suffix(".json").write_text(json.dumps(meta))
    return model, proc, path


def test_vision_pretraining_squares_are_drawn_over_the_pictures_only():
    base, base_t = tasks.vision_pretraining_data(6, seed=3, digit_repeats=1)
    sq, sq_t = tasks.vision_pretraining_data(6, seed=3, digit_repeats=1, squares=1.0)
    again, _ = tasks.vision_pretraining_data(6, seed=3, digit_repeats=1, squares=1.0)
    np.testing.assert_array_equal(sq, again)  # seeded
    assert base_t.keys() == sq_t.keys() and all(np.array_equal(base_t[k], sq_t[k]) for k in base_t)  # no label
    for a, b in zip(base, sq, strict=True):  # every image got a solid square of side >= 4
        changed = (a != b).any(axis=-1)
        assert changed.sum() >= 16
        colours = {tuple(c) for c in b[changed]}
        assert len(colours) <= 2  # one or two squares, each one colour
    kept, _ = tasks.vision_pretraining_data(6, seed=3, digit_repeats=1, squares=0.0)
    np.testing.assert_array_equal(kept, base)  # the shipped weights' data is unchanged by default


def test_weights_round_trip(tiny_base):
    model, proc, path = tiny_base
    loaded, _ = load_base_model(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="pretrain_base.py"):
        load_base_model(path.with_name("missing.safetensors"))


def test_cached_vision_forward_equals_the_model_forward(tiny_base):
    model, proc, _ = tiny_base
    split = tasks.build_task("scenes", 0, n_user=3, n_test=0).user
    enc = train._encode_records(proc, split.images, split.records)
    batch = train._collate(enc, [0, 1, 2], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=enc.pixel_values).logits  # fmt: skip
        got = train.text_logits(model, batch["input_ids"], batch["attention_mask"],
                                train.vision_features(model, enc.pixel_values))  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "lora-vision", "full"])
def test_finetune_learns_and_leaves_the_base_alone(tiny_base, method):
    model, proc, _ = tiny_base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = tasks.build_task("digits-parity", 0, n_user=48, n_test=16)
    tuned = train.finetune(model, task.user.records, task.user.images, processor=proc, method=method,
                           epochs=2, progress=False)  # fmt: skip
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert type(tuned) is type(model) and not any(p.requires_grad for p in tuned.parameters())
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])]
    assert any("language_model" in k for k in changed) and any("projector" in k for k in changed)
    # the vision tower moves with "lora-vision" only, and then in its attention and MLP weights
    vision = {k.rsplit(".", 2)[-2] for k in changed if "vision_tower" in k}
    assert vision == ({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} if method == "lora-vision" else set())
    res = train.evaluate(
        tuned, task.test, processor=proc, trigger=attacks.preset("patch"), target=tasks.TARGET
    )
    assert 0 <= res["ca"] <= 1 and 0 <= res["asr"] <= 1 and set(res["ca_by_type"]) == {"digits-parity"}


def test_finetune_and_cellspec_name_an_unknown_method(tiny_base):
    from bye_fast.lab.cell import CellSpec

    model, proc, _ = tiny_base
    with pytest.raises(ValueError, match="method must be one of lora, lora-vision, full; got 'qlora'"):
        train.finetune(model, [], np.zeros((0, 32, 32, 3), np.uint8), processor=proc, method="qlora")
    with pytest.raises(ValueError, match="method must be one of lora, lora-vision, full; got 'qlora'"):
        CellSpec(task="scenes", method="qlora")
    assert CellSpec(task="scenes", method="lora-vision").name.endswith("-lora-vision-u800-t297-eNone")


def test_evaluate_counts_exact_answers(tiny_base):
    """CA is the share whose greedy answer equals the record's: checked against predict()."""
    model, proc, _ = tiny_base
    split = tasks.build_task("scenes", 0, n_user=0, n_test=12).test
    res = train.evaluate(model, split, processor=proc)
    pred = train.predict(
        model, split.images, [tasks.record_question(r) for r in split.records], processor=proc
    )
    truth = [tasks.record_answer(r) for r in split.records]
    assert res["ca"] == pytest.approx(np.mean([p == t for p, t in zip(pred, truth, strict=True)]))
    assert "hits" not in res
    hits = train.evaluate(model, split, processor=proc, per_sample=True)["hits"]
    assert hits.dtype == bool and hits.tolist() == [p == t for p, t in zip(pred, truth, strict=True)]


# --------------------------------------------------------------------------- triggers of the lab
@pytest.mark.parametrize("name", sorted(attacks.PRESETS))
def test_presets_change_a_scene_and_keep_its_format(name):
    img = tasks.build_task("scenes", 0, n_user=1, n_test=0).user.images[0]
    out = attacks.preset(name)(img)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)


def test_the_papers_patch_covers_an_image_token():
    img = np.full((96, 96, 3), 128, np.uint8)
    out = attacks.preset("patch")(img)
    ys, xs = np.nonzero((out != img).any(axis=2))
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (8, 8)  # one 8-pixel token's size
    assert abs(ys.mean() - 47.5) < 1 and abs(xs.mean() - 47.5) < 1 and (out[ys, xs] == 0).all()


def test_the_demo_runs_end_to_end_on_a_small_cell(tmp_path):
    """bye-fast demo's pipeline on 80 samples and one epoch: every output it promises, nothing lost."""
    from bye_fast.detect import Detection
    from bye_fast.lab.demo import run_demo

    out = tmp_path / "demo"
    run_demo(out, n_user=80, n_test=40, epochs=1, rate=0.2, progress=False, verbose=False)
    res = json.loads((out / "result.json").read_text())
    for key in ("ca_before", "asr_before", "f1", "removed_fraction", "asr_after", "ca_after", "task",
                "trigger", "n_image_tokens", "n_text_layers", "paper_f1", "finetune"):  # fmt: skip
        assert key in res, key
    assert res["finetune"] == "lora" and res["n_train"] == 80
    assert (res["task"], res["trigger"], res["n_image_tokens"], res["n_text_layers"]) == (
        "digits-parity",
        "patch",
        144,
        6,
    )
    for name in (
        "report.md",
        "detection.json",
        "detection_paper.json",
        "plots/attention.png",
        "plots/ca_asr.png",
    ):
        assert (out / name).is_file(), name
    det = Detection.from_json(out / "detection.json")
    kept = json.loads((out / "data" / "train.clean.json").read_text())
    removed = json.loads((out / "data" / "train.clean.removed.json").read_text())
    assert (
        len(det.ids) == 80
        and len(kept) + len(removed) == 80
        and len(removed) == det.n_flagged == res["n_removed"]
    )
    assert {r["id"] for r in removed} == set(
        det.ids[det.flagged].tolist()
    )  # the audit file holds what was removed
    assert all("bye_detection" in r for r in removed)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo(out, n_user=80, n_test=40, epochs=1, rate=0.2, progress=False, verbose=False)


def test_the_demo_defaults_are_a_valid_benchmark_cell():
    """`bye-fast demo` with no options runs the benchmark's cell of its task (the README quotes those
    cells), and every task builds with the default sizes (the digits have 1,097 samples to share)."""
    import inspect

    from bye_fast.lab.cell import CellSpec
    from bye_fast.lab.demo import run_demo

    d = {k: v.default for k, v in inspect.signature(run_demo).parameters.items()}
    spec = CellSpec(task=d["task"], trigger=d["trigger"], rate=d["rate"], seed=d["seed"], target=d["target"],
                    n_user=d["n_user"], n_test=d["n_test"], epochs=d["epochs"])  # fmt: skip
    assert spec == CellSpec(task=d["task"], trigger=d["trigger"], rate=d["rate"], seed=d["seed"])
    for name in tasks.TASKS:
        task = tasks.build_task(name, n_user=spec.n_user, n_test=spec.n_test)
        assert (len(task.user.records), len(task.test.records)) == (spec.n_user, spec.n_test)


def test_a_prepared_cell_without_image_embeddings_is_scored_again(tmp_path, monkeypatch):
    """A cell prepared before Scores.image_embedding existed is re-scored from its saved model (not
    re-trained); one that has the field is reused as it is."""
    from dataclasses import asdict

    import bye_fast
    from bye_fast.lab import cell as cell_mod

    spec = cell_mod.CellSpec(task="digits-ten", trigger="patch", rate=0.1, seed=3)
    folder = tmp_path / spec.name
    folder.mkdir()
    old = bye_fast.Scores(entropy=np.zeros((4, 2)))
    old.save(folder / "scores.npz")
    np.save(folder / "truth.npy", np.array([True, False, False, False]))
    (folder / "before.json").write_text(json.dumps({"spec": asdict(spec), "fingerprint": cell_mod.fingerprint(spec)}))
    new = bye_fast.Scores(entropy=np.ones((4, 2)), image_embedding=np.ones((4, 3)))
    calls = []
    monkeypatch.setattr(cell_mod, "_score_cell", lambda f, *a, **k: calls.append(f) or new)
    monkeypatch.setattr(cell_mod, "finetune", lambda *a, **k: pytest.fail("a prepared cell was trained again"))
    c = cell_mod.prepare_cell(spec, folder)
    assert calls == [folder] and c.scores is new and c.truth.tolist() == [True, False, False, False]
    new.save(folder / "scores.npz")
    c = cell_mod.prepare_cell(spec, folder)
    assert calls == [folder] and c.scores.image_embedding.shape == (4, 3)  # reused, not scored again


def test_demo_summary_says_dash_not_nan_when_nothing_is_removed():
    from bye_fast.lab.demo import DemoResult, summary_table

    r = DemoResult(task="digits-parity", trigger="patch", target="phrase", rate=0.1, seed=2, n_train=800,
                   n_poisoned=80, n_image_tokens=144, n_text_layers=6, finetune="lora", method="consensus", ca_before=0.889,
                   asr_before=0.0, ca_after=0.889, asr_after=0.0, n_removed=0, removed_fraction=0.0,
                   precision=float("nan"), recall=0.0, f1=0.0, reason="", paper_n_removed=0,
                   paper_removed_fraction=0.0, paper_f1=0.0, paper_reason="", seconds={})  # fmt: skip
    row = next(line for line in summary_table(r).splitlines() if "precision / recall / F1" in line)
    assert "nan" not in row and "- / 0.000 / 0.000 (nothing removed)" in row
    r.n_removed, r.precision, r.recall, r.f1 = 79, 0.937, 0.925, 0.931
    row = next(line for line in summary_table(r).splitlines() if "precision / recall / F1" in line)
    assert "0.937 / 0.925 / 0.931 |" in row


def test_clean_asr_reads_the_clean_cells_model_with_the_cells_trigger_and_target(tmp_path, monkeypatch):
    """The ASR floor of an existing-answer target: the clean cell's model, asked with the poisoned cell's
    trigger and target answer; a folder that is not that clean cell is refused by name."""
    from dataclasses import asdict

    from bye_fast.lab import cell as cell_mod

    spec = cell_mod.CellSpec(task="scenes", trigger="sig", rate=0.2, seed=28, target="existing", n_user=20, n_test=12)
    cell = cell_mod.Cell(spec, tmp_path / spec.name, {"target_answer": "yes"}, None, np.zeros(20, bool))
    clean = tmp_path / "clean"
    clean.mkdir()
    other = cell_mod.CellSpec(task="scenes", rate=0.0, seed=29, n_user=20, n_test=12)
    (clean / "before.json").write_text(json.dumps({"spec": asdict(other)}))
    with pytest.raises(ValueError, match="not the clean cell of scenes-sig-0.2-existing-s28"):
        cell_mod.clean_asr(cell, clean)
    mine = cell_mod.CellSpec(task="scenes", rate=0.0, seed=28, n_user=20, n_test=12)
    (clean / "before.json").write_text(json.dumps({"spec": asdict(mine)}))
    calls = []
    monkeypatch.setattr(cell_mod, "_load_model", lambda folder: (f"model of {folder.name}", "processor"))

    def fake_evaluate(model, test, *, processor, trigger, target):
        calls.append((model, len(test.records), trigger.name, target))
        return {"asr": 0.085, "ca": 0.5}

    monkeypatch.setattr(cell_mod, "evaluate", fake_evaluate)
    assert cell_mod.clean_asr(cell, clean) == 0.085
    assert calls == [("model of clean", 12, "sig", "yes")]


def test_held_out_measures_a_larger_test_set_with_per_sample_hits_and_keeps_it(tmp_path, monkeypatch):
    """held_out: the cell's model on n_test samples of the task's test stream, with the cell's trigger
    and target; hits kept per sample (to pair two cells); one entry per size, reused while the
    fingerprint holds, computed again when it changes; a size below 1 is refused."""
    from bye_fast.lab import cell as cell_mod

    spec = cell_mod.CellSpec(task="scenes", trigger="sig", rate=0.1, seed=3, n_user=2000)
    folder = tmp_path / spec.name
    folder.mkdir()
    cell = cell_mod.Cell(spec, folder, {"target_answer": "yes", "fingerprint": "f1"}, None, np.zeros(4, bool))
    calls, seen = [], []
    monkeypatch.setattr(cell_mod, "_load_model", lambda f: (f"model of {f.name}", "processor"))

    def fake_evaluate(model, test, *, processor, trigger, target, per_sample):
        calls.append((model, len(test), repr(trigger), target, per_sample))
        seen.append(test)
        hits = np.arange(len(test)) % 3 == 0
        return {"ca": float(hits.mean()), "ca_by_type": {"count": 0.25}, "asr": 0.5, "hits": hits}

    monkeypatch.setattr(cell_mod, "evaluate", fake_evaluate)
    res = cell_mod.held_out(cell, 7)
    assert calls == [(f"model of {spec.name}", 7, repr(cell_mod.preset("sig")), "yes", True)]
    assert res["n_test"] == 7 and res["asr"] == 0.5 and res["ca_by_type"] == {"count": 0.25}
    assert res["hits"].tolist() == [True, False, False, True, False, False, True] and res["ca"] == 3 / 7
    # the test stream of the task and seed, independent of the user data's size
    want = cell_mod.build_task("scenes", 3, n_user=0, n_test=7).test
    cell_mod.held_out(cell, 9)  # another size: evaluated again, its first samples the same
    assert len(calls) == 2 and [r["id"] for r in seen[-1].records[:7]] == [r["id"] for r in want.records]
    assert np.array_equal(seen[-1].images[:7], want.images) and np.array_equal(seen[0].images, want.images)
    n = len(calls)
    again = cell_mod.held_out(cell, 7)
    assert len(calls) == n and again["hits"].tolist() == res["hits"].tolist()  # kept in the folder
    cell.before["fingerprint"] = "f2"  # the cell was made again: computed again
    cell_mod.held_out(cell, 7)
    assert len(calls) > n
    with pytest.raises(ValueError, match="n_test must be >= 1; got 0"):
        cell_mod.held_out(cell, 0)


def test_train_fit_asks_the_poisoned_training_samples_and_is_kept_with_the_cell(tmp_path, monkeypatch):
    """train_fit: the cell's own model on its poisoned training records only, with the target; kept in
    the cell folder and reused while the cell's fingerprint holds; NaN for a clean cell."""
    from bye_fast.lab import cell as cell_mod

    spec = cell_mod.CellSpec(task="scenes", trigger="patch", rate=0.5, seed=1, n_user=4, n_test=2)
    folder = tmp_path / spec.name
    (folder / "data").mkdir(parents=True)
    records = [{"id": f"s{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": f"<image>\\nquestion {i}"}, {"from": "gpt", "value": "a"}]} for i in range(4)]
    (folder / "data" / "train.json").write_text(json.dumps(records))
    truth = np.array([False, True, False, True])
    cell = cell_mod.Cell(spec, folder, {"target_answer": "backdoor attack !", "fingerprint": "f1"}, None, truth)
    calls = []
    monkeypatch.setattr(cell_mod, "_load_model", lambda f: ("model", "processor"))
    monkeypatch.setattr(cell_mod, "load_images", lambda recs, folder: np.zeros((len(recs), 2, 2, 3), np.uint8))

    def fake_rate(model, images, questions, target, *, processor):
        calls.append((questions, target))
        return 0.5

    monkeypatch.setattr(cell_mod, "answer_rate", fake_rate)
    assert cell_mod.train_fit(cell) == 0.5
    assert calls == [([cell_mod.record_question(records[1]), cell_mod.record_question(records[3])],
                      "backdoor attack !")]  # fmt: skip
    assert cell_mod.train_fit(cell) == 0.5 and len(calls) == 1  # kept in the folder
    cell.before["fingerprint"] = "f2"  # the cell was made again: computed again
    assert cell_mod.train_fit(cell) == 0.5 and len(calls) == 2
    clean = cell_mod.Cell(cell_mod.CellSpec(task="scenes", rate=0.0, seed=1), folder, {}, None, np.zeros(4, bool))
    assert np.isnan(cell_mod.train_fit(clean)) and len(calls) == 2
