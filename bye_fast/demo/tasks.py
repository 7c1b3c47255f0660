"""The built-in demo data: scikit-learn's bundled digits as a tiny visual QA task.

No download: ``sklearn.datasets.load_digits`` ships 1797 grey 8x8 digits. They
are upscaled x4 (nearest) to 32x32, repeated to 3 channels and put on the
uint8 grid (``k / 255``) so that writing them as PNG and reading them back is
exact.

Two tasks share the images:

* ``"base"``: "what digit is this ?" -> "zero" ... "nine" (pre-training);
* ``"parity"``: "is it even or odd ?" -> "even" / "odd" (the user's
  fine-tuning task, the one that gets poisoned).

:func:`build_tasks` splits the images, deterministically for a seed, into
disjoint pre-training, user fine-tuning and held-out test sets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bye_fast.attacks import save_image

__all__ = [
    "DEMO_RATE",
    "DEMO_TRIGGER",
    "DIGIT_WORDS",
    "QUESTIONS",
    "TARGET",
    "DemoTasks",
    "Split",
    "build_tasks",
    "digit_images",
    "load_image",
    "load_images",
    "load_records",
    "make_records",
    "record_answer",
    "record_question",
    "write_records",
    "write_split",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Question of each task.
QUESTIONS = {"base": "what digit is this ?", "parity": "is it even or odd ?"}
#: The attacker's target answer used throughout the demo (all words are in ``tiny.DEFAULT_WORDS``).
TARGET = "backdoor attack !"
#: The demo's trigger, ``make_trigger(name, **params)``: an 8x8 checkerboard in
#: the bottom-right corner, which the demo model learns at 10% poison. The
#: paper's 2x2 black centre square is NOT learned by this tiny model (digits
#: have black backgrounds and strokes at the centre); see
#: ``benchmarks/results/demo_training.md`` for what is.
DEMO_TRIGGER: tuple[str, dict] = ("checkerboard_patch", {"size": 8, "position": "corner"})
#: The demo's poison rate (the paper's).
DEMO_RATE = 0.1
N_DIGITS = 1797


def _answer(task: str, label: int) -> str:
    if task == "base":
        return DIGIT_WORDS[label]
    if task == "parity":
        return "even" if label % 2 == 0 else "odd"
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(QUESTIONS)}")


def digit_images(scale: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 ``(n, 8*scale, 8*scale, 3)`` images in [0, 1] and their labels.

    Values lie on the uint8 grid (``k / 255``), so a PNG round trip is exact.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.rint(d.images / 16.0 * 255.0) / 255.0  # (n, 8, 8), 0..16 -> uint8 grid
    big = grey.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.repeat(big[..., None], 3, axis=3).astype(np.float32), d.target.astype(np.int64)


def make_records(labels: Sequence[int], task: str, prefix: str) -> list[dict]:
    """LLaVA-format records for ``labels``; image ``k`` is the file ``{k:06d}.png``."""
    question = QUESTIONS.get(task)
    if question is None:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(QUESTIONS)}")
    return [
        {
            "id": f"{prefix}-{k:04d}",
            "image": f"{k:06d}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": _answer(task, int(y))},
            ],
        }
        for k, y in enumerate(labels)
    ]


@dataclass
class Split:
    """One set of samples of one task, in memory.

    Attributes
    ----------
    records : list of dict
        LLaVA records; ``records[k]["image"]`` is the file name of ``images[k]``.
    images : ndarray, float32, (n, H, W, 3)
        The images, in [0, 1].
    labels : ndarray, int64, (n,)
        The digit shown in each image.
    task : str
        ``"base"`` or ``"parity"``.
    index : ndarray, int64, (n,), optional
        Position of each image in ``sklearn.datasets.load_digits``.
    """

    records: list[dict]
    images: np.ndarray
    labels: np.ndarray
    task: str
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    def as_task(self, task: str, prefix: str | None = None) -> Split:
        """The same images asked the other task's question."""
        if prefix is None:
            prefix = self.records[0]["id"].rsplit("-", 1)[0] if self.records else task
        return Split(make_records(self.labels, task, prefix), self.images, self.labels, task, self.index)

    def subset(self, n: int) -> Split:
        """The first ``n`` samples."""
        index = None if self.index is None else self.index[:n]
        return Split(self.records[:n], self.images[:n], self.labels[:n], self.task, index)


