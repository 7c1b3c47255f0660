"""Stage 1 of BYE: attention entropy of the last prompt token over the image tokens.

:func:`score` is the fused path (no attention maps, one prefill pass);
:func:`score_reference` is the paper's path (eager attention,
``output_attentions=True``), kept for validation and benchmarking. Both
return the same :class:`~bye_fast.scores.Scores`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bye_fast.hook import (
    BatchCollector,
    attention_stats_hook,
    collecting,
    preserved_model_state,
    text_config,
)
from bye_fast.kernels.attn_entropy import PAPER_EPS
from bye_fast.scores import Scores

__all__ = ["score", "score_reference"]


# --------------------------------------------------------------------------- batches
@dataclass
class _Batch:
    inputs: dict[str, Any]  # what the model's forward gets
    ids: list | None  # user ids, or None
    qpos: torch.Tensor  # (B,) query position
    key_valid: torch.Tensor  # (B, N) bool
    image_mask: torch.Tensor  # (B, N) bool
    size: int


def resolve_image_token_id(model: torch.nn.Module, image_token_id: int | None) -> int:
    if image_token_id is not None:
        return int(image_token_id)
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"{type(model).__name__}.config has no image_token_id / image_token_index: pass "
        "image_token_id=<the id of the image placeholder token in input_ids> to score()"
    )


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _prepare(batch: Any, index: int, image_token_id: int, device: torch.device, dtype: torch.dtype) -> _Batch:
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"batch {index}: expected a dict / BatchEncoding of model inputs, got {type(batch).__name__}"
        )
    inputs = dict(batch)  # never mutate the user's batch
    ids = inputs.pop("ids", None)
    if "input_ids" not in inputs or not isinstance(inputs["input_ids"], torch.Tensor):
        raise ValueError(f"batch {index}: has no 'input_ids' tensor (keys: {sorted(batch.keys())})")
    input_ids = inputs["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"batch {index}: input_ids must be (batch, seq_len); got {tuple(input_ids.shape)}")
    B, N = input_ids.shape
    if ids is not None:
        ids = list(ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else ids)
        if len(ids) != B:
            raise ValueError(f"batch {index}: 'ids' has {len(ids)} entries for {B} rows")
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"batch {index}: attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    attended = mask.to(torch.bool)
    if not attended.any(dim=1).all():
        row = int((~attended.any(dim=1)).nonzero()[0])
        who = f"id {ids[row]!r}" if ids is not None else f"row {row}"
        raise ValueError(f"batch {index}: {who} has an all-zero attention_mask")
    positions = torch.arange(N)
    qpos = torch.where(attended, positions, -1).amax(dim=1)  # last attended position (left or right padding)
    key_valid = attended & (positions[None, :] <= qpos[:, None])
    image_mask = (input_ids == image_token_id) & attended
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and name.startswith("pixel_values"):
                value = value.to(dtype)
        moved[name] = value
    return _Batch(moved, ids, qpos.to(device), key_valid.to(device), image_mask.to(device), B)


def _progress(loader: Iterable, progress: bool, desc: str):
    total = None
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        try:
            total = len(dataset)
        except TypeError:
            total = None
    return tqdm(total=total, disable=not progress, desc=desc, unit="sample", dynamic_ncols=True)


def _assemble(
    entropy: list[torch.Tensor],
    head_entropy: list[torch.Tensor],
    image_mass: list[torch.Tensor],
    ids: list,
    n_image: list[torch.Tensor],
    meta: dict,
) -> Scores:
    if not entropy:
        raise ValueError("the loader yielded no batch: nothing to score")
    n_img = torch.cat(n_image).numpy()
    scores = Scores(
        entropy=torch.cat(entropy).numpy(),
        head_entropy=torch.cat(head_entropy).numpy(),
        image_mass=torch.cat(image_mass).numpy(),
        ids=ids,
        n_image_tokens=n_img,
        meta=meta,
    )
    missing = scores.no_image_ids
    if missing:
        shown = ", ".join(repr(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        warnings.warn(
            f"{len(missing)} sample(s) have no image token; their scores are NaN: {shown}",
            UserWarning,
            stacklevel=3,
        )
    return scores


def _iterate(loader, model, image_token_id, device, desc, progress):
    image_token_id = resolve_image_token_id(model, image_token_id)
    model_dev, dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else model_dev
    if device != model_dev:
        raise ValueError(
            f"model is on {model_dev} but device={device}; move the model first (model.to(device))"
        )
    seen = 0
    bar = _progress(loader, progress, desc)
    try:
        for index, raw in enumerate(loader):
            batch = _prepare(raw, index, image_token_id, device, dtype)
            ids = batch.ids if batch.ids is not None else list(range(seen, seen + batch.size))
            yield batch, ids
            seen += batch.size
            bar.update(batch.size)
    finally:
        bar.close()


def _decoder_inputs_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head (``model.model`` for *ForConditionalGeneration)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model


# --------------------------------------------------------------------------- fused path
def score(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    image_token_id: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    backend: str = "auto",
) -> Scores:
    """Score every sample: attention entropy of the last prompt token over the image tokens.

    One prefill pass per batch through the model's vision tower and text
    decoder, with the text attention routed through SDPA plus a fused
    statistics kernel; the attention maps are never materialised, the LM head
    and the KV cache are skipped and the forward stops after the last decoder
    layer's attention.

    Parameters
    ----------
    model : a HuggingFace multimodal model (LLaVA, LLaVA-NeXT, Qwen2-VL, ...) whose
        text attention goes through transformers' attention interface.
    loader : iterable of batches (dict / ``BatchEncoding``) the model's forward
        accepts: ``input_ids``, ``attention_mask``, ``pixel_values`` and
        model-specific keys. An optional ``"ids"`` list (one per row) is removed
        before the forward and carried into the result. Prompts must end where
        the answer would start; left and right padding both work.
    image_token_id : id of the image placeholder in ``input_ids``; default
        ``model.config.image_token_id`` (or ``image_token_index``).
    device : where to run; default the model's device (which must match).
    progress : show a tqdm progress bar with samples/s.
    backend : statistics kernel, "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns
    -------
    Scores
        ``entropy`` (n, layers), ``head_entropy`` (n, layers, heads),
        ``image_mass`` (n, layers), ``ids``, ``n_image_tokens``.
    """
    n_layers = int(text_config(model).num_hidden_layers)
    inner = _decoder_inputs_model(model)
    out_e, out_he, out_m, out_ids, out_n = [], [], [], [], []
    with attention_stats_hook(model), torch.inference_mode():
        for batch, ids in _iterate(loader, model, image_token_id, device, "bye_fast.score", progress):
            collector = BatchCollector(
                qpos=batch.qpos,
                image_mask=batch.image_mask,
                key_valid=batch.key_valid,
                n_layers=n_layers,
                stop_after_last_layer=True,
                backend=backend,
            )
            with collecting(collector):
                inner(**batch.inputs, use_cache=False)
            ent, he, mass = collector.finish()
            _collect(ent, he, mass, batch, ids, out_e, out_he, out_m, out_ids, out_n)
    meta = {"method": "bye_fast.score", "model": type(model).__name__, "backend": backend}
    return _assemble(out_e, out_he, out_m, out_ids, out_n, meta)


def _collect(ent, he, mass, batch, ids, out_e, out_he, out_m, out_ids, out_n):
    n_img = batch.image_mask.sum(dim=1).cpu()
    none = n_img == 0
    if none.any():  # make "no image" explicit whatever the kernel produced
        ent[none] = float("nan")
        he[none] = float("nan")
        mass[none] = float("nan")
    out_e.append(ent)
    out_he.append(he)
    out_m.append(mass)
    out_ids.extend(ids)
    out_n.append(n_img)


# --------------------------------------------------------------------------- reference path
def _stats_from_maps(
    attentions: tuple[torch.Tensor, ...], qpos: torch.Tensor, image_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's computation on materialised (B, H, L, L) maps, in float64."""
    B = qpos.shape[0]
    rows = torch.arange(B, device=qpos.device)
    ent, head_ent, mass = [], [], []
    for layer_attn in attentions:
        a = layer_attn[rows, :, qpos].double()  # (B, H, N): the query row of every head
        img = image_mask[:, None, :].to(a.device)
        a_img = torch.where(img, a, 0.0)
        head_mean = a_img.mean(dim=1)  # (B, N) head mean over image tokens
        total = head_mean.sum(-1, keepdim=True)
        p = head_mean / total
        ent.append(-(p * torch.log(p + PAPER_EPS)).sum(-1))
        ph = a_img / a_img.sum(-1, keepdim=True)
        head_ent.append(-torch.special.xlogy(ph, ph).sum(-1))
        mass.append(a_img.sum(-1).mean(-1))
    return (
        torch.stack(ent, 1).float().cpu(),
        torch.stack(head_ent, 1).float().cpu(),
        torch.stack(mass, 1).float().cpu(),
    )


