"""bye_fast.score (fused) against bye_fast.score_reference (eager, output_attentions) on tiny models."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

import bye_fast
from bye_fast.hook import ATTN_IMPLEMENTATION, BatchCollector, attention_stats_hook, collecting
from bye_fast.score import _prepare

from ._families import FAMILIES
from ._models import llava

#: Every attention statistic of Scores (compared fused vs reference to 1e-4).
FIELDS = (
    "entropy",
    "head_entropy",
    "image_mass",
    "head_image_share",
    "head_before_share",
    "image_topk_share",
)


def _attn_impls(model):
    return (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_matches_reference(family, padding_side):
    model, batches = FAMILIES[family](padding_side=padding_side)
    before = _attn_impls(model)
    fused = bye_fast.score(model, batches, progress=False, hidden_states=True)
    ref = bye_fast.score_reference(model, batches, progress=False, hidden_states=True)
    assert _attn_impls(model) == before
    n = sum(b["input_ids"].shape[0] for b in batches)
    assert fused.entropy.shape == (n, 3)
    assert fused.head_entropy.shape == (n, 3, 4)
    np.testing.assert_array_equal(fused.ids, np.arange(n))
    np.testing.assert_array_equal(fused.n_image_tokens, ref.n_image_tokens)
    for field in FIELDS:
        a, b = getattr(fused, field), getattr(ref, field)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=field)
    # the answer signals: the last layer's MLP ran on the query rows only, the LM head on those rows
    np.testing.assert_allclose(fused.hidden, ref.hidden, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(fused.answer_confidence, ref.answer_confidence, atol=1e-5)
    np.testing.assert_allclose(fused.answer_margin, ref.answer_margin, atol=1e-4)
    np.testing.assert_array_equal(fused.answer_token, ref.answer_token)
    after = fused.head_after_share
    assert (after > -1e-6).all() and (fused.head_before_share > 0).all() and (after > 1e-3).any()
    assert np.ptp(fused.answer_confidence) > 0
    # the test is only meaningful if entropies vary between samples and layers (not uniform attention)
    assert np.ptp(fused.entropy) > 0.05
    assert (fused.entropy < np.log(fused.n_image_tokens)[:, None] + 1e-4).all()


def test_padding_side_does_not_change_scores():
    model, left = llava("left")
    _, right = llava("right")
    a = bye_fast.score(model, left, progress=False)
    b = bye_fast.score(model, right, progress=False)
    for field in FIELDS:
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=2e-5)


def test_prompt_key_is_the_question_whatever_the_padding_and_the_path():
    """One key per prompt text: equal for left and right padding, in both paths, and to a hash of the
    sample's own unpadded text tokens computed by hand (the slow twin)."""
    import hashlib

    from ._models import PROMPTS, build_processor

    model, left = llava("left", n_batches=2, batch_size=3)
    _, right = llava("right", n_batches=2, batch_size=3)
    a = bye_fast.score(model, left, progress=False)
    b = bye_fast.score(model, right, progress=False)
    r = bye_fast.score_reference(model, left, progress=False)
    assert a.prompt_key.dtype == np.int64 and a.prompt_key.shape == (6,)
    np.testing.assert_array_equal(a.prompt_key, b.prompt_key)
    np.testing.assert_array_equal(a.prompt_key, r.prompt_key)
    texts = [PROMPTS[(bi + i) % len(PROMPTS)] for bi in range(2) for i in range(3)]
    proc = build_processor()
    image_id = model.config.image_token_id
    for text, key in zip(texts, a.prompt_key, strict=True):
        ids = proc.tokenizer(text, return_tensors="np")["input_ids"][0]
        ids = ids[ids != image_id].astype("<i8")
        want = int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little", signed=True)
        assert key == want, text
    same = np.array(texts)[:, None] == np.array(texts)[None, :]
    assert ((a.prompt_key[:, None] == a.prompt_key[None, :]) == same).all()
    assert not same.all()  # the test needs at least two different questions


def test_model_outputs_unchanged_by_the_hook():
    """The plugged-in attention returns exactly what SDPA returns."""
    model, batches = llava("right")
    batch = batches[0]
    with torch.inference_mode():
        plain = model(**batch).logits
    prepared = _prepare({**batch}, 0, model.config.image_token_id, torch.device("cpu"), torch.float32)
    collector = BatchCollector(
        prepared.qpos, prepared.image_mask, prepared.key_valid, n_layers=3, stop_after_last_layer=False
    )
    with attention_stats_hook(model), torch.inference_mode(), collecting(collector):
        assert model.config.text_config._attn_implementation == ATTN_IMPLEMENTATION
        hooked = model(**batch).logits
    assert torch.equal(plain, hooked)
    assert sorted(collector.head_entropy) == [0, 1, 2]


