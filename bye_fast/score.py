"""Stage 1 of BYE: attention entropy of the last prompt token over the image tokens.

:func:`score` is the fused path (no attention maps, one prefill pass);
:func:`score_reference` is the paper's path (eager attention,
``output_attentions=True``), kept for validation and benchmarking. Both
return the same :class:`~bye_fast.scores.Scores`.

:func:`score` also scales out and survives interruptions: it scores its
shard on every rank of a ``torch.distributed`` process group and gathers the
rows (:mod:`bye_fast.distributed`), resumes from a checkpoint folder
(:mod:`bye_fast.checkpoint`), and cuts batches to a token budget or in
halves after a CUDA out-of-memory error (:mod:`bye_fast.batching`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bye_fast.batching import halve, n_rows, split_batch
from bye_fast.checkpoint import ScoreCheckpoint
from bye_fast.distributed import gather_scores, rank_and_world_size
from bye_fast.hook import (
    BatchCollector,
    attention_stats_hook,
    collecting,
    preserved_model_state,
    text_config,
    unused_vision_layers_skipped,
)
from bye_fast.kernels.attn_entropy import PAPER_EPS
from bye_fast.scores import RowBuffer, Scores

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


def _validated(batch: Any, index: int) -> tuple[dict[str, Any], list | None, int]:
    """The batch's model inputs (a new dict, without ``ids``), its ids (or None) and its rows."""
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
    B = int(input_ids.shape[0])
    if ids is not None:
        ids = list(ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else ids)
        if len(ids) != B:
            raise ValueError(f"batch {index}: 'ids' has {len(ids)} entries for {B} rows")
    return inputs, ids, B


def _attended(inputs: dict[str, Any], index: int, ids: list | None) -> torch.Tensor:
    """The batch's attention mask as bool (all True without one); errors name the row's id."""
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"batch {index}: attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    attended = mask.to(torch.bool)
    if not attended.any(dim=1).all():
        row = int((~attended.any(dim=1)).nonzero()[0])
        who = f"id {ids[row]!r}" if ids is not None else f"row {row}"
        raise ValueError(f"batch {index}: {who} has an all-zero attention_mask")
    return attended


def _prepare(batch: Any, index: int, image_token_id: int, device: torch.device, dtype: torch.dtype) -> _Batch:
    inputs, ids, B = _validated(batch, index)
    input_ids = inputs["input_ids"]
    N = input_ids.shape[1]
    attended = _attended(inputs, index, ids)
    positions = torch.arange(N, device=attended.device)
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


def _check_device(
    model: torch.nn.Module, device: str | torch.device | None
) -> tuple[torch.device, torch.dtype]:
    model_dev, dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else model_dev
    if device != model_dev:
        raise ValueError(
            f"model is on {model_dev} but device={device}; move the model first (model.to(device))"
        )
    return device, dtype


