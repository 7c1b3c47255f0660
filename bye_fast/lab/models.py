"""Tiny LLaVA models, tokenizers and processors built from configs, and the lab's base model.

Nothing is fetched from a model hub. :func:`build_llava` makes random-weight
models of any small size (the tests use them); :data:`BASE_MODEL` is the
architecture of the lab's pre-trained base model, whose weights ship with the
package (:func:`load_base_model`; made by ``benchmarks/pretrain_base.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

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


# --------------------------------------------------------------------------- the lab's base model
#: Architecture of the lab's base model (``llava_config`` keywords plus the processor's image
#: geometry): a CLIP vision tower (96 x 96 images, 8-pixel patches -> 144 image tokens, 2 layers)
#: and a Llama text decoder (6 layers, 4 heads, 2 kv heads). The projector reads the last vision layer.
BASE_MODEL: dict = {
    "image_size": 96,
    "patch_size": 8,
    "vision_hidden": 64,
    "vision_layers": 2,
    "vision_heads": 4,
    "hidden": 96,
    "layers": 6,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 256,
    "vision_feature_layer": -1,
}

#: Where the shipped base weights live (``base.safetensors`` and ``base.json``).
WEIGHTS_DIR = Path(__file__).with_name("weights")


def lab_processor(padding_side: str = "left") -> LlavaProcessor:
    """The processor of the lab's base model (its tokenizer knows every word of the lab's tasks)."""
    from bye_fast.lab.tasks import WORDS

    return build_processor(
        BASE_MODEL["image_size"], BASE_MODEL["patch_size"], words=WORDS, padding_side=padding_side
    )


def build_base_model(
    seed: int = 0, *, dtype: torch.dtype = torch.float32, **overrides
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A RANDOM-weight model of the base architecture (``BASE_MODEL`` updated by ``overrides``)."""
    cfg = {**BASE_MODEL, **overrides}
    cfg.pop("image_size"), cfg.pop("patch_size")
    return build_llava(lab_processor(), seed=seed, dtype=dtype, **cfg)


def load_base_model(
    path: str | Path | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The pre-trained base model shipped with the package (or the weights file ``path``).

    Raises ``FileNotFoundError`` naming the file and the command that makes it.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS_DIR / "base.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no base-model weights; make them with `python benchmarks/pretrain_base.py`"
        )
    meta = json.loads(path.with_suffix(".json").read_text())
    model, processor = build_base_model(dtype=dtype, **meta["architecture"])
    if meta["vocab"] != _vocab(processor):
        raise ValueError(f"{path}: the weights were trained with another vocabulary than this package's")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise ValueError(
            f"{path}: does not match the base architecture (missing {missing}, extra {unexpected})"
        )
    model.to(dtype).eval()
    return model, processor


def _vocab(processor: LlavaProcessor) -> list[str]:
    vocab = processor.tokenizer.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def save_base_model(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, path: str | Path, info: dict
) -> Path:
    """Write ``model``'s weights (safetensors) and ``<path>.json`` (architecture, vocabulary, ``info``)."""
    from safetensors.torch import save

    from bye_fast._io import atomic_write, write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path, "wb", suffix=".safetensors") as f:
        f.write(save(state))
    write_json_atomic(
        path.with_suffix(".json"),
        {"architecture": {k: v for k, v in BASE_MODEL.items() if k not in ("image_size", "patch_size")},
         "vocab": _vocab(processor), **info},
    )  # fmt: skip
    return path
