"""Per-family behaviour beyond fused == reference: layers that cannot see the image, unsupported models."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import bye_fast

from ._families import BEGIN, END, GEMMA_TOKENS, IMG, TEXT, _text, gemma3_batch, gemma3_model

FIELDS = ("entropy", "head_entropy", "image_mass", "head_image_share", "head_before_share", "image_topk_share")
WINDOW = 8


def _windowed(padding_side: str, layer_types: list[str], n: int = 12):
    """A Gemma 3 whose sliding window (8) is shorter than the prompt: rows alternate between 2 and 12 text
    tokens after the image (the window sees the image, or not)."""
    model = gemma3_model(WINDOW, layer_types=layer_types)
    gen = torch.Generator().manual_seed(1)
    rows = [[1] + _text(gen, 2 + i % 3) + [BEGIN] + [IMG] * GEMMA_TOKENS + [END] + _text(gen, 2 if i % 2 else 12)
            for i in range(n)]  # fmt: skip
    return model, [gemma3_batch(rows[:6], padding_side, gen), gemma3_batch(rows[6:], padding_side, gen)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_layers_that_cannot_see_the_image_are_nan(padding_side, tmp_path):
    """Sliding-window layers whose window ends after the image: NaN in every field, in both paths; detect
    leaves those layers out (named) instead of refusing."""
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    model, batches = _windowed(padding_side, types)
    fused = bye_fast.score(model, batches, progress=False)
    ref = bye_fast.score_reference(model, batches, progress=False)
    blind = np.arange(12) % 2 == 0  # 12 tokens after the image: the window of 8 misses it
    for field in FIELDS:
        a, b = getattr(fused, field), getattr(ref, field)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=field)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=field)  # NaNs compare equal
        assert np.isnan(a[blind][:, [0, 2]]).all(), field
        assert np.isfinite(a[blind][:, 1]).all() and np.isfinite(a[~blind]).all(), field
    assert np.isnan(fused.head_after_share[blind][:, [0, 2]]).all()
    assert (fused.n_image_tokens == GEMMA_TOKENS).all()

    det = bye_fast.detect(fused, method="paper")
    assert det.no_image_ids == []  # every sample saw its image in layer 1
    assert det.details["left_out"] == {"layer 0": 6, "layer 2": 6}
    assert "left out 2 feature(s)" in det.reason and "layer 0 (6 samples)" in det.reason
    det.to_json(tmp_path / "detection.json")
    assert json.loads((tmp_path / "detection.json").read_text())["details"]["left_out"] == {"layer 0": 6, "layer 2": 6}


def test_sample_blind_in_every_layer_is_a_sample_without_image():
    model, batches = _windowed("left", ["sliding_attention"] * 3, n=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # image tokens are there: no "no image token" warning
        scores = bye_fast.score(model, batches, progress=False)
    blind = np.arange(24) % 2 == 0
    assert np.isnan(scores.entropy[blind]).all() and np.isfinite(scores.entropy[~blind]).all()
    det = bye_fast.detect(scores, method="paper")
    assert det.no_image_ids == scores.ids[blind].tolist()
    assert not det.flagged[blind].any() and np.isnan(det.score[blind]).all()


def test_unsupported_models_are_refused_by_name(monkeypatch):
    """A model without an image token, or whose text attention bye_fast cannot plug into: errors naming its
    class and what is missing."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaModel

    from ._models import llava

    text_only = LlamaForCausalLM(LlamaConfig(**TEXT)).eval()
    batch = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    for fn in (bye_fast.score, bye_fast.score_reference):
        with pytest.raises(ValueError, match=r"LlamaForCausalLM\.config has no image_token_id / image_token_index"):
            fn(text_only, [batch], progress=False)

    model, batches = llava(n_batches=1)
    monkeypatch.setattr(LlamaModel, "_can_set_attn_implementation_cached_value", False, raising=False)
    with pytest.raises(NotImplementedError, match="LlavaForConditionalGeneration: its text decoder does not accept"):
        bye_fast.score(model, batches, progress=False)
    monkeypatch.undo()
    assert model.config.text_config._attn_implementation == "sdpa"  # restored

    for layer in model.model.language_model.layers:  # attention modules that do not say which layer they are
        monkeypatch.setattr(layer.self_attn, "layer_idx", None)
    with pytest.raises(NotImplementedError, match="LlavaForConditionalGeneration: no decoder layer called"):
        bye_fast.score(model, batches, progress=False)
