"""Tiny random multimodal models and padded batches for the scoring tests (no downloads)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from bye_fast.lab.models import IMAGE, build_llava, build_processor, build_tokenizer

PROMPTS = [
    "USER: <image> is it even or odd ? ASSISTANT:",
    "USER: <image> what digit ? ASSISTANT:",
    "USER: what digit is this number ? <image> describe the image a number ASSISTANT:",
]


def sharpen(model: torch.nn.Module, factor: float = 12.0) -> torch.nn.Module:
    """Scale the text q/k projections so random attention is peaky, not uniform."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                p.mul_(factor)
    return model


def _images(rng, sizes):
    return [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]


def llava(padding_side: str = "left", seed: int = 0, n_batches: int = 2, batch_size: int = 3):
    proc = build_processor(padding_side=padding_side)
    model, _ = build_llava(proc, seed=seed, layers=3, heads=4, kv_heads=2)
    sharpen(model)
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(n_batches):
        texts = [PROMPTS[(b + i) % len(PROMPTS)] for i in range(batch_size)]
        enc = proc(
            text=texts, images=_images(rng, [(32, 32)] * batch_size), return_tensors="pt", padding=True
        )
        batches.append(dict(enc))
    return model, batches


def llava_next(padding_side: str = "left", seed: int = 0):
    tok = build_tokenizer()
    tok.padding_side = padding_side
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=pinpoints,
        do_rescale=True,
        rescale_factor=1 / 255,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = sharpen(LlavaNextForConditionalGeneration._from_config(cfg).eval())
    rng = np.random.default_rng(seed)
    batches = []
    for sizes in ([(40, 70), (64, 40), (32, 32)], [(70, 70), (30, 60)]):
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(len(sizes))]
        batches.append(dict(proc(text=texts, images=_images(rng, sizes), return_tensors="pt", padding=True)))
    return model, batches


QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 60, 61, 62, 63


def qwen2_vl(padding_side: str = "left", seed: int = 0):
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )
    torch.manual_seed(seed)
    model = sharpen(Qwen2VLForConditionalGeneration._from_config(cfg).eval())
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for grids, prefixes in (([[1, 4, 4], [1, 4, 6], [1, 6, 6]], [3, 7, 1]), ([[1, 8, 4], [1, 2, 2]], [2, 9])):
        rows = []
        for (t, h, w), pre in zip(grids, prefixes, strict=True):
            n = t * h * w // 4
            text = torch.randint(3, 50, (pre,), generator=gen).tolist()
            rows.append(text + [QWEN_START] + [QWEN_IMAGE] * n + [QWEN_END] + [20, 21, 22])
        batches.append(qwen_batch(rows, grids, padding_side, gen))
    return model, batches


def pad_rows(rows: list[list[int]], padding_side: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token rows padded (id 0) on ``padding_side``."""
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def qwen_batch(
    rows: list[list[int]], grids: list[list[int]], padding_side: str, gen: torch.Generator
) -> dict:
    """Token rows padded on ``padding_side``, with random pixel patches for the image ``grids`` (t, h, w)."""
    padded = pad_rows(rows, padding_side)
    ids, mask = padded["input_ids"], padded["attention_mask"]
    grid = torch.tensor(grids)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=gen),
        "image_grid_thw": grid,
        "mm_token_type_ids": (ids == QWEN_IMAGE).long(),
    }


FAMILIES = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl}
