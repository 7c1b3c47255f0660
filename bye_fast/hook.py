"""The model hook: a transformers attention function that also measures.

:func:`attention_stats_hook` is a context manager that routes the TEXT
decoder's attention of a HuggingFace model through :func:`_bye_attention`.
That function returns exactly what transformers' SDPA attention returns and,
beside it, hands the query row of each sample's last prompt token to the
statistics kernel (:mod:`bye_fast.kernels.attn_entropy`). No attention map is
materialised.

How the plug-in works (see ``transformers-attention.md``):

* the function is registered in ``AttentionInterface`` AND the SDPA mask
  builder in ``AttentionMaskInterface`` under the same name, otherwise the
  function always receives ``attention_mask=None`` and padding is lost;
* the mask is ``None`` when nothing is padded, else a bool (B, 1, Lq, Lk) tensor
  with True = attend; we take the query row of it, which folds in padding,
  causality and any sliding window;
* keys arrive unrepeated for grouped-query attention (the kernel handles it);
* vision-tower attention modules have no ``layer_idx`` and pass straight through.

The active collector is held in a :class:`contextvars.ContextVar`, so two
threads scoring two models do not see each other's state.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bye_fast.kernels.attn_entropy import attn_image_stats, head_mean_entropy, topk_share

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BatchCollector",
    "attention_stats_hook",
    "collecting",
    "decoder_layers",
    "last_layer_mlp_on_query_rows",
    "preserved_model_state",
    "register",
    "set_text_attn_implementation",
    "text_config",
    "unused_vision_layers_skipped",
]

#: The name under which bye_fast's attention function is registered in transformers.
ATTN_IMPLEMENTATION = "bye_fast_sdpa"

_ACTIVE: contextvars.ContextVar[BatchCollector | None] = contextvars.ContextVar(
    "bye_fast_collector", default=None
)


class _StopForward(Exception):
    """Raised after the last decoder layer's statistics: the rest of the forward is unused."""


