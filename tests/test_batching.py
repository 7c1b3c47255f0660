"""Memory-constrained scoring: token-budget splits, halving on CUDA OOM, skipped vision layers.

The slow twin of every split run is the unsplit run. Results agree to float
rounding, not bit for bit: a row's activations in a batch of 1 differ from
the same row's in a batch of 3 by ~1e-6 relative on CPU (matmul blocking
depends on the batch size; seen even without any padding change), and the
sharpened tiny models amplify that to ~1e-5 in ``head_entropy``. Hence
``atol=3e-5`` (the padding-side test uses 2e-5 for the same reason).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import bye_fast
from bye_fast.batching import halve, image_layout, row_groups, split_batch, take_rows
from bye_fast.lab.models import build_llava, build_processor

from ._families import BEGIN, FAMILIES
from ._models import QWEN_END, QWEN_IMAGE, QWEN_START, llava, qwen2_vl, qwen_batch, sharpen

FIELDS = ("entropy", "head_entropy", "image_mass")
ATOL = 3e-5


def _close(a, b, atol=ATOL):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.n_image_tokens, b.n_image_tokens)
    for f in FIELDS:
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), atol=atol, rtol=0, err_msg=f)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_split_scores_match_unsplit(family, padding_side):
    model, batches = FAMILIES[family](padding_side=padding_side)
    ref = bye_fast.score(model, batches, progress=False)
    widths = [b["input_ids"].shape[1] for b in batches]
    budget = max(widths)  # one row per group at most, and never a row over budget
    groups = [row_groups(b, budget)[0] for b in batches]
    assert all(len(g) == b["input_ids"].shape[0] for g, b in zip(groups, batches, strict=True))
    split = bye_fast.score(model, batches, progress=False, max_tokens_per_batch=budget)
    _close(split, ref)
    # a budget of two rows: groups of two and one
    two = bye_fast.score(model, batches, progress=False, max_tokens_per_batch=2 * max(widths))
    _close(two, ref)


def test_split_pieces_are_consistent_per_family():
    """Every piece carries its own rows' images, and drops all-padding edge columns."""
    for family, build in FAMILIES.items():
        model, batches = build(padding_side="left")
        image_id = model.config.image_token_id
        layout = image_layout(model)
        batch = batches[0]
        pieces, too_long = split_batch(batch, 1, image_token_id=image_id, layout=layout)
        assert len(pieces) == batch["input_ids"].shape[0] and too_long == list(range(len(pieces)))
        for r, piece in enumerate(pieces):
            mask = piece["attention_mask"]
            assert mask[:, 0].any() and mask[:, -1].any(), family  # trimmed to the row
            n_img = int((piece["input_ids"] == image_id).sum())
            assert n_img == int((batch["input_ids"][r] == image_id).sum())
            if family.startswith("qwen2"):
                t, h, w = piece["image_grid_thw"][0].tolist()
                assert piece["pixel_values"].shape[0] == t * h * w and n_img == t * h * w // 4
                start = int(batch["image_grid_thw"][:r].prod(-1).sum())
                assert torch.equal(piece["pixel_values"], batch["pixel_values"][start : start + t * h * w])
            elif family == "internvl":  # tiles of 16 tokens; an image of several tiles is one run
                start = int((batch["input_ids"][:r] == image_id).sum()) // layout.tokens_per_entry
                n = n_img // layout.tokens_per_entry
                assert torch.equal(piece["pixel_values"], batch["pixel_values"][start : start + n])
            elif family == "gemma3":  # one run per image, some rows with two
                n = int((piece["input_ids"] == BEGIN).sum())
                start = int((batch["input_ids"][:r] == BEGIN).sum())
                assert torch.equal(piece["pixel_values"], batch["pixel_values"][start : start + n])
            else:  # one image per row (Mistral 3: in several runs), or per-row pixels (Idefics3)
                assert torch.equal(piece["pixel_values"], batch["pixel_values"][r : r + 1]), family
            for key in ("image_sizes", "pixel_attention_mask", "batch_num_images"):
                if key in batch:
                    assert torch.equal(piece[key], batch[key][r : r + 1]), (family, key)
            if family == "mistral3":
                h, w = (piece["image_sizes"][0] // layout.size_divisor).tolist()
                assert n_img == h * w


def _qwen_two_images_per_row(padding_side="left"):
    """A Qwen2-VL batch whose rows hold 2, 1 and 0 images."""
    model, _ = qwen2_vl()
    gen = torch.Generator().manual_seed(3)
    layout = [[[1, 4, 4], [1, 4, 6]], [[1, 6, 6]], []]
    rows, grids = [], []
    for images in layout:
        row = torch.randint(3, 50, (3,), generator=gen).tolist()
        for t, h, w in images:
            row += [QWEN_START] + [QWEN_IMAGE] * (t * h * w // 4) + [QWEN_END] + [30, 31]
            grids.append([t, h, w])
        rows.append(row + [20, 21, 22])
    return model, qwen_batch(rows, grids, padding_side, gen)


def test_qwen_rows_with_several_or_no_images():
    model, batch = _qwen_two_images_per_row()
    pieces, _ = split_batch(batch, 1, image_token_id=QWEN_IMAGE)
    assert pieces[0]["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    assert pieces[0]["pixel_values"].shape[0] == 16 + 24
    assert pieces[1]["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert pieces[2]["pixel_values"] is None and pieces[2]["image_grid_thw"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # row 2 has no image: NaN + warning in both runs
        ref = bye_fast.score(model, [batch], progress=False)
        split = bye_fast.score(model, [batch], progress=False, max_tokens_per_batch=1)
    assert np.isnan(ref.entropy[2]).all() and ref.n_image_tokens.tolist() == [10, 9, 0]
    _close(split, ref)


def test_llava_row_without_image_splits():
    model, batches = llava(n_batches=1, batch_size=3)
    batch = dict(batches[0])
    ids = batch["input_ids"].clone()
    ids[1][ids[1] == model.config.image_token_id] = 7
    batch["input_ids"] = ids
    batch["pixel_values"] = batch["pixel_values"][[0, 2]]
    pieces = halve(batch, image_token_id=model.config.image_token_id)
    assert pieces[0]["pixel_values"].shape[0] == 1 and pieces[1]["pixel_values"].shape[0] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = bye_fast.score(model, [batch], progress=False)
        split = bye_fast.score(model, [batch], progress=False, max_tokens_per_batch=1)
    _close(split, ref)


def test_unsplittable_batches_are_refused_clearly():
    model, batches = llava(n_batches=1, batch_size=3)
    image_id = model.config.image_token_id
    batch = dict(batches[0])
    # two images back to back in one row: one run of image tokens for two images
    doubled = dict(batch, pixel_values=torch.cat([batch["pixel_values"], batch["pixel_values"][:1]]))
    with pytest.raises(NotImplementedError, match=r"batch 0: 'pixel_values' holds 4 images .* 3 runs"):
        split_batch(doubled, 1, image_token_id=image_id)
    with pytest.raises(NotImplementedError, match="batch 5: .* split 'pixel_values_videos'"):
        split_batch(dict(batch, pixel_values_videos=torch.zeros(3, 2)), 1, image_token_id=image_id, index=5)
    # nothing to cut: unknown keys pass through untouched
    whole, _ = split_batch(dict(batch, pixel_values_videos=torch.zeros(3, 2)), 10**6, image_token_id=image_id)
    assert len(whole) == 1
    with pytest.raises(NotImplementedError, match="batch 0"):
        bye_fast.score(model, [dict(batch, extra=torch.zeros(3))], progress=False, max_tokens_per_batch=1)
    with pytest.raises(ValueError, match="max_tokens_per_batch must be >= 1"):
        bye_fast.score(model, [batch], progress=False, max_tokens_per_batch=0)
    with pytest.raises(ValueError, match="rows range"):
        take_rows(batch, range(2, 2), image_token_id=image_id)


def test_row_over_budget_warns_once():
    model, batches = llava(n_batches=2, batch_size=3)
    batches = [{**b, "ids": [f"b{i}r{j}" for j in range(3)]} for i, b in enumerate(batches)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bye_fast.score(model, batches, progress=False, max_tokens_per_batch=10)
    msgs = [str(w.message) for w in caught if "max_tokens_per_batch" in str(w.message)]
    assert len(msgs) == 1 and "batch 0: id 'b0r0'" in msgs[0]


def _oom_above(model, rows: int):
    """Make the decoder's forward raise a CUDA OOM for batches of more than ``rows`` rows."""
    inner = model.model
    original = inner.forward
    calls = []

    def forward(*args, **kwargs):
        n = kwargs["input_ids"].shape[0]
        calls.append(n)
        if n > rows:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated, {n} rows)")
        return original(*args, **kwargs)

    inner.forward = forward
    return calls


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_simulated_oom_halves_batches(family, capsys):
    model, batches = FAMILIES[family]()
    ref = bye_fast.score(model, batches, progress=False)
    calls = _oom_above(model, 2)
    got = bye_fast.score(model, batches, progress=True)
    _close(got, ref)
    n = [b["input_ids"].shape[0] for b in batches]
    assert sum(c for c in calls if c <= 2) == sum(n)  # every row scored exactly once
    err = capsys.readouterr().err
    assert err.count("CUDA out of memory on batch 0 (3 rows)") == 1
    assert err.count("CUDA out of memory") == 1  # said once, though batch 1 ran out of memory too
    assert "OOM: halving batches" in err


def test_simulated_oom_without_progress_warns_and_single_row_reraises():
    model, batches = llava(n_batches=2, batch_size=3)
    ref = bye_fast.score(model, batches, progress=False)
    _oom_above(model, 1)
    with pytest.warns(UserWarning, match="out of memory on batch 0") as caught:
        got = bye_fast.score(model, batches, progress=False)
    assert sum("CUDA out of memory" in str(w.message) for w in caught) == 1
    _close(got, ref)
    _oom_above(model, 0)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated, 1 rows"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bye_fast.score(model, batches, progress=False)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_skipping_unused_vision_layers_changes_nothing(family, monkeypatch):
    """Vision layers after ``vision_feature_layer`` are skipped; the slow twin runs them all."""
    import contextlib
    import importlib

    from bye_fast.hook import unused_vision_layers_skipped

    if family == "llava":
        model, _ = build_llava(build_processor(), seed=1, layers=2, vision_layers=3, vision_feature_layer=-2)
        sharpen(model)
        _, batches = llava(n_batches=1)
    else:
        model, batches = FAMILIES[family]()
        model.config.vision_feature_layer = -2
    layers = model.model.vision_tower.encoder.layers
    ran = []
    hooks = [m.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, m in enumerate(layers)]
    with unused_vision_layers_skipped(model) as skipped:
        assert skipped == 1 and "forward" in layers[-1].__dict__
    assert all("forward" not in m.__dict__ for m in layers)  # restored
    fast = bye_fast.score(model, batches, progress=False)
    n = len(layers)
    assert n - 1 not in ran and ran[: n - 1] == list(range(n - 1))  # the last layer did not run
    score_module = importlib.import_module("bye_fast.score")  # the module, not the function
    monkeypatch.setattr(score_module, "unused_vision_layers_skipped", lambda m: contextlib.nullcontext(0))
    ran.clear()
    slow = bye_fast.score(model, batches, progress=False)
    assert ran[:n] == list(range(n))  # the twin runs every layer
    for h in hooks:
        h.remove()
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(fast, f), getattr(slow, f), err_msg=f)
    # and a later plain forward that wants every hidden state still gets them
    with torch.inference_mode():
        out = model.model.vision_tower(
            batches[0]["pixel_values"][:1].flatten(0, -4)[:1], output_hidden_states=True
        )
    assert len(out.hidden_states) == n + 1 and all(h is not None for h in out.hidden_states)


def test_layers_returning_tuples_are_never_replaced_by_the_identity():
    """Older CLIP layers return ``(hidden_states,)``: a bare-tensor identity would be indexed wrongly."""
    from bye_fast.hook import _returns_tensor

    class Old(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor]:
            return (hidden_states,)

    class New(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return hidden_states

    class Unannotated(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    assert _returns_tensor(New()) and not _returns_tensor(Old()) and not _returns_tensor(Unannotated())


def test_family_layouts_refuse_images_that_do_not_line_up():
    """InternVL tiles and Mistral 3 image sizes that do not account for the rows' image tokens are refused."""
    model, batches = FAMILIES["internvl"]()
    batch = dict(batches[0], pixel_values=batches[0]["pixel_values"][:-1])  # a tile short
    with pytest.raises(NotImplementedError, match=r"batch 0: the rows' image tokens \(\[16, 32, 16\]\) do not add up"):
        split_batch(batch, 1, image_token_id=model.config.image_token_id, layout=image_layout(model))
    model, batches = FAMILIES["mistral3"]()
    sizes = batches[0]["image_sizes"].clone()
    sizes[0, 0] += 8  # one more row of image tokens than the prompt has
    batch = dict(batches[0], image_sizes=sizes)
    with pytest.raises(NotImplementedError, match="do not add up to whole images"):
        halve(batch, image_token_id=model.config.image_token_id, layout=image_layout(model))
    no_sizes = {k: v for k, v in batches[0].items() if k != "image_sizes"}
    with pytest.raises(NotImplementedError, match="lacks"):
        halve(no_sizes, image_token_id=model.config.image_token_id, layout=image_layout(model))


@pytest.mark.parametrize("family", ["idefics3", "mistral3"])
def test_family_row_without_image_splits(family):
    """A row without image (Idefics3: per-row zero pixels; Mistral 3: no image size) in a split batch."""
    model, batches = FAMILIES[family]()
    image_id = model.config.image_token_id
    batch = dict(batches[1])  # rows: 0 with image(s), 1 with one image
    ids = batch["input_ids"].clone()
    ids[1][ids[1] == image_id] = 7  # row 1 loses its image tokens
    batch["input_ids"] = ids
    if family == "idefics3":
        batch["pixel_values"] = batch["pixel_values"].clone()
        batch["pixel_values"][1] = 0
        batch["pixel_attention_mask"] = batch["pixel_attention_mask"].clone()
        batch["pixel_attention_mask"][1] = False
    else:
        batch["pixel_values"], batch["image_sizes"] = batch["pixel_values"][:1], batch["image_sizes"][:1]
    pieces, _ = split_batch(batch, 1, image_token_id=image_id, layout=image_layout(model))
    assert pieces[1]["pixel_values"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # row 1 has no image: NaN + warning in both runs
        ref = bye_fast.score(model, [batch], progress=False)
        split = bye_fast.score(model, [batch], progress=False, max_tokens_per_batch=1)
    assert np.isnan(ref.entropy[1]).all() and np.isfinite(ref.entropy[0]).all()
    _close(split, ref)
