"""Image-attention statistics of one query row per sample, without attention maps.

Given, for every sample ``b``, the query vector of its last prompt token and
the keys of the sequence, compute per head ``h``:

* ``lse[b, h]``          log-sum-exp of the scaled scores over the attended keys;
* ``head_entropy[b, h]`` entropy of the head's attention renormalised over the
  image keys, ``-sum_t p_t log p_t`` (natural log);
* ``image_mass[b, h]``   share of the head's attention on image keys;
* ``before_mass[b, h]``  share of the head's attention on the (text) keys before the
  first image key (the rest, ``1 - image_mass - before_mass``, is text after or
  between images, the query token included);

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

try:  # Triton is optional: the module (torch paths) must import without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = [
    "AttnImageStats",
    "attn_image_stats",
    "attn_image_stats_reference",
    "attn_image_stats_torch",
    "attn_image_stats_triton",
    "first_image_position",
    "head_mean_entropy",
    "topk_share",
]

#: The epsilon of the paper's reference code: ``-sum p * log(p + 1e-8)``.
PAPER_EPS = 1e-8


class AttnImageStats(NamedTuple):
    lse: torch.Tensor  # (B, H) float32
    head_entropy: torch.Tensor  # (B, H) float32, NaN where a row has no image key
    image_mass: torch.Tensor  # (B, H) float32
    image_attn: torch.Tensor  # (B, N) float32, head-summed softmax at image keys, 0 elsewhere
    before_mass: torch.Tensor  # (B, H) float32, share on attended keys before the first image key


def first_image_position(image_mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 index of each row's first image key; ``N`` for a row without one."""
    B, N = image_mask.shape
    pos = torch.arange(N, device=image_mask.device).expand(B, N)
    return torch.where(image_mask, pos, N).amin(dim=1) if N else torch.zeros(B, dtype=torch.long)


def _check_inputs(q, k, qpos, key_valid, image_mask) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q must be (B, H, Lq, D) and k (B, Hkv, N, D); got {tuple(q.shape)}, {tuple(k.shape)}"
        )
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
            raise ValueError(
                f"{name} must be a bool tensor of shape ({B}, {N}); got {m.dtype} {tuple(m.shape)}"
            )
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


def topk_share(image_attn: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the image attention ``(..., N)`` (0 at non-image keys) held by its ``k`` largest entries.

    Rows whose attention sums to 0 (no image key) give NaN; with fewer than ``k``
    image keys the share is 1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    a = image_attn.float() if image_attn.dtype not in (torch.float32, torch.float64) else image_attn
    total = a.sum(dim=-1)
    top = a.topk(min(k, a.shape[-1]), dim=-1).values.sum(dim=-1)
    return torch.where(total > 0, top / total, torch.full_like(total, float("nan")))


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
    before = torch.arange(N)[None, :] < first_image_position(image_mask & key_valid)[:, None]  # (B, N)
    before_mass = (probs * before[:, None, :]).sum(-1)
    return AttnImageStats(lse, ent, mass, img_probs.sum(1), before_mass)


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
    log_p = (s_img - lse_img[..., None]).masked_fill(~img, 0.0)  # log of the image-renormalised probs
    # -sum p log p, with log p formed before the sum (no cancellation between two large numbers)
    ent = -torch.where(img, torch.exp(log_p) * log_p, 0.0).sum(-1)
    ent = torch.where(has_img, ent, torch.full_like(lse_img, float("nan")))
    mass = torch.where(has_img, torch.exp(lse_img - lse), torch.zeros_like(lse))
    image_attn = torch.where(img, torch.exp(s - lse[..., None]), 0.0).sum(1)  # (B, N)
    ar = torch.arange(N, device=s.device)
    before = (ar[None, :] < first_image_position(image_mask & key_valid)[:, None]) & key_valid  # (B, N)
    lse_before = torch.logsumexp(s.masked_fill(~before[:, None, :], float("-inf")), dim=-1)
    before_mass = torch.exp(lse_before - lse)  # exp(-inf) = 0 without such keys
    return AttnImageStats(lse, ent, mass, image_attn, before_mass)


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
    return triton is not None


# ---------------------------------------------------------------------------
# Fused Triton kernel
# ---------------------------------------------------------------------------

_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))