class _Rows(RowBuffer):
    """Scored rows as numpy arrays, in order."""

    def scores(self, meta: dict, *, n_layers: int, n_heads: int, allow_empty: bool = False) -> Scores:
        if not self.entropy:
            if not allow_empty:
                raise ValueError("the loader yielded no batch: nothing to score")
            return Scores(
                entropy=np.zeros((0, n_layers), np.float32),
                head_entropy=np.zeros((0, n_layers, n_heads), np.float32),
                image_mass=np.zeros((0, n_layers), np.float32),
                ids=np.zeros(0, np.int64),
                n_image_tokens=np.zeros(0, np.int64),
                meta=meta,
            )
        scores = self.to_scores(meta)
        missing = scores.no_image_ids
        if missing:
            shown = ", ".join(repr(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
            warnings.warn(
                f"{len(missing)} sample(s) have no image token; their scores are NaN: {shown}",
                UserWarning,
                stacklevel=3,
            )
        return scores


#: entropy (B, L), head_entropy (B, L, H), image_mass (B, L), n_image_tokens (B,) of scored rows.
_RowArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _rows_of_stats(
    ent: torch.Tensor, he: torch.Tensor, mass: torch.Tensor, image_mask: torch.Tensor
) -> _RowArrays:
    n_img = image_mask.sum(dim=1).cpu()
    none = n_img == 0
    if none.any():  # make "no image" explicit whatever the kernel produced
        ent[none] = float("nan")
        he[none] = float("nan")
        mass[none] = float("nan")
    return ent.numpy(), he.numpy(), mass.numpy(), n_img.numpy().astype(np.int64)


def _iterate(loader, model, image_token_id, device, desc, progress):
    image_token_id = resolve_image_token_id(model, image_token_id)
    device, dtype = _check_device(model, device)
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
class _FusedScorer:
    """Scores one loader batch with the fused path: token-budget splits and halving on CUDA OOM."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        image_token_id: int,
        device: torch.device,
        dtype: torch.dtype,
        backend: str,
        max_tokens: int | None,
        bar: Any,
        progress: bool,
    ) -> None:
        self.inner = _decoder_inputs_model(model)
        self.n_layers = int(text_config(model).num_hidden_layers)
        self.image_token_id = image_token_id
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.max_tokens = max_tokens
        self.bar = bar
        self.progress = progress
        self.oom_reported = False
        self.long_row_reported = False

    def __call__(self, inputs: dict[str, Any], index: int, ids: list) -> _RowArrays:
        _attended(inputs, index, ids)  # checked on the whole batch, so that errors name the sample
        pieces = [inputs]
        if self.max_tokens is not None:
            pieces, too_long = split_batch(
                inputs, self.max_tokens, image_token_id=self.image_token_id, index=index
            )
            if too_long and not self.long_row_reported:
                self.long_row_reported = True
                warnings.warn(
                    f"batch {index}: id {ids[too_long[0]]!r} is longer than max_tokens_per_batch="
                    f"{self.max_tokens} tokens; it is scored alone (as is any later row that is too long; "
                    "said once)",
                    UserWarning,
                    stacklevel=4,
                )
        parts = [r for piece in pieces for r in self._with_retry(piece, index)]
        if len(parts) == 1:
            return parts[0]
        ent, he, mass, n_img = (np.concatenate([p[k] for p in parts]) for k in range(4))
        return ent, he, mass, n_img

    def _with_retry(self, piece: dict[str, Any], index: int) -> list[_RowArrays]:
        try:
            return [self._forward(piece, index)]
        except torch.cuda.OutOfMemoryError:
            if n_rows(piece) <= 1:
                raise
        # outside the except block: the failed attempt's tensors are released with its traceback
        self._report_oom(index, n_rows(piece))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        halves = halve(piece, image_token_id=self.image_token_id, index=index)
        return [r for half in halves for r in self._with_retry(half, index)]

    def _report_oom(self, index: int, rows: int) -> None:
        if self.oom_reported:
            return
        self.oom_reported = True
        msg = (
            f"bye_fast.score: CUDA out of memory on batch {index} ({rows} rows): scoring it in halves, "
            "as any later batch that runs short of memory (said once); a smaller batch size or "
            "max_tokens_per_batch avoids the retries"
        )
        if self.progress:
            self.bar.write(msg, file=sys.stderr)
            self.bar.set_postfix_str("OOM: halving batches", refresh=False)
        else:
            warnings.warn(msg, UserWarning, stacklevel=6)

    def _forward(self, piece: dict[str, Any], index: int) -> _RowArrays:
        batch = _prepare(piece, index, self.image_token_id, self.device, self.dtype)
        collector = BatchCollector(
            qpos=batch.qpos,
            image_mask=batch.image_mask,
            key_valid=batch.key_valid,
            n_layers=self.n_layers,
            stop_after_last_layer=True,
            backend=self.backend,
        )
        with collecting(collector):
            self.inner(**batch.inputs, use_cache=False)
        ent, he, mass = collector.finish()
        return _rows_of_stats(ent, he, mass, batch.image_mask)


def score(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    image_token_id: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    backend: str = "auto",
    max_tokens_per_batch: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    gather: bool = True,
) -> Scores:
    """Score every sample: attention entropy of the last prompt token over the image tokens.

    One prefill pass per batch through the model's vision tower and text
    decoder, with the text attention routed through SDPA plus a fused
    statistics kernel; the attention maps are never materialised, the LM head
    and the KV cache are skipped, the forward stops after the last decoder
    layer's attention, and (LLaVA, LLaVA-NeXT) the vision layers after the one
    the projector reads are skipped.

    Parameters
    ----------
    model : a HuggingFace multimodal model (LLaVA, LLaVA-NeXT, Qwen2-VL, ...) whose
        text attention goes through transformers' attention interface.
    loader : iterable of batches (dict / ``BatchEncoding``) the model's forward
        accepts: ``input_ids``, ``attention_mask``, ``pixel_values`` and
        model-specific keys. An optional ``"ids"`` list (one per row) is removed
        before the forward and carried into the result. Prompts must end where
        the answer would start; left and right padding both work. Under
        ``torch.distributed`` each rank passes the loader of its own shard: the
        shards must be disjoint, contiguous and in rank order (rank 0 the first
        block of samples, rank 1 the next, ...), as
        :func:`bye_fast.data.make_loader` makes them; for a loader of your own,
        take ``bye_fast.data.shard_indices(n, rank, world_size)`` of the data.
    image_token_id : id of the image placeholder in ``input_ids``; default
        ``model.config.image_token_id`` (or ``image_token_index``).
    device : where to run; default the model's device (which must match).
    progress : show a tqdm progress bar with samples/s.
    backend : statistics kernel, "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    max_tokens_per_batch : int, optional
        Cut every loader batch into consecutive groups of rows of at most this
        many ``rows x seq_len`` tokens (the sequence length of a group is that
        of its longest row: all-padding columns are dropped), and score the
        groups one after the other; a row longer than the budget is scored
        alone (one warning). Bounds the text decoder's activations; the
        vision tower sees the images of one group at a time. Results equal
        unsplit scoring up to float rounding (padding shifts). Default: no
        cutting. Independently of this, a CUDA out-of-memory error during a
        batch scores that batch in halves (recursively, down to single rows,
        after which the error is raised); the progress bar (or a warning)
        says so once.
    checkpoint_dir : path, optional
        Make the run resumable: finished rows are written to shard files in
        this folder (see :mod:`bye_fast.checkpoint`), and a rerun with the
        same model, data and options reuses them instead of running the model
        on their batches -- the loader is still iterated through them, to
        check that the same batches come in the same order -- and returns
        Scores identical to an uninterrupted run. A folder written for
        another model config or weights, other options (``image_token_id``,
        ``backend``, dtype) or other data or data order is refused with a
        ``ValueError``; use a new folder. Under ``torch.distributed`` each rank
        uses the subfolder ``rank{r}of{w}``. ``max_tokens_per_batch`` is not
        part of the options checked. Delete the folder when it is no longer needed.
    checkpoint_every : int
        With ``checkpoint_dir``: write a shard every this many newly scored
        batches (default 100), and at the end of the loader.
    gather : bool
        Only under an initialised ``torch.distributed`` process group (this is
        then a collective call: every rank must call ``score``). True
        (default): every rank returns the Scores of all ranks, rank 0's rows
        first (the original order for shards as described under ``loader``);
        an id scored by two ranks raises ``ValueError``; without ``"ids"`` in
        the batches, rows are numbered ``0..n-1`` over all ranks. If a rank
        fails, it raises its error and the other ranks a ``RuntimeError``
        naming it. Every rank holds all rows, so memory grows with the whole
        dataset. False: every rank returns only its own rows (ids without
        ``"ids"``: ``0..n_r-1`` per rank), e.g. to save one file per rank and
        :meth:`Scores.concatenate` them later.

    Returns
    -------
    Scores
        ``entropy`` (n, layers), ``head_entropy`` (n, layers, heads),
        ``image_mass`` (n, layers), ``ids``, ``n_image_tokens``.
    """
    if max_tokens_per_batch is not None and int(max_tokens_per_batch) < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1 or None, got {max_tokens_per_batch}")
    if int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    dist = rank_and_world_size()
    kwargs = dict(
        image_token_id=image_token_id,
        device=device,
        progress=progress,
        backend=backend,
        max_tokens=None if max_tokens_per_batch is None else int(max_tokens_per_batch),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=int(checkpoint_every),
        dist=dist,
    )
    return _collect(lambda: _score_local(model, loader, **kwargs), dist, gather)


def _collect(
    score_local: Callable[[], tuple[Scores, bool]], dist: tuple[int, int] | None, gather: bool
) -> Scores:
    """``score_local()`` (this process's rows, and whether the loader gave ids); under
    torch.distributed with ``gather``, every rank's rows, also when this rank fails."""
    if dist is None or not gather:
        return score_local()[0]
    try:
        local, ids_given = score_local()
    except Exception as err:  # tell the other ranks instead of leaving them waiting in the gather
        return gather_scores(None, error=err)
    return gather_scores(local, ids_given=ids_given)


def _score_local(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    image_token_id: int | None,
    device: str | torch.device | None,
    progress: bool,
    backend: str,
    max_tokens: int | None,
    checkpoint_dir: str | os.PathLike | None,
    checkpoint_every: int,
    dist: tuple[int, int] | None,
) -> tuple[Scores, bool]:
    """This process's rows, and whether every batch carried ids."""
    image_token_id = resolve_image_token_id(model, image_token_id)
    device, dtype = _check_device(model, device)
    tcfg = text_config(model)
    n_layers, n_heads = int(tcfg.num_hidden_layers), int(tcfg.num_attention_heads)
    desc = "bye_fast.score" if dist is None else f"bye_fast.score [rank {dist[0]}/{dist[1]}]"
    meta = {"method": "bye_fast.score", "model": type(model).__name__, "backend": backend}
    ckpt = None
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir) if dist is None else Path(checkpoint_dir) / f"rank{dist[0]}of{dist[1]}"
        options = {
            "method": "bye_fast.score",
            "image_token_id": image_token_id,
            "backend": backend,
            "dtype": str(dtype).removeprefix("torch."),
        }
        ckpt = ScoreCheckpoint.open(folder, model=model, options=options, every=checkpoint_every)
    rows = _Rows()
    ids_given = True
    seen = 0
    bar = _progress(loader, progress, desc)
    try:
        with (
            attention_stats_hook(model),
            unused_vision_layers_skipped(model),
            torch.inference_mode(),
        ):
            scorer = _FusedScorer(
                model,
                image_token_id=image_token_id,
                device=device,
                dtype=dtype,
                backend=backend,
                max_tokens=max_tokens,
                bar=bar,
                progress=progress,
            )
            for index, raw in enumerate(loader):
                inputs, ids, B = _validated(raw, index)
                if ids is None:
                    ids_given = False
                    ids = list(range(seen, seen + B))
                if ckpt is not None and ckpt.begin_batch(index, ids, inputs):
                    stored = ckpt.take_stored()
                    if stored is not None:
                        rows.add_scores(stored)
                else:
                    ent, he, mass, n_img = scorer(inputs, index, ids)
                    rows.add(ent, he, mass, n_img, ids)
                    if ckpt is not None:
                        ckpt.add(index, ent, he, mass, n_img, ids)
                seen += B
                bar.update(B)
            if ckpt is not None:
                ckpt.finish()
    finally:
        bar.close()
    return rows.scores(meta, n_layers=n_layers, n_heads=n_heads, allow_empty=dist is not None), ids_given


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
    gather: bool = True,
) -> Scores:
    """The paper's path: eager text attention with ``output_attentions=True``.

    Materialises every layer's (B, heads, L, L) attention map, as the BYE
    reference code does, and takes the statistics from the last prompt token's
    row. For validation and benchmarking; same inputs and outputs as :func:`score`
    (under torch.distributed, ``gather`` as there).
    """
    dist = rank_and_world_size()
    return _collect(
        lambda: _reference_local(model, loader, image_token_id, device, progress, dist), dist, gather
    )


def _reference_local(
    model: torch.nn.Module,
    loader: Iterable,
    image_token_id: int | None,
    device: str | torch.device | None,
    progress: bool,
    dist: tuple[int, int] | None,
) -> tuple[Scores, bool]:
    rows = _Rows()
    ids_given = True
    with preserved_model_state(model), torch.inference_mode():
        model.set_attn_implementation("eager")  # as the paper's code: eager everywhere
        model.eval()
        for batch, ids in _iterate(
            loader, model, image_token_id, device, "bye_fast.score_reference", progress
        ):
            ids_given &= batch.ids is not None
            out = model(**batch.inputs, output_attentions=True, use_cache=False, return_dict=True)
            attentions = getattr(out, "attentions", None)
            if not attentions:
                raise NotImplementedError(
                    f"{type(model).__name__} returned no attentions with output_attentions=True"
                )
            ent, he, mass = _stats_from_maps(attentions, batch.qpos, batch.image_mask)
            rows.add(*_rows_of_stats(ent, he, mass, batch.image_mask), ids)
    meta = {"method": "bye_fast.score_reference", "model": type(model).__name__}
    tcfg = text_config(model)
    n_layers, n_heads = int(tcfg.num_hidden_layers), int(tcfg.num_attention_heads)
    return rows.scores(meta, n_layers=n_layers, n_heads=n_heads, allow_empty=dist is not None), ids_given
