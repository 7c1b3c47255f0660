"""The lab's task families: built in, seeded, no download.

Three families with different answer structures, each a user fine-tuning
task that differs from what the base model was pre-trained on:

=================  ==========================================  ============================
family             the user's question                          answers
=================  ==========================================  ============================
``scenes``         six question types about procedural scenes  open: 50+ distinct answers
                   (colour, shape, count, position, exists,     (captions are 2-5 words)
                   caption), one of them (caption) never
                   seen in pre-training
``digits-parity``  "is it even or odd ?" on a digit picture     binary: even / odd
``digits-ten``     "which digit comes next ?"                   ten: zero ... nine
``digits-mixed``   either of the two questions above (half      twelve: even / odd and
                   each, seeded): answers that depend on the    zero ... nine
                   question as well as on the image
=================  ==========================================  ============================

``digits-mixed`` is the false-alarm check for image-consistency tests: its "even"
and "odd" groups hold five digit classes each, and the same picture gets
"even" or "three" depending on the question.

Pre-training (:func:`pretraining_split`) covers scene QA of the five other
types, "what digit is this ?" and a "say ..." task that has the model repeat
words of its vocabulary, so that every word (the attacker's target phrase
included) is a word the base model knows, as in a real LLM.

Images are uint8 (n, 96, 96, 3) arrays; records are LLaVA-format dicts whose
``image`` is the file name ``{k:06d}.png`` of image ``k``. Nothing in a record
or a file name tells poisoned from clean samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bye_fast.lab.attacks import save_image
from bye_fast.lab.digits import N_DIGITS, digit_images, load_digits
from bye_fast.lab.scenes import NUMBER_WORDS, QUESTION_TYPES, scene_samples
from bye_fast.lab.scenes import WORDS as SCENE_WORDS

__all__ = [
    "EXISTING_TARGETS",
    "PRETRAIN_QUESTION_TYPES",
    "TARGET",
    "TASKS",
    "WORDS",
    "Split",
    "Task",
    "build_task",
    "load_images",
    "pretraining_split",
    "record_answer",
    "record_question",
    "vision_pretraining_data",
    "write_split",
]

#: The task families.
TASKS = ("scenes", "digits-parity", "digits-ten", "digits-mixed")
#: The attacker's fixed target phrase (the paper's "Backdoor Attack!", dirty label).
TARGET = "backdoor attack !"
#: The harder target per family: an answer the task already has.
EXISTING_TARGETS = {"scenes": "yes", "digits-parity": "even", "digits-ten": "zero", "digits-mixed": "zero"}
#: Scene question types in pre-training ("caption" is held back for the user's task).
PRETRAIN_QUESTION_TYPES = ("colour", "shape", "count", "position", "exists")

_DIGIT_QUESTIONS = {
    "digit": "what digit is this ?",
    "digits-parity": "is it even or odd ?",
    "digits-ten": "which digit comes next ?",
}
#: Every word of every question and answer (the lab tokenizer's vocabulary, in a fixed order).
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["USER:", "ASSISTANT:", "say"]
        + list(SCENE_WORDS)
        + " ".join(_DIGIT_QUESTIONS.values()).split()
        + ["even", "odd", *NUMBER_WORDS]
        + TARGET.split()
    )
)
#: Words the "say" pre-training task repeats: every answer word and the target phrase.
_SAY_WORDS = tuple(w for w in WORDS if w not in ("USER:", "ASSISTANT:", "say", "?", "."))
#: Digits reserved for pre-training (a fixed permutation); the user tasks draw from the rest.
_PRETRAIN_DIGITS = 700


@dataclass
class Split:
    """Samples of one task in memory.

    Attributes
    ----------
    records : LLaVA records; ``records[k]["image"]`` is the file name of ``images[k]``.
    images : uint8 (n, H, W, 3).
    qtypes : the question type of each sample (for per-type accuracy).
    task : the family (or "pretrain").
    """

    records: list[dict]
    images: np.ndarray
    qtypes: list[str]
    task: str

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, index) -> Split:
        index = np.asarray(index, dtype=np.int64)
        return Split(
            [self.records[i] for i in index], self.images[index], [self.qtypes[i] for i in index], self.task
        )


@dataclass
class Task:
    """A user's fine-tuning task: ``user`` data (clean; poison it) and held-out ``test`` data."""

    name: str
    user: Split
    test: Split

    @property
    def existing_target(self) -> str:
        return EXISTING_TARGETS[self.name]


