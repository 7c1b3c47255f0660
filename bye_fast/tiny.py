"""Tiny models, tokenizers and processors built from configs (no downloads).

Used by the tests, the demo and the benchmarks. Everything here has random
weights unless trained; nothing is fetched from a model hub.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)

#: A LLaVA-1.5-style single-turn template: "USER: <image>\nq ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}"
    "{% else %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

DEFAULT_WORDS = (
    "USER: ASSISTANT: what digit is this ? is it even or odd yes no "
    "zero one two three four five six seven eight nine even odd backdoor attack ! "
    "describe the image a number"
).split()


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` plus the special tokens."""
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(
    image_size: int = 32,
    patch_size: int = 4,
    words: Iterable[str] = DEFAULT_WORDS,
    padding_side: str = "left",
) -> LlavaProcessor:
    """A LLaVA processor for ``image_size`` square images (no resize/crop surprises)."""
    tokenizer = build_tokenizer(words)
    tokenizer.padding_side = padding_side
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_resize=True,
        do_rescale=True,  # images are uint8 / PIL (as read from files): [0, 255] -> [0, 1]
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def llava_config(
    vocab_size: int,
    *,
    image_token_id: int,
    pad_token_id: int = 0,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vision_feature_layer: int | None = None,
) -> LlavaConfig:
    """A LLaVA config: CLIP vision tower + Llama text model (GQA when kv_heads < heads)."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max(4096, 2 * (image_size // patch_size) ** 2),
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer if vision_feature_layer is not None else -1,
        image_seq_length=(image_size // patch_size) ** 2,
    )


def build_llava(
    processor: LlavaProcessor | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight tiny LLaVA matched to ``processor`` (built if None)."""
    processor = processor or build_processor()
    tok = processor.tokenizer
    image_size = processor.image_processor.crop_size["height"]
    cfg = llava_config(
        len(tok),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        pad_token_id=tok.pad_token_id,
        image_size=image_size,
        patch_size=processor.patch_size,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.eval()
    return model, processor