def test_ids_carried_and_defaulted():
    model, batches = llava(n_batches=2, batch_size=2)
    with_ids = [{**b, "ids": [f"s{i}{j}" for j in range(2)]} for i, b in enumerate(batches)]
    s = bye_fast.score(model, with_ids, progress=False)
    assert s.ids.tolist() == ["s00", "s01", "s10", "s11"]
    assert "ids" in with_ids[0]  # the user's batch is not mutated
    s2 = bye_fast.score(model, batches, progress=False)
    assert s2.ids.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(s.entropy, s2.entropy)


def test_model_state_restored_on_error():
    model, batches = llava()
    model.train()
    before = _attn_impls(model)
    bad = [batches[0], {"attention_mask": batches[0]["attention_mask"]}]
    with pytest.raises(ValueError, match="batch 1: has no 'input_ids'"):
        bye_fast.score(model, bad, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert _attn_impls(model) == before


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_image_embedding_matches_the_whole_vision_tower(padding_side):
    """Fused: a hook on the projector's input, with the unused vision layers skipped. Twins: the
    reference path (every vision layer run, hidden_states[vision_feature_layer]) and a float64 mean
    of that by hand."""
    model, batches = llava(n_batches=2, batch_size=3, padding_side=padding_side)
    fused = bye_fast.score(model, batches, progress=False, image_embeddings=True)
    ref = bye_fast.score_reference(model, batches, progress=False, image_embeddings=True)
    vcfg = model.config.vision_config
    with torch.no_grad():
        hs = [model.model.vision_tower(b["pixel_values"], output_hidden_states=True).hidden_states for b in batches]
    want = torch.cat([h[model.config.vision_feature_layer][:, 1:].double().mean(dim=1) for h in hs]).numpy()
    assert fused.image_embedding.shape == (6, vcfg.hidden_size)
    assert np.ptp(fused.image_embedding, axis=0).max() > 1e-3  # differs between images
    np.testing.assert_allclose(fused.image_embedding, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ref.image_embedding, want, atol=1e-5, rtol=1e-5)
    assert bye_fast.score(model, batches, progress=False).image_embedding is None  # only when asked


def test_image_embedding_of_a_row_without_image_is_nan():
    model, batches = llava(n_batches=1, batch_size=3)
    batch = dict(batches[0])
    ids = batch["input_ids"].clone()
    ids[1][ids[1] == model.config.image_token_id] = 7
    batch["input_ids"], batch["pixel_values"] = ids, batch["pixel_values"][[0, 2]]
    with pytest.warns(UserWarning, match="no image token"):
        s = bye_fast.score(model, [batch], progress=False, image_embeddings=True)
    assert np.isnan(s.image_embedding[1]).all() and np.isfinite(s.image_embedding[[0, 2]]).all()
    # a batch without any image: the projector never runs; NaN rows, not an error (both paths)
    text_only = dict(batches[0])
    ids = text_only["input_ids"].clone()
    ids[ids == model.config.image_token_id] = 7
    text_only["input_ids"] = ids
    del text_only["pixel_values"]
    for path in (bye_fast.score, bye_fast.score_reference):
        with pytest.warns(UserWarning, match="no image token"):
            t = path(model, [batches[0], text_only], progress=False, image_embeddings=True)
        assert t.image_embedding.shape == (6, model.config.vision_config.hidden_size)
        assert np.isfinite(t.image_embedding[:3]).all() and np.isnan(t.image_embedding[3:]).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl", "gemma3", "llava_next"])
def test_image_embedding_elsewhere_is_a_clear_error(family):
    model, batches = FAMILIES[family]()
    for path in (bye_fast.score, bye_fast.score_reference):
        with pytest.raises(NotImplementedError, match="image_embeddings=True supports LLaVA-1.5"):
            path(model, batches, progress=False, image_embeddings=True)


def test_row_without_image_gives_nan_and_warning():
    model, batches = llava(n_batches=1, batch_size=3)
    batch = dict(batches[0])
    ids = batch["input_ids"].clone()
    ids[1][ids[1] == model.config.image_token_id] = 7  # row 1 loses its image tokens
    batch["input_ids"] = ids
    batch["pixel_values"] = batch["pixel_values"][[0, 2]]
    batch["ids"] = ["a", "b", "c"]
    with pytest.warns(UserWarning, match="1 sample.*no image token.*'b'"):
        s = bye_fast.score(model, [batch], progress=False)
    assert s.no_image_ids == ["b"]
    assert np.isnan(s.entropy[1]).all() and np.isnan(s.head_entropy[1]).all()
    assert np.isfinite(s.entropy[[0, 2]]).all()


def test_bad_inputs_raise_clear_errors():
    model, batches = llava(n_batches=1)
    with pytest.raises(ValueError, match="no batch"):
        bye_fast.score(model, [], progress=False)
    with pytest.raises(ValueError, match="batch 0: 'ids' has 2 entries for 3 rows"):
        bye_fast.score(model, [{**batches[0], "ids": ["a", "b"]}], progress=False)
    with pytest.raises(ValueError, match="batch 0: expected a dict"):
        bye_fast.score(model, [batches[0]["input_ids"]], progress=False)
    # an all-zero mask is named by the sample's id, also when the batch is split by a token budget
    dead = {**batches[0], "ids": ["a", "b", "c"], "attention_mask": batches[0]["attention_mask"].clone()}
    dead["attention_mask"][2] = 0
    for budget in (None, batches[0]["input_ids"].shape[1]):
        with pytest.raises(ValueError, match="batch 0: id 'c' has an all-zero attention_mask"):
            bye_fast.score(model, [dead], progress=False, max_tokens_per_batch=budget)
    orig = model.config.image_token_id
    model.config.image_token_id = None  # a model that does not say which token is the image
    try:
        assert getattr(model.config, "image_token_index", None) is None
        with pytest.raises(ValueError, match="pass image_token_id="):
            bye_fast.score(model, batches, progress=False)
    finally:
        model.config.image_token_id = orig
    # an explicit image_token_id works and gives the same result
    a = bye_fast.score(model, batches, progress=False)
    b = bye_fast.score(model, batches, image_token_id=model.config.image_token_id, progress=False)
    np.testing.assert_array_equal(a.entropy, b.entropy)


@pytest.mark.parametrize("path", ["score", "score_reference"])
def test_silent_wrong_results_are_errors(path):
    """No pixel_values, a text token as image_token_id, a prompt beyond the context: errors naming the culprit."""
    fn = getattr(bye_fast, path)
    model, batches = llava(n_batches=1)
    no_pixels = {k: v for k, v in batches[0].items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="batch 0: has image tokens but no pixel_values"):
        fn(model, [no_pixels], progress=False)
    word = int(batches[0]["input_ids"][0, -2])  # a text token of the prompt
    with pytest.raises(ValueError, match=f"image_token_id={word} is not the image placeholder"):
        fn(model, batches, image_token_id=word, progress=False)
    tcfg = model.config.text_config
    saved = tcfg.max_position_embeddings
    tcfg.max_position_embeddings = 20  # shorter than the prompts (64 image tokens + text)
    try:
        with pytest.raises(
            ValueError, match=r"batch 0: id 'a' has \d+ tokens, more than the model's context of 20"
        ):
            fn(model, [{**batches[0], "ids": ["a", "b", "c"]}], progress=False)
    finally:
        tcfg.max_position_embeddings = saved


def test_attention_outside_interface_is_refused():
    model, batches = llava(n_batches=1)

    def manual_forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        out, w = eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), w

    for layer in model.model.language_model.layers:
        layer.self_attn.forward = types.MethodType(manual_forward, layer.self_attn)
    with pytest.raises(NotImplementedError, match="score_reference"):
        bye_fast.score(model, batches, progress=False)


