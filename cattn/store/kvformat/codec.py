"""8-bit codes for pre-RoPE KV: keys per channel, values per token, int8 or fp8 e4m3.

Pre-RoPE keys have outlier *channels* that stay put across tokens (KVQuant, Hooper et al. 2024): a
channel's values sit in a band of its own, often far from zero, whose centre does not move with the
position. So a key's code is per channel (head and dim) over a group of `KEY_GROUP` consecutive tokens
and *centred*: ``x ~ offset + code * step`` with ``offset`` the middle of the group's range and ``step``
its half-width over ``QMAX``; the levels cover the band, not ``[-absmax, absmax]``. After RoPE the same
channel pair turns with the position, and its band is smeared around zero: a post-RoPE cache cannot
centre it. Values have no such structure and get one symmetric scale per token and head:
``x ~ code * scale`` with ``scale = absmax / QMAX``.

Steps and scales are rounded up (offsets to nearest) to the model dtype when they are made, and the
codes are computed against the rounded values, so what the store keeps is what dequantization uses.
Dequantization computes in fp32: for a 16-bit model ``code * step`` is exact there (8-bit code, 16-bit
step), so any fp32 evaluation of ``code * step + offset`` (an FMA or not) gives the same bits, rounded
into the model dtype; the torch path here and the Triton kernel (`cattn.ops.dequant_kv`) agree. Error
bound, per element: ``|x - deq| <= step / 2`` (int8; plus the model dtype's own rounding of ``deq``),
``<= 2**-4 * |x - offset| + step * 2**-10`` (fp8 e4m3: 3 mantissa bits).

A zero or constant channel (or token) has step 0 and codes 0; it comes back as its offset, exactly.
"""
from __future__ import annotations

import torch

from cattn.store.kvformat.names import FORMATS, KEY_GROUP, LOSSLESS
CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CPU_BLOCK_ELEMENTS = 1 << 18              # CPU: elements per block: 1 MiB of fp32 scratch, in the L2 cache


def check_format(kv_format, what: str = "kv_format") -> str:
    """``kv_format`` if it names a format (`FORMATS`); TypeError/ValueError naming ``what`` otherwise."""
    if not isinstance(kv_format, str):
        raise TypeError(f"{what} must be a str, one of {FORMATS}, got {type(kv_format).__name__}")
    if kv_format not in FORMATS:
        raise ValueError(f"{what} must be one of {FORMATS}, got {kv_format!r}")
    return kv_format


def num_key_groups(num_tokens: int, group: int = KEY_GROUP) -> int:
    """Key scale rows of a chunk of ``num_tokens`` tokens."""
    return -(-num_tokens // group)


def _check_codes_format(kv_format: str) -> None:
    if check_format(kv_format) == LOSSLESS:
        raise ValueError("kv_format must be an 8-bit format ('int8' or 'fp8') here, got 'lossless'")


def _check_kv(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"{what} must be [num_tokens, num_kv_heads, head_dim], got shape {tuple(x.shape)}")
    if x.dtype not in MODEL_DTYPES:
        raise TypeError(f"{what} must be one of {MODEL_DTYPES}, got {x.dtype}")


def _check_out(t, shape: tuple, dtype: torch.dtype, device: torch.device, what: str) -> torch.Tensor:
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{what} must be a {list(shape)} {dtype} tensor on {device}, got "
                         f"{getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}")
    return t


