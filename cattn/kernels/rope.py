"""RoPE in registers: the angles of a tile of positions, and the rotation of a pair of halves.

A head is split into three parts that are loaded separately: the first and second
member of each rotated pair (``x1``, ``x2``; dims ``i`` and ``i + rotary_dim/2`` in
neox style, ``2i`` and ``2i+1`` in gptj style) and the unrotated rest. A dot product
over a head is the sum over the parts, so Q.K never needs the halves put back together.
"""
import triton
import triton.language as tl


@triton.jit
def pair_dims(HALF_PAD: tl.constexpr, HALF: tl.constexpr, GPTJ: tl.constexpr):
    """Head dims of the first and second member of each rotated pair, and the mask of real pairs."""
    i = tl.arange(0, HALF_PAD)
    if GPTJ:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    return first, second, i < HALF


@triton.jit
def rope_cos_sin(positions, inv_freq_ptr, attention_scaling, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """cos and sin ``[len(positions), HALF_PAD]`` fp32 of ``position * inv_freq`` (fp32, as HF computes)."""
    i = tl.arange(0, HALF_PAD)
    inv_freq = tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    angle = positions.to(tl.float32)[:, None] * inv_freq[None, :]
    return tl.cos(angle) * attention_scaling, tl.sin(angle) * attention_scaling


@triton.jit
def rotate(x1, x2, cos, sin):
    """Rotate each pair ``(x1, x2)`` by its angle; fp32 in, fp32 out."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin
