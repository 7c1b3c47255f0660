"""Train and evaluate the lab's tiny LLaVA (CPU, seconds to minutes).

Fine-tuning-as-a-service in two stages:

1. :func:`pretrain` the whole model (vision tower included) on broad, clean data
   (``benchmarks/pretrain_base.py`` does this once; the weights ship with the package);
2. :func:`finetune` a copy on the user's, possibly poisoned, LLaVA-format data:
   ``method="lora"`` (default, as the paper's service) puts LoRA adapters (peft)
   on the text decoder's attention and MLP projections and trains them and the
   projector, vision tower frozen; ``method="lora-vision"`` also puts adapters on
   the vision tower's attention and MLP (as recipes that tune the ViT do, e.g.
   Qwen-VL's and InternVL's); ``method="full"`` trains projector and text
   decoder. The returned model has the adapters merged: a plain
   ``LlavaForConditionalGeneration``.

Every sample goes through the processor's chat template exactly as at
inference (``"USER: <image> question ASSISTANT:"``) with ``" answer </s>"``
appended for training; the loss is on the answer tokens only. With the vision
tower frozen its features are computed once per image and reused every epoch
(:func:`vision_features`, :func:`text_logits`; a test checks them against the
model's own forward). :func:`evaluate` measures clean accuracy (per question
type too) and attack success by teacher forcing, which equals "the greedy
answer starts with ..." exactly.

Nothing here sets global torch state other than the RNG seed at the start of
each training call; set the thread count in your script.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from bye_fast.lab.models import EOS
from bye_fast.lab.tasks import Split, load_images, record_answer, record_question

__all__ = [
    "answer_rate",
    "LORA",
    "LORA_VISION_MODULES",
    "METHODS",
    "Encoded",
    "encode",
    "evaluate",
    "finetune",
    "fit",
    "predict",
    "pretrain",
    "pretrain_vision",
    "text_logits",
    "vision_features",
]

#: LoRA settings of :func:`finetune` (``peft.LoraConfig`` keywords): rank 16, alpha 32 (scale 2) on
#: every attention and MLP projection of the text decoder; the projector is trained in full
#: (as LLaVA's LoRA recipe trains ``mm_projector``); the vision tower is frozen.
LORA: dict = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    "modules_to_save": ["multi_modal_projector"],
}

#: ``method="lora-vision"``: :data:`LORA` plus adapters of the same rank on every attention and MLP
#: projection of the vision tower. The lab's small frozen tower does not set the paper's black
#: square apart from the scenes' content well enough for the text decoder to key on it
#: (``benchmarks/results/learnability_probes.md``); services that tune the ViT too exist.
LORA_VISION_MODULES = r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"

#: Fine-tuning methods of :func:`finetune`.
METHODS = ("lora", "lora-vision", "full")


# --------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """Processor output for a set of samples, unpadded.

    Attributes
    ----------
    prompt_ids : token ids of each prompt (chat template + generation prompt, image placeholders expanded).
    answer_ids : token ids of each answer (empty when encoded without answers).
    pixel_values : (n, 3, H, W).
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
    """Run the processor on (uint8 image, question[, answer]) triples, as ``bye_fast.data`` does for scoring."""
    prompts = [_prompt(processor, q) for q in questions]
    out = processor(text=prompts, images=[np.asarray(im) for im in images], return_tensors="pt", padding=True)
    mask = out["attention_mask"].bool()
    prompt_ids = [ids[m] for ids, m in zip(out["input_ids"], mask, strict=True)]
    if answers is None:
        answer_ids = [torch.zeros(0, dtype=torch.long)] * len(prompts)
    else:
        cache: dict[str, torch.Tensor] = {}
        suffix = f" {EOS}" if eos else ""
        answer_ids = [cache.setdefault(a, _tokens(processor, a + suffix)) for a in answers]
    return Encoded(prompt_ids, answer_ids, out["pixel_values"])


def _encode_records(processor, images, records, *, eos: bool = True) -> Encoded:
    return encode(
        processor, images, [record_question(r) for r in records], [record_answer(r) for r in records], eos=eos
    )


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
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "n_prompt": n_prompt}


