"""RoPE in registers from a cos/sin table (see `cattn.rope_table`): no trigonometry in any loop.

A head is split into three parts that are loaded separately: the first and second
member of each rotated pair (``x1``, ``x2``; dims ``i`` and ``i + rotary_dim/2`` in
neox style, ``2i`` and ``2i+1`` in gptj style) and the unrotated rest. After rotation
the two halves are joined side by side, ``[x1 | x2]``, for Q and K alike, so Q.K over the
rotated dims is one dot over the whole rotated width (one wgmma chain, fewer registers
than two half-width dots); the unrotated rest, if any, adds a second dot.
"""
import triton
import triton.language as tl


@triton.jit
def load_pairs(rows, row_ok, HALF: tl.constexpr, HALF_PAD: tl.constexpr, GPTJ: tl.constexpr,
               IN_DTYPE: tl.constexpr = False):
    """The two members of each rotated pair of ``rows`` (a pointer per row to its head's dim 0),
    ``[R, HALF_PAD]`` each, zeros where absent; fp32, or the input dtype with ``IN_DTYPE``. Both styles load contiguous runs, so the loads stay
    16-byte vectors: neox two halves, gptj the whole rotated run, de-interleaved in registers."""
    i = tl.arange(0, HALF_PAD)
    if GPTJ:
        j = tl.arange(0, 2 * HALF_PAD)
        both = tl.load(rows[:, None] + j[None, :], mask=row_ok[:, None] & (j < 2 * HALF)[None, :], other=0.0)
        x1, x2 = tl.split(tl.reshape(both, (both.shape[0], HALF_PAD, 2)))
    else:
        mask = row_ok[:, None] & (i < HALF)[None, :]
        x1 = tl.load(rows[:, None] + i[None, :], mask=mask, other=0.0)
        x2 = tl.load(rows[:, None] + HALF + i[None, :], mask=mask, other=0.0)
    if not IN_DTYPE:
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return x1, x2


@triton.jit
def table_cos_sin(cos_sin_set, positions, ROT: tl.constexpr, HALF_PAD: tl.constexpr, IN_DTYPE: tl.constexpr = False):
    """cos and sin ``[len(positions), HALF_PAD]`` read from the rows ``positions`` of a table set
    ``[num_positions, ROT]`` (cos in the first ``ROT/2`` columns, sin in the rest; scaling included);
    fp32, or the table's dtype with ``IN_DTYPE``."""
    HALF: tl.constexpr = ROT // 2
    i = tl.arange(0, HALF_PAD)
    row = cos_sin_set + positions.to(tl.int64)[:, None] * ROT + i[None, :]
    ok = (i < HALF)[None, :]
    cos = tl.load(row, mask=ok, other=0.0)
    sin = tl.load(row + HALF, mask=ok, other=0.0)
    if not IN_DTYPE:
        cos, sin = cos.to(tl.float32), sin.to(tl.float32)
    return cos, sin


@triton.jit
def rotate_joined(x1, x2, cos, sin, dtype: tl.constexpr):
    """Rotate each pair ``(x1, x2)`` (``[R, HALF_PAD]``, computed in their dtype) and return ``[x1' | x2']`` ``[R, 2*HALF_PAD]``
    in ``dtype``, the operand of one dot over the rotated dims."""
    r1 = (x1 * cos - x2 * sin).to(dtype)
    r2 = (x2 * cos + x1 * sin).to(dtype)
    joined = tl.join(r1, r2)                                     # [R, HALF_PAD, 2]
    return tl.reshape(tl.permute(joined, (0, 2, 1)), (x1.shape[0], 2 * x1.shape[1]))
