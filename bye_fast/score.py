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

import contextlib
import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bye_fast.batching import halve, image_layout, n_rows, split_batch
from bye_fast.checkpoint import ScoreCheckpoint
from bye_fast.distributed import gather_scores, rank_and_world_size
from bye_fast.hook import (
    BatchCollector,
    attention_stats_hook,
    collecting,
    last_layer_mlp_on_query_rows,
    preserved_model_state,
    text_config,
    unused_vision_layers_skipped,
)
from bye_fast.kernels.attn_entropy import PAPER_EPS
from bye_fast.scores import FIELDS, RowBuffer, Scores

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
    prompt_key: np.ndarray  # (B,) int64


def prompt_keys(input_ids: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    """Per row, a 64-bit hash (BLAKE2b) of the token ids where ``text`` is true, in order: the same
    question in the same template gives the same key whatever the padding side, the batch or the
    image."""
    ids = input_ids.detach().cpu().numpy().astype("<i8")
    keep = text.detach().cpu().numpy()
    return np.array(
        [int.from_bytes(hashlib.blake2b(row[m].tobytes(), digest_size=8).digest(), "little", signed=True)
         for row, m in zip(ids, keep, strict=True)],
        dtype=np.int64,
    )  # fmt: skip


def resolve_image_token_id(model: torch.nn.Module, image_token_id: int | None) -> int:
    """``image_token_id``, else the model config's. An id that differs from the config's is refused:
    every other token of the prompt would be scored as an image."""
    cfg = model.config
    configured = None
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            configured = int(value)
            break
    if image_token_id is not None:
        if (
            isinstance(image_token_id, bool)
            or int(image_token_id) != image_token_id
            or int(image_token_id) < 0
        ):
            raise ValueError(
                f"image_token_id must be a non-negative integer token id; got {image_token_id!r}"
            )
        if configured is not None and int(image_token_id) != configured:
            raise ValueError(
                f"image_token_id={image_token_id} is not the image placeholder of {type(model).__name__} "
                f"(config.image_token_id = {configured}): the model fills only that token with image "
                "features; leave image_token_id unset"
            )
        return int(image_token_id)
    if configured is not None:
        return configured
    raise ValueError(
        f"{type(model).__name__}.config has no image_token_id / image_token_index: pass "
        "image_token_id=<the id of the image placeholder token in input_ids> to score()"
    )


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's inputs go, and its dtype: those of its first parameter.

    A model dispatched by accelerate with offloading (``device_map="auto"`` with an offload folder,
    ``dispatch_model``, ``cpu_offload``) keeps offloaded parameters on the ``meta`` device and loads them
    at forward time; its inputs go to the execution device of its outermost accelerate hook.
    """
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device, p.dtype
        device = _execution_device(model)
        if device is None:
            raise ValueError(
                f"{type(model).__name__} has parameters on the meta device and no accelerate hook that says "
                "where it runs: load its weights (or dispatch it with accelerate) before scoring"
            )
        return device, p.dtype
    return torch.device("cpu"), torch.float32


def _execution_device(model: torch.nn.Module) -> torch.device | None:
    """The ``execution_device`` of the outermost accelerate hook in ``model``, or None."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return None


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


def _check_length(inputs: dict[str, Any], index: int, ids: list | None, max_len: int | None) -> None:
    """A prompt longer than the text decoder's context is an error naming the sample."""
    if not max_len:
        return
    lengths = _attended(inputs, index, ids).sum(dim=1)
    if (lengths > max_len).any():
        row = int((lengths > max_len).nonzero()[0])
        who = f"id {ids[row]!r}" if ids is not None else f"row {row}"
        raise ValueError(
            f"batch {index}: {who} has {int(lengths[row])} tokens, more than the model's context of "
            f"{max_len} (max_position_embeddings): its scores would be meaningless"
        )


def _context_length(model: torch.nn.Module) -> int | None:
    value = getattr(text_config(model), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _prepare(batch: Any, index: int, image_token_id: int, device: torch.device, dtype: torch.dtype) -> _Batch:
    inputs, ids, B = _validated(batch, index)
    input_ids = inputs["input_ids"]
    N = input_ids.shape[1]
    attended = _attended(inputs, index, ids)
    positions = torch.arange(N, device=attended.device)
    qpos = torch.where(attended, positions, -1).amax(dim=1)  # last attended position (left or right padding)
    key_valid = attended & (positions[None, :] <= qpos[:, None])
    image_mask = (input_ids == image_token_id) & attended
    if image_mask.any() and not any(k.startswith("pixel_values") for k in inputs):
        raise ValueError(
            f"batch {index}: has image tokens but no pixel_values (keys: {sorted(inputs)}); the model would "
            "score its placeholder embeddings as if they were the image"
        )
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and name.startswith("pixel_values"):
                value = value.to(dtype)
        moved[name] = value
    keys = prompt_keys(input_ids, key_valid & ~image_mask)
    return _Batch(moved, ids, qpos.to(device), key_valid.to(device), image_mask.to(device), B, keys)


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

    def scores(self, meta: dict, *, empty: dict[str, tuple[int, ...]] | None = None) -> Scores:
        """The rows as Scores; with no row at all, an empty Scores with the shapes ``empty``
        (field -> per-sample shape) if given, else an error."""
        if not self.ids:
            if empty is None:
                raise ValueError("the loader yielded no batch: nothing to score")
            arrays = {name: np.zeros((0, *shape), _DTYPES[name]) for name, shape in empty.items()}
            return Scores(**arrays, ids=np.zeros(0, np.int64), meta=meta)
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


_DTYPES = {f.name: f.dtype for f in FIELDS}
#: Fields measured on the image tokens: NaN for a row without any.
_IMAGE_FIELDS = ("entropy", "head_entropy", "image_mass", "head_image_share", "head_before_share",
                 "image_topk_share", "image_embedding")  # fmt: skip


def _rows_of_stats(stats: dict[str, torch.Tensor], batch: _Batch) -> dict[str, np.ndarray]:
    """Per-batch tensors as numpy rows, with n_image_tokens and prompt_key; NaN image statistics for
    rows without image."""
    image_mask = batch.image_mask
    n_img = image_mask.sum(dim=1).cpu()
    none = (n_img == 0).numpy()
    out = {name: value.numpy() for name, value in stats.items()}
    if none.any():  # make "no image" explicit whatever the kernel produced
        for name in _IMAGE_FIELDS:
            if name in out:
                out[name][none] = np.nan
    out["n_image_tokens"] = n_img.numpy().astype(np.int64)
    out["prompt_key"] = batch.prompt_key
    return out


def _empty_shapes(
    model: torch.nn.Module, *, answers: bool, hidden: bool, image_emb: bool = False
) -> dict[str, tuple[int, ...]]:  # a rank without rows: the shapes its empty arrays need
    tcfg = text_config(model)
    L, H = int(tcfg.num_hidden_layers), int(tcfg.num_attention_heads)
    shapes = {"entropy": (L,), "head_entropy": (L, H), "image_mass": (L,), "head_image_share": (L, H),
              "head_before_share": (L, H), "image_topk_share": (L,), "n_image_tokens": (), "prompt_key": ()}  # fmt: skip
    if answers:
        shapes.update(answer_token=(), answer_confidence=(), answer_margin=())
    if hidden:
        shapes["hidden"] = (int(tcfg.hidden_size),)
    if image_emb:
        shapes["image_embedding"] = (_vision_size(model),)
    return shapes


def _row_means(feats: torch.Tensor | None, image_mask: torch.Tensor, size: int) -> torch.Tensor:
    """One (T, V) block of vision features per image -> (B, V) float32 rows: each image's mean in the row
    that holds its tokens, NaN in a row without image tokens (images are in row order, one per row;
    ``feats`` None: no row of the batch has an image)."""
    has = (image_mask.sum(dim=1) > 0).cpu()
    if feats is None and not has.any():
        return torch.full((len(has), size), float("nan"))
    if feats is None or feats.ndim != 3 or feats.shape[0] != int(has.sum()) or feats.shape[-1] != size:
        raise NotImplementedError(
            f"image_embeddings=True needs a model whose projector reads one (tokens, {size}) block per "
            f"sample (LLaVA-1.5 style); got a projector input of shape "
            f"{None if feats is None else tuple(feats.shape)} for {int(has.sum())} rows with an image"
        )
    out = torch.full((len(has), size), float("nan"))
    out[has] = feats.double().mean(dim=1).float().cpu()
    return out


def _check_image_embeddings(model: torch.nn.Module) -> None:
    """``image_embeddings=True`` is defined for LLaVA-1.5-style models only: one image per sample, a
    ``multi_modal_projector`` reading ``hidden_states[vision_feature_layer]`` (one int) of the tower."""
    inner = _decoder_inputs_model(model)
    layer = getattr(model.config, "vision_feature_layer", None)
    if type(inner).__name__ != "LlavaModel" or not isinstance(layer, int):
        raise NotImplementedError(
            "image_embeddings=True supports LLaVA-1.5-style models (LlavaModel, one int vision_feature_layer); "
            f"{type(model).__name__} is not one"
        )


def _vision_size(model: torch.nn.Module) -> int:
    """Width of the vision features the projector reads (one int ``vision_feature_layer``)."""
    return int(model.config.vision_config.hidden_size)


@contextlib.contextmanager
def _projector_inputs(model: torch.nn.Module, store: list) -> Iterator[None]:
    """Append what the projector reads (the vision features) to ``store`` while active
    (:func:`_check_image_embeddings` has vouched for a LLaVA ``multi_modal_projector``)."""

    def pre_hook(module, args, kwargs):
        store.append(args[0] if args else next(iter(kwargs.values())))

    projector = _decoder_inputs_model(model).multi_modal_projector
    handle = projector.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _vision_features_reference(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The slow twin of the projector's input: ``hidden_states[vision_feature_layer]`` of the whole
    vision tower (every layer run), without the CLS token under the "default" strategy (LLaVA-1.5)."""
    cfg = model.config
    hs = _decoder_inputs_model(model).vision_tower(pixel_values, output_hidden_states=True).hidden_states
    feats = hs[cfg.vision_feature_layer]
    return feats[:, 1:] if getattr(cfg, "vision_feature_select_strategy", "default") == "default" else feats


def _answer_signals(
    model: torch.nn.Module, last_hidden: torch.Tensor, qpos: torch.Tensor, hidden: bool
) -> dict[str, torch.Tensor]:
    """The greedy first answer token and its probability from the query rows' final hidden states."""
    rows = torch.arange(last_hidden.shape[0], device=last_hidden.device)
    h = last_hidden[rows, qpos.to(last_hidden.device)]  # (B, D)
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    conf, token = torch.softmax(logits, dim=-1).max(dim=-1)
    top2 = logits.topk(2, dim=-1).values
    out = {
        "answer_token": token.cpu(),
        "answer_confidence": conf.cpu(),
        "answer_margin": (top2[:, 0] - top2[:, 1]).cpu(),
    }
    if hidden:
        out["hidden"] = h.float().cpu()
    return out


def _loader_batches(loader: Iterable, bar: Any) -> Iterator[tuple[int, Any, dict[str, Any], list, bool]]:
    """The one loop over a loader, for both paths: ``(index, raw batch, validated inputs, ids, ids
    given)`` per batch; without ids, a batch's ids are the running sample positions. ``bar``
    advances once the caller is done with the batch."""
    seen = 0
    for index, raw in enumerate(loader):
        inputs, ids, B = _validated(raw, index)
        given = ids is not None
        if not given:
            ids = list(range(seen, seen + B))
        yield index, raw, inputs, ids, given
        seen += B
        bar.update(B)


#: One batch's scored rows, by Scores field name.
_RowArrays = dict[str, np.ndarray]


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (adapters stay injected), or the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _decoder_inputs_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head (``model.model`` for *ForConditionalGeneration)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _has_lm_head(model: torch.nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and isinstance(get(), torch.nn.Module) and _decoder_inputs_model(model) is not model


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
        answers: bool,
        hidden: bool,
        topk: int,
        image_emb: bool = False,
    ) -> None:
        self.model = model
        self.image_emb = image_emb
        self.vision_size = _vision_size(model) if image_emb else 0
        self.inner = _decoder_inputs_model(model)
        self.n_layers = int(text_config(model).num_hidden_layers)
        self.answers = answers
        self.hidden = hidden
        self.topk = topk
        self.max_len = _context_length(model)
        self.image_token_id = image_token_id
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.max_tokens = max_tokens
        self.layout = image_layout(model)
        self.bar = bar
        self.progress = progress
        self.oom_reported = False
        self.long_row_reported = False

    def __call__(self, inputs: dict[str, Any], index: int, ids: list) -> _RowArrays:
        _attended(inputs, index, ids)  # checked on the whole batch, so that errors name the sample
        _check_length(inputs, index, ids, self.max_len)
        pieces = [inputs]
        if self.max_tokens is not None:
            pieces, too_long = split_batch(
                inputs, self.max_tokens, image_token_id=self.image_token_id, index=index, layout=self.layout
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
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

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
        halves = halve(piece, image_token_id=self.image_token_id, index=index, layout=self.layout)
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
            stop_after_last_layer=not self.answers,
            backend=self.backend,
            topk=self.topk,
            model_name=type(self.model).__name__,
        )
        seen: list[torch.Tensor] = []
        with (
            collecting(collector),
            _projector_inputs(self.model, seen) if self.image_emb else contextlib.nullcontext(),
        ):
            out = self.inner(**batch.inputs, use_cache=False)
        stats = collector.finish()
        if self.image_emb:
            stats["image_embedding"] = _row_means(seen[0] if seen else None, batch.image_mask, self.vision_size)
        if self.answers:
            stats.update(_answer_signals(self.model, out.last_hidden_state, batch.qpos, self.hidden))
        return _rows_of_stats(stats, batch)


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
    hidden_states: bool = False,
    topk: int = 4,
    image_embeddings: bool = False,
) -> Scores:
    """Score every sample: what the last prompt token attends to, and what it would answer.

    One prefill pass per batch through the model's vision tower and text
    decoder, with the text attention routed through SDPA plus a fused
    statistics kernel; the attention maps are never materialised and the KV
    cache is skipped. The last decoder layer's MLP and the LM head run on the
    last prompt token only (for the answer signals), and (LLaVA, LLaVA-NeXT) the
    vision layers after the one the projector reads are skipped. Per sample and
    layer (and head): the paper's entropy, per-head entropies, the shares of the
    attention on the image, on the text before it and after it, the spatial
    concentration of the image attention; per sample: the greedy first answer
    token and its probability (see :data:`bye_fast.scores.FIELDS`).

    Parameters
    ----------
    model : a HuggingFace multimodal model (LLaVA, LLaVA-NeXT, LLaVA-OneVision, InternVL,
        Qwen2/2.5-VL, Gemma 3, Idefics3/SmolVLM, Mistral 3, ...: ``docs/families.md``) whose
        text attention goes through transformers' attention interface; a peft model (adapters
        unmerged) or one dispatched by accelerate with offloading works too.
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
    hidden_states : bool
        Also keep the last prompt token's final hidden state (``Scores.hidden``,
        n x hidden_size floats), e.g. for spectral-signature baselines.
    topk : int
        k of ``Scores.image_topk_share`` (default 4: about the tokens one small patch covers).
    image_embeddings : bool
        Also keep each sample's image features as the projector reads them, averaged over the
        image's tokens (``Scores.image_embedding``, n x vision_hidden_size floats): what the image
        shows, before the fine-tuned projector, which the default detector compares across the
        model's answer groups (:mod:`bye_fast.consensus`). LLaVA-1.5-style models (one image per
        sample, a ``multi_modal_projector``); others raise ``NotImplementedError``.

    Returns
    -------
    Scores
        Every field of :data:`bye_fast.scores.FIELDS` (``hidden``, ``image_embedding`` only when asked;
        ``answer_*`` only for models with an LM head), ``ids``.
    """
    if int(topk) < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
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
        hidden=bool(hidden_states),
        topk=int(topk),
        image_emb=bool(image_embeddings),
    )
    return _collect(lambda: _score_local(_unwrapped(model), loader, **kwargs), dist, gather)


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
    hidden: bool,
    topk: int,
    image_emb: bool = False,
) -> tuple[Scores, bool]:
    """This process's rows, and whether every batch carried ids."""
    image_token_id = resolve_image_token_id(model, image_token_id)
    device, dtype = _check_device(model, device)
    answers = _has_lm_head(model)
    if hidden and not answers:
        raise ValueError(f"hidden_states=True needs a model with an LM head; {type(model).__name__} has none")
    if image_emb:
        _check_image_embeddings(model)
    n_layers = int(text_config(model).num_hidden_layers)
    desc = "bye_fast.score" if dist is None else f"bye_fast.score [rank {dist[0]}/{dist[1]}]"
    meta = {"method": "bye_fast.score", "model": type(model).__name__, "backend": backend, "topk": topk}
    ckpt = None
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir) if dist is None else Path(checkpoint_dir) / f"rank{dist[0]}of{dist[1]}"
        options = {
            "method": "bye_fast.score",
            "image_token_id": image_token_id,
            "backend": backend,
            "dtype": str(dtype).removeprefix("torch."),
            "topk": topk,
            "hidden_states": hidden,
            "prompt_key": True,  # checkpoints written before prompt_key existed lack the field
            **({"image_embeddings": True} if image_emb else {}),  # older checkpoints stay valid
        }
        ckpt = ScoreCheckpoint.open(folder, model=model, options=options, every=checkpoint_every)
    rows = _Rows()
    ids_given = True
    bar = _progress(loader, progress, desc)
    try:
        with (
            attention_stats_hook(model),
            unused_vision_layers_skipped(model),
            last_layer_mlp_on_query_rows(model, n_layers),
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
                answers=answers,
                hidden=hidden,
                topk=topk,
                image_emb=image_emb,
            )
            for index, _, inputs, ids, given in _loader_batches(loader, bar):
                ids_given &= given
                if ckpt is not None and ckpt.begin_batch(index, ids, inputs):
                    stored = ckpt.take_stored()
                    if stored is not None:
                        rows.add_scores(stored)
                else:
                    arrays = scorer(inputs, index, ids)
                    rows.add(arrays, ids)
                    if ckpt is not None:
                        ckpt.add(index, arrays, ids)
            if ckpt is not None:
                ckpt.finish()
    finally:
        bar.close()
    empty = _empty_shapes(model, answers=answers, hidden=hidden, image_emb=image_emb) if dist is not None else None
    return rows.scores(meta, empty=empty), ids_given


# --------------------------------------------------------------------------- reference path
def _stats_from_maps(
    attentions: tuple[torch.Tensor, ...], qpos: torch.Tensor, image_mask: torch.Tensor, topk: int
) -> dict[str, torch.Tensor]:
    """The statistics computed naively on materialised (B, H, L, L) maps, in float64."""
    B, N = image_mask.shape
    rows = torch.arange(B, device=qpos.device)
    first = torch.where(image_mask, torch.arange(N, device=image_mask.device), N).amin(dim=1)
    before = torch.arange(N, device=image_mask.device)[None, :] < first[:, None]  # (B, N)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "entropy", "head_entropy", "image_mass", "head_image_share", "head_before_share", "image_topk_share")}  # fmt: skip
    for layer_attn in attentions:
        a = layer_attn[rows, :, qpos].double()  # (B, H, N): the query row of every head
        img = image_mask[:, None, :].to(a.device)
        a_img = torch.where(img, a, 0.0)
        head_mean = a_img.mean(dim=1)  # (B, N) head mean over image tokens
        total = head_mean.sum(-1, keepdim=True)
        p = head_mean / total
        out["entropy"].append(-(p * torch.log(p + PAPER_EPS)).sum(-1))
        ph = a_img / a_img.sum(-1, keepdim=True)
        out["head_entropy"].append(-torch.special.xlogy(ph, ph).sum(-1))
        out["image_mass"].append(a_img.sum(-1).mean(-1))
        out["head_image_share"].append(a_img.sum(-1))
        out["head_before_share"].append(torch.where(before[:, None, :].to(a.device), a, 0.0).sum(-1))
        top = torch.sort(p, dim=-1, descending=True).values[:, :topk].sum(-1)
        out["image_topk_share"].append(top)
        blind = a_img.sum(dim=(1, 2)) == 0  # (B,): no attention on the image (e.g. outside a sliding window)
        for v in out.values():
            v[-1][blind.to(v[-1].device)] = float("nan")
    return {k: torch.stack(v, 1).float().cpu() for k, v in out.items()}