def test_progress_bar_reports_samples(capsys):
    model, batches = llava(n_batches=1)
    bye_fast.score(model, batches, progress=True)
    err = capsys.readouterr().err
    assert "bye_fast.score" in err and "sample" in err


def test_bfloat16_model_close_to_float32():
    model, batches = llava()
    ref = bye_fast.score(model, batches, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = bye_fast.score(model.to(torch.bfloat16), batches, progress=False)
    # bf16 weights and activations: the statistic moves, but stays close
    np.testing.assert_allclose(s.entropy, ref.entropy, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_triton_backend_matches_reference(family):
    """The fused Triton kernel inside the model hook (interpreter on CPU, compiled on CUDA)."""
    model, batches = FAMILIES[family](padding_side="right")
    fused = bye_fast.score(model, batches, progress=False, backend="triton")
    ref = bye_fast.score_reference(model, batches, progress=False)
    for field in FIELDS:
        np.testing.assert_allclose(
            getattr(fused, field), getattr(ref, field), atol=1e-4, rtol=0, err_msg=field
        )


def test_attention_maps_are_the_distributions_score_measures():
    """review.attention_maps recomputes, per sample and layer, the distribution whose entropy score reports."""
    from bye_fast.kernels.attn_entropy import PAPER_EPS
    from bye_fast.review import attention_maps

    model, batches = llava("right")
    scores = bye_fast.score(model, batches, progress=False)
    ids, maps = attention_maps(model, batches)
    assert ids == scores.ids.tolist()
    for k, m in enumerate(maps):
        assert m.shape == (scores.n_layers, scores.n_image_tokens[k])
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-5)
        ent = -(m * np.log(m + PAPER_EPS)).sum(axis=1)
        np.testing.assert_allclose(ent, scores.entropy[k], atol=1e-4)
        top = np.sort(m, axis=1)[:, ::-1][:, :4].sum(axis=1)
        np.testing.assert_allclose(top, scores.image_topk_share[k], atol=1e-5)
