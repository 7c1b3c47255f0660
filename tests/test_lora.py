"""LoRA adapters (peft): scoring through an unmerged adapter equals scoring the merged model; the CLI's --adapter."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image

import bye_fast
from bye_fast.cli import main
from bye_fast.data import make_loader
from bye_fast.lab.models import build_llava

from ._families import FAMILIES
from ._models import sharpen

FIELDS = ("entropy", "head_entropy", "image_mass", "head_image_share", "head_before_share", "image_topk_share")
#: Text and vision attention and MLPs (CLIP and Llama/Qwen2 share these names).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"]


def _lora(model: torch.nn.Module, seed: int = 0) -> PeftModel:
    """``model`` with a random (non-zero) LoRA adapter of rank 4 injected."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


def _assert_close(a, b, atol=1e-4):
    np.testing.assert_array_equal(a.n_image_tokens, b.n_image_tokens)
    for field in FIELDS:
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=atol, rtol=0, err_msg=field)
    np.testing.assert_array_equal(a.answer_token, b.answer_token)
    np.testing.assert_allclose(a.answer_confidence, b.answer_confidence, atol=atol)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_unmerged_adapter_scores_as_the_merged_model(family):
    model, batches = FAMILIES[family](padding_side="left")
    base = bye_fast.score(model, batches, progress=False)
    peft_model = _lora(model)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    unmerged = bye_fast.score(peft_model, batches, progress=False)
    merged_model = copy.deepcopy(peft_model).merge_and_unload()
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    merged = bye_fast.score(merged_model, batches, progress=False)
    _assert_close(unmerged, merged)
    assert np.abs(unmerged.entropy - base.entropy).max() > 1e-2  # the adapter changes what is measured
    _assert_close(bye_fast.score_reference(peft_model, batches, progress=False), unmerged)
    assert unmerged.meta["model"] == type(model).__name__


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny LLaVA, a LoRA adapter of it, and 6 records with images."""
    root = tmp_path_factory.mktemp("lora")
    model, processor = build_llava(layers=3)
    sharpen(model)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    _lora(model, seed=1).save_pretrained(root / "adapter")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    records = []
    for i in range(6):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        question = "is it even or odd ?" if i % 2 else "what digit is this ?"
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "even"}]})  # fmt: skip
    (root / "train.json").write_text(json.dumps(records))
    return root


def test_cli_scores_through_an_adapter(workspace):
    w = workspace
    common = ["--data", str(w / "train.json"), "--images", str(w / "images"), "--batch-size", "4",
              "--no-progress", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    argv = ["score", "--model", str(w / "model"), "--adapter", str(w / "adapter"), "--out", str(w / "a.npz")]
    assert main(argv + common) == 0
    assert main(["score", "--model", str(w / "model"), "--out", str(w / "base.npz")] + common) == 0
    got, base = bye_fast.Scores.load(w / "a.npz"), bye_fast.Scores.load(w / "base.npz")
    assert got.meta["adapter_path"] == str(w / "adapter") and got.ids.tolist() == [f"r{i}" for i in range(6)]

    model, processor = build_llava(layers=3)  # the same architecture, weights from disk
    model = PeftModel.from_pretrained(
        type(model).from_pretrained(w / "model"), w / "adapter"
    ).merge_and_unload()
    loader = make_loader(w / "train.json", w / "images", processor, batch_size=4)
    _assert_close(got, bye_fast.score(model.eval(), loader, progress=False))
    assert np.abs(got.entropy - base.entropy).max() > 1e-2

    assert main(["score", "--model", str(w / "model"), "--adapter", str(w / "images"), "--out", str(w / "x.npz")]
                + common) == 2  # fmt: skip