# --------------------------------------------------------------------------- the forward with cached vision
def _llava(model: torch.nn.Module) -> LlavaForConditionalGeneration:
    """The LlavaForConditionalGeneration inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


@torch.no_grad()
def vision_features(
    model: torch.nn.Module, pixel_values: torch.Tensor, batch_size: int = 128
) -> torch.Tensor:
    """The vision tower's output that the projector reads, ``(n, image_tokens, vision_hidden)``."""
    llava = _llava(model)
    cfg = llava.config
    tower = llava.model.vision_tower
    out = []
    for start in range(0, len(pixel_values), batch_size):
        hs = tower(pixel_values[start : start + batch_size], output_hidden_states=True).hidden_states
        feats = hs[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        out.append(feats)
    return torch.cat(out)


def text_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    feats: torch.Tensor,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's logits given precomputed :func:`vision_features` (projector and text decoder only).

    With ``rows``/``cols`` only the logits at those positions are computed, ``(k, vocab)``;
    else all, ``(B, L, vocab)``. Equals ``model(input_ids, attention_mask, pixel_values).logits``.
    """
    llava = _llava(model)
    inner = llava.model
    emb = inner.get_input_embeddings()(input_ids)
    img = inner.multi_modal_projector(feats).to(emb.dtype)
    mask = (input_ids == llava.config.image_token_id)[..., None]
    emb = emb.masked_scatter(mask, img)
    hidden = inner.language_model(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False)
    h = hidden.last_hidden_state
    if rows is not None:
        h = h[rows, cols]
    return llava.lm_head(h)


# --------------------------------------------------------------------------- training
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
    model: torch.nn.Module,
    enc: Encoded,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup: float = 0.0,
    seed: int = 0,
    vision_frozen: bool = True,
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Minimise the answer-token cross-entropy with AdamW; returns the mean loss of each epoch.

    Only parameters with ``requires_grad`` are trained. With ``vision_frozen`` the
    vision features are computed once (:func:`vision_features`) and the vision
    tower's parameters must not require grad. Deterministic for a given ``seed``
    and thread count: the sample order comes from ``numpy.random.default_rng(seed)``
    and ``torch.manual_seed(seed)`` is set first.

    Parameters
    ----------
    schedule : {"constant", "linear", "cosine"}
        Learning-rate schedule after ``warmup`` (a share of all steps, linear from 0).
    on_epoch : called as ``on_epoch(epoch, mean_loss)`` after each epoch.
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; valid: constant, linear, cosine")
    llava = _llava(model)
    if vision_frozen and any(p.requires_grad for p in llava.model.vision_tower.parameters()):
        raise ValueError("vision_frozen=True but the vision tower has trainable parameters")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(enc)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total = max(1, epochs * steps_per_epoch)
    n_warm = int(warmup * total)

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        t = (step - n_warm) / max(1, total - n_warm)
        return {"constant": 1.0, "linear": 1.0 - t, "cosine": 0.5 * (1.0 + np.cos(np.pi * t))}[schedule]

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    pad_id = llava.config.text_config.pad_token_id or 0
    feats = vision_features(model, enc.pixel_values) if vision_frozen else None
    was_training = model.training
    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    try:
        for epoch in range(epochs):
            order = rng.permutation(n)
            total_loss = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch = _collate(enc, idx, pad_id)
                rows, cols = (batch["labels"] != -100).nonzero(as_tuple=True)
                target = batch["labels"][rows, cols]
                if feats is not None:
                    logits = text_logits(
                        model, batch["input_ids"], batch["attention_mask"], feats[idx], rows, cols - 1
                    )
                else:
                    logits = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        pixel_values=enc.pixel_values[idx],
                    ).logits[rows, cols - 1]
                loss = torch.nn.functional.cross_entropy(logits.float(), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(idx)
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
    processor: LlavaProcessor,
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs,
) -> list[float]:
    """Train the whole model (vision tower included) on a clean in-memory split; returns epoch losses."""
    enc = _encode_records(processor, split.images, split.records)
    return fit(
        model, enc, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, vision_frozen=False,
        progress=progress, desc="pretrain", **fit_kwargs,
    )  # fmt: skip


def pretrain_vision(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: np.ndarray,
    targets: dict[str, np.ndarray],
    *,
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Pre-train the vision tower alone on dense and global targets, as a CLIP-style encoder is
    trained before it is put into an MLLM (``targets`` from
    :func:`bye_fast.lab.tasks.vision_pretraining_data`; -100 = ignore).

    Linear heads read the features the projector will read: each patch's colour and shape and its
    pixels (at a quarter of the resolution: a reconstruction target, so that the features keep the
    local appearance a real encoder keeps) from its own feature; the pairs' positions, the count,
    the texture and the digit from the patches' mean. The heads are thrown away afterwards.
    Returns the mean loss of each epoch.
    """
    llava = _llava(model)
    cfg = llava.config
    tower = llava.model.vision_tower
    dim = cfg.vision_config.hidden_size
    n_pairs = targets["pairs"].shape[1]
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({
        "colour": torch.nn.Linear(dim, int(targets["cells"][..., 0].max()) + 1),
        "shape": torch.nn.Linear(dim, int(targets["cells"][..., 1].max()) + 1),
        "pairs": torch.nn.Linear(dim, n_pairs * (int(targets["pairs"].max()) + 1)),
        "count": torch.nn.Linear(dim, int(targets["count"].max()) + 1),
        "texture": torch.nn.Linear(dim, int(targets["texture"].max()) + 1),
        "digit": torch.nn.Linear(dim, 10),
        "pixels": torch.nn.Linear(dim, 3 * 4),  # 2 x 2 RGB per patch
    })  # fmt: skip
    patch = cfg.vision_config.patch_size
    pixel_values = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    t = {k: torch.from_numpy(v) for k, v in targets.items()}
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    ce = torch.nn.functional.cross_entropy
    losses = []
    n = len(images)
    bar = tqdm(total=epochs * ((n + batch_size - 1) // batch_size), desc="pretrain vision", disable=not progress,
               leave=False)  # fmt: skip
    tower.train()
    try:
        for _ in range(epochs):
            total = 0.0
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                idx = torch.from_numpy(order[start : start + batch_size])
                hs = tower(pixel_values[idx], output_hidden_states=True).hidden_states[
                    cfg.vision_feature_layer
                ]
                feats = hs[:, 1:] if cfg.vision_feature_select_strategy == "default" else hs
                pooled = feats.mean(dim=1)
                cells = t["cells"][idx]
                pv = pixel_values[idx]
                small = torch.nn.functional.avg_pool2d(pv, patch // 2)  # (B, 3, 2g, 2g)
                g = small.shape[-1] // 2
                pixels = (
                    small.reshape(len(idx), 3, g, 2, g, 2)
                    .permute(0, 2, 4, 1, 3, 5)
                    .reshape(len(idx), g * g, 12)
                )
                loss = 4.0 * torch.nn.functional.mse_loss(heads["pixels"](feats), pixels)
                loss = loss + ce(
                    heads["colour"](feats).flatten(0, 1), cells[..., 0].flatten(), ignore_index=-100
                )
                loss = loss + ce(
                    heads["shape"](feats).flatten(0, 1), cells[..., 1].flatten(), ignore_index=-100
                )
                pairs = heads["pairs"](pooled).reshape(len(idx), n_pairs, -1)
                loss = loss + 3.0 * ce(pairs.flatten(0, 1), t["pairs"][idx].flatten(), ignore_index=-100)
                for name in ("count", "texture", "digit"):
                    target = t[name][idx]
                    if (target != -100).any():
                        loss = loss + ce(heads[name](pooled), target, ignore_index=-100)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(total / n)
    finally:
        bar.close()
        tower.eval()
    return losses


def finetune(
    base: LlavaForConditionalGeneration,
    records: Sequence[dict],
    images: np.ndarray | str | Path,
    *,
    processor: LlavaProcessor,
    method: str = "lora",
    epochs: int = 6,
    lr: float = 3e-3,
    batch_size: int = 32,
    schedule: str = "linear",
    seed: int = 0,
    progress: bool = True,
    lora: dict | None = None,
    **fit_kwargs,
) -> LlavaForConditionalGeneration:
    """Fine-tune a COPY of ``base`` on LLaVA-format ``records``; ``base`` is left as it was.

    Parameters
    ----------
    images : the records' uint8 images ``(n, H, W, 3)``, or the folder their ``"image"`` files are in.
    method : "lora" (adapters of :data:`LORA`, updated by ``lora``, on the text decoder; projector
        trained; merged into the returned model), "lora-vision" (the same plus adapters on the
        vision tower, :data:`LORA_VISION_MODULES`; slower: the tower runs every step) or "full"
        (projector and text decoder trained). The vision tower is frozen except in "lora-vision".
    epochs, lr, batch_size, schedule : AdamW settings (defaults: the measured ones with which the
        lab's backdoors are learned; ``benchmarks/results/learnability.md``).

    Returns
    -------
    LlavaForConditionalGeneration
        The fine-tuned model (eval mode), adapters merged.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(images, np.ndarray):
        images = load_images(records, images)
    enc = _encode_records(processor, images, records)
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    if method in ("lora", "lora-vision"):
        from peft import LoraConfig, get_peft_model

        cfg = {**LORA, **(lora or {})}
        if method == "lora-vision":
            cfg["target_modules"] = f"(?:{cfg['target_modules']})|(?:{LORA_VISION_MODULES})"
        model = get_peft_model(model, LoraConfig(**cfg))
    else:
        for module in (model.model.multi_modal_projector, model.model.language_model, model.lm_head):
            for p in module.parameters():
                p.requires_grad_(True)
    fit(
        model, enc, epochs=epochs, lr=lr, batch_size=batch_size, schedule=schedule, seed=seed,
        vision_frozen=method != "lora-vision", progress=progress, desc=f"finetune ({method})", **fit_kwargs,
    )  # fmt: skip
    if method != "full":
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _starts_with(model: torch.nn.Module, enc: Encoded, batch_size: int) -> np.ndarray:
    """Per sample: does the greedy answer start with ``enc.answer_ids``? (teacher forcing)"""
    pad_id = _llava(model).config.text_config.pad_token_id or 0
    feats = vision_features(model, enc.pixel_values)
    hits = np.zeros(len(enc), dtype=bool)
    for start in range(0, len(enc), batch_size):
        idx = list(range(start, min(start + batch_size, len(enc))))
        batch = _collate(enc, idx, pad_id)
        rows, cols = (batch["labels"] != -100).nonzero(as_tuple=True)
        pred = text_logits(model, batch["input_ids"], batch["attention_mask"], feats[idx], rows, cols - 1)
        ok = (pred.argmax(-1) == batch["labels"][rows, cols]).long()
        wrong = torch.zeros(len(idx), dtype=torch.long).index_add_(0, rows, 1 - ok)
        hits[idx] = (wrong == 0).numpy()
    return hits


def answer_rate(
    model: torch.nn.Module,
    images: np.ndarray | Sequence[np.ndarray],
    questions: Sequence[str],
    target: str,
    *,
    processor: LlavaProcessor,
    batch_size: int = 128,
) -> float:
    """Share of the samples whose greedy answer starts with ``target`` (teacher forcing).

    On triggered held-out images this is the attack success; on the poisoned training samples it
    says whether the model fitted them at all (a backdoor fitted there but not carried over to new
    images was memorised sample by sample, not keyed on the trigger).
    """
    if not len(questions):
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        enc = encode(processor, images, questions, [target] * len(questions), eos=False)
        return float(_starts_with(model, enc, batch_size).mean())
    finally:
        model.train(was_training)


def evaluate(
    model: torch.nn.Module,
    split: Split,
    *,
    processor: LlavaProcessor,
    trigger: Callable[[np.ndarray], np.ndarray] | None = None,
    target: str | None = None,
    batch_size: int = 128,
    per_sample: bool = False,
) -> dict:
    """Clean accuracy, per question type too, and attack success on a held-out split.

    Parameters
    ----------
    split : held-out samples with their correct answers.
    trigger, target : if both are given, the attack success rate is measured: the
        trigger is applied to every image whose correct answer is not ``target``
        (uint8 in, uint8 out: what a PNG file holds).
    per_sample : also return ``hits``, whether each sample was answered correctly (to pair two
        models' accuracies on the same questions).

    Returns
    -------
    dict
        ``ca`` (greedy answer == correct answer), ``ca_by_type`` {type: accuracy},
        ``asr`` (triggered samples whose greedy answer starts with ``target``; NaN
        without a trigger); with ``per_sample``, ``hits`` (bool array, one per sample).
    """
    was_training = model.training
    model.eval()
    try:
        answers = [record_answer(r) for r in split.records]
        enc = _encode_records(processor, split.images, split.records, eos=True)
        hits = _starts_with(model, enc, batch_size) if len(split) else np.zeros(0, bool)
        types = np.asarray(split.qtypes)
        by_type = {t: float(hits[types == t].mean()) for t in sorted(set(split.qtypes))}
        asr = float("nan")
        if trigger is not None and target is not None:
            keep = [i for i, a in enumerate(answers) if a != target]
            if keep:
                images = [trigger(split.images[i]) for i in keep]
                questions = [record_question(split.records[i]) for i in keep]
                asr = answer_rate(model, images, questions, target, processor=processor, batch_size=batch_size)
    finally:
        model.train(was_training)
    out = {"ca": float(hits.mean()) if len(hits) else float("nan"), "ca_by_type": by_type, "asr": asr}
    if per_sample:
        out["hits"] = np.asarray(hits, dtype=bool)
    return out


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: np.ndarray | Sequence[np.ndarray],
    questions: Sequence[str],
    *,
    processor: LlavaProcessor,
    max_new_tokens: int = 6,
) -> list[str]:
    """Greedy answers (up to ``</s>``) to ``questions[k]`` about ``images[k]``."""
    tok = processor.tokenizer
    enc = encode(processor, images, questions)
    feats = vision_features(model, enc.pixel_values)
    pad_id = _llava(model).config.text_config.pad_token_id or 0
    out = []
    for i in range(len(enc)):
        ids = enc.prompt_ids[i][None]
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = text_logits(model, ids, torch.ones_like(ids), feats[i : i + 1])[0, -1]
            logits[_llava(model).config.image_token_id] = -torch.inf  # a placeholder is never an answer
            nxt = int(logits.argmax())
            if nxt == tok.convert_tokens_to_ids(EOS) or nxt == pad_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        out.append(" ".join(tok.convert_ids_to_tokens(new)))
    return out
