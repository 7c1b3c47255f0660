"""Models dispatched by accelerate with offloading (device_map="auto" + offload folder, dispatch_model,
cpu_offload) score as the plain model: offloaded weights sit on the meta device and are loaded by
accelerate's hooks at forward time, around bye_fast's attention and MLP hooks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from accelerate import cpu_offload, dispatch_model

import bye_fast
from bye_fast.lab.models import build_llava, build_processor

from ._families import FAMILIES
from ._models import llava, sharpen

FIELDS = ("entropy", "head_entropy", "image_mass", "head_image_share", "head_before_share", "image_topk_share")


def _close(a, b):
    np.testing.assert_array_equal(a.n_image_tokens, b.n_image_tokens)
    for field in FIELDS:
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-4, rtol=0, err_msg=field)
    np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(a.answer_token, b.answer_token)
    np.testing.assert_allclose(a.answer_confidence, b.answer_confidence, atol=1e-5)


def _offloaded(model: torch.nn.Module, how: str, tmp_path) -> torch.nn.Module:
    if how == "cpu_offload":  # every weight on meta, loaded module by module
        return cpu_offload(copy.deepcopy(model), execution_device="cpu")
    if how == "dispatch_model":  # the vision tower in memory, the text decoder's later layers and head on disk
        lm = "model.language_model"
        device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", f"{lm}.embed_tokens": "cpu",
                      f"{lm}.rotary_emb": "cpu", f"{lm}.layers.0": "cpu", f"{lm}.layers.1": "disk",
                      f"{lm}.layers.2": "disk", f"{lm}.norm": "disk", "lm_head": "disk"}  # fmt: skip
        return dispatch_model(copy.deepcopy(model), device_map=device_map, offload_dir=tmp_path / "offload")
    # device_map="auto" with a memory budget of half the weights: the rest goes to the offload folder
    model.save_pretrained(tmp_path / "model")
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    loaded = type(model).from_pretrained(tmp_path / "model", device_map="auto", max_memory={"cpu": budget},
                                         offload_folder=tmp_path / "offload")  # fmt: skip
    assert {"cpu", "disk"} <= set(loaded.hf_device_map.values())
    return loaded.eval()


@pytest.mark.parametrize("how", ["cpu_offload", "dispatch_model", "device_map_auto"])
def test_offloaded_model_scores_as_the_plain_model(how, tmp_path):
    # vision_feature_layer=-2: the last vision layer is skipped (its forward replaced) under accelerate's hooks too
    model, _ = build_llava(build_processor(), seed=1, layers=3, heads=4, kv_heads=2, vision_layers=3,
                           vision_feature_layer=-2)  # fmt: skip
    sharpen(model)
    _, batches = llava("left")
    plain = bye_fast.score(model, batches, progress=False, hidden_states=True)
    offloaded = _offloaded(model, how, tmp_path)
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    layers = offloaded.model.vision_tower.vision_model.encoder.layers if hasattr(
        offloaded.model.vision_tower, "vision_model") else offloaded.model.vision_tower.encoder.layers  # fmt: skip
    ran = []
    hooks = [m.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, m in enumerate(layers)]
    got = bye_fast.score(offloaded, batches, progress=False, hidden_states=True)
    assert 2 not in ran and 0 in ran  # the unused last vision layer did not run
    for h in hooks:
        h.remove()
    _close(got, plain)
    _close(bye_fast.score_reference(offloaded, batches, progress=False, hidden_states=True), plain)
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # still offloaded
    with torch.inference_mode():  # and still a working model (the hooks are gone, accelerate's are not)
        a, b = offloaded(**batches[0]).logits, model(**batches[0]).logits
    torch.testing.assert_close(a, b)


def test_offloaded_gemma3_scores_as_the_plain_model(tmp_path):
    """A second family: Gemma 3 (per-layer sliding / full masks, query-pre-attention scaling), with
    device_map="auto". (Not cpu_offload: its per-module hooks do not load the weights of SigLIP's pooling
    head, an nn.MultiheadAttention, so even a plain forward fails.)"""
    model, batches = FAMILIES["gemma3"]()
    plain = bye_fast.score(model, batches, progress=False, hidden_states=True)
    offloaded = _offloaded(model, "device_map_auto", tmp_path)
    _close(bye_fast.score(offloaded, batches, progress=False, hidden_states=True), plain)


def test_meta_model_without_hooks_is_a_clear_error():
    model, batches = llava("left", n_batches=1)
    with torch.device("meta"):
        empty = type(model)(model.config)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration has parameters on the meta device"):
        bye_fast.score(empty, batches, progress=False)
