"""For people: where the last prompt token looks in the image, recomputed for a few samples.

:func:`attention_maps` runs the fused scoring path on the samples of a loader
and returns, per sample, the head-mean attention of the last prompt token over
its image tokens in every decoder layer, renormalised over the image (the
distribution whose entropy :func:`bye_fast.score` reports). Meant for the few
samples a person reviews (its output is ``n x layers x image tokens``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

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

__all__ = ["attention_maps"]


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