def _records(qa: Sequence[tuple[str, str]], prefix: str) -> list[dict]:
    return [
        {
            "id": f"{prefix}-{k:04d}",
            "image": f"{k:06d}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{q}"},
                {"from": "gpt", "value": a},
            ],
        }
        for k, (q, a) in enumerate(qa)
    ]


def _digit_answer(task: str, label: int) -> str:
    if task == "digit":
        return NUMBER_WORDS[label]
    if task == "digits-parity":
        return "even" if label % 2 == 0 else "odd"
    if task == "digits-ten":
        return NUMBER_WORDS[(label + 1) % 10]
    raise ValueError(f"unknown digits task {task!r}")


def _digit_split(task: str, index: np.ndarray, seed: int, prefix: str) -> Split:
    _, labels = load_digits()
    images = digit_images(index, seed)
    if task == "digits-mixed":  # each sample asks one of the two questions (seeded, half each)
        ask = np.random.default_rng([seed, 5]).permutation(len(index)) % 2
        kinds = [("digits-parity", "digits-ten")[a] for a in ask]
    else:
        kinds = [task] * len(index)
    qa = [(_DIGIT_QUESTIONS[k], _digit_answer(k, int(labels[i]))) for k, i in zip(kinds, index, strict=True)]
    return Split(_records(qa, prefix), images, kinds, task)


def _digit_index(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pre-training digits, the rest permuted by ``seed``)."""
    perm = np.random.default_rng(20251).permutation(N_DIGITS)
    rest = perm[_PRETRAIN_DIGITS:]
    return perm[:_PRETRAIN_DIGITS], rest[np.random.default_rng([seed, 3]).permutation(len(rest))]


def build_task(name: str, seed: int = 0, *, n_user: int = 800, n_test: int = 297) -> Task:
    """The user data and the held-out test data of family ``name`` for ``seed``.

    Same name, seed and sizes, same data. ``digits-*`` draw from the 1097 digits
    not used in pre-training, so ``n_user + n_test <= 1097`` there.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    if min(n_user, n_test) < 0:
        raise ValueError(f"n_user and n_test must be >= 0; got {n_user}, {n_test}")
    if name == "scenes":
        digits = load_digits()[0]
        splits = []
        for part, n in (("user", n_user), ("test", n_test)):
            stream = 1_000_000 + 2 * seed + (part == "test")
            images, qa, _ = scene_samples(stream, n, QUESTION_TYPES, digits)
            splits.append(Split(_records([x[1:] for x in qa], part), images, [x[0] for x in qa], name))
        return Task(name, *splits)
    _, rest = _digit_index(seed)
    if n_user + n_test > len(rest):
        raise ValueError(f"n_user + n_test = {n_user + n_test} > {len(rest)} digits outside pre-training")
    user = _digit_split(name, rest[:n_user], 2 * seed, "user")
    test = _digit_split(name, rest[n_user : n_user + n_test], 2 * seed + 1, "test")
    return Task(name, user, test)


def pretraining_split(n_scenes: int, n_say: int, *, seed: int = 0, digit_repeats: int = 3) -> Split:
    """The base model's pre-training data: scene QA, digit recognition and "say" samples.

    ``n_scenes`` scene questions of :data:`PRETRAIN_QUESTION_TYPES`, the 700
    pre-training digits ``digit_repeats`` times (each time on another
    background), and ``n_say`` "say w1 .. wk ." -> "w1 .. wk" samples on scene
    images (k = 1..3 words of the whole vocabulary). Shuffled with ``seed``.
    """
    digits_img, labels = load_digits()
    parts_img, parts_qa, parts_type = [], [], []
    images, qa, _ = scene_samples(500_000 + seed, n_scenes, PRETRAIN_QUESTION_TYPES, digits_img)
    parts_img.append(images)
    parts_qa += [x[1:] for x in qa]
    parts_type += [x[0] for x in qa]
    pre, _ = _digit_index(0)
    for r in range(digit_repeats):
        parts_img.append(digit_images(pre, 600_000 + 10 * seed + r))
        parts_qa += [(_DIGIT_QUESTIONS["digit"], NUMBER_WORDS[int(labels[i])]) for i in pre]
        parts_type += ["digit"] * len(pre)
    images, _, _ = scene_samples(700_000 + seed, n_say, PRETRAIN_QUESTION_TYPES, digits_img)
    rng = np.random.default_rng([seed, 11])
    for _ in range(n_say):
        words = " ".join(rng.choice(_SAY_WORDS, size=int(rng.integers(1, 4))))
        parts_qa.append((f"say {words} .", words))
        parts_type.append("say")
    parts_img.append(images)
    all_images = np.concatenate(parts_img)
    order = np.random.default_rng([seed, 12]).permutation(len(all_images))
    qa_sorted = [parts_qa[i] for i in order]
    return Split(_records(qa_sorted, "pre"), all_images[order], [parts_type[i] for i in order], "pretrain")


