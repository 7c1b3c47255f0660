"""For people: where the last prompt token looks in the image, recomputed for a few samples.

:func:`attention_maps` runs the fused scoring path on the samples of a loader
and returns, per sample, the head-mean attention of the last prompt token over
its image tokens in every decoder layer, renormalised over the image (the
distribution whose entropy :func:`bye_fast.score` reports). Meant for the few
samples a person reviews (its output is ``n x layers x image tokens``).

:func:`heat_maps` turns those maps into one heat map per sample over its
image-token grid (mean over chosen layers, NaN layers skipped), and
:func:`write_review` writes the review folder of ``bye-fast review``: an HTML
page and a PNG contact sheet of the most suspicious samples with their heat
maps and answers, and ``review.json``, so that a person can look before
deleting data.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bye_fast._io import atomic_folder, atomic_write, write_json_atomic
from bye_fast.detect import Detection
from bye_fast.hook import (
    BatchCollector,
    attention_stats_hook,
    collecting,
    text_config,
    unused_vision_layers_skipped,
)
from bye_fast.score import (
    _check_device,
    _decoder_inputs_model,
    _prepare,
    _unwrapped,
    _validated,
    resolve_image_token_id,
)

__all__ = [
    "REVIEW_FILES",
    "PROMPT_OPTIONS",
    "HeatMap",
    "Review",
    "attention_maps",
    "contact_sheet",
    "detection_layers",
    "heat_maps",
    "layer_mean",
    "question_and_answer",
    "token_grid",
    "write_review",
]


def attention_maps(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    image_token_id: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[list, list[np.ndarray]]:
    """The last prompt token's image attention per sample and layer.

    Parameters
    ----------
    model, loader, image_token_id, device : as for :func:`bye_fast.score`.

    Returns
    -------
    ids : list
        The samples' ids (the batches' ``"ids"``, else 0..n-1).
    maps : list of float32 arrays ``(layers, n_image_tokens)``
        Head-mean attention over the sample's image tokens, in token order, summing to 1 per
        layer (NaN for a layer that never reported).
    """
    model = _unwrapped(model)
    image_token_id = resolve_image_token_id(model, image_token_id)
    device, dtype = _check_device(model, device)
    n_layers = int(text_config(model).num_hidden_layers)
    inner = _decoder_inputs_model(model)
    ids_out: list = []
    maps: list[np.ndarray] = []
    with attention_stats_hook(model), unused_vision_layers_skipped(model), torch.inference_mode():
        for index, raw in enumerate(loader):
            inputs, ids, B = _validated(raw, index)
            ids = ids if ids is not None else list(range(len(ids_out), len(ids_out) + B))
            batch = _prepare(inputs, index, image_token_id, device, dtype)
            collector = BatchCollector(
                qpos=batch.qpos, image_mask=batch.image_mask, key_valid=batch.key_valid, n_layers=n_layers,
                stop_after_last_layer=True, backend="torch",
            )  # fmt: skip
            with collecting(collector):
                inner(**batch.inputs, use_cache=False)
            image = batch.image_mask.cpu()
            per_layer = [collector.image_attn.get(i) for i in range(n_layers)]
            for row in range(B):
                m = np.full((n_layers, int(image[row].sum())), np.nan, np.float32)
                for i, a in enumerate(per_layer):
                    if a is not None:
                        v = a[row].float().cpu()[image[row]]
                        m[i] = (v / v.sum()).numpy() if v.sum() > 0 else np.nan
                maps.append(m)
            ids_out.extend(ids)
    return ids_out, maps


# =========================================================================== the review sheet
#: The files :func:`write_review` writes in its folder.
REVIEW_FILES = ("index.html", "contact_sheet.png", "review.json")
_FORMAT = "bye_fast.review/1"
#: Side of a sample's picture (pixels) on the page and on the contact sheet.
TILE = 224
#: Height of a contact-sheet caption band (pixels) and the sheet's number of columns at most.
CAPTION, COLUMNS = 30, 6


@dataclass
class HeatMap:
    """The last prompt token's attention over one sample's image, for a person to look at.

    Attributes
    ----------
    values : (rows, cols) float array or None
        Mean over ``layers`` of the head-mean attention over the image tokens (each layer's
        distribution summing to 1 over all the sample's image tokens), on the image-token grid
        (the tokens in ``tokens``); None when no layer saw the image or no grid is known.
    layers : the layers averaged.
    skipped_layers : asked-for layers left out because their map is NaN (e.g. a sliding-window
        layer whose window does not reach the image).
    tokens : ``(start, stop)``: the sample's image tokens (in token order) that form the grid.
    n_image_tokens : all of the sample's image tokens.
    notes : what was left out and why, in words.
    """

    values: np.ndarray | None
    layers: list[int]
    skipped_layers: list[int]
    tokens: tuple[int, int]
    n_image_tokens: int
    notes: list[str] = field(default_factory=list)


def layer_mean(
    maps: np.ndarray, layers: Sequence[int]
) -> tuple[np.ndarray | None, list[int], list[int], list[str]]:
    """Mean of the rows ``layers`` of ``maps`` (layers x image tokens), leaving out NaN rows.

    Returns ``(mean or None, layers used, layers skipped, notes)``. When every asked-for layer is
    NaN, the mean falls back to every finite layer (with a note); None when no layer is finite.
    """
    maps = np.asarray(maps, dtype=np.float64)
    finite = np.isfinite(maps).all(axis=1) if maps.shape[1] else np.zeros(maps.shape[0], bool)
    used = [int(j) for j in layers if finite[j]]
    skipped = [int(j) for j in layers if not finite[j]]
    notes = []
    if skipped:
        notes.append(f"layer(s) {_ranges(skipped)} skipped: their attention does not reach the image "
                     "(NaN, e.g. a sliding window shorter than the prompt)")  # fmt: skip
    if not used:
        used = [int(j) for j in np.nonzero(finite)[0]]
        if not used:
            return None, [], skipped, [*notes, "no layer's attention reaches the image: no heat map"]
        notes.append(
            f"none of the chosen layers sees the image: averaged the layers that do ({_ranges(used)})"
        )
    return maps[used].mean(axis=0), used, skipped, notes


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out: list[str] = []
    for v in sorted(set(int(x) for x in values)):
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


def _vision_patch_side(model: torch.nn.Module) -> int | None:
    """Image tokens per side of one vision-tower image (``image_size / patch_size``), if the config says."""
    vc = getattr(model.config, "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if isinstance(size, int) and isinstance(patch, int) and patch > 0 and size % patch == 0:
        return size // patch
    return None


def _tile_tokens(model: torch.nn.Module) -> int | None:
    """Image tokens of one vision-tower image or tile, where the config says: Gemma 3's
    ``mm_tokens_per_image``, InternVL's pixel shuffle (``downsample_ratio``), Idefics3's ``scale_factor``."""
    cfg = model.config
    t = getattr(cfg, "mm_tokens_per_image", None)
    if isinstance(t, int) and t > 0:
        return t
    side = _vision_patch_side(model)
    ratio, scale = getattr(cfg, "downsample_ratio", None), getattr(cfg, "scale_factor", None)
    if side and isinstance(ratio, float) and 0 < ratio <= 1:
        return int(round(side * ratio)) ** 2
    if side and isinstance(scale, int) and scale > 0 and side % scale == 0:
        return (side // scale) ** 2
    return None


def _merge_pixels(model: torch.nn.Module) -> int | None:
    """Pixels per image-token side of a Pixtral-style vision tower (Mistral 3): patch x spatial merge."""
    merge = getattr(model.config, "spatial_merge_size", None)
    patch = getattr(getattr(model.config, "vision_config", None), "patch_size", None)
    return int(merge) * int(patch) if isinstance(merge, int) and isinstance(patch, int) else None


def token_grid(
    model: torch.nn.Module, batch: Mapping, row: int, n_tokens: int
) -> tuple[tuple[int, int] | None, tuple[int, int], str]:
    """Where a row's image tokens lie in the image: ``((rows, cols) or None, (start, stop), note)``.

    For one image per row:

    * Qwen2-VL / Qwen2.5-VL (``image_grid_thw``): ``(h, w) / spatial_merge_size``;
    * LLaVA-NeXT / OneVision (``image_grid_pinpoints``, a 5-D ``pixel_values``): the overview
      image's ``side x side`` tokens, the first in token order (the crops' tokens are not drawn);
    * Mistral 3 (``image_sizes``, ``spatial_merge_size``): ``(h, w) / (patch x merge)``;
    * tiled images (InternVL, Idefics3 / SmolVLM; also Gemma 3): the last tile's tokens (the
      whole image: InternVL's thumbnail, Idefics3's global image) when there are several;
    * otherwise a square number of tokens is a square grid (LLaVA-1.5);
    * anything else: no grid (None), said in the note.
    """
    B = len(batch["input_ids"])
    cfg = model.config
    thw = batch.get("image_grid_thw")
    if thw is not None and len(thw) == B:
        t, h, w = (int(v) for v in thw[row])
        merge = int(getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 2) or 1)
        if t == 1 and h % merge == 0 and w % merge == 0 and (h // merge) * (w // merge) == n_tokens:
            return (h // merge, w // merge), (0, n_tokens), ""
    pixels = batch.get("pixel_values")
    side = _vision_patch_side(model)
    if getattr(cfg, "image_grid_pinpoints", None) and isinstance(pixels, torch.Tensor) and pixels.dim() == 5:
        if side and n_tokens > side * side:
            return (side, side), (0, side * side), (
                f"heat map over the overview image's {side}x{side} tokens (the {n_tokens - side * side} tokens "
                "of the high-resolution crops are not drawn)"
            )  # fmt: skip
    sizes, m = batch.get("image_sizes"), _merge_pixels(model)
    if sizes is not None and m and len(sizes) == B:
        h, w = (int(v) for v in sizes[row])
        if (h // m) * (w // m) == n_tokens:
            return (h // m, w // m), (0, n_tokens), ""
    t = _tile_tokens(model)
    g = int(round(np.sqrt(t))) if t else 0
    if t and g * g == t and n_tokens > t and n_tokens % t == 0:
        return (g, g), (n_tokens - t, n_tokens), (
            f"heat map over the last of {n_tokens // t} tiles or images of {t} tokens (InternVL's thumbnail, "
            "Idefics3's global view: the whole image; or the row's last image); the others are not drawn"
        )  # fmt: skip
    g = int(round(np.sqrt(n_tokens)))
    if g > 0 and g * g == n_tokens:
        return (g, g), (0, n_tokens), ""
    return (
        None,
        (0, n_tokens),
        f"{n_tokens} image tokens do not form a grid this review knows: no heat map drawn",
    )


def _model_view(model: torch.nn.Module, processor: Any, batch: Mapping, row: int) -> np.ndarray | None:
    """The row's image as the vision tower saw it (resized, cropped), uint8 HxWx3, where the processor's
    ``pixel_values`` can be turned back into the pixels the drawn tokens cover (see :func:`token_grid`);
    else None (then the image file is shown)."""
    pixels = batch.get("pixel_values")
    ip = getattr(processor, "image_processor", None)
    B = len(batch["input_ids"])
    if not isinstance(pixels, torch.Tensor) or ip is None or pixels.shape[0] != B:
        return None
    x = pixels[row]
    if x.dim() == 4:  # several images per row: LLaVA-NeXT's overview first, Idefics3's global view last
        if getattr(model.config, "image_grid_pinpoints", None):
            x = x[0]
        elif batch.get("pixel_attention_mask") is not None:
            valid = batch["pixel_attention_mask"][row].flatten(1).any(dim=1).nonzero()
            if not len(valid):
                return None
            x = x[int(valid.max())]
        else:
            return None
    if x.dim() != 3 or x.shape[0] != 3:
        return None
    sizes = batch.get("image_sizes")
    if (
        sizes is not None and _merge_pixels(model) and len(sizes) == B
    ):  # Mistral 3: padded to the batch's largest
        h, w = (int(v) for v in sizes[row])
        x = x[:, :h, :w]
    x = x.detach().float().cpu().numpy()
    if getattr(ip, "do_normalize", False):
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        if mean is None or std is None:
            return None
        x = x * np.asarray(std, np.float32).reshape(-1, 1, 1) + np.asarray(mean, np.float32).reshape(-1, 1, 1)
    if getattr(ip, "do_rescale", False):
        x = x / float(getattr(ip, "rescale_factor", 1 / 255))
    return np.clip(np.rint(x.transpose(1, 2, 0)), 0, 255).astype(np.uint8)


def heat_maps(
    model: torch.nn.Module,
    batches: Sequence[Mapping],
    *,
    layers: Sequence[int] | None = None,
    image_token_id: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[list, list[HeatMap]]:
    """Heat maps of the samples of ``batches`` (see :class:`HeatMap`), from :func:`attention_maps`.

    ``layers``: the decoder layers to average (default: all); a layer whose map is NaN for a
    sample is skipped for that sample, with a note. Returns ``(ids, heat maps)`` in batch order.
    """
    model = _unwrapped(model)  # a peft model: the transformers model inside, adapters injected
    ids, maps = attention_maps(model, batches, image_token_id=image_token_id, device=device)
    n_layers = maps[0].shape[0] if maps else 0
    chosen = list(range(n_layers)) if layers is None else [int(j) for j in layers]
    bad = [j for j in chosen if not 0 <= j < n_layers]
    if bad:
        raise ValueError(
            f"layer(s) {bad} out of range: the model has {n_layers} decoder layers (0-{n_layers - 1})"
        )
    out: list[HeatMap] = []
    k = 0
    for batch in batches:
        for row in range(len(batch["input_ids"])):
            m = maps[k]
            k += 1
            n = m.shape[1]
            if n == 0:
                out.append(HeatMap(None, [], [], (0, 0), 0, ["no image tokens: nothing to draw"]))
                continue
            mean, used, skipped, notes = layer_mean(m, chosen)
            grid, (start, stop), note = token_grid(model, batch, row, n)
            notes += [note] if note else []
            values = None if mean is None or grid is None else mean[start:stop].reshape(grid)
            out.append(HeatMap(values, used, skipped, (start, stop), n, notes))
    return ids, out


# ----------------------------------------------------------------------- detection and records
def _detection(detection: Any) -> tuple[Detection, str | None]:
    """A Detection, or one read from a detection.json (or a folder holding one); and its path."""
    if isinstance(detection, Detection):
        return detection, None
    path = Path(detection)
    if path.is_dir():
        path = path / "detection.json"
    return Detection.from_json(path), str(path.resolve())


def _key(value: Any) -> str:
    """Ids compare by their text (``3`` and ``"3"`` are the same id, as in :mod:`bye_fast.data`)."""
    return str(value.item() if isinstance(value, np.generic) else value)


def _skipped_ids(meta: Mapping) -> set[str]:
    """Ids the scoring run skipped for an unreadable image (``meta["skipped"]``)."""
    value = (meta or {}).get("skipped")
    if isinstance(value, str) and value:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return set()
    if not isinstance(value, list):
        return set()
    return {_key(v["id"]) for v in value if isinstance(v, Mapping) and "id" in v}


def _preview(items: Sequence, k: int = 4) -> str:
    shown = ", ".join(repr(v) for v in list(items)[:k])
    return shown + (f", ... (+{len(items) - k} more)" if len(items) > k else "")


def _record_ids(records: Sequence[Mapping]) -> list:
    """The records' ids: their ``"id"`` fields, or their positions when none has one (as the loaders do)."""
    if any("id" in r for r in records):
        return [r.get("id") for r in records]
    return list(range(len(records)))


