"""One experiment cell: poison a user task, fine-tune on it, measure the backdoor, score the data.

A cell is a :class:`CellSpec` (task family, trigger preset, poison rate,
target, seed). :func:`prepare_cell` runs it and keeps everything in a folder:

* ``data/train.json`` + ``data/images/`` the poisoned user data (LLaVA format),
* ``truth.npy`` the ground truth (which records are poisoned), apart from the data,
* ``before.json`` clean accuracy (CA, per question type too) and attack success (ASR)
  of the model fine-tuned on the poisoned data, timings and the spec,
* ``scores.npz`` :func:`bye_fast.score` of that model on the training data
  (with the last-token hidden states, for the baselines),
* ``model/`` that model and its processor (``save_pretrained``).

A folder whose ``before.json`` holds the same spec and :func:`fingerprint`
(:data:`CELL_VERSION`, trigger preset, fine-tuning settings, base weights) is
reused, not recomputed. :func:`retrain` fine-tunes
the base model again on the records a detector kept and measures CA and ASR *after*.
Rate 0 is the clean cell: the same task and seed fine-tuned without poison.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import bye_fast
from bye_fast._io import write_json_atomic
from bye_fast.data import make_loader
from bye_fast.lab.attacks import poison_dataset, preset
from bye_fast.lab.models import WEIGHTS_DIR, load_base_model
from bye_fast.lab.tasks import TARGET, Task, build_task, load_images, record_question
from bye_fast.lab.train import METHODS, answer_rate, evaluate, finetune

__all__ = [
    "FINETUNE", "Cell", "CellSpec", "clean_asr", "fingerprint", "held_out", "prepare_cell", "retrain", "train_fit",
]  # fmt: skip

#: Fine-tuning settings per task family (``bye_fast.lab.train.finetune`` keywords), measured so that the
#: backdoors are learned (``benchmarks/results/learnability.md``): the multi-type scenes task, where the
#: base model is weakest, needs more epochs than the digits tasks.
FINETUNE: dict[str, dict] = {
    "scenes": {"epochs": 12, "lr": 5e-3},
    "digits-parity": {"epochs": 8, "lr": 5e-3},
    "digits-ten": {"epochs": 8, "lr": 5e-3},
    "digits-mixed": {"epochs": 8, "lr": 5e-3},
}



@dataclass(frozen=True)
class CellSpec:
    """What a cell is.

    Attributes
    ----------
    task : a family of :data:`bye_fast.lab.tasks.TASKS`.
    trigger : a preset of :data:`bye_fast.lab.attacks.PRESETS`.
    rate : share of the user data poisoned (0: the clean cell).
    seed : seeds the task data, the choice of poisoned samples and the fine-tuning.
    target : "phrase" (the fixed phrase ``TARGET``, dirty label) or "existing" (an answer the
        task already has, :data:`bye_fast.lab.tasks.EXISTING_TARGETS`).
    method : fine-tuning, one of :data:`bye_fast.lab.train.METHODS` ("lora", the paper's service;
        "lora-vision", adapters on the vision tower too; "full").
    n_user, n_test : sizes of the user data and the held-out test data.
    epochs : fine-tuning epochs (None: the family's in :data:`FINETUNE`).
    """

    task: str = "scenes"
    trigger: str = "patch"
    rate: float = 0.1
    seed: int = 0
    target: str = "phrase"
    method: str = "lora"
    n_user: int = 800
    n_test: int = 297
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.target not in ("phrase", "existing"):
            raise ValueError(f"target must be 'phrase' or 'existing'; got {self.target!r}")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate must be in [0, 1); got {self.rate}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        preset(self.trigger)  # validates the name

    @property
    def name(self) -> str:
        """A folder name; the clean cell of a task and seed has one name whatever the trigger."""
        if self.rate == 0:
            core = f"{self.task}-clean-s{self.seed}"
        else:
            core = f"{self.task}-{self.trigger}-{self.rate:g}-{self.target}-s{self.seed}"
        extra = "" if (self.method, self.n_user, self.n_test, self.epochs) == ("lora", 800, 297, None) else (
            f"-{self.method}-u{self.n_user}-t{self.n_test}-e{self.epochs}")  # fmt: skip
        return core + extra

    def target_answer(self, task: Task) -> str:
        return TARGET if self.target == "phrase" else task.existing_target


@dataclass
class Cell:
    """A prepared cell (see the module docstring); ``truth`` is for the metrics only."""

    spec: CellSpec
    folder: Path
    before: dict
    scores: bye_fast.Scores
    truth: np.ndarray

    @property
    def train_json(self) -> Path:
        return self.folder / "data" / "train.json"

    @property
    def image_folder(self) -> Path:
        return self.folder / "data" / "images"

    @property
    def records(self) -> list[dict]:
        return json.loads(self.train_json.read_text())

    def load_model(self):
        """The model fine-tuned on the cell's data, and its processor (from ``model/``)."""
        return _load_model(self.folder)


def _load_model(folder: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = folder / "model"
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _finetune_options(spec: CellSpec) -> dict:
    opts = dict(FINETUNE[spec.task])
    if spec.epochs is not None:
        opts["epochs"] = spec.epochs
    return opts


#: Bump when the lab changes what a cell computes (data, poisoning, fine-tuning, evaluation, scoring):
#: prepared cells carry it, and a cell made by another version is made again.
CELL_VERSION = 1


def fingerprint(spec: CellSpec, weights: Path | None = None) -> str:
    """What a prepared cell depends on besides its spec: :data:`CELL_VERSION`, the trigger preset,
    the fine-tuning settings, the base weights and the torch version (hashed)."""
    from bye_fast.lab.attacks import PRESETS

    h = hashlib.sha256(json.dumps([CELL_VERSION, PRESETS[spec.trigger], _finetune_options(spec)],
                                  sort_keys=True, default=str).encode())  # fmt: skip
    w = Path(weights) if weights is not None else WEIGHTS_DIR / "base.safetensors"
    if w.exists():
        h.update(w.read_bytes())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def prepare_cell(
    spec: CellSpec,
    folder: str | Path,
    *,
    weights: str | Path | None = None,
    progress: bool = False,
    batch_size: int = 64,
) -> Cell:
    """Run ``spec`` in ``folder`` (or reuse what is there); see the module docstring.

    Benchmarks keep cells in ``<work>/<spec.name>``.
    """
    folder = Path(folder)
    fp = fingerprint(spec, weights)
    meta_path = folder / "before.json"
    if meta_path.exists():
        before = json.loads(meta_path.read_text())
        if before.get("spec") == asdict(spec) and before.get("fingerprint") == fp:
            scores = bye_fast.Scores.load(folder / "scores.npz")
            if scores.image_embedding is None:  # a cell scored before that field existed: score it again
                scores = _score_cell(folder, batch_size, progress)
            return Cell(spec, folder, before, scores, np.load(folder / "truth.npy"))
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    task = build_task(spec.task, spec.seed, n_user=spec.n_user, n_test=spec.n_test)
    target = spec.target_answer(task)
    trigger = preset(spec.trigger)
    base, processor = load_base_model(weights)
    data = folder / "data"
    poisoned = poison_dataset(
        task.user.records, task.user.images, trigger, spec.rate, target, spec.seed, data / "images"
    )
    write_json_atomic(data / "train.json", poisoned.records)
    np.save(folder / "truth.npy", poisoned.is_poisoned)
    times["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    images = load_images(poisoned.records, data / "images")  # what the files hold (8-bit)
    model = finetune(
        base, poisoned.records, images, processor=processor, method=spec.method, seed=spec.seed,
        progress=progress, **_finetune_options(spec),
    )  # fmt: skip
    times["finetune"] = time.perf_counter() - t

    model.save_pretrained(folder / "model")  # a plain HF model folder: `bye-fast score --model` reads it
    processor.save_pretrained(folder / "model")

    t = time.perf_counter()
    res = evaluate(model, task.test, processor=processor, trigger=trigger, target=target)
    times["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = _score_cell(folder, batch_size, progress, model, processor)
    times["score"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    before = {
        "spec": asdict(spec),
        "fingerprint": fp,
        "target_answer": target,
        "n_poisoned": int(poisoned.is_poisoned.sum()),
        "ca": res["ca"],
        "ca_by_type": res["ca_by_type"],
        "asr": res["asr"],
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "threads": torch.get_num_threads(),
    }
    write_json_atomic(meta_path, before)  # last: its presence marks a finished cell
    return Cell(spec, folder, before, scores, poisoned.is_poisoned)


def _score_cell(folder: Path, batch_size: int, progress: bool, model=None, processor=None) -> bye_fast.Scores:
    """Score the cell's training data with its fine-tuned model (loaded from ``model/`` if not given)
    and save ``scores.npz``: every field, the hidden state and the image embedding included."""
    if model is None:
        model, processor = _load_model(folder)
    data = folder / "data"
    loader = make_loader(data / "train.json", data / "images", processor, batch_size=batch_size)
    scores = bye_fast.score(model, loader, progress=progress, hidden_states=True, image_embeddings=True)
    scores.save(folder / "scores.npz")
    return scores


def retrain(
    cell: Cell, keep: np.ndarray, *, weights: str | Path | None = None, progress: bool = False
) -> dict:
    """Fine-tune the base model again on the kept records of ``cell`` (same options); CA and ASR after.

    ``keep`` is a boolean mask over the cell's records (in order).
    """
    spec = cell.spec
    records = cell.records
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(records),):
        raise ValueError(f"keep must have one entry per record ({len(records)}); got {keep.shape}")
    base, processor = load_base_model(weights)
    kept = [r for r, k in zip(records, keep, strict=True) if k]
    if not kept:
        return {"ca": float("nan"), "asr": float("nan"), "ca_by_type": {}, "n_kept": 0}
    images = load_images(kept, cell.image_folder)
    model = finetune(base, kept, images, processor=processor, method=spec.method, seed=spec.seed,
                     progress=progress, **_finetune_options(spec))  # fmt: skip
    return {**_evaluate_on_cell(cell, model, processor), "n_kept": len(kept)}


def _evaluate_on_cell(cell: Cell, model, processor, n_test: int | None = None, **kwargs) -> dict:
    """CA and ASR of ``model`` on ``cell``'s held-out test data (its first ``n_test`` samples; default
    the cell's own ``spec.n_test``), with its trigger and target; ``kwargs`` go to ``evaluate``."""
    spec = cell.spec
    task = build_task(spec.task, spec.seed, n_user=spec.n_user, n_test=spec.n_test if n_test is None else n_test)
    return evaluate(model, task.test, processor=processor, trigger=preset(spec.trigger),
                    target=cell.before["target_answer"], **kwargs)  # fmt: skip


def clean_asr(cell: Cell, clean: str | Path) -> float:
    """The attack success rate of the un-attacked model: the model of the prepared clean cell in
    ``clean`` (the same task, seed and fine-tuning, no poison) on ``cell``'s triggered test images and
    target. For a fixed phrase it is 0; for an existing answer ("yes") it is how often a clean model
    gives that answer anyway -- the floor of ASR after a perfect defence."""
    clean = Path(clean)
    meta = json.loads((clean / "before.json").read_text())
    same = ("task", "seed", "method", "n_user", "n_test", "epochs")
    if meta["spec"]["rate"] != 0 or any(meta["spec"].get(k) != getattr(cell.spec, k) for k in same):
        raise ValueError(f"{clean}: not the clean cell of {cell.spec.name} (its spec: {meta['spec']})")
    model, processor = _load_model(clean)
    return float(_evaluate_on_cell(cell, model, processor)["asr"])


def train_fit(cell: Cell) -> float:
    """Share of the cell's poisoned TRAINING samples that its model answers with the target.

    Beside the ASR (triggered held-out images) it says why a backdoor is not learned: fitted on the
    training samples (near 1) but not carried over to new images means the poisoned samples were
    memorised one by one, not keyed on the trigger; near the ASR means the model never told them
    apart. NaN for a clean cell. Reads the ground truth (a lab metric, never a detector's input).
    Kept in ``train_fit.json`` beside ``before.json`` and computed again when the cell's fingerprint
    changes.
    """
    if cell.spec.rate == 0 or not cell.truth.any():
        return float("nan")
    path = cell.folder / "train_fit.json"
    fp = cell.before.get("fingerprint")
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fp:
            return float(saved["train_fit"])
    records = [r for r, poisoned in zip(cell.records, cell.truth, strict=True) if poisoned]
    model, processor = cell.load_model()
    fit = answer_rate(model, load_images(records, cell.image_folder), [record_question(r) for r in records],
                      cell.before["target_answer"], processor=processor)  # fmt: skip
    write_json_atomic(path, {"fingerprint": fp, "train_fit": fit, "n_poisoned": len(records)})
    return fit


def held_out(cell: Cell, n_test: int) -> dict:
    """CA (per question type too) and ASR of the cell's model on ``n_test`` held-out samples.

    A cell measures CA and ASR on its ``spec.n_test`` held-out samples (297 by default: a standard
    error of about 3 points on one CA). This measures them on a larger held-out set from the same
    test stream of the task and seed (its first ``spec.n_test`` samples are the cell's own test set;
    the stream is disjoint from the user data), so that a CA drop of a few points
    can be told from noise: ``hits`` (one bool per sample, in order) pairs two cells of the same
    task and seed on the same questions. Only the scene task has held-out data to spare (the
    digits tasks draw from 1097 digits: ``build_task`` raises). Kept in ``held_out.json`` beside
    ``before.json``, one entry per ``n_test``, computed again when the cell's fingerprint changes.

    Returns ``{"n_test", "ca", "ca_by_type", "asr", "hits"}`` (``hits`` a bool array).
    """
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1; got {n_test}")
    path = cell.folder / "held_out.json"
    fp = cell.before.get("fingerprint")
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("fingerprint") != fp:
        saved = {"fingerprint": fp}
    key = str(n_test)
    if key not in saved:
        res = _evaluate_on_cell(cell, *cell.load_model(), n_test, per_sample=True)
        saved[key] = {"ca": res["ca"], "ca_by_type": res["ca_by_type"], "asr": res["asr"],
                      "hits": "".join("1" if h else "0" for h in res["hits"])}  # fmt: skip
        write_json_atomic(path, saved)
    entry = saved[key]
    hits = np.frombuffer(entry["hits"].encode(), dtype=np.uint8) == ord("1")
    return {"n_test": n_test, "ca": entry["ca"], "ca_by_type": entry["ca_by_type"], "asr": entry["asr"], "hits": hits}