@dataclass
class BatchCollector:
    """Per-batch state shared by all decoder layers of one forward pass.

    Parameters
    ----------
    qpos : (B,) index of each row's query token (its last attended position).
    image_mask : (B, N) bool, True at image tokens.
    key_valid : (B, N) bool, keys the query row may attend (padding + causality);
        used when a layer receives ``attention_mask=None``.
    n_layers : number of decoder layers.
    stop_after_last_layer : raise :class:`_StopForward` once layer ``n_layers-1`` is done.
    backend : kernel backend ("auto", "triton", "torch").
    topk : k of ``image_topk_share``.
    model_name : the model's class name, for error messages.
    """

    qpos: torch.Tensor
    image_mask: torch.Tensor
    key_valid: torch.Tensor
    n_layers: int
    stop_after_last_layer: bool = False
    backend: str = "auto"
    topk: int = 4
    model_name: str = "the model"
    head_entropy: dict[int, torch.Tensor] = field(default_factory=dict)
    image_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    before_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    image_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    sees_image: dict[int, torch.Tensor] = field(default_factory=dict)
    _row_masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def key_valid_for(self, attention_mask: torch.Tensor | None, n_keys: int) -> torch.Tensor:
        if n_keys != self.key_valid.shape[1]:
            raise RuntimeError(
                f"bye_fast scores a single prefill pass: got {n_keys} keys for {self.key_valid.shape[1]} "
                "input tokens (is a KV cache or a prompt-compression step active?)"
            )
        if attention_mask is None:
            return self.key_valid
        cached = self._row_masks.get(id(attention_mask))
        if cached is not None and cached[0] is attention_mask:
            return cached[1]
        B = self.qpos.shape[0]
        rows = attention_mask[torch.arange(B, device=attention_mask.device), 0, self.qpos]  # (B, N)
        if rows.dtype != torch.bool:  # additive float mask (0 = attend)
            rows = rows > torch.finfo(rows.dtype).min / 2
        rows = rows.to(self.key_valid.device)
        self._row_masks[id(attention_mask)] = (attention_mask, rows)
        return rows

    def add(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling) -> None:
        if layer_idx in self.head_entropy:
            raise RuntimeError(f"decoder layer {layer_idx} attended twice in one forward pass")
        n_keys = key.shape[2]
        if query.shape[2] != n_keys:
            raise RuntimeError(
                f"bye_fast expects one prefill pass (queries = keys); layer {layer_idx} got "
                f"{query.shape[2]} queries for {n_keys} keys"
            )
        key_valid = self.key_valid_for(attention_mask, n_keys)
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        home, here = self.qpos.device, query.device  # differ when a device map spreads the layers
        qpos, key_valid, image_mask = (t.to(here) for t in (self.qpos, key_valid, self.image_mask))
        stats = attn_image_stats(query, key, qpos, key_valid, image_mask, scale, backend=self.backend)
        self.head_entropy[layer_idx] = stats.head_entropy.to(home)
        self.image_mass[layer_idx] = stats.image_mass.to(home)
        self.before_mass[layer_idx] = stats.before_mass.to(home)
        self.image_attn[layer_idx] = stats.image_attn.to(home)
        # a sliding-window layer whose window ends before the image: nothing of the image to measure
        self.sees_image[layer_idx] = (key_valid & image_mask).any(dim=1).to(home)

    def finish(self) -> dict[str, torch.Tensor]:
        """The layers stacked, float32 on CPU: ``entropy``, ``image_mass``, ``image_topk_share`` (B, L);
        ``head_entropy``, ``head_image_share``, ``head_before_share`` (B, L, H).

        Layers that never reported (a non-attention layer, say) are NaN, and so is every statistic of a
        sample in a layer whose query row cannot see any of its image tokens (a sliding window that
        ends after the image): its ``head_before_share`` would otherwise read 1 and its image shares 0.
        """
        if not self.head_entropy:
            raise NotImplementedError(
                f"{self.model_name}: no decoder layer called the attention interface: its text attention does "
                "not go through transformers' AttentionInterface (or its attention modules have no layer_idx), "
                "so the fused path cannot see it. "
                "Use bye_fast.score_reference(model, loader) (eager attention, output_attentions=True)."
            )
        ref = next(iter(self.head_entropy.values()))
        B, H = ref.shape
        layers = range(self.n_layers)
        nan_bh = torch.full((B, H), float("nan"), device=ref.device)

        def per_head(d: dict[int, torch.Tensor]) -> torch.Tensor:
            return torch.stack([d.get(i, nan_bh) for i in layers], dim=1)

        share = per_head(self.image_mass)
        out = {
            "entropy": torch.full((B, self.n_layers), float("nan"), device=ref.device),
            "head_entropy": per_head(self.head_entropy),
            "image_mass": share.mean(-1),
            "head_image_share": share,
            "head_before_share": per_head(self.before_mass),
            "image_topk_share": torch.full((B, self.n_layers), float("nan"), device=ref.device),
        }
        present = [i for i in layers if i in self.image_attn]
        if present:
            stacked = torch.stack([self.image_attn[i] for i in present], dim=1)  # (B, Lp, N)
            out["entropy"][:, present] = head_mean_entropy(stacked)
            out["image_topk_share"][:, present] = topk_share(stacked, self.topk)
            blind = torch.zeros(B, self.n_layers, dtype=torch.bool, device=ref.device)
            blind[:, present] = ~torch.stack([self.sees_image[i].to(ref.device) for i in present], dim=1)
            for value in out.values():
                value[blind] = float("nan")
        return {k: v.float().cpu() for k, v in out.items()}


def _bye_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA attention plus, for text decoder layers, the query row's image-attention statistics."""
    out = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    collector = _ACTIVE.get()
    layer_idx = getattr(module, "layer_idx", None)
    if collector is not None and layer_idx is not None:
        collector.add(int(layer_idx), query, key, attention_mask, scaling)
        if collector.stop_after_last_layer and int(layer_idx) == collector.n_layers - 1:
            raise _StopForward
    return out