def _match_records(records: Sequence[Mapping], det: Detection, source: str) -> dict[str, int]:
    """Record position by id key; ``ValueError`` (one line) when the detection's ids are not the data's."""
    rids = _record_ids(records)
    where: dict[str, int] = {}
    for i, rid in enumerate(rids):
        where.setdefault(_key(rid), i)
    det_ids = [_key(v) for v in np.asarray(det.ids).tolist()]
    unknown = [v for v in det_ids if v not in where]
    if unknown:
        raise ValueError(
            f"{len(unknown)} of the detection's {len(det_ids)} id(s) are not in {source}: {_preview(unknown)} "
            "(was the detection made from these data?)"
        )
    scored = set(det_ids) | _skipped_ids(det.meta)
    missing = [rid for rid in rids if _key(rid) not in scored]
    if missing:
        raise ValueError(
            f"{len(missing)} id(s) of {source} are not in the detection: {_preview(missing)} "
            "(was the detection made from these data?)"
        )
    return where


#: make_loader options that decide the prompt (where this version of make_loader has them).
PROMPT_OPTIONS = ("chat_template", "system_prompt", "image_placement")


def _prompt_options(det: Detection, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The prompt options to build the reviewed prompts with: ``given``, else those the scores were made with
    (``meta["score_options"]`` of ``bye-fast score``), so that attention is recomputed on the scored prompt."""
    import inspect

    from bye_fast.data import make_loader

    accepted = set(inspect.signature(make_loader).parameters) & set(PROMPT_OPTIONS)
    if given is not None:
        unknown = sorted(set(given) - accepted)
        if unknown:
            raise ValueError(
                f"prompt option(s) {', '.join(unknown)} unknown to make_loader (it takes {sorted(accepted)})"
            )
        return dict(given)
    try:
        scored = json.loads((det.meta or {}).get("score_options") or "{}")
    except (TypeError, json.JSONDecodeError):
        scored = {}
    if not isinstance(scored, dict):
        return {}
    return {k: scored[k] for k in sorted(accepted) if scored.get(k) is not None}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI-style content parts
        return " ".join(
            p.get("text", "") for p in value if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return "" if value is None else str(value)


def question_and_answer(record: Mapping) -> tuple[str, str | None]:
    """The record's first human turn (without ``<image>``) and the answer that follows it (None: none)."""
    turns = record.get("conversations")
    role_key, text_key = "from", "value"
    if not isinstance(turns, list):
        turns, role_key, text_key = record.get("messages") or [], "role", "content"
    question, answer = None, None
    for turn in turns:
        if not isinstance(turn, Mapping):
            continue
        role = str(turn.get(role_key, "")).lower()
        if question is None and role in ("human", "user"):
            question = _text(turn.get(text_key)).replace("<image>", "").strip()
        elif question is not None and role in ("gpt", "assistant", "model"):
            answer = _text(turn.get(text_key)).strip()
            break
    return question or "", answer


# ------------------------------------------------------------------------------ layers
_LAYER = re.compile(r"\blayer (\d+)\b")


def detection_layers(det: Detection, n_layers: int) -> tuple[list[int], str]:
    """The layers a detection's decision rests on: ``(layers, where they come from)``.

    The layers of the features the method used (the paper's sensitive layers, the default's
    chosen features); when it used none, those of its three strongest features (evidence or
    separation); else every layer.
    """
    d = det.details or {}
    names = [] if d.get("feature_names") is None else list(d["feature_names"])

    def layers_of(indices) -> list[int]:
        found = set()
        for j in indices:
            if 0 <= int(j) < len(names):
                m = _LAYER.search(str(names[int(j)]))
                if m:
                    found.add(int(m.group(1)))
        return sorted(found)

    def listed(key: str, other: str) -> list:  # a list (from JSON) or a numpy array (in memory)
        value = d.get(key, d.get(other))
        return [] if value is None else np.asarray(value, dtype=object).ravel().tolist()

    layers = layers_of(listed("chosen", "sensitive"))
    source = "the layers of the features the detection used"
    if not layers:
        strength = np.asarray([np.nan if v is None else v for v in listed("evidence", "separation")], float)
        finite = strength[np.isfinite(strength)] if len(strength) == len(names) else strength[:0]
        if finite.size and finite.max() > finite.min():  # all equal: no feature stands out
            order = [
                j
                for j in np.argsort(-np.nan_to_num(strength, nan=-np.inf))
                if np.isfinite(strength[j]) and _LAYER.search(str(names[j]))
            ]
            layers = layers_of(order[:3])
            source = "the layers of the detection's three strongest features (it used none)"
    if not layers:
        return list(range(n_layers)), "all layers (the detection names no layer)"
    bad = [j for j in layers if j >= n_layers]
    if bad:
        raise ValueError(
            f"the detection names layer(s) {_ranges(bad)} but the model has {n_layers} decoder layers: "
            "is this the model that was scored?"
        )
    return layers, source


# ------------------------------------------------------------------------------ pictures
def _fit(image: Image.Image, side: int = TILE) -> Image.Image:
    """``image`` scaled to fit a ``side`` square (small images blown up pixel by pixel)."""
    w, h = image.size
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)