def score_reference(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    image_token_id: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    gather: bool = True,
    hidden_states: bool = False,
    topk: int = 4,
    image_embeddings: bool = False,
) -> Scores:
    """The paper's path: eager attention with ``output_attentions=True``, the model's full forward.

    Materialises every layer's (B, heads, L, L) attention map, as the BYE
    reference code does, and computes every statistic naively (float64) from
    the last prompt token's row; the answer signals come from the model's own
    logits. For validation and benchmarking; same inputs and outputs as
    :func:`score` (under torch.distributed, ``gather`` as there).
    """
    if int(topk) < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    dist = rank_and_world_size()
    return _collect(
        lambda: _reference_local(
            _unwrapped(model), loader, image_token_id, device, progress, dist, bool(hidden_states), int(topk),
            bool(image_embeddings),
        ),
        dist,
        gather,
    )


def _reference_local(
    model: torch.nn.Module,
    loader: Iterable,
    image_token_id: int | None,
    device: str | torch.device | None,
    progress: bool,
    dist: tuple[int, int] | None,
    hidden: bool,
    topk: int,
    image_emb: bool = False,
) -> tuple[Scores, bool]:
    rows = _Rows()
    ids_given = True
    answers = _has_lm_head(model)
    if hidden and not answers:
        raise ValueError(f"hidden_states=True needs a model with an LM head; {type(model).__name__} has none")
    if image_emb:
        _check_image_embeddings(model)
    image_token_id = resolve_image_token_id(model, image_token_id)
    device, dtype = _check_device(model, device)
    max_len = _context_length(model)
    bar = _progress(loader, progress, "bye_fast.score_reference")
    with preserved_model_state(model), torch.inference_mode(), contextlib.closing(bar):
        model.set_attn_implementation("eager")  # as the paper's code: eager everywhere
        model.eval()
        for index, raw, inputs, ids, given in _loader_batches(loader, bar):
            _check_length(inputs, index, ids if given else None, max_len)
            batch = _prepare(raw, index, image_token_id, device, dtype)
            ids_given &= given
            out = model(
                **batch.inputs,
                output_attentions=True,
                output_hidden_states=hidden,
                use_cache=False,
                return_dict=True,
            )
            attentions = getattr(out, "attentions", None)
            if not attentions:
                raise NotImplementedError(
                    f"{type(model).__name__} returned no attentions with output_attentions=True"
                )
            stats = _stats_from_maps(attentions, batch.qpos, batch.image_mask & batch.key_valid, topk)
            if image_emb:
                pv = batch.inputs.get("pixel_values")
                feats = None if pv is None else _vision_features_reference(model, pv)
                stats["image_embedding"] = _row_means(feats, batch.image_mask, _vision_size(model))
            if answers:
                r = torch.arange(batch.size, device=batch.qpos.device)
                logits = out.logits[r, batch.qpos].double()
                conf, token = torch.softmax(logits, dim=-1).max(dim=-1)
                top2 = logits.topk(2, dim=-1).values
                stats.update(answer_token=token.cpu(), answer_confidence=conf.float().cpu(),
                             answer_margin=(top2[:, 0] - top2[:, 1]).float().cpu())  # fmt: skip
                if hidden:
                    stats["hidden"] = out.hidden_states[-1][r, batch.qpos].float().cpu()
            rows.add(_rows_of_stats(stats, batch), ids)
    meta = {"method": "bye_fast.score_reference", "model": type(model).__name__, "topk": topk}
    empty = _empty_shapes(model, answers=answers, hidden=hidden, image_emb=image_emb) if dist is not None else None
    return rows.scores(meta, empty=empty), ids_given