def register() -> None:
    """Register the attention function and its mask builder with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _bye_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _all_configs(config) -> Iterator:
    seen: set[int] = set()
    stack = [config]
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        yield c
        for key in getattr(c, "sub_configs", {}) or {}:
            stack.append(getattr(c, key, None))


def text_config(model: torch.nn.Module) -> PretrainedConfig:
    """The text decoder's config of a multimodal (or plain) model."""
    cfg = model.config
    try:
        return cfg.get_text_config(decoder=True)
    except (AttributeError, TypeError):
        return getattr(cfg, "text_config", cfg)


@contextlib.contextmanager
def preserved_model_state(model: torch.nn.Module) -> Iterator[None]:
    """Restore every config's attention implementation and the training mode on exit."""
    saved = [(c, c.__dict__.get("_attn_implementation_internal")) for c in _all_configs(model.config)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for c, impl in saved:
            c.__dict__["_attn_implementation_internal"] = impl
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def attention_stats_hook(model: torch.nn.Module) -> Iterator[None]:
    """Route the text decoder's attention through bye_fast for the duration of the block.

    The vision tower keeps its own implementation. The model's attention
    settings and training mode are restored on exit, even on error.
    """
    register()
    text_cfg = text_config(model)
    with preserved_model_state(model):
        set_text_attn_implementation(model, text_cfg, ATTN_IMPLEMENTATION)
        if text_cfg._attn_implementation != ATTN_IMPLEMENTATION:  # transformers only warns, and skips it
            raise NotImplementedError(
                f"{type(model).__name__}: its text decoder does not accept an attention implementation from "
                "transformers' AttentionInterface (its attention does not follow the functional approach), so "
                "the fused path cannot see it. Use bye_fast.score_reference(model, loader)."
            )
        model.eval()
        yield


def set_text_attn_implementation(model: torch.nn.Module, text_cfg: PretrainedConfig, name: str) -> None:
    """Set ``name`` on the text config only (other sub-configs keep theirs)."""
    if text_cfg is model.config:
        model.set_attn_implementation(name)
        return
    mapping = {}
    for key in model.config.sub_configs:
        sub = getattr(model.config, key, None)
        if sub is None:
            continue
        mapping[key] = name if sub is text_cfg else (sub._attn_implementation or "sdpa")
    if text_cfg not in [getattr(model.config, k, None) for k in model.config.sub_configs]:
        raise NotImplementedError(
            f"cannot locate the text decoder config of {type(model).__name__}; use bye_fast.score_reference"
        )
    model.set_attn_implementation(mapping)


@contextlib.contextmanager
def collecting(collector: BatchCollector) -> Iterator[BatchCollector]:
    """Make ``collector`` the active one in this context."""
    token = _ACTIVE.set(collector)
    try:
        yield collector
    except _StopForward:
        pass
    finally:
        _ACTIVE.reset(token)


def decoder_layers(model: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList | None:
    """The text decoder's list of layers: the ``ModuleList`` whose last layer's ``self_attn.layer_idx``
    is ``n_layers - 1`` (vision layers have no ``layer_idx``), or None."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and n_layers:
            attn = getattr(module[-1], "self_attn", None)
            if getattr(attn, "layer_idx", None) == n_layers - 1:
                return module
    return None


def _mlp_rows_pre_hook(module, args):
    collector = _ACTIVE.get()
    if collector is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
        return None
    x = args[0]
    collector._mlp_shape = tuple(x.shape)
    rows = torch.arange(x.shape[0], device=x.device)
    return (x[rows, collector.qpos.to(x.device)][:, None, :], *args[1:])


def _mlp_rows_hook(module, args, output):
    collector = _ACTIVE.get()
    shape = None if collector is None else collector.__dict__.pop("_mlp_shape", None)
    if shape is None or not isinstance(output, torch.Tensor):
        return None
    full = output.new_zeros(shape[:2] + output.shape[2:])
    rows = torch.arange(shape[0], device=output.device)
    full[rows, collector.qpos.to(output.device)] = output[:, 0]
    return full


@contextlib.contextmanager
def last_layer_mlp_on_query_rows(model: torch.nn.Module, n_layers: int) -> Iterator[bool]:
    """Run the last decoder layer's MLP on each sample's query row only, while a collector is active.

    The MLP is token-wise, and after the last layer only the query row's hidden
    state is read (for the answer signals), so the other rows of its output are
    left 0. Applies to decoder layers with an ``mlp`` (or ``feed_forward``)
    module whose forward takes the hidden states as its first argument and
    returns a tensor; otherwise the MLP runs on every row (same results, more
    work). Yields whether the hooks are in place; they are removed on exit.
    """
    layers = decoder_layers(model, n_layers)
    last = layers[-1] if layers is not None else None
    mlp = getattr(last, "mlp", None) or getattr(last, "feed_forward", None)
    if not isinstance(mlp, torch.nn.Module):
        yield False
        return
    handles = [mlp.register_forward_pre_hook(_mlp_rows_pre_hook), mlp.register_forward_hook(_mlp_rows_hook)]
    try:
        yield True
    finally:
        for h in handles:
            h.remove()


#: Models whose projector reads ``hidden_states[config.vision_feature_layer]`` of a CLIP/SigLIP-style
#: vision tower; checked (tests/test_batching.py::test_skipping_unused_vision_layers_changes_nothing) to give identical scores with the unused layers skipped.
_FEATURE_LAYER_MODELS = ("LlavaModel", "LlavaNextModel")


def _vision_encoder_layers(inner: torch.nn.Module) -> torch.nn.ModuleList | None:
    tower = getattr(inner, "vision_tower", None)
    for path in ("vision_model.encoder.layers", "encoder.layers"):
        obj = tower
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    return None


def _identity_layer(hidden_states, *args, **kwargs):
    return hidden_states


def _returns_tensor(layer: torch.nn.Module) -> bool:
    """Whether the layer's forward is annotated to return a bare tensor (older CLIP layers return tuples)."""
    ann = inspect.signature(type(layer).forward).return_annotation
    if isinstance(ann, str):
        return ann.replace(" ", "") in {"torch.Tensor", "torch.FloatTensor", "Tensor", "FloatTensor"}
    return isinstance(ann, type) and issubclass(ann, torch.Tensor)


@contextlib.contextmanager
def unused_vision_layers_skipped(model: torch.nn.Module) -> Iterator[int]:
    """Make the vision-tower layers after the one the projector reads pass their input through.

    LLaVA-style models project ``hidden_states[vision_feature_layer]`` of the
    vision tower (LLaVA-1.5: ``-2``, the output of the second-to-last layer);
    the layers after it only feed the tower's unused final output. For the
    duration of the block their ``forward`` is replaced by the identity (the
    modules, their weights and transformers' output-capturing hooks stay in
    place); the original ``forward`` is restored on exit, even on error.

    Applies to LLaVA and LLaVA-NeXT with a single int ``vision_feature_layer``
    and a CLIP/SigLIP-style encoder whose layers return a bare tensor; a no-op
    otherwise.

    Yields
    ------
    int
        The number of vision layers skipped (0 when nothing applies).
    """
    inner = getattr(model, "model", model)
    feature_layer = getattr(model.config, "vision_feature_layer", None)
    layers = _vision_encoder_layers(inner)
    vision_cfg = getattr(model.config, "vision_config", None)
    applies = (
        type(inner).__name__ in _FEATURE_LAYER_MODELS
        and isinstance(feature_layer, int)
        and not isinstance(feature_layer, bool)
        and layers is not None
        and len(layers) == getattr(vision_cfg, "num_hidden_layers", -1)
        and all(_returns_tensor(m) for m in layers)  # the identity must return what the layer returns
    )
    n = len(layers) if layers is not None else 0
    if not applies or not -(n + 1) <= feature_layer <= n:
        yield 0
        return
    keep = feature_layer % (n + 1)  # hidden_states[k] is the output of the first k layers
    skipped = [layers[i] for i in range(keep, n)]
    saved = [(m, m.__dict__.get("forward")) for m in skipped]
    try:
        for m in skipped:
            m.forward = _identity_layer
        yield len(skipped)
    finally:
        for m, forward in saved:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
