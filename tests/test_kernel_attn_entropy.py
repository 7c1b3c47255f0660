"""Fused attention-statistics kernel vs its torch twin vs the naive float64 reference.

Runs on CUDA when present (compiled Triton), else on CPU under the Triton
interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from bye_fast.kernels.attn_entropy import (
    AttnImageStats,
    attn_image_stats,
    attn_image_stats_reference,
    attn_image_stats_torch,
    attn_image_stats_triton,
    head_mean_entropy,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]

# (atol, rtol) for lse / head_entropy / image_mass, and for image_attn (relative).
TOLS = {
    torch.float32: dict(stats=(1e-5, 1e-5), attn=(1e-8, 1e-5)),
    torch.bfloat16: dict(stats=(1e-2, 1e-2), attn=(1e-5, 1e-2)),
}


def make_inputs(
    B: int,
    H: int,
    Hkv: int,
    N: int,
    D: int,
    *,
    dtype: torch.dtype,
    padding: str,
    q_scale: float,
    layout: str,
    seed: int,
):
    """Random prefill-like inputs: queries/keys for a length-N sequence per sample.

    padding "left": key_valid False on a prefix, qpos = N - 1.
    padding "right": key_valid False on a suffix; sample 1 also has "answer"
    tokens after qpos, invalid by causality. Image tokens come in 2-3 separate
    runs (the first inside the attended span, others anywhere, possibly in
    padding); with B >= 2 the last sample has no image token at all.
    layout "contiguous"; "transposed": (B, L, H, D) storage viewed as
    (B, H, L, D), as transformers produces; "strided": q and k with a non-unit
    last-dim stride (k then gets copied by the launcher).
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if layout == "contiguous":
        q = rand(B, H, N, D, scale=q_scale)
        k = rand(B, Hkv, N, D)
    elif layout == "transposed":
        q = rand(B, N, H, D, scale=q_scale).transpose(1, 2)
        k = rand(B, N, Hkv, D).transpose(1, 2)
    elif layout == "strided":
        q = rand(B, H, N, 2 * D, scale=q_scale)[..., ::2]
        k = rand(B, Hkv, D, N).transpose(-1, -2)
    else:
        raise ValueError(layout)

    ar = torch.arange(N)
    key_valid = torch.zeros(B, N, dtype=torch.bool)
    qpos = torch.empty(B, dtype=torch.long)
    for b in range(B):
        if padding == "left":
            pad = 0 if b == 0 else int(torch.randint(1, N // 2 + 1, (1,), generator=g))
            qpos[b] = N - 1
            key_valid[b] = ar >= pad
        elif padding == "right":
            length = N if b == 0 else int(torch.randint(N // 2, N, (1,), generator=g))
            answer = 3 if b == 1 else 0  # tokens after the query row: masked by causality
            qpos[b] = length - 1 - answer
            key_valid[b] = ar <= qpos[b]
        else:
            raise ValueError(padding)

    image_mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B if B == 1 else B - 1):
        first = int(key_valid[b].nonzero()[0])
        last = int(qpos[b])
        n_runs = int(torch.randint(2, 4, (1,), generator=g))
        for r in range(n_runs):
            length = int(torch.randint(2, max(3, N // 6), (1,), generator=g))
            lo, hi = (first, max(first + 1, last - length)) if r == 0 else (0, N - length)
            start = int(torch.randint(lo, hi, (1,), generator=g))
            image_mask[b, start : start + length] = True
    return tuple(t.to(DEVICE) for t in (q, k, qpos, key_valid, image_mask))


def assert_stats_close(out: AttnImageStats, ref: AttnImageStats, dtype: torch.dtype) -> dict[str, float]:
    """Compare against the float64 reference; return the max abs errors (NaN-aware)."""
    (s_atol, s_rtol), (a_atol, a_rtol) = TOLS[dtype]["stats"], TOLS[dtype]["attn"]
    errs = {}
    for name in AttnImageStats._fields:
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float32, name
        assert got.shape == want.shape, name
        atol, rtol = (a_atol, a_rtol) if name == "image_attn" else (s_atol, s_rtol)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, equal_nan=True, msg=name)
        errs[name] = (got.double() - want).abs().nan_to_num(0.0, 0.0, 0.0).max().item()
    hm_got, hm_want = head_mean_entropy(out.image_attn), head_mean_entropy(ref.image_attn)
    torch.testing.assert_close(hm_got.double(), hm_want, atol=s_atol, rtol=s_rtol, equal_nan=True)
    return errs


# (B, H, Hkv, N, D, block_n): N not a multiple of the tile; GQA groups 1, 2, 3, 4, 32;
# head_dim 16, 32, 40 (not a power of two), 64; block_n None = the launcher's default.
SHAPES = [
    (2, 4, 4, 37, 32, 16),
    (3, 8, 4, 100, 64, 32),
    (2, 8, 2, 129, 32, None),
    (2, 4, 1, 100, 40, 32),
    (1, 2, 2, 130, 64, 128),
    (3, 6, 2, 70, 16, 16),
    (2, 32, 1, 40, 16, 16),
]


@pytest.mark.parametrize("q_scale", [1.0, 4.0], ids=["flat", "peaky"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}K{}N{}D{}bn{}".format(*s))
def test_matches_reference(shape, dtype, padding, q_scale):
    B, H, Hkv, N, D, block_n = shape
    seed = zlib.crc32(repr((shape, dtype, padding, q_scale)).encode())
    layout = "transposed" if (B + N) % 2 else "contiguous"
    q, k, qpos, key_valid, image_mask = make_inputs(
        B, H, Hkv, N, D, dtype=dtype, padding=padding, q_scale=q_scale, layout=layout, seed=seed
    )
    scaling = D**-0.5
    ref = attn_image_stats_reference(q, k, qpos, key_valid, image_mask, scaling)  # bf16 values upcast
    out = attn_image_stats_triton(q, k, qpos, key_valid, image_mask, scaling, block_n=block_n)
    assert_stats_close(out, ref, dtype)
    assert_stats_close(attn_image_stats_torch(q, k, qpos, key_valid, image_mask, scaling), ref, dtype)
    if B >= 2:  # the last sample has no image key
        assert out.head_entropy[-1].isnan().all()
        assert (out.image_mass[-1] == 0).all() and (out.image_attn[-1] == 0).all()
    assert (out.image_attn[~(image_mask & key_valid)] == 0).all()


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_layouts_and_dtypes(layout, dtype):
    B, H, Hkv, N, D = 2, 4, 2, 50, 32
    q, k, qpos, key_valid, image_mask = make_inputs(
        B, H, Hkv, N, D, dtype=dtype, padding="left", q_scale=3.0, layout=layout, seed=7
    )
    assert q.is_contiguous() == (layout == "contiguous")
    assert (k.stride(-1) == 1) == (layout != "strided")
    ref = attn_image_stats_reference(q, k, qpos, key_valid, image_mask, D**-0.5)
    out = attn_image_stats_triton(q, k, qpos, key_valid, image_mask, D**-0.5, block_n=16)
    assert_stats_close(out, ref, torch.float32 if dtype == torch.float32 else torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_fully_masked_tiles_and_garbage_keys():
    """Long left padding (whole tiles masked) with NaN/inf keys there: no NaN leaks."""
    B, H, Hkv, N, D = 2, 4, 2, 96, 32
    q, k, qpos, key_valid, image_mask = make_inputs(
        B, H, Hkv, N, D, dtype=torch.float32, padding="left", q_scale=1.0, layout="contiguous", seed=3
    )
    key_valid[1, :70] = False  # tiles 0-3 of 16 keys fully masked for sample 1
    image_mask[1] = False
    image_mask[1, 60:80] = True  # half in the padding
    k[1, :, :70] = float("nan")
    k[0, :, 5] = float("inf")
    key_valid[0, 5] = False
    ref = attn_image_stats_reference(q, k, qpos, key_valid, image_mask, D**-0.5)
    out = attn_image_stats_triton(q, k, qpos, key_valid, image_mask, D**-0.5, block_n=16)
    assert_stats_close(out, ref, torch.float32)
    assert torch.isfinite(out.head_entropy).all()


def test_dispatcher():
    B, H, Hkv, N, D = 2, 4, 2, 40, 32
    args = make_inputs(B, H, Hkv, N, D, dtype=torch.float32, padding="right", q_scale=1.0,
                       layout="contiguous", seed=11)  # fmt: skip
    ref = attn_image_stats_reference(*args, D**-0.5)
    for backend in ("auto", "torch", "triton"):
        assert_stats_close(attn_image_stats(*args, D**-0.5, backend=backend), ref, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        attn_image_stats(*args, D**-0.5, backend="cuda")


def test_launcher_validation():
    q, k, qpos, key_valid, image_mask = make_inputs(
        1, 2, 1, 20, 16, dtype=torch.float32, padding="left", q_scale=1.0, layout="contiguous", seed=0
    )
    with pytest.raises(ValueError, match="dtype"):
        attn_image_stats_triton(q, k.bfloat16(), qpos, key_valid, image_mask, 0.25)
    with pytest.raises(ValueError, match="integer"):
        attn_image_stats_triton(q, k, qpos.float(), key_valid, image_mask, 0.25)
    with pytest.raises(ValueError, match="block_n"):
        attn_image_stats_triton(q, k, qpos, key_valid, image_mask, 0.25, block_n=24)
    with pytest.raises(ValueError, match="bool"):
        attn_image_stats_triton(q, k, qpos, key_valid.int(), image_mask, 0.25)


def test_imports_without_triton():
    """The module (and the torch backend) must work where triton is not installed."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from bye_fast.kernels import attn_entropy as m\n"
        "assert m.triton is None and not m._triton_available()\n"
        "q = torch.randn(1, 2, 3, 8); k = torch.randn(1, 1, 3, 8)\n"
        "v = torch.ones(1, 3, dtype=torch.bool)\n"
        "out = m.attn_image_stats(q, k, torch.tensor([2]), v, v, 0.3)\n"
        "assert torch.isfinite(out.head_entropy).all()\n"
        "try:\n"
        "    m.attn_image_stats(q, k, torch.tensor([2]), v, v, 0.3, backend='triton')\n"
        "except RuntimeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
