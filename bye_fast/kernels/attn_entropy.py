"""Image-attention statistics of one query row per sample, without attention maps.

Given, for every sample ``b``, the query vector of its last prompt token and
the keys of the sequence, compute per head ``h``:

* ``lse[b, h]``          log-sum-exp of the scaled scores over the attended keys;
* ``head_entropy[b, h]`` entropy of the head's attention renormalised over the
  image keys, ``-sum_t p_t log p_t`` (natural log);
* ``image_mass[b, h]``   share of the head's attention on image keys;

and per sample the head-summed attention over the image keys,
``image_attn[b, t] = sum_h softmax_h[t]`` (0 at non-image keys), from which
:func:`head_mean_entropy` gives the paper's statistic.

Three implementations of the same maths live here:

* :func:`attn_image_stats_triton`: the fused Triton kernel (CUDA; also runs
  under ``TRITON_INTERPRET=1`` on CPU for tests);
* :func:`attn_image_stats_torch`: the same maths in torch (any device), the
  fallback off CUDA;
* :func:`attn_image_stats_reference`: naive float64 (repeat keys, full
  softmax), the obviously-correct twin the tests compare against.

:func:`attn_image_stats` dispatches between the first two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "AttnImageStats",
    "attn_image_stats",
    "attn_image_stats_reference",
    "attn_image_stats_torch",
    "head_mean_entropy",
]

#: The epsilon of the paper's reference code: ``-sum p * log(p + 1e-8)``.
PAPER_EPS = 1e-8


class AttnImageStats(NamedTuple):
    lse: torch.Tensor  # (B, H) float32
    head_entropy: torch.Tensor  # (B, H) float32, NaN where a row has no image key
    image_mass: torch.Tensor  # (B, H) float32
    image_attn: torch.Tensor  # (B, N) float32, head-summed softmax at image keys, 0 elsewhere


def _check_inputs(q, k, qpos, key_valid, image_mask) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be (B, H, Lq, D) and k (B, Hkv, N, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, _, D = q.shape
    Bk, Hkv, N, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if H % Hkv != 0:
        raise ValueError(f"number of query heads ({H}) must be a multiple of key heads ({Hkv})")
    if qpos.shape != (B,):
        raise ValueError(f"qpos must be ({B},); got {tuple(qpos.shape)}")
    for name, m in (("key_valid", key_valid), ("image_mask", image_mask)):
        if m.shape != (B, N) or m.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor of shape ({B}, {N}); got {m.dtype} {tuple(m.shape)}")
    return B, H, Hkv, N, D


def head_mean_entropy(image_attn: torch.Tensor, eps: float = PAPER_EPS) -> torch.Tensor:
    """The paper's statistic from head-summed image attention ``(..., N)``.

    ``p = a / sum(a)`` (the head mean renormalised over image keys; the 1/H
    cancels), ``H = -sum p * log(p + eps)``. Rows whose ``a`` sums to 0 (no image
    key) give NaN. Works on any leading shape, in float32 or float64.
    """
    a = image_attn.float() if image_attn.dtype not in (torch.float32, torch.float64) else image_attn
    total = a.sum(dim=-1, keepdim=True)
    p = a / total
    h = -(p * torch.log(p + eps)).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, h, torch.full_like(h, float("nan")))


def attn_image_stats_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    qpos: torch.Tensor,
    key_valid: torch.Tensor,
    image_mask: torch.Tensor,
    scaling: float,
) -> AttnImageStats:
    """Naive float64 twin: repeat keys per head, full softmax, mask, reduce."""
    B, H, Hkv, N, D = _check_inputs(q, k, qpos, key_valid, image_mask)
    qd = q.double()[torch.arange(B), :, qpos.long()]  # (B, H, D)
    kd = k.double().repeat_interleave(H // Hkv, dim=1)  # (B, H, N, D)
    s = torch.einsum("bhd,bhnd->bhn", qd, kd) * scaling
    s = s.masked_fill(~key_valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.softmax(s, dim=-1)  # (B, H, N)
    img = image_mask[:, None, :].expand(B, H, N)
    img_probs = probs * img
    mass = img_probs.sum(-1)
    p = img_probs / mass[..., None]
    ent = -torch.special.xlogy(p, p).sum(-1)
    ent = torch.where(mass > 0, ent, torch.full_like(ent, float("nan")))
    return AttnImageStats(lse, ent, mass, img_probs.sum(1))


def attn_image_stats_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    qpos: torch.Tensor,
    key_valid: torch.Tensor,
    image_mask: torch.Tensor,
    scaling: float,
) -> AttnImageStats:
    """Same maths as the Triton kernel, in torch (fp32 accumulation, GQA without a key copy).

    Materialises only the (B, H, N) scores of the one query row, never an
    (N x N) map.
    """
    B, H, Hkv, N, D = _check_inputs(q, k, qpos, key_valid, image_mask)
    G = H // Hkv
    rows = q[torch.arange(B, device=q.device), :, qpos.long()]  # (B, H, D)
    rows = rows.reshape(B, Hkv, G, D).float()
    s = torch.matmul(rows, k.float().transpose(-1, -2)).reshape(B, H, N) * scaling  # (B, H, N)
    s = s.masked_fill(~key_valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H)
    img = (image_mask & key_valid)[:, None, :]
    s_img = s.masked_fill(~img, float("-inf"))
    lse_img = torch.logsumexp(s_img, dim=-1)  # (B, H), -inf without image keys
    has_img = torch.isfinite(lse_img)
    p = torch.exp(s_img - lse_img[..., None])  # renormalised over image keys
    # -sum p log p = lse_img - sum p s  (p log p := 0 where p == 0)
    ps = torch.where(img, p * s_img.masked_fill(~img, 0.0), 0.0).sum(-1)
    ent = torch.where(has_img, lse_img - ps, torch.full_like(lse_img, float("nan")))
    mass = torch.where(has_img, torch.exp(lse_img - lse), torch.zeros_like(lse))
    image_attn = torch.where(img, torch.exp(s - lse[..., None]), 0.0).sum(1)  # (B, N)
    return AttnImageStats(lse, ent, mass, image_attn)


def attn_image_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    qpos: torch.Tensor,
    key_valid: torch.Tensor,
    image_mask: torch.Tensor,
    scaling: float,
    *,
    backend: str = "auto",
) -> AttnImageStats:
    """Statistics of query row ``q[b, :, qpos[b]]`` against keys ``k[b]``.

    Parameters
    ----------
    q : (B, H, Lq, D) queries (any strides; RoPE already applied).
    k : (B, Hkv, N, D) keys, NOT repeated for grouped-query attention:
        query head ``h`` uses key head ``h // (H // Hkv)``.
    qpos : (B,) integer index of the query row in ``q``'s ``Lq`` dimension.
    key_valid : (B, N) bool, True where the query row attends the key
        (padding and causality folded in).
    image_mask : (B, N) bool, True at image-token keys.
    scaling : the softmax scale (usually ``D ** -0.5``).
    backend : "auto" (Triton on CUDA when available, else torch), "triton" or "torch".
    """
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_available() else "torch"
    if backend == "torch":
        return attn_image_stats_torch(q, k, qpos, key_valid, image_mask, scaling)
    if backend == "triton":
        return attn_image_stats_triton(q, k, qpos, key_valid, image_mask, scaling)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch'; got {backend!r}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attn_image_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    qpos: torch.Tensor,
    key_valid: torch.Tensor,
    image_mask: torch.Tensor,
    scaling: float,
) -> AttnImageStats:
    """Fused Triton kernel (placeholder until the kernel lands: torch maths)."""
    return attn_image_stats_torch(q, k, qpos, key_valid, image_mask, scaling)
