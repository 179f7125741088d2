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
into the model dtype; the torch path here and the Triton kernel (`cattn.ops.dequant_kv`) agree. Error bound, per element: ``|x - deq| <= step / 2`` (int8; plus the
model dtype's own rounding of ``deq``), ``<= 2**-4 * |x - offset| + step * 2**-10`` (fp8 e4m3: 3
mantissa bits).

A zero or constant channel (or token) has step 0 and codes 0; it comes back as its offset, exactly.
"""
from __future__ import annotations

import torch

from cattn.store.kvformat.names import FORMATS, KEY_GROUP, LOSSLESS
CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK_TOKENS = 128                         # CPU: tokens per block, whose fp32 scratch stays in cache


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


def _encode(q: torch.Tensor, scale: torch.Tensor, kv_format: str, codes: torch.Tensor) -> None:
    """``codes = encode(q / scale)``, scaling ``q`` (fp32 scratch) in place; ``scale`` broadcasts against it and
    may hold zeros (a zero row encodes as zeros, not NaN)."""
    q.mul_(torch.where(scale > 0, 1.0 / scale.float(), 0.0))
    qmax = QMAX[kv_format]
    if kv_format == "int8":
        q.round_()
    codes.copy_(q.clamp_(-qmax, qmax))   # fp8: the cast rounds to nearest even


def _absmax(q: torch.Tensor, dim: int) -> torch.Tensor:
    """``|q|.amax(dim)`` without an ``|q|`` tensor: two reductions over the block in cache."""
    return torch.maximum(q.amax(dim), q.amin(dim).neg_())


def _scale(absmax: torch.Tensor, kv_format: str, dtype: torch.dtype) -> torch.Tensor:
    """``absmax / QMAX`` rounded *up* to ``dtype``: the scale the codes are made against (never below the
    exact one, so no value is clipped; fp16's subnormal scales of tiny channels included)."""
    want = absmax.to(torch.float64) / QMAX[kv_format]     # small tensors: exact enough to never round down
    scale = want.to(dtype)
    return torch.where(scale.to(want.dtype) < want, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)


def _blocks(num_tokens: int, device: torch.device, unit: int) -> int:
    """Tokens per pass: on CPU a block of ``unit`` tokens (its fp32 scratch stays in cache through the
    passes over it), on an accelerator all of them (one launch per pass)."""
    return max(1, unit if device.type == "cpu" else num_tokens)


def _key_rows(q: torch.Tensor, kv_format: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, offset)`` of key groups ``q [rows, group, Hkv, D]`` (fp32), each ``[rows, Hkv, D]`` in ``dtype``:
    the offset is the middle of each channel's range rounded to ``dtype``, the step the larger distance from
    it to the range's ends over ``QMAX``, rounded up (so no value is clipped)."""
    wide = torch.float64     # the scale rows are small: exact differences of dtype values, whatever dtype is
    hi, lo = q.amax(1).to(wide), q.amin(1).to(wide)
    offset = ((hi + lo) / 2).to(dtype)
    reach = torch.maximum(hi - offset.to(wide), offset.to(wide) - lo)
    return _scale(reach, kv_format, dtype), offset


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
    """
    _check_kv(k, "k")
    _check_codes_format(kv_format)
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise ValueError(f"group must be an int >= 1, got {group!r}")
    m, h, d = k.shape
    codes = _check_out(codes, (m, h, d), CODE_DTYPES[kv_format], k.device, "codes")
    scales = _check_out(scales, (num_key_groups(m, group), 2, h, d), k.dtype, k.device, "scales")
    step = -(-_blocks(m, k.device, _BLOCK_TOKENS) // group) * group
    scratch = torch.empty(min(step, m), h, d, dtype=torch.float32, device=k.device)
    for lo in range(0, m, step):
        hi = min(lo + step, m)
        full = (hi - lo) // group * group
        for a, b in ((lo, lo + full), (lo + full, hi)):   # whole groups, then a short last one
            if a == b:
                continue
            rows = slice(a // group, -(-b // group))
            q = scratch[:b - a].copy_(k[a:b]).view(rows.stop - rows.start, -1, h, d)
            step_rows, offset_rows = scales[rows, 0], scales[rows, 1]
            for dst, src in zip((step_rows, offset_rows), _key_rows(q, kv_format, k.dtype)):
                dst.copy_(src)
            q.sub_(offset_rows.unsqueeze(1))
            _encode(q, step_rows.unsqueeze(1), kv_format, codes[a:b].view(q.shape))
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
    """
    _check_kv(v, "v")
    _check_codes_format(kv_format)
    m, h, d = v.shape
    codes = _check_out(codes, (m, h, d), CODE_DTYPES[kv_format], v.device, "codes")
    scales = _check_out(scales, (m, h), v.dtype, v.device, "scales")
    step = _blocks(m, v.device, _BLOCK_TOKENS)
    scratch = torch.empty(min(step, m), h, d, dtype=torch.float32, device=v.device)
    for lo in range(0, m, step):
        q = scratch[:min(step, m - lo)].copy_(v[lo:lo + step])
        scale = scales[lo:lo + step].copy_(_scale(_absmax(q, -1), kv_format, v.dtype))
        _encode(q, scale.unsqueeze(-1), kv_format, codes[lo:lo + step])
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
