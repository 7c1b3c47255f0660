"""Tiny random models of the other MLLM families bye_fast supports, with padded batches (no downloads).

Every builder returns ``(model, batches)`` like those of :mod:`tests._models`:
a 3-layer, 4-head text decoder (``sharpen``-ed, so attention is peaky) and two
batches of 3 and 2 rows, padded on ``padding_side``, whose rows differ in
length and in their number of image tokens. Prompts are written as token ids
the way each family's processor writes them (special tokens around the image
placeholders included), so no tokenizer is needed.

Token ids: 0 pad, 1 bos, 2 eos, 3..49 text, 50..63 the family's special tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from ._models import FAMILIES as _FIRST
from ._models import QWEN_END, QWEN_IMAGE, QWEN_START, QWEN_VIDEO, _images, pad_rows, qwen_batch, sharpen

VOCAB = 64
#: The text decoder of every family here: 3 layers, 4 query heads over 2 kv heads.
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)  # fmt: skip
IMG, BEGIN, END, BREAK, GLOBAL, VIDEO = 60, 61, 62, 63, 59, 58


def _text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 50, (n,), generator=gen).tolist()


def _built(cls, cfg, seed: int):
    torch.manual_seed(seed)
    return sharpen(cls._from_config(cfg).eval())


# --------------------------------------------------------------------------- LLaVA-OneVision
def llava_onevision(padding_side: str = "left", seed: int = 0):
    """LLaVA-OneVision (anyres, SigLIP): ``<image>`` x (base + unpadded crops + one newline per row); all of
    them are ``image_token_id``. The count is the processor's own formula (its constructor needs a video
    processor, i.e. torchvision, so the prompt is written here)."""
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
                                         do_rescale=True, rescale_factor=1 / 255, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3)  # fmt: skip
    counter = object.__new__(LlavaOnevisionProcessor)  # only for _get_number_of_features
    counter.image_processor, counter.num_image_tokens, counter.vision_aspect_ratio = ip, 16, "anyres_max_9"
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", **TEXT), image_token_index=IMG, video_token_index=VIDEO,
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    model = _built(LlavaOnevisionForConditionalGeneration, cfg, seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for sizes, prefixes in (([(40, 70), (64, 40), (32, 32)], [3, 7, 1]), ([(70, 70), (30, 60)], [2, 9])):
        rows = [_text(gen, pre) + [IMG] * counter._get_number_of_features(h, w, 32, 32) + [20, 21, 22]
                for (h, w), pre in zip(sizes, prefixes, strict=True)]  # fmt: skip
        batch = pad_rows(rows, padding_side)
        images = ip(_images(rng, sizes), return_tensors="pt")
        batch.update(pixel_values=images["pixel_values"], image_sizes=images["image_sizes"],
                     batch_num_images=torch.as_tensor(images["batch_num_images"]))  # fmt: skip
        batches.append(batch)
    return model, batches


# --------------------------------------------------------------------------- InternVL
INTERNVL_TOKENS = 16  # per 32x32 tile: (32/4)^2 patches, pixel-shuffled by 0.5 -> 16


def internvl(padding_side: str = "left", seed: int = 0):
    """InternVL: ``<img>`` + ``<IMG_CONTEXT>`` x 16 per tile + ``</img>``; the context tokens are the image."""
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=4),
        text_config=dict(model_type="qwen2", **TEXT),
        image_token_id=IMG, image_seq_length=INTERNVL_TOKENS, downsample_ratio=0.5,
    )  # fmt: skip
    model = _built(InternVLForConditionalGeneration, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for tiles, prefixes in (([1, 2, 1], [3, 7, 1]), ([3, 1], [2, 9])):  # an image of 1, 2 or 3 tiles
        rows = [_text(gen, pre) + [BEGIN] + [IMG] * (INTERNVL_TOKENS * t) + [END] + [20, 21, 22]
                for t, pre in zip(tiles, prefixes, strict=True)]  # fmt: skip
        batch = pad_rows(rows, padding_side)
        batch["pixel_values"] = torch.randn(sum(tiles), 3, 32, 32, generator=gen)
        batches.append(batch)
    return model, batches


# --------------------------------------------------------------------------- Qwen2.5-VL
def qwen2_5_vl(padding_side: str = "left", seed: int = 0):
    """Qwen2.5-VL: ``<|vision_start|>`` + ``<|image_pad|>`` x (t h w / 4) + ``<|vision_end|>``; only the pads
    are the image. Windowed vision attention (window 2x2 merged patches) with one full-attention block."""
    cfg = Qwen2_5_VLConfig(
        text_config=dict(**TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1]),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )  # fmt: skip
    model = _built(Qwen2_5_VLForConditionalGeneration, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for grids, prefixes in (([[1, 4, 4], [1, 4, 8], [1, 8, 8]], [3, 7, 1]), ([[1, 8, 4], [1, 4, 4]], [2, 9])):
        rows = [_text(gen, pre) + [QWEN_START] + [QWEN_IMAGE] * (t * h * w // 4) + [QWEN_END] + [20, 21, 22]
                for (t, h, w), pre in zip(grids, prefixes, strict=True)]  # fmt: skip
        batches.append(qwen_batch(rows, grids, padding_side, gen))
    return model, batches


# --------------------------------------------------------------------------- Gemma 3
GEMMA_TOKENS = 16  # mm_tokens_per_image: 8x8 SigLIP patches average-pooled to 4x4


def gemma3_config(sliding_window: int = 512) -> Gemma3Config:
    """Gemma 3 with layers sliding / full / sliding (window ``sliding_window``)."""
    return Gemma3Config(
        text_config=dict(**TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=sliding_window,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=4),
        mm_tokens_per_image=GEMMA_TOKENS, image_token_index=IMG, boi_token_index=BEGIN, eoi_token_index=END,
    )  # fmt: skip


def gemma3_model(sliding_window: int = 512, seed: int = 0, layer_types: list[str] | None = None):
    cfg = gemma3_config(sliding_window)
    if layer_types is not None:
        cfg.text_config.layer_types = layer_types
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(cfg).eval()
    with torch.no_grad():  # transformers initialises the projection to 0: every image token would look alike
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
    return sharpen(model)


def gemma3_batch(rows: list[list[int]], padding_side: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    batch = pad_rows(rows, padding_side)
    # images attend to themselves bidirectionally
    batch["token_type_ids"] = (batch["input_ids"] == IMG).long()
    n_images = int((batch["input_ids"] == BEGIN).sum())
    batch["pixel_values"] = torch.randn(n_images, 3, 32, 32, generator=gen)
    return batch


def gemma3(padding_side: str = "left", seed: int = 0, sliding_window: int = 512, suffix: int = 3):
    """Gemma 3: ``<start_of_image>`` + ``<image_soft_token>`` x 16 + ``<end_of_image>``; the soft tokens are the
    image. ``suffix`` text tokens follow the image (the prompt's length after it)."""
    model = gemma3_model(sliding_window, seed)
    gen = torch.Generator().manual_seed(seed)
    image = [BEGIN] + [IMG] * GEMMA_TOKENS + [END]
    batches = []
    for layout in ([(3, 1), (7, 2), (1, 1)], [(2, 2), (9, 1)]):  # (text before, images)
        rows = [[1] + _text(gen, pre) + (image + _text(gen, 2)) * n + _text(gen, suffix) for pre, n in layout]
        batches.append(gemma3_batch(rows, padding_side, gen))
    return model, batches


# --------------------------------------------------------------------------- Idefics3 / SmolVLM
IDEFICS_TOKENS = 16  # per 32x32 image: (32/4)^2 patches, pixel-shuffled by scale 2 -> 16


def _idefics(cls, config_cls, padding_side: str, seed: int):
    cfg = config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=4),
        text_config=dict(model_type="llama", **TEXT), image_token_id=IMG, scale_factor=2,
    )  # fmt: skip
    model = _built(cls, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for layout in ([(3, 1), (7, 2), (1, 1)], [(2, 2), (9, 1)]):  # (text before, images)
        rows = []
        for pre, n in layout:  # the processor's layout of n sub-images <row_1_col_k> and the global image
            row = _text(gen, pre)
            for k in range(n):
                tile = GLOBAL if k == n - 1 else 40 + k
                row += [BEGIN, tile] + [IMG] * IDEFICS_TOKENS
            rows.append(row + [BEGIN] + [20, 21, 22])
        batch = pad_rows(rows, padding_side)
        n_max = max(n for _, n in layout)
        pixels = torch.zeros(len(layout), n_max, 3, 32, 32)
        pixel_mask = torch.zeros(len(layout), n_max, 32, 32, dtype=torch.bool)
        for r, (_, n) in enumerate(layout):  # padding images are all zero, as the processor makes them
            pixels[r, :n] = torch.randn(n, 3, 32, 32, generator=gen)
            pixel_mask[r, :n] = True
        batch.update(pixel_values=pixels, pixel_attention_mask=pixel_mask)
        batches.append(batch)
    return model, batches


def idefics3(padding_side: str = "left", seed: int = 0):
    """Idefics3: per sub-image ``<fake_token_around_image><row_i_col_j>`` + ``<image>`` x 16; only ``<image>``
    is the image. ``pixel_values`` is (rows, images, 3, H, W), zero-padded per row."""
    return _idefics(Idefics3ForConditionalGeneration, Idefics3Config, padding_side, seed)


def smolvlm(padding_side: str = "left", seed: int = 0):
    """SmolVLM: Idefics3's layout and inputs."""
    return _idefics(SmolVLMForConditionalGeneration, SmolVLMConfig, padding_side, seed)


# --------------------------------------------------------------------------- Mistral 3
MISTRAL_MERGE = 8  # pixels per image token side: patch 4 x spatial merge 2


def mistral3_tokens(h: int, w: int) -> list[int]:
    """Pixtral's layout of an h x w image: rows of ``[IMG]`` separated by ``[IMG_BREAK]``, then ``[IMG_END]``."""
    rows, cols = h // MISTRAL_MERGE, w // MISTRAL_MERGE
    out: list[int] = []
    for r in range(rows):
        out += [IMG] * cols + [END if r == rows - 1 else BREAK]
    return out


def mistral3(padding_side: str = "left", seed: int = 0):
    """Mistral 3 (Pixtral vision): ``[IMG]`` rows broken by ``[IMG_BREAK]`` and closed by ``[IMG_END]``; only
    ``[IMG]`` is the image, so an image is several runs of image tokens."""
    cfg = Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=48, patch_size=4, head_dim=8),
        text_config=dict(model_type="mistral", **TEXT), image_token_index=IMG, spatial_merge_size=2,
        vision_feature_layer=-1,
    )  # fmt: skip
    model = _built(Mistral3ForConditionalGeneration, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for sizes, prefixes in (([[32, 24], [16, 48], [24, 24]], [3, 7, 1]), ([[48, 32], [16, 16]], [2, 9])):
        rows = [[1] + _text(gen, pre) + mistral3_tokens(h, w) + [20, 21, 22]
                for (h, w), pre in zip(sizes, prefixes, strict=True)]  # fmt: skip
        batch = pad_rows(rows, padding_side)
        H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
        pixels = torch.zeros(len(sizes), 3, H, W)  # the processor pads images to the batch's largest
        for i, (h, w) in enumerate(sizes):
            pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        batch.update(pixel_values=pixels, image_sizes=torch.tensor(sizes))
        batches.append(batch)
    return model, batches


#: Every family: those of tests._models and the ones above.
FAMILIES = {**_FIRST, "llava_onevision": llava_onevision, "internvl": internvl, "qwen2_5_vl": qwen2_5_vl, "gemma3": gemma3,
            "idefics3": idefics3, "smolvlm": smolvlm, "mistral3": mistral3}  # fmt: skip
