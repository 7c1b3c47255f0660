"""Train and evaluate the demo's tiny LLaVA on the digits tasks (CPU, minutes).

The two stages of fine-tuning-as-a-service:

1. :func:`pretrain` the whole model (vision tower included) on the clean base
   task ("what digit is this ?");
2. :func:`finetune` a copy (:func:`copy_model`) on the user's, possibly
   poisoned, LLaVA-format data with the vision tower frozen.

Every sample goes through the processor's chat template exactly as at
inference: ``"USER: <image> question ASSISTANT:"`` (generation prompt), with
``" answer </s>"`` appended for training; the loss is on the answer tokens
only. :func:`evaluate` measures clean accuracy and attack success rate by
teacher forcing, which equals "the greedy answer starts with ..." exactly.

Nothing here sets global torch state other than the RNG seed at the start of
each training call; set the thread count in your script.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from bye_fast.demo.tasks import TARGET, Split, load_images, record_answer, record_question
from bye_fast.tiny import EOS, build_llava, build_processor

__all__ = [
    "DEFAULT_MODEL",
    "Encoded",
    "build_demo_model",
    "copy_model",
    "encode",
    "evaluate",
    "finetune",
    "fit",
    "predict",
    "pretrain",
    "pretrained_model",
]

#: Architecture of the demo model (``bye_fast.tiny.llava_config`` keywords).
#: Image features come from the CLIP embedding output (local patch features),
#: which trains much faster on CPU than the last vision layer.
DEFAULT_MODEL: dict = {
    "vision_hidden": 64,
    "vision_layers": 2,
    "vision_heads": 4,
    "hidden": 64,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
}


def build_demo_model(
    seed: int = 0, processor: LlavaProcessor | None = None, **config
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA for the demo (``DEFAULT_MODEL`` updated by ``config``).

    ``vision_feature_layer`` defaults to ``-(vision_layers + 1)``: the CLIP
    embedding output.
    """
    cfg = {**DEFAULT_MODEL, **config}
    cfg.setdefault("vision_feature_layer", -(cfg["vision_layers"] + 1))
    return build_llava(processor or build_processor(), seed=seed, **cfg)