if triton is not None:

    @triton.jit
    def _score_tile(q, k_base, offs_n, n_mask, offs_d, d_mask, stride_kn, qk_scale, DOT_FP32: tl.constexpr):
        """Scaled scores [BLOCK_G, BLOCK_N] (log2 units) of the G query rows against one key tile.

        The K tile is loaded transposed, [BLOCK_D, BLOCK_N], once for all G heads.
        """
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            # fp32 inputs: IEEE fp32 products (TF32, the GPU default, loses ~1e-3).
            qk = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, kt)  # fp16/bf16 tensor-core products, fp32 accumulation
        return qk * qk_scale

    @triton.jit
    def _attn_image_stats_kernel(
        q_ptr,
        k_ptr,
        qpos_ptr,
        valid_ptr,
        img_ptr,
        first_ptr,
        lse_ptr,
        ent_ptr,
        mass_ptr,
        before_ptr,
        attn_ptr,
        stride_qb,
        stride_qh,
        stride_ql,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,  # k's last dim is contiguous (the launcher guarantees it)
        stride_vb,
        stride_vn,
        stride_ib,
        stride_in,
        stride_ob,  # (B, H) outputs are contiguous: stride over heads is 1
        stride_ab,  # (B, N) image_attn is contiguous: stride over keys is 1
        N,
        qk_scale,  # softmax scale * log2(e): scores come out in log2 units
        G: tl.constexpr,  # query heads per kv head (GQA group size)
        D: tl.constexpr,
        BLOCK_G: tl.constexpr,  # >= 16 and >= G: the M of tl.dot, rows >= G masked
        BLOCK_D: tl.constexpr,  # next_pow2(D) (>= 16), columns >= D masked
        BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr,  # dot in fp32 with IEEE precision (see the launcher)
    ):
        """One program per (sample b, kv head): the G query heads sharing that kv head.

        Notation, per query head (a row of the [BLOCK_G, BLOCK_N] score tile),
        in log2 units ``x_t = scale * log2(e) * <q, k_t>``:

        pass 1 (online over N, like FlashAttention decoding)
            all attended keys:  m   = running max,  Z = sum_t 2^(x_t - m)
            image keys only:    m_i = running max,  Z_i = sum_t 2^(x_t - m_i),
                                S_i = sum_t 2^(x_t - m_i) * (x_t - m_i)
            keys before the first image key:  Z_b = sum_t 2^(x_t - m)  (same running max)
            then  lse  = ln2 * (m + log2 Z)
                  H    = -sum p ln p with p_t = 2^(x_t - m_i) / Z_i (image-renormalised)
                       = ln2 * (log2 Z_i - S_i / Z_i)
                  mass = 2^((m_i + log2 Z_i) - (m + log2 Z)),  before = Z_b / Z
            S_i is kept relative to the running max (x_t - m_i <= 0) rather than as
            sum 2^(x-m) * x, so H does not come from cancelling two large numbers.
        pass 2 (over N again, scores recomputed; nothing (B, H, N) is stored)
            p_t = 2^((x_t - m) - log2 Z) at attended image keys, summed over the G heads
            and atomically added into image_attn[b, t] (Hkv programs per sample).
        """
        LN2 = 0.6931471805599453  # (module globals are not visible to compiled kernels)
        NEG_INF = float("-inf")
        # Finite "-inf" for running maxima: a fully masked tile then gives
        # exp2(m_old - m_new) = exp2(0) = 1 instead of exp2(-inf - -inf) = NaN.
        M_INIT = -1.0e30

        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n0 = tl.arange(0, BLOCK_N)
        g_mask = offs_g < G
        d_mask = offs_d < D
        heads = kvh * G + offs_g  # query heads of this program (rows >= G are padding)

        # The query rows q[b, heads, qpos[b], :], read in place through the strides.
        qp = tl.load(qpos_ptr + b).to(tl.int64)
        q_ptrs = q_ptr + b * stride_qb + qp * stride_ql
        q_ptrs = q_ptrs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
        if DOT_FP32:
            q = q.to(tl.float32)

        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        valid_base = valid_ptr + b * stride_vb
        img_base = img_ptr + b * stride_ib

        m = tl.full([BLOCK_G], M_INIT, tl.float32)
        z = tl.zeros([BLOCK_G], tl.float32)
        z_b = tl.zeros([BLOCK_G], tl.float32)
        first = tl.load(first_ptr + b).to(tl.int64)  # first attended image key (N if none)
        m_i = tl.full([BLOCK_G], M_INIT, tl.float32)
        z_i = tl.zeros([BLOCK_G], tl.float32)
        s_i = tl.zeros([BLOCK_G], tl.float32)

        # ---- pass 1: online log-sum-exp over all attended keys and over image keys
        for start in range(0, N, BLOCK_N):
            offs_n = start + offs_n0
            n_mask = offs_n < N
            x = _score_tile(q, k_base, offs_n, n_mask, offs_d, d_mask, stride_kn, qk_scale, DOT_FP32)
            valid = tl.load(valid_base + offs_n * stride_vn, mask=n_mask, other=0) != 0
            img = (tl.load(img_base + offs_n * stride_in, mask=n_mask, other=0) != 0) & valid

            # all attended keys
            x_all = tl.where(valid[None, :], x, NEG_INF)
            m_new = tl.maximum(m, tl.max(x_all, axis=1))
            p = tl.exp2(x_all - m_new[:, None])  # 0 at masked keys
            alpha = tl.exp2(m - m_new)
            z = z * alpha + tl.sum(p, axis=1)
            z_b = z_b * alpha + tl.sum(tl.where((offs_n < first)[None, :], p, 0.0), axis=1)
            m = m_new

            # image keys: Z_i and S_i rescaled to the new max. For the old terms,
            # 2^(x-m_new) (x-m_new) = a 2^(x-m_old) ((x-m_old) + (m_old-m_new)), a = 2^(m_old-m_new),
            # so S_i <- a (S_i + (m_old - m_new) Z_i). (m_old - m_new) is finite (M_INIT).
            x_img = tl.where(img[None, :], x, NEG_INF)
            mi_new = tl.maximum(m_i, tl.max(x_img, axis=1))
            alpha_i = tl.exp2(m_i - mi_new)
            p_i = tl.exp2(x_img - mi_new[:, None])
            d_i = tl.where(img[None, :], x - mi_new[:, None], 0.0)  # no 0 * inf/NaN at masked keys
            s_i = alpha_i * (s_i + (m_i - mi_new) * z_i) + tl.sum(p_i * d_i, axis=1)
            z_i = z_i * alpha_i + tl.sum(p_i, axis=1)
            m_i = mi_new

        # log2-lse = m + log2 Z, -inf when no key is attended (Z == 0). Below it is
        # used as (x - m) - log2 Z rather than x - (m + log2 Z): x and m are both
        # large, their difference is exact-ish, and the rounding of the sum is avoided.
        log2_z = tl.log2(z)
        lse2 = m + log2_z
        has_img = z_i > 0
        z_i_safe = tl.where(has_img, z_i, 1.0)
        ent = LN2 * (tl.log2(z_i_safe) - s_i / z_i_safe)
        ent = tl.where(has_img, ent, float("nan"))
        mass = tl.where(has_img, tl.exp2((m_i - m) + (tl.log2(z_i_safe) - log2_z)), 0.0)
        before = tl.where(z > 0, z_b / tl.where(z > 0, z, 1.0), 0.0)

        out_offs = b * stride_ob + heads
        tl.store(lse_ptr + out_offs, lse2 * LN2, mask=g_mask)
        tl.store(ent_ptr + out_offs, ent, mask=g_mask)
        tl.store(mass_ptr + out_offs, mass, mask=g_mask)
        tl.store(before_ptr + out_offs, before, mask=g_mask)

        # ---- pass 2: full-softmax probabilities at image keys, summed over heads
        attn_base = attn_ptr + b * stride_ab
        for start in range(0, N, BLOCK_N):
            offs_n = start + offs_n0
            n_mask = offs_n < N
            x = _score_tile(q, k_base, offs_n, n_mask, offs_d, d_mask, stride_kn, qk_scale, DOT_FP32)
            valid = tl.load(valid_base + offs_n * stride_vn, mask=n_mask, other=0) != 0
            img = (tl.load(img_base + offs_n * stride_in, mask=n_mask, other=0) != 0) & valid
            keep = img[None, :] & g_mask[:, None]
            p = tl.where(keep, tl.exp2((x - m[:, None]) - log2_z[:, None]), 0.0)
            # Other kv heads of sample b add into the same entries: atomics, only at
            # image keys. Summation order across kv heads is not fixed, so the
            # last bits of image_attn may differ run to run (fp32 rounding only).
            # Nothing reads image_attn inside the kernel, so relaxed ordering suffices.
            tl.atomic_add(attn_base + offs_n, tl.sum(p, axis=0), mask=img, sem="relaxed")


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attn_image_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    qpos: torch.Tensor,
    key_valid: torch.Tensor,
    image_mask: torch.Tensor,
    scaling: float,
    *,
    block_n: int | None = None,
) -> AttnImageStats:
    """Fused Triton kernel: one launch, grid (B, Hkv), no (B, H, N) intermediate.

    Same contract as :func:`attn_image_stats`. ``q`` and ``k`` must share a dtype
    (float16, bfloat16 or float32); accumulation is float32. ``q`` may have any
    strides (the query row is read in place); ``k`` may have any strides except
    that its last dim must be contiguous, otherwise it is copied with
    ``.contiguous()`` (keys from a transformers cache already are). ``block_n``
    (a power of two >= 16) overrides the key tile size; tests use it to get
    several tiles out of small ``N``.

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
    before this module was imported (Triton reads it when the kernel is defined).
    ``image_attn`` is accumulated with atomics across kv heads, so its last bits
    are not bitwise reproducible run to run.
    """
    if triton is None:
        raise RuntimeError("attn_image_stats_triton needs triton; use backend='torch'")
    B, H, Hkv, N, D = _check_inputs(q, k, qpos, key_valid, image_mask)
    if q.dtype != k.dtype or q.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"q and k must share a dtype in {_KERNEL_DTYPES}; got {q.dtype} and {k.dtype}")
    if qpos.dtype.is_floating_point or qpos.dtype == torch.bool:
        raise ValueError(f"qpos must be an integer tensor; got {qpos.dtype}")
    dev = q.device
    for name, t in (("k", k), ("qpos", qpos), ("key_valid", key_valid), ("image_mask", image_mask)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but q is on {dev}")
    interpreted = type(_attn_image_stats_kernel).__name__ == "InterpretedFunction"
    if dev.type != "cuda" and not interpreted:
        raise RuntimeError(
            "attn_image_stats_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            "bye_fast for CPU tensors); use backend='torch' instead"
        )
    if block_n is None:
        block_n = 64
    elif block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16; got {block_n}")

    if k.stride(-1) != 1:
        k = k.contiguous()
    G = H // Hkv
    lse = torch.empty(B, H, device=dev, dtype=torch.float32)
    ent = torch.empty(B, H, device=dev, dtype=torch.float32)
    mass = torch.empty(B, H, device=dev, dtype=torch.float32)
    before = torch.empty(B, H, device=dev, dtype=torch.float32)
    image_attn = torch.zeros(B, N, device=dev, dtype=torch.float32)  # atomically accumulated
    if B == 0 or H == 0:
        return AttnImageStats(lse, ent, mass, image_attn, before)
    first = first_image_position(image_mask & key_valid)
    # bool -> uint8 is a free reinterpretation (same element size, same strides).
    valid_u8 = key_valid.view(torch.uint8)
    img_u8 = image_mask.view(torch.uint8)

    _attn_image_stats_kernel[(B, Hkv)](
        q,
        k,
        qpos,
        valid_u8,
        img_u8,
        first,
        lse,
        ent,
        mass,
        before,
        image_attn,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        q.stride(3),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        valid_u8.stride(0),
        valid_u8.stride(1),
        img_u8.stride(0),
        img_u8.stride(1),
        lse.stride(0),
        image_attn.stride(0),
        N,
        float(scaling) * _LOG2E,
        G=G,
        D=D,
        BLOCK_G=max(16, _next_pow2(G)),
        BLOCK_D=max(16, _next_pow2(D)),
        BLOCK_N=block_n,
        # fp32: IEEE dot. bf16 under the interpreter: upcast (exact) before the dot,
        # because triton's interpreter multiplies bf16 dot operands as their raw
        # uint16 bits (triton 3.9 `create_dot`); compiled kernels use the native bf16 dot.
        DOT_FP32=q.dtype == torch.float32 or (interpreted and q.dtype == torch.bfloat16),
        num_warps=4,
    )
    return AttnImageStats(lse, ent, mass, image_attn, before)
