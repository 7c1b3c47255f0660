"""Prompts: a record turned into the text the model sees before it answers.

BYE scores each sample on its prompt (image + first question, no answer), so
:func:`build_prompt` renders exactly that with the model's processor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bye_fast.records import IMAGE_PLACEHOLDER, _first_human_turn, _image_paths

__all__ = ["build_prompt"]


def _question_and_images(record: Mapping) -> tuple[str, list[str]]:
    """First human turn's text and the record's image paths; ``ValueError`` if they disagree."""
    rid = record.get("id")
    turn = _first_human_turn(record.get("conversations") or [])
    if turn is None or not isinstance(turn.get("value"), str):
        raise ValueError(f"record {rid!r}: no human turn with a text 'value'")
    text, images = turn["value"], _image_paths(record)
    n_placeholders = text.count(IMAGE_PLACEHOLDER)
    if n_placeholders and n_placeholders != len(images):
        raise ValueError(
            f"record {rid!r}: its first human turn has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but the record has {len(images)} image(s)"
        )
    return text, images


def _content(text: str, n_images: int) -> list[dict]:
    """Chat-template content items: text pieces and images in placeholder order."""
    if IMAGE_PLACEHOLDER not in text:
        items = [{"type": "image"} for _ in range(n_images)]
        return items + ([{"type": "text", "text": text.strip()}] if text.strip() else [])
    items: list[dict] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            items.append({"type": "image"})
        if piece.strip():
            items.append({"type": "text", "text": piece.strip()})
    return items


def _image_token(processor: Any) -> str:
    token = getattr(processor, "image_token", None)
    token = token or getattr(getattr(processor, "tokenizer", None), "image_token", None)
    return token or IMAGE_PLACEHOLDER


def build_prompt(record: Mapping, processor: Any) -> str:
    """The prompt of ``record`` as the model sees it when it must answer.

    Only the FIRST human turn is used. Its ``<image>`` placeholders become
    image content items, in order, between the text pieces around them
    (stripped of surrounding whitespace); if the text has no placeholder but
    the record has images, the images come first, as in LLaVA. The message is
    rendered with ``processor.apply_chat_template(messages,
    add_generation_prompt=True, tokenize=False)``: generation prompt on, no
    answer.

    If the processor has no chat template, the prompt is the plain question
    text with each placeholder replaced by the processor's image token (its
    ``image_token``, else its tokenizer's, else ``<image>``), and, when the text
    has no placeholder, one image token per image followed by a newline in
    front -- no role markers and no generation prompt.

    Parameters
    ----------
    record : Mapping
        A LLaVA-format record (not modified).
    processor : transformers.ProcessorMixin
        The model's processor, e.g. a ``LlavaProcessor``.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        Naming the record id, if the first human turn has placeholders whose
        number differs from the number of images, or there is no human turn.
    """
    text, images = _question_and_images(record)
    if getattr(processor, "chat_template", None) is None:
        token = _image_token(processor)
        if IMAGE_PLACEHOLDER in text:
            return text.replace(IMAGE_PLACEHOLDER, token)
        return token * len(images) + "\n" + text if images else text
    messages = [{"role": "user", "content": _content(text, len(images))}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