def heat_layer(values: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """RGBA picture of a heat map (``values`` over the token grid, scaled to its maximum), each token
    a block of ``size`` (width, height) / grid; brighter and more opaque where attention is higher."""
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    top = np.nanmax(v) if v.size and np.isfinite(v).any() else 0.0
    v = np.clip(np.nan_to_num(v / top if top > 0 else v * 0.0), 0.0, 1.0)
    rgba = colormaps["inferno"](v)
    rgba[..., 3] = 0.25 + 0.55 * v
    small = Image.fromarray(np.rint(rgba * 255).astype(np.uint8), "RGBA")
    return small.resize(size, Image.Resampling.NEAREST)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(image)).decode("ascii")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "\u2026" if len(text) > 2 else ""
    return text


def contact_sheet(
    tiles: Sequence[tuple[Image.Image | None, Sequence[str], bool]], columns: int = COLUMNS
) -> Image.Image:
    """A grid of ``TILE`` x ``TILE`` pictures with a caption band under each: ``(picture, two caption
    lines, flagged)`` per cell; flagged cells are framed in red."""
    from PIL import ImageDraw

    cols = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    cell_h = TILE + CAPTION
    sheet = Image.new("RGB", (cols * TILE, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for k, (picture, lines, flagged) in enumerate(tiles):
        x, y = (k % cols) * TILE, (k // cols) * cell_h
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=(40, 40, 40))
        if picture is not None:
            sheet.paste(
                picture.convert("RGB"), (x + (TILE - picture.width) // 2, y + (TILE - picture.height) // 2)
            )
        else:
            draw.text((x + 8, y + TILE // 2), "no image", fill="white", font=font)
        if flagged:
            draw.rectangle([x, y, x + TILE - 1, y + cell_h - 1], outline=(220, 30, 30), width=3)
        for i, line in enumerate(lines[:2]):
            draw.text(
                (x + 5, y + TILE + 2 + 13 * i),
                _fit_text(draw, line, font, TILE - 10),
                fill="black",
                font=font,
            )
    return sheet


# ----------------------------------------------------------------------------- the review
@dataclass
class Review:
    """What :func:`write_review` wrote: the folder, the samples shown (rank order) and the layers."""

    out_dir: Path
    samples: list[dict]
    heat: list[HeatMap]
    layers: list[int]
    layer_source: str
    notes: list[str]


def _fmt_score(x: float) -> str:
    return f"{x:.4g}" if np.isfinite(x) else "n/a"


def write_review(
    model: torch.nn.Module,
    processor: Any,
    records: str | os.PathLike | Sequence[Mapping],
    detection: Detection | str | os.PathLike,
    out_dir: str | os.PathLike,
    top_k: int = 24,
    *,
    images: str | os.PathLike | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    image_token_id: int | None = None,
    device: str | torch.device | None = None,
    prompt_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Review:
    """Write a review folder of the ``top_k`` most suspicious samples, for a person to look at.

    The folder (written as one unit: it appears complete or not at all) holds

    * ``index.html``: one self-contained page (pictures embedded as PNG data URIs): per sample,
      in suspicion order, its rank, id, suspicion score, whether it is flagged, the question and
      the record's answer, the prompt as scored, and the image (as the vision tower saw it when
      the processor's pixels can be turned back, else the file) under the heat map of the last
      prompt token's attention (hover to see the image alone);
    * ``contact_sheet.png``: the same pictures in a grid, captioned by rank, id, score;
    * ``review.json``: the ids, ranks, scores, flags, layers and notes shown.

    Parameters
    ----------
    model, processor : the model that was scored (with its adapter, if any) and its processor.
    records : the data that was scored (a dataset file or its records), matched by id.
    detection : a :class:`~bye_fast.detect.Detection`, a ``detection.json`` or its folder.
    out_dir : the folder to write; an existing one is replaced only with ``overwrite=True``.
    top_k : how many samples (the highest suspicion scores; samples without a score are never shown).
    images : the folder the records' image paths are relative to.
    layers : decoder layers to average (default: :func:`detection_layers`); a layer whose map is
        NaN for a sample (it cannot see the image) is skipped for that sample, with a note.
    batch_size, image_token_id, device : as for :func:`bye_fast.data.make_loader` / :func:`bye_fast.score`.
    prompt_options : :func:`~bye_fast.data.make_loader`'s prompt options (:data:`PROMPT_OPTIONS`, where it has
        them); default: those the scores were made with (the detection's ``meta["score_options"]``), so
        that attention is recomputed on the prompt that was scored.

    Attention is recomputed for the ``top_k`` samples only (:func:`attention_maps`).

    Raises
    ------
    ValueError : the detection's ids are not the data's (one line), a bad layer or ``top_k``.
    FileExistsError : ``out_dir`` exists and ``overwrite`` is False.
    """
    from bye_fast.data import load_records, make_loader

    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(errno.EEXIST, "exists; pass overwrite=True to replace it", str(out))
    det, det_path = _detection(detection)
    source = str(records) if isinstance(records, (str, os.PathLike)) else "the records"
    recs = load_records(records) if isinstance(records, (str, os.PathLike)) else list(records)
    where = _match_records(recs, det, source)
    n_layers = int(text_config(_unwrapped(model)).num_hidden_layers)
    if layers is None:
        chosen, layer_source = detection_layers(det, n_layers)
    else:
        chosen, layer_source = sorted({int(j) for j in layers}), "given"
        bad = [j for j in chosen if not 0 <= j < n_layers]
        if bad:
            raise ValueError(f"layer(s) {_ranges(bad)} out of range: the model has {n_layers} decoder layers")
    score = np.asarray(det.score, dtype=np.float64)
    rank = det.rank
    shown = [int(i) for i in np.argsort(rank, kind="stable") if np.isfinite(score[i])][: int(top_k)]
    notes = []
    if len(shown) < int(top_k):
        notes.append(f"{len(shown)} sample(s) have a suspicion score; top_k={int(top_k)} asked for")
    if not shown:
        raise ValueError(f"the detection gives no sample a suspicion score: nothing to review ({det.reason})")
    positions = not any("id" in r for r in recs)
    sub = [recs[where[_key(det.ids[i])]] for i in shown]
    if positions:  # records without ids: their positions are their ids (the loader would renumber them)
        sub = [{**r, "id": where[_key(det.ids[i])]} for r, i in zip(sub, shown, strict=True)]
    options = _prompt_options(det, prompt_options)
    loader = make_loader(sub, images, processor, batch_size=int(batch_size), **options)
    batches = list(loader)
    ids, heat = heat_maps(model, batches, layers=chosen, image_token_id=image_token_id, device=device)
    if [_key(v) for v in ids] != [_key(det.ids[i]) for i in shown]:  # a record skipped by the loader
        raise ValueError("the loader did not return the reviewed samples in order (a record was skipped?)")
    pictures, samples = [], []
    rows = [(batch, r) for batch in batches for r in range(len(batch["input_ids"]))]
    for k, (i, hm, (batch, r)) in enumerate(zip(shown, heat, rows, strict=True)):
        item = loader.dataset[k]
        view = _model_view(model, processor, batch, r)
        source_view = "as the vision tower saw it"
        if view is None and item["images"]:
            view, source_view = np.asarray(item["images"][0].convert("RGB")), "the image file"
        base = _fit(Image.fromarray(view)) if view is not None else None
        layer_img = heat_layer(hm.values, base.size) if base is not None and hm.values is not None else None
        question, answer = question_and_answer(sub[k])
        sample = {
            "rank": int(rank[i]), "id": det.ids[i].item() if isinstance(det.ids[i], np.generic) else det.ids[i],
            "score": float(score[i]), "flagged": bool(det.flagged[i]), "question": question, "answer": answer,
            "layers": hm.layers, "skipped_layers": hm.skipped_layers,
            "grid": list(hm.values.shape) if hm.values is not None else None,
            "n_image_tokens": hm.n_image_tokens,
            "drawn_share": float(hm.values.sum()) if hm.values is not None else None,  # of the attention
            "peak_share": float(hm.values.max()) if hm.values is not None else None,
            "picture": source_view if base is not None else None, "notes": hm.notes,
        }  # fmt: skip
        samples.append(sample)
        pictures.append((base, layer_img, item.get("prompt", "")))
    tiles = []
    for (base, layer_img, _), s in zip(pictures, samples, strict=True):
        shown_img = Image.alpha_composite(base.convert("RGBA"), layer_img) if layer_img is not None else base
        flag = " FLAGGED" if s["flagged"] else ""
        tiles.append(
            (shown_img, [f"#{s['rank']}  {s['id']}", f"score {_fmt_score(s['score'])}{flag}"], s["flagged"])
        )
    skipped = sorted({j for s in samples for j in s["skipped_layers"]})
    if skipped:
        notes.append(
            f"layer(s) {_ranges(skipped)} skipped for some samples: their attention does not reach the image"
        )
    summary = {
        "format": _FORMAT,
        "detection": det_path,
        "data": str(Path(records).resolve()) if isinstance(records, (str, os.PathLike)) else None,
        "method": det.method,
        "reason": det.reason,
        "n_samples": len(det.ids),
        "n_flagged": det.n_flagged,
        "top_k": int(top_k),
        "layers": chosen,
        "layer_source": layer_source,
        "prompt_options": options,
        "heat_map": "mean over the layers of the last prompt token's head-mean attention over the image tokens "
        "(each layer's distribution over the image), on the image-token grid, scaled to its maximum per image",
        "notes": notes,
        "samples": samples,
    }
    with atomic_folder(out) as tmp:
        write_json_atomic(tmp / "review.json", _jsonable(summary), allow_nan=False)
        with atomic_write(tmp / "contact_sheet.png", "wb", suffix=".png") as f:
            f.write(_png(contact_sheet(tiles)))
        with atomic_write(tmp / "index.html") as f:
            f.write(_html(summary, pictures))
    return Review(out, samples, heat, chosen, layer_source, notes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.3em}.meta{color:#555;font-size:.9em}
.sample{display:flex;gap:1.2em;border-top:1px solid #ccc;padding:1em 0}
.pic{position:relative;width:224px;height:224px;flex:none;background:#282828}
.pic img{position:absolute;left:0;top:0;right:0;bottom:0;margin:auto;image-rendering:pixelated}
.pic:hover img.heat{opacity:0}
.flagged{color:#fff;background:#c81e1e;padding:0 .4em;border-radius:3px}
.kept{color:#fff;background:#2a7a2a;padding:0 .4em;border-radius:3px}
.text{flex:1;min-width:0}.text p{margin:.3em 0}.note{color:#8a5a00;font-size:.85em}
pre{white-space:pre-wrap;font-size:.8em;background:#f4f4f4;padding:.4em}
"""


def _html(summary: dict, pictures: Sequence[tuple[Image.Image | None, Image.Image | None, str]]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>bye-fast review</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>bye-fast review: the {len(summary['samples'])} most suspicious samples</h1>",
        f'<p class="meta">method <b>{esc(str(summary["method"]))}</b>: {summary["n_flagged"]} of '
        f"{summary['n_samples']} samples flagged. {esc(str(summary['reason']))}</p>",
        f'<p class="meta">Heat map: {esc(summary["heat_map"])}; layers {esc(_ranges(summary["layers"]))} '
        f"({esc(summary['layer_source'])}). Hover over a picture to see the image alone. Look before deleting data: "
        "a flag is a statistical decision, not proof.</p>",
    ]
    for note in summary["notes"]:
        parts.append(f'<p class="note">{esc(note)}</p>')
    for s, (base, layer_img, prompt) in zip(summary["samples"], pictures, strict=True):
        badge = (
            '<span class="flagged">flagged</span>'
            if s["flagged"]
            else '<span class="kept">not flagged</span>'
        )
        pic = '<div class="pic">'
        if base is not None:
            pic += f'<img alt="image of {esc(str(s["id"]))}" src="{_data_uri(base)}">'
            if layer_img is not None:
                pic += f'<img class="heat" alt="attention heat map" src="{_data_uri(layer_img)}">'
        pic += "</div>"
        answer = esc(s["answer"]) if s["answer"] is not None else "<i>(no answer in the record)</i>"
        notes = "".join(f'<p class="note">{esc(n)}</p>' for n in s["notes"])
        layers = f"layers {_ranges(s['layers'])}" if s["layers"] else "no layer"
        if s["peak_share"] is not None:
            layers += f"; the brightest token holds {s['peak_share']:.1%} of the attention"
        parts.append(
            f'<div class="sample" id="rank-{s["rank"]}">{pic}<div class="text">'
            f"<p><b>#{s['rank']}</b> &nbsp; id <code>{esc(str(s['id']))}</code> &nbsp; suspicion "
            f"<b>{_fmt_score(s['score']) if s['score'] is not None else 'n/a'}</b> &nbsp; {badge}</p>"
            f"<p><b>Question:</b> {esc(s['question'])}</p><p><b>Answer:</b> {answer}</p>"
            f'<p class="meta">{esc(layers)}; {s["n_image_tokens"]} image tokens; picture: {esc(str(s["picture"]))}</p>'
            f"{notes}<details><summary>prompt as scored</summary><pre>{esc(prompt)}</pre></details>"
            "</div></div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