def score_reference(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    image_token_id: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Scores:
    """The paper's path: eager text attention with ``output_attentions=True``.

    Materialises every layer's (B, heads, L, L) attention map, as the BYE
    reference code does, and takes the statistics from the last prompt token's
    row. For validation and benchmarking; same inputs and outputs as :func:`score`.
    """
    out_e, out_he, out_m, out_ids, out_n = [], [], [], [], []
    with preserved_model_state(model), torch.inference_mode():
        model.set_attn_implementation("eager")  # as the paper's code: eager everywhere
        model.eval()
        for batch, ids in _iterate(
            loader, model, image_token_id, device, "bye_fast.score_reference", progress
        ):
            out = model(**batch.inputs, output_attentions=True, use_cache=False, return_dict=True)
            attentions = getattr(out, "attentions", None)
            if not attentions:
                raise NotImplementedError(
                    f"{type(model).__name__} returned no attentions with output_attentions=True"
                )
            ent, he, mass = _stats_from_maps(attentions, batch.qpos, batch.image_mask)
            _collect(ent, he, mass, batch, ids, out_e, out_he, out_m, out_ids, out_n)
    meta = {"method": "bye_fast.score_reference", "model": type(model).__name__}
    return _assemble(out_e, out_he, out_m, out_ids, out_n, meta)