def copy_model(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """An independent copy (e.g. to fine-tune twice from the same pre-trained weights)."""
    return copy.deepcopy(model)


# ---------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------


@dataclass
class Encoded:
    """Processor output for a set of samples, unpadded.

    Attributes
    ----------
    prompt_ids : list of LongTensor
        Token ids of each prompt (chat template + generation prompt, image
        placeholder expanded).
    answer_ids : list of LongTensor
        Token ids of each answer (empty when encoded without answers).
    pixel_values : FloatTensor, (n, 3, H, W)
    """

    prompt_ids: list[torch.Tensor]
    answer_ids: list[torch.Tensor]
    pixel_values: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _prompt(processor: LlavaProcessor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _tokens(processor: LlavaProcessor, text: str) -> torch.Tensor:
    tok = processor.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.unk_token_id in ids:
        unknown = [w for w in text.split() if tok.convert_tokens_to_ids(w) == tok.unk_token_id]
        raise ValueError(f"words not in the tokenizer's vocabulary: {unknown}")
    return torch.tensor(ids, dtype=torch.long)


def encode(
    processor: LlavaProcessor,
    images: np.ndarray | Sequence[np.ndarray],
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    eos: bool = True,
) -> Encoded:
    """Run the processor on (image, question[, answer]) triples.

    Parameters
    ----------
    processor : LlavaProcessor
    images : sequence of float arrays (H, W, 3) in [0, 1]
    questions : sequence of str
    answers : sequence of str, optional
        Appended after the generation prompt (``+ " </s>"`` if ``eos``).
    """
    prompts = [_prompt(processor, q) for q in questions]
    # uint8, as images read from PNG files reach the processor when scoring (bye_fast.data)
    images = [_as_uint8(im) for im in images]
    out = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    mask = out["attention_mask"].bool()
    prompt_ids = [ids[m] for ids, m in zip(out["input_ids"], mask, strict=True)]
    if answers is None:
        answer_ids = [torch.zeros(0, dtype=torch.long)] * len(prompts)
    else:
        cache: dict[str, torch.Tensor] = {}
        suffix = f" {EOS}" if eos else ""
        answer_ids = [cache.setdefault(a, _tokens(processor, a + suffix)) for a in answers]
    return Encoded(prompt_ids, answer_ids, out["pixel_values"])


def _collate(enc: Encoded, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; ``labels`` are -100 except on answer tokens."""
    seqs = [torch.cat([enc.prompt_ids[i], enc.answer_ids[i]]) for i in idx]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention = torch.zeros_like(input_ids)
    n_prompt = torch.tensor([len(enc.prompt_ids[i]) for i in idx])
    for row, (i, s) in enumerate(zip(idx, seqs, strict=True)):
        input_ids[row, : len(s)] = s
        attention[row, : len(s)] = 1
        labels[row, n_prompt[row] : len(s)] = enc.answer_ids[i]
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": enc.pixel_values[list(idx)],
        "labels": labels,
        "n_prompt": n_prompt,
    }


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


@contextmanager
def _frozen(module: torch.nn.Module | None) -> Iterator[None]:
    """Temporarily stop gradients into ``module``."""
    if module is None:
        yield
        return
    saved = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def fit(
    model: LlavaForConditionalGeneration,
    enc: Encoded,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Minimise the answer-token cross-entropy with AdamW; returns the mean loss of each epoch.

    Deterministic for a given ``seed``: the sample order of each epoch comes
    from ``numpy.random.default_rng(seed)`` and ``torch.manual_seed(seed)`` is
    set first. Only parameters with ``requires_grad`` are trained.

    Parameters
    ----------
    schedule : {"constant", "linear", "cosine"}
        Learning-rate schedule over all steps (decay to 0 for linear/cosine).
    on_epoch : callable, optional
        Called as ``on_epoch(epoch, mean_loss)`` after each epoch.
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; valid: constant, linear, cosine")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(enc)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total = max(1, epochs * steps_per_epoch)

    def factor(step: int) -> float:
        t = step / total
        return {"constant": 1.0, "linear": 1.0 - t, "cosine": 0.5 * (1.0 + np.cos(np.pi * t))}[schedule]

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    pad_id = model.config.text_config.pad_token_id or 0
    was_training = model.training
    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    try:
        for epoch in range(epochs):
            order = rng.permutation(n)
            total_loss = 0.0
            for start in range(0, n, batch_size):
                batch = _collate(enc, order[start : start + batch_size], pad_id)
                batch.pop("n_prompt")
                loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(batch["input_ids"])
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            losses.append(total_loss / n)
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
    finally:
        bar.close()
        model.train(was_training)
    return losses


def pretrain(
    model: LlavaForConditionalGeneration,
    split: Split,
    *,
    processor: LlavaProcessor | None = None,
    epochs: int = 12,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    freeze_vision: bool = False,
    progress: bool = True,
    **fit_kwargs,
) -> list[float]:
    """Train the model on a clean in-memory split (the vision tower too unless ``freeze_vision``).

    Returns the mean training loss of each epoch.
    """
    return _train(
        model, processor, split.images, split.records, freeze_vision=freeze_vision, desc="pretrain",
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress, **fit_kwargs,
    )  # fmt: skip


def finetune(
    model: LlavaForConditionalGeneration,
    records: Sequence[dict],
    image_folder: str | Path,
    *,
    processor: LlavaProcessor | None = None,
    epochs: int = 10,
    lr: float = 2e-3,
    batch_size: int = 32,
    schedule: str = "linear",
    freeze_vision: bool = True,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs,
) -> list[float]:
    """Fine-tune on LLaVA-format ``records`` whose images are in ``image_folder``.

    The vision tower is frozen (restored afterwards) unless ``freeze_vision``
    is False; the projector and language model are trained. Returns the mean
    training loss of each epoch.

    The defaults (10 epochs, AdamW 2e-3 decayed linearly to 0, batch 32) are
    the measured ones with which the demo model learns a corner-patch
    backdoor at 10% poison (see ``benchmarks/results/demo_training.md``):
    with a constant rate the attack success oscillated between epochs.
    """
    return _train(
        model, processor, load_images(records, image_folder), records, freeze_vision=freeze_vision,
        desc="finetune", epochs=epochs, lr=lr, batch_size=batch_size, schedule=schedule, seed=seed,
        progress=progress, **fit_kwargs,
    )  # fmt: skip


def _train(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor | None,
    images: Sequence[np.ndarray],
    records: Sequence[dict],
    *,
    freeze_vision: bool,
    **fit_kwargs,
) -> list[float]:
    """Encode (image, question, answer) of ``records`` and :func:`fit` on them, the vision tower
    frozen (and restored afterwards) when ``freeze_vision``."""
    processor = processor or build_processor()
    enc = encode(
        processor, images, [record_question(r) for r in records], [record_answer(r) for r in records]
    )
    with _frozen(model.model.vision_tower if freeze_vision else None):
        return fit(model, enc, **fit_kwargs)


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------


@torch.no_grad()
def _starts_with(
    model: LlavaForConditionalGeneration, enc: Encoded, batch_size: int, pad_id: int
) -> np.ndarray:
    """Per sample: does the greedy answer start with ``enc.answer_ids``? (teacher forcing)"""
    hits = np.zeros(len(enc), dtype=bool)
    for start in range(0, len(enc), batch_size):
        idx = list(range(start, min(start + batch_size, len(enc))))
        batch = _collate(enc, idx, pad_id)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
        pred = logits.argmax(-1)
        for row, i in enumerate(idx):
            k = int(batch["n_prompt"][row])
            m = len(enc.answer_ids[i])
            hits[i] = bool(torch.equal(pred[row, k - 1 : k - 1 + m], enc.answer_ids[i]))
    return hits


def _as_uint8(img: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as uint8 (what a PNG file holds); uint8 passes through."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _uint8_grid(img: np.ndarray) -> np.ndarray:
    """What a PNG round trip does to a float image."""
    return (np.rint(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def evaluate(
    model: LlavaForConditionalGeneration,
    split: Split,
    *,
    processor: LlavaProcessor | None = None,
    trigger: Callable[[np.ndarray], np.ndarray] | None = None,
    target: str = TARGET,
    batch_size: int = 128,
) -> dict[str, float]:
    """Clean accuracy and attack success rate on a held-out split.

    Parameters
    ----------
    split : Split
        Held-out samples with their correct answers.
    trigger : callable, optional
        If given, the attack success rate is measured: the trigger is applied
        to every image whose correct answer does not start with ``target``
        (then rounded to 8 bit, as the poisoned training PNGs were).
    target : str
        The attacker's target answer.

    Returns
    -------
    dict
        ``ca``: share of clean samples whose greedy answer starts with the
        correct answer; ``asr``: share of triggered samples whose greedy
        answer starts with ``target`` (NaN without a trigger or samples).
    """
    processor = processor or build_processor()
    pad_id = model.config.text_config.pad_token_id or 0
    was_training = model.training
    model.eval()
    try:
        questions = [record_question(r) for r in split.records]
        answers = [record_answer(r) for r in split.records]
        enc = encode(processor, split.images, questions, answers, eos=False)
        ca = float(_starts_with(model, enc, batch_size, pad_id).mean()) if len(split) else float("nan")
        asr = float("nan")
        keep = [i for i, a in enumerate(answers) if not a.startswith(target)]
        if trigger is not None and keep:
            images = [_uint8_grid(trigger(split.images[i])) for i in keep]
            enc = encode(processor, images, [questions[i] for i in keep], [target] * len(keep), eos=False)
            asr = float(_starts_with(model, enc, batch_size, pad_id).mean())
    finally:
        model.train(was_training)
    return {"ca": ca, "asr": asr}


@torch.no_grad()
def predict(
    model: LlavaForConditionalGeneration,
    images: np.ndarray | Sequence[np.ndarray],
    question: str,
    *,
    processor: LlavaProcessor | None = None,
    max_new_tokens: int = 4,
) -> list[str]:
    """Greedy answers (up to ``</s>``) to one ``question`` about each image."""
    processor = processor or build_processor()
    tok = processor.tokenizer
    enc = encode(processor, images, [question] * len(images))
    ids = torch.stack(enc.prompt_ids)  # same question -> same length, no padding
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, pixel_values=enc.pixel_values).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        model.train(was_training)
    out = []
    for row in ids[:, enc.prompt_ids[0].numel() :].tolist():
        words = tok.convert_ids_to_tokens(row)
        out.append(" ".join(words[: words.index(EOS)] if EOS in words else words))
    return out


# ---------------------------------------------------------------------------
# cached pre-training
# ---------------------------------------------------------------------------


def pretrained_model(
    split: Split,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    model_config: dict | None = None,
    progress: bool = True,
    **pretrain_kwargs,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a demo model and pre-train it on ``split``, cached in ``cache_dir`` if given.

    The cache key hashes the seed, the model config, the pre-training
    arguments and the split's records and images, so a stale file is never
    reused for different settings.
    """
    model, processor = build_demo_model(seed, **(model_config or {}))
    path = None
    if cache_dir is not None:
        h = hashlib.sha256()
        h.update(json.dumps([seed, model_config, pretrain_kwargs, split.records], sort_keys=True).encode())
        h.update(np.ascontiguousarray(split.images).tobytes())
        h.update(torch.__version__.encode())
        path = Path(cache_dir) / f"pretrained-{h.hexdigest()[:16]}.pt"
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            return model, processor
    pretrain(model, split, processor=processor, seed=seed, progress=progress, **pretrain_kwargs)
    model.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return model, processor