def _encode(q: torch.Tensor, inv_scale: torch.Tensor, kv_format: str, codes: torch.Tensor) -> None:
    """``codes = encode(q * inv_scale)``, scaling ``q`` (fp32 scratch) in place; ``inv_scale`` (fp32, 0 where the
    scale is) broadcasts against it. No clamp: a scale is never below ``absmax / QMAX`` and its fp32 inverse
    is off by an ulp at most, so ``|q * inv_scale| <= QMAX * (1 + 2**-23)``, which rounds to ``QMAX``."""
    q.mul_(inv_scale)
    if kv_format == "int8":
        q.round_()
    codes.copy_(q)                       # fp8: the cast rounds to nearest even


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` in fp32, 0 where the scale is 0 (a zero or constant row encodes as zeros, not NaN)."""
    scale = scale.float()
    return torch.where(scale > 0, 1.0 / scale, 0.0)


def _scale(absmax: torch.Tensor, kv_format: str, dtype: torch.dtype) -> torch.Tensor:
    """``absmax / QMAX`` rounded *up* to ``dtype``: the scale the codes are made against (never below the
    exact one, so no value is clipped; fp16's subnormal scales of tiny channels included)."""
    want = absmax.to(torch.float64) / QMAX[kv_format]     # small tensors: exact enough to never round down
    scale = want.to(dtype)
    return torch.where(scale.to(want.dtype) < want, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)


def _block_tokens(num_tokens: int, row_elements: int, device: torch.device, multiple: int = 1) -> int:
    """Tokens per pass: on CPU a block whose fp32 scratch (``row_elements`` per token) stays in the L2 cache
    through the passes over it, a multiple of ``multiple``; on an accelerator all of them (one launch a pass)."""
    if device.type != "cpu":
        return max(num_tokens, 1)
    return max(multiple, _CPU_BLOCK_ELEMENTS // max(row_elements, 1) // multiple * multiple)


def _key_blocks(num_tokens: int, block: int, group: int) -> list[tuple[int, int]]:
    """``[a, b)`` blocks of at most ``block`` tokens (a multiple of ``group``), every one whole groups but a
    short last group in a block of its own."""
    whole = num_tokens // group * group
    out = [(a, min(a + block, whole)) for a in range(0, whole, block)]
    return out + [(whole, num_tokens)] if whole < num_tokens else out


def quantize_keys(k: torch.Tensor, kv_format: str, *, group: int = KEY_GROUP, codes: torch.Tensor | None = None,
                  scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel centred codes of pre-RoPE keys.

    Args:
        k: ``[m, Hkv, D]`` fp16/bf16/fp32/fp64 pre-RoPE keys of ``m`` consecutive tokens (any device).
        kv_format: ``"int8"`` or ``"fp8"``.
        group: tokens per scale row: tokens ``[g * group, (g + 1) * group)`` share row ``g``.
        codes, scales: optional outputs to fill (e.g. views of a pool extent), on ``k``'s device.

    Returns:
        codes ``[m, Hkv, D]`` int8 / float8_e4m3fn, and scale rows ``[ceil(m / group), 2, Hkv, D]`` in
        ``k.dtype``: ``[:, 0]`` the step, ``[:, 1]`` the offset of each channel of each group.

    Two passes over the keys, a cache-sized block at a time: each group's range per channel, then (once the
    rows are made, for all groups at once) the codes.
    """
    _check_kv(k, "k")
    _check_codes_format(kv_format)
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise ValueError(f"group must be an int >= 1, got {group!r}")
    m, h, d = k.shape
    codes = _check_out(codes, (m, h, d), CODE_DTYPES[kv_format], k.device, "codes")
    rows = num_key_groups(m, group)
    scales = _check_out(scales, (rows, 2, h, d), k.dtype, k.device, "scales")
    if m == 0:
        return codes, scales
    runs = _key_blocks(m, _block_tokens(m, h * d, k.device, group), group)
    scratch = torch.empty(runs[0][1], h, d, dtype=torch.float32, device=k.device)   # the first block is the longest

    def grouped(a: int, b: int, load: bool = True) -> torch.Tensor:
        """Tokens ``[a, b)`` in the scratch (copied in unless ``load`` is False), ``[groups, tokens, Hkv, D]``."""
        block = scratch[:b - a].copy_(k[a:b]) if load else scratch[:b - a]
        return block.view(-(-(b - a) // group), -1, h, d)

    hi = torch.empty(rows, h, d, dtype=torch.float32, device=k.device)
    lo = torch.empty_like(hi)
    for a, b in runs:
        g = slice(a // group, -(-b // group))
        q = grouped(a, b)
        torch.amax(q, 1, out=hi[g])
        torch.amin(q, 1, out=lo[g])
    wide = torch.float64     # the rows are small: exact differences of dtype values, whatever dtype is
    hi, lo = hi.to(wide), lo.to(wide)
    offset = scales[:, 1].copy_(((hi + lo) / 2).to(k.dtype))
    step = scales[:, 0].copy_(_scale(torch.maximum(hi - offset.to(wide), offset.to(wide) - lo), kv_format, k.dtype))
    offset, inv_step = offset.float().unsqueeze(1), _inverse(step).unsqueeze(1)
    for a, b in runs:
        g = slice(a // group, -(-b // group))
        q = grouped(a, b, load=len(runs) > 1).sub_(offset[g])   # one block: still in the scratch
        _encode(q, inv_step[g], kv_format, codes[a:b].view(q.shape))
    return codes, scales


def quantize_values(v: torch.Tensor, kv_format: str, *, codes: torch.Tensor | None = None,
                    scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes of values.

    Args:
        v: ``[m, Hkv, D]`` fp16/bf16/fp32/fp64 values (any device).
        kv_format: ``"int8"`` or ``"fp8"``.
        codes, scales: optional outputs to fill, on ``v``'s device.

    Returns:
        codes ``[m, Hkv, D]`` int8 / float8_e4m3fn, scales ``[m, Hkv]`` in ``v.dtype`` (one per token and head).

    Two passes, as `quantize_keys` makes them: each row's absmax, then the codes.
    """
    _check_kv(v, "v")
    _check_codes_format(kv_format)
    m, h, d = v.shape
    codes = _check_out(codes, (m, h, d), CODE_DTYPES[kv_format], v.device, "codes")
    scales = _check_out(scales, (m, h), v.dtype, v.device, "scales")
    if m == 0:
        return codes, scales
    block = _block_tokens(m, h * d, v.device)
    scratch = torch.empty(min(block, m), h, d, dtype=torch.float32, device=v.device)
    hi = torch.empty(m, h, dtype=torch.float32, device=v.device)
    lo = torch.empty_like(hi)
    for a in range(0, m, block):
        q = scratch[:min(block, m - a)].copy_(v[a:a + block])
        torch.amax(q, -1, out=hi[a:a + block])
        torch.amin(q, -1, out=lo[a:a + block])
    inv_scale = _inverse(scales.copy_(_scale(torch.maximum(hi, lo.neg_()), kv_format, v.dtype))).unsqueeze(-1)
    for a in range(0, m, block):
        q = scratch[:min(block, m - a)]
        if block < m:            # one block: still in the scratch
            q.copy_(v[a:a + block])
        _encode(q, inv_scale[a:a + block], kv_format, codes[a:a + block])
    return codes, scales


def _check_codes(codes, what: str) -> None:
    if not isinstance(codes, torch.Tensor) or codes.ndim != 3 or codes.dtype not in CODE_DTYPES.values():
        raise ValueError(f"{what} must be a [num_tokens, num_kv_heads, head_dim] int8 or float8_e4m3fn tensor, got "
                         f"{getattr(codes, 'shape', codes)} {getattr(codes, 'dtype', '')}")


def _check_scales(scales, dtype: torch.dtype, expected: str, shape_ok) -> None:
    """ValueError unless ``scales`` is a tensor of ``dtype`` whose shape ``shape_ok`` accepts (``expected`` says it)."""
    if not isinstance(scales, torch.Tensor) or not shape_ok(scales.shape) or scales.dtype != dtype:
        raise ValueError(f"scales must be {expected} {dtype}, got {getattr(scales, 'shape', scales)} "
                         f"{getattr(scales, 'dtype', '')}")


def _check_dtype(dtype) -> None:
    if dtype not in MODEL_DTYPES:
        raise TypeError(f"dtype must be one of {MODEL_DTYPES}, got {dtype}")


def dequantize_keys(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, *, phase: int = 0,
                    group: int = KEY_GROUP, out: torch.Tensor | None = None) -> torch.Tensor:
    """Keys back from `quantize_keys`'s codes, for tokens that may start inside a group.

    Args:
        codes: ``[n, Hkv, D]`` int8 / float8_e4m3fn: tokens ``[lo, lo + n)`` of a chunk.
        scales: ``[G, 2, Hkv, D]`` in ``dtype``: the chunk's scale rows (step, offset) from ``lo // group`` on
            (at least the rows those tokens use).
        dtype: the model dtype (the scales' dtype).
        phase: ``lo % group``: token ``t`` of ``codes`` uses row ``(phase + t) // group``.
        out: optional ``[n, Hkv, D]`` ``dtype`` output on the codes' device.

    Returns:
        ``[n, Hkv, D]`` in ``dtype``: ``code * step + offset`` computed in fp32 (see `_multiply_add`).
    """
    _check_codes(codes, "codes")
    _check_dtype(dtype)
    n, h, d = codes.shape
    if not isinstance(group, int) or group < 1 or not isinstance(phase, int) or not 0 <= phase < group:
        raise ValueError(f"need group >= 1 and 0 <= phase < group, got phase={phase!r}, group={group!r}")
    rows = num_key_groups(phase + n, group)
    _check_scales(scales, dtype, f"[>= {rows}, 2, {h}, {d}]",
                  lambda shape: len(shape) == 4 and shape[0] >= rows and tuple(shape[1:]) == (2, h, d))
    out = _check_out(out, (n, h, d), dtype, codes.device, "out")
    t = 0
    while t < n:                              # runs of tokens sharing a scale row: one pass each
        at = phase + t
        row = at // group
        if at % group == 0 and (full := (n - t) // group):
            span, shape = full * group, (full, group, h, d)
            step, offset = scales[row:row + full, 0].unsqueeze(1), scales[row:row + full, 1].unsqueeze(1)
        else:
            span = min(n - t, (row + 1) * group - at)
            shape, step, offset = (span, h, d), scales[row, 0], scales[row, 1]
        _multiply_add(codes[t:t + span].view(shape), step, offset, out[t:t + span].view(shape))
        t += span
    return out


def _multiply_add(codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = codes * step (+ offset)``, broadcast, rounded as the module docstring says: into a 16-bit dtype
    computed in fp32 (``code * step`` exact there, the sum rounded, then the dtype's rounding), into fp32/fp64
    one rounding per operation. int8 codes into a 16-bit dtype take one pass (torch converts them exactly and
    computes in fp32 inside it)."""
    sixteen = out.dtype.itemsize == 2
    if sixteen and codes.dtype == torch.int8:
        if offset is None:
            torch.mul(codes, step, out=out)
        else:
            torch.addcmul(offset, codes, step, out=out)
    elif sixteen and offset is not None:      # fp8 codes (torch promotes no float8 with others): in fp32
        out.copy_(codes.float().mul_(step).add_(offset))
    else:                                     # the copy is exact: every code is an integer or an fp8 value
        out.copy_(codes).mul_(step)
        if offset is not None:
            out.add_(offset)


def dequantize_values(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, *,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Values back from `quantize_values`'s codes.

    Args:
        codes: ``[n, Hkv, D]`` int8 / float8_e4m3fn.
        scales: ``[n, Hkv]`` in ``dtype``.
        dtype: the model dtype.
        out: optional ``[n, Hkv, D]`` ``dtype`` output on the codes' device.

    Returns:
        ``[n, Hkv, D]`` in ``dtype``.
    """
    _check_codes(codes, "codes")
    _check_dtype(dtype)
    n, h, d = codes.shape
    _check_scales(scales, dtype, f"[{n}, {h}]", lambda shape: tuple(shape) == (n, h))
    out = _check_out(out, (n, h, d), dtype, codes.device, "out")
    _multiply_add(codes, scales.unsqueeze(-1), None, out)
    return out
