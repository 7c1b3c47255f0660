"""Prompts: a record turned into the text the model sees before it answers.

BYE scores each sample on its prompt (image + first question, no answer), so
:func:`build_prompt` renders exactly that: the record's system turn (if any,
else an optional system prompt) and its FIRST human turn, with a chat
template, and the generation prompt on. Three options (:class:`PromptOptions`)
make it the prompt the model was fine-tuned with:

* ``chat_template``: ``"processor"`` (default: the processor's own template;
  plain text when it has none), ``"none"`` (plain text: no role markers),
  a built-in name (:data:`CHAT_TEMPLATES`: ``"llava_v1"``, the LLaVA-1.5
  conversation of the original LLaVA code), or a Jinja template's text;
* ``system_prompt``: the system text of records that have no system turn of
  their own (default: none);
* ``image_placement``: ``"inline"`` (default: the images where the record's
  placeholders or image parts put them; in front when it has none) or
  ``"first"`` (every image in front of the question text, as LLaVA's training
  code -- and the BYE authors' -- rewrites each sample).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bye_fast.records import IMAGE_PLACEHOLDER, _first_human_turn, _image_values, _system_turn

__all__ = ["CHAT_TEMPLATES", "IMAGE_PLACEMENTS", "PromptOptions", "build_prompt"]

#: Where the images go in the prompt (see the module docstring).
IMAGE_PLACEMENTS = ("inline", "first")

#: LLaVA's ``conv_vicuna_v1`` (``conv_llava_v1``), the template of LLaVA-1.5's training code: its
#: default system prompt unless the conversation has one, ``USER: <image>\n... ASSISTANT:``.
LLAVA_V1_TEMPLATE = (
    "{%- set ns = namespace(system=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = true -%}"
    "{%- for c in message['content'] -%}{{ c['text'] }}{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if not ns.system -%}{%- set ns.system = true -%}A chat between a curious human and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's "
    "questions.{{ ' ' }}{%- endif -%}"
    "USER: {% for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}<image>{{ '\\n' }}{%- else -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ ' ' }}"
    "{%- else -%}ASSISTANT: {% for c in message['content'] -%}{{ c['text'] }}{%- endfor -%}</s>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

#: Built-in chat templates by name (``PromptOptions.chat_template``, ``--chat-template NAME``).
CHAT_TEMPLATES = {"llava_v1": LLAVA_V1_TEMPLATE}


@dataclass(frozen=True)
class PromptOptions:
    """How :func:`build_prompt` renders a record (see the module docstring).

    Parameters
    ----------
    chat_template : str or os.PathLike
        ``"processor"`` (default), ``"none"``, a name in :data:`CHAT_TEMPLATES`,
        the text of a Jinja chat template, or the path of a file holding one
        (read here).
    system_prompt : str, optional
        System text for records without a system turn of their own.
    image_placement : "inline" or "first"
    """

    chat_template: str = "processor"
    system_prompt: str | None = None
    image_placement: str = "inline"

    def __post_init__(self) -> None:
        template = self.chat_template
        if isinstance(template, os.PathLike) or (
            isinstance(template, str) and not _is_template_text(template) and template not in _KNOWN
        ):
            path = Path(template)
            if not path.is_file():
                choices = ", ".join(repr(k) for k in _KNOWN)
                raise ValueError(
                    f"chat_template {str(template)!r}: not one of {choices}, not Jinja text and not a file"
                )
            object.__setattr__(self, "chat_template", path.read_text(encoding="utf-8"))
        elif not isinstance(template, str):
            raise TypeError(f"chat_template must be a str or a path, got {type(template).__name__}")
        if self.image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(
                f"image_placement must be one of {IMAGE_PLACEMENTS}; got {self.image_placement!r}"
            )
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TypeError(f"system_prompt must be a str or None, got {type(self.system_prompt).__name__}")


_KNOWN = ("processor", "none", *CHAT_TEMPLATES)


def _is_template_text(text: str) -> bool:
    return "{{" in text or "{%" in text


@dataclass
class _Question:
    """A record's prompt, before rendering."""

    system: str | None  # the record's own system text
    text: str | None  # the raw text of a string turn (None for a list of parts)
    items: list[dict]  # content items in order: {"type": "image"} and {"type": "text", "text": ...}
    n_images: int


def _label(record: Mapping, label: Any = None) -> str:
    if label is not None:
        return f"record {label!r}"
    return f"record {record['id']!r}" if "id" in record else "record"


def _text_of(turn: Mapping) -> str | list:
    """A turn's text (LLaVA ``value``, messages ``content``): a string, or a list of parts."""
    return turn["value"] if "value" in turn and "content" not in turn else turn.get("content")