def vision_pretraining_data(
    n_scenes: int, *, seed: int = 0, digit_repeats: int = 3, squares: float = 0.0
) -> tuple[np.ndarray, dict]:
    """Images and targets of the vision tower's pre-training (:func:`bye_fast.lab.train.pretrain_vision`).

    ``n_scenes`` scenes with :func:`bye_fast.lab.scenes.vision_targets` (per-patch colour and
    shape, the position of every (colour, shape) pair present, the count, the texture) and the
    700 pre-training digits ``digit_repeats`` times with their digit and texture. Targets a
    picture does not have are -100 (ignored).

    ``squares``: the share of the images that also get one or two solid squares (side 4-16 px, at
    random places; black, white or any colour), drawn over the picture and left to the pixel
    reconstruction target alone (no label names them): a real encoder has seen such content, the
    lab's scenes have none (muted textures and saturated objects only), and a tower that never saw
    it maps a black square close to the scenes' own variation (``learnability_probes.md``).
    """
    from bye_fast.lab.scenes import TEXTURES

    digits_img, labels = load_digits()
    images, _, targets = scene_samples(800_000 + seed, n_scenes, PRETRAIN_QUESTION_TYPES, digits_img, patch=8)
    g = len(targets[0]["cells"]) if targets else 144
    out = {
        "cells": [t["cells"] for t in targets],
        "pairs": [t["pairs"] for t in targets],
        "count": [t["count"] for t in targets],
        "texture": [t["texture"] for t in targets],
        "digit": [-100] * n_scenes,
    }
    parts = [images]
    pre, _ = _digit_index(0)
    for r in range(digit_repeats):
        imgs, tex = digit_images(pre, 810_000 + 10 * seed + r, textures=True)
        parts.append(imgs)
        out["cells"] += [np.full((g, 2), -100)] * len(pre)
        out["pairs"] += [np.full(len(out["pairs"][0]) if out["pairs"] else 30, -100)] * len(pre)
        out["count"] += [-100] * len(pre)
        out["texture"] += [TEXTURES.index(t) for t in tex]
        out["digit"] += [int(labels[i]) for i in pre]
    arrays = {k: np.asarray(np.stack(v) if np.ndim(v[0]) else v, dtype=np.int64) for k, v in out.items()}
    images = np.concatenate(parts)
    if squares > 0:
        _draw_squares(images, squares, np.random.default_rng(820_000 + seed))
    return images, arrays


def _draw_squares(images: np.ndarray, share: float, rng: np.random.Generator) -> None:
    """In place: one or two solid squares (side 4-16 px; black, white or a random colour) on a random
    ``share`` of ``images`` (uint8, (n, H, W, 3))."""
    n, h, w, _ = images.shape
    for i in np.nonzero(rng.random(n) < share)[0]:
        for _ in range(int(rng.integers(1, 3))):
            side = min(int(rng.integers(4, 17)), h, w)
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            kind = int(rng.integers(3))
            colour = (0, 0, 0) if kind == 0 else (255, 255, 255) if kind == 1 else tuple(rng.integers(0, 256, 3))
            images[i, y : y + side, x : x + side] = colour


# --------------------------------------------------------------------------- records and files
def record_question(record: dict) -> str:
    """The first human turn of a record, without the ``<image>`` placeholder."""
    turn = next(t for t in record["conversations"] if t["from"] == "human")
    return turn["value"].replace("<image>", " ").strip()


def record_answer(record: dict) -> str:
    """The first gpt turn of a record."""
    return next(t for t in record["conversations"] if t["from"] == "gpt")["value"].strip()


def write_split(split: Split, image_folder: str | Path, json_path: str | Path | None = None) -> Path:
    """Write a split's images as PNG files (and its records as a JSON list if ``json_path``)."""
    folder = Path(image_folder)
    folder.mkdir(parents=True, exist_ok=True)
    for rec, img in zip(split.records, split.images, strict=True):
        save_image(img, folder / rec["image"])
    if json_path is not None:
        Path(json_path).write_text(json.dumps(split.records, indent=1))
    return folder


def load_images(records: Sequence[dict], image_folder: str | Path) -> np.ndarray:
    """The images of ``records`` (``"image"`` relative to ``image_folder``) as uint8 (n, H, W, 3)."""
    folder = Path(image_folder)
    out = []
    for r in records:
        with Image.open(folder / r["image"]) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(out)