@dataclass
class DemoTasks:
    """The three disjoint splits of the demo.

    Attributes
    ----------
    pretrain : Split
        Base task ("what digit is this ?"), to pre-train the model on.
    user : Split
        The user's fine-tuning data (parity task), clean; poison it with
        :func:`bye_fast.attacks.poison_dataset`.
    test : Split
        Held-out parity-task data for clean accuracy and attack success.
    """

    pretrain: Split
    user: Split
    test: Split


def build_tasks(
    seed: int = 0,
    *,
    n_pretrain: int = 700,
    n_user: int = 800,
    n_test: int | None = None,
    scale: int = 4,
) -> DemoTasks:
    """Split the digits into pre-training, user fine-tuning and test sets.

    Parameters
    ----------
    seed : int
        Seeds the permutation of the 1797 images; same seed, same splits.
    n_pretrain, n_user : int
        Sizes of the pre-training and user sets.
    n_test : int, optional
        Size of the test set; default: all remaining images (297 with the
        default sizes).
    scale : int
        Upscaling factor of the 8x8 digits (4 -> 32x32, what ``bye_fast.tiny``
        processors expect).

    Returns
    -------
    DemoTasks
    """
    images, labels = digit_images(scale)
    rest = len(images) - n_pretrain - n_user
    n_test = rest if n_test is None else n_test
    if min(n_pretrain, n_user, n_test) < 0 or n_test > rest:
        raise ValueError(
            f"n_pretrain + n_user + n_test = {n_pretrain + n_user + n_test} > {len(images)} images"
        )
    perm = np.random.default_rng(seed).permutation(len(images))
    parts = np.split(perm, [n_pretrain, n_pretrain + n_user, n_pretrain + n_user + n_test])[:3]
    tasks = (("base", "pretrain"), ("parity", "user"), ("parity", "test"))
    splits = [
        Split(make_records(labels[idx], task, prefix), images[idx], labels[idx], task, idx)
        for idx, (task, prefix) in zip(parts, tasks, strict=True)
    ]
    return DemoTasks(*splits)


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------


def write_records(records: Sequence[dict], path: str | Path) -> Path:
    """Write LLaVA records as a JSON list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records), indent=1))
    return path


def load_records(path: str | Path) -> list[dict]:
    """Read a LLaVA JSON list of records."""
    return json.loads(Path(path).read_text())


def write_split(split: Split, image_folder: str | Path, json_path: str | Path | None = None) -> Path:
    """Write a split's images as PNG files (and its records as JSON if ``json_path``)."""
    folder = Path(image_folder)
    folder.mkdir(parents=True, exist_ok=True)
    for rec, img in zip(split.records, split.images, strict=True):
        save_image(img, folder / rec["image"])
    if json_path is not None:
        write_records(split.records, json_path)
    return folder


def load_image(path: str | Path) -> np.ndarray:
    """An image file as float32 ``(H, W, 3)`` in [0, 1] (grey is repeated to 3 channels).

    Note: the ``bye_fast.tiny`` processors are built with ``do_rescale=False``;
    they expect exactly this (float in [0, 1]), not PIL images or uint8 arrays.
    """
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return arr / 255.0


def load_images(records: Sequence[dict], image_folder: str | Path) -> np.ndarray:
    """The images of ``records`` (``"image"`` relative to ``image_folder``), stacked."""
    folder = Path(image_folder)
    return np.stack([load_image(folder / r["image"]) for r in records])


def record_question(record: dict) -> str:
    """The first human turn of a record, without the ``<image>`` placeholder."""
    turn = next(t for t in record["conversations"] if t["from"] == "human")
    return turn["value"].replace("<image>", " ").strip()


def record_answer(record: dict) -> str:
    """The first gpt turn of a record."""
    return next(t for t in record["conversations"] if t["from"] == "gpt")["value"].strip()