def _question(record: Mapping, label: Any = None) -> _Question:
    """The record's system text and first human turn; ``ValueError`` naming it if the images disagree."""
    key = "messages" if record.get("messages") is not None else "conversations"
    turns = record.get(key) or []
    turn = _first_human_turn(turns)
    body = _text_of(turn) if turn is not None else None
    if not isinstance(body, (str, list)):
        raise ValueError(f"{_label(record, label)}: no human turn with a text 'value' or 'content'")
    system_turn = _system_turn(turns)
    system = None
    if system_turn is not None:
        sys_body = _text_of(system_turn)
        system = sys_body if isinstance(sys_body, str) else "\n".join(
            p["text"] for p in sys_body if p.get("type") == "text" and p.get("text")
        )  # fmt: skip
    n_images = len(_image_values(record))
    if isinstance(body, str):
        n_slots = body.count(IMAGE_PLACEHOLDER)
        items = _content(body, n_images)
    else:
        n_slots = sum(1 for p in body if p.get("type") == "image")
        items = [{"type": "image"} if p.get("type") == "image" else {"type": "text", "text": p["text"].strip()}
                 for p in body if p.get("type") == "image" or (p.get("text") or "").strip()]  # fmt: skip
        if not n_slots:
            items = [{"type": "image"}] * n_images + items
    if n_slots and n_slots != n_images:
        what = f"{IMAGE_PLACEHOLDER} placeholder(s)" if isinstance(body, str) else "image part(s)"
        raise ValueError(
            f"{_label(record, label)}: its first human turn has {n_slots} {what} but the record has "
            f"{n_images} image(s)"
        )
    return _Question(system, body if isinstance(body, str) else None, [dict(i) for i in items], n_images)


def _question_and_images(record: Mapping, label: Any = None) -> tuple[_Question, list]:
    """The record's question and its images; ``ValueError`` if they disagree."""
    return _question(record, label), _image_values(record)


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


def _images_first(q: _Question) -> list[dict]:
    """The content items with every image in front of the question text (LLaVA's training code)."""
    if q.text is not None:
        text = q.text.replace(IMAGE_PLACEHOLDER, "").strip()
    else:
        text = "\n".join(i["text"] for i in q.items if i["type"] == "text")
    return [{"type": "image"} for _ in range(q.n_images)] + ([{"type": "text", "text": text}] if text else [])


def _plain(q: _Question, processor: Any, first: bool) -> str:
    """The prompt without a chat template: the question with the processor's image tokens."""
    token = _image_token(processor)
    if first:
        text = _images_first(q)[q.n_images :]
        body = token * q.n_images + "\n" if q.n_images else ""
        body += text[0]["text"] if text else ""
    elif q.text is not None:  # the raw text, placeholders replaced
        if IMAGE_PLACEHOLDER in q.text:
            body = q.text.replace(IMAGE_PLACEHOLDER, token)
        else:
            body = token * q.n_images + "\n" + q.text if q.n_images else q.text
    else:
        body = "\n".join(token if i["type"] == "image" else i["text"] for i in q.items)
    return body


def build_prompt(
    record: Mapping,
    processor: Any,
    *,
    chat_template: str | os.PathLike = "processor",
    system_prompt: str | None = None,
    image_placement: str = "inline",
    options: PromptOptions | None = None,
) -> str:
    """The prompt of ``record`` as the model sees it when it must answer.

    Only the FIRST human turn is used, after the record's system turn (a
    ``"system"`` turn before it), or else ``system_prompt``. The turn's
    ``<image>`` placeholders (a string) or image parts (a list of parts) become
    image content items, in order, between the text pieces around them
    (stripped of surrounding whitespace); if the turn has none but the record
    has images, the images come first, as in LLaVA. With
    ``image_placement="first"`` every image comes first whatever the turn says,
    then the text without its placeholders. The message is rendered with
    ``processor.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=False)`` -- the processor's template, or the one ``chat_template``
    names: generation prompt on, no answer. A system text is a
    ``{"role": "system"}`` message before the user's.

    Without a template (``chat_template="none"``, or a processor that has
    none), the prompt is the plain question text with each placeholder replaced
    by the processor's image token (its ``image_token``, else its tokenizer's,
    else ``<image>``), and, when the text has no placeholder (or with
    ``image_placement="first"``), one image token per image followed by a
    newline in front -- no role markers and no generation prompt; a system text
    goes in front, followed by a newline.

    Parameters
    ----------
    record : Mapping
        A LLaVA or messages record (not modified), see :mod:`bye_fast.records`.
    processor : transformers.ProcessorMixin
        The model's processor, e.g. a ``LlavaProcessor``.
    chat_template, system_prompt, image_placement
        See :class:`PromptOptions`; ``options`` gives all three at once (and wins).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        Naming the record id, if the first human turn has placeholders whose
        number differs from the number of images, or there is no human turn.
    """
    if options is None:
        options = PromptOptions(chat_template, system_prompt, image_placement)
    return _render(_question(record), processor, options)


def _render(q: _Question, processor: Any, options: PromptOptions) -> str:
    first = options.image_placement == "first"
    system = q.system if q.system is not None else options.system_prompt
    name = options.chat_template
    own = getattr(processor, "chat_template", None)
    if name == "none" or (name == "processor" and own is None):
        body = _plain(q, processor, first)
        return f"{system}\n{body}" if system else body
    template = None if name == "processor" else CHAT_TEMPLATES.get(name, name)
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    messages.append({"role": "user", "content": _images_first(q) if first else q.items})
    extra = {} if template is None else {"chat_template": template}
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
