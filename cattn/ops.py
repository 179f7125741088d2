"""Public ops: argument checks, backend dispatch, and the Triton launchers.

Every op checks its arguments before anything runs and raises a ValueError or
TypeError naming the argument. Checks of *values* (page ids inside the pool,
``kv_len >= q_len``) read the index tensors on the host; a caller that built
them itself and checked them once per step (`check_batch`) passes
``check_indices=False`` to keep the hot path free of host syncs.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from cattn import cpu_attention, reference
from cattn.rope import RopeSpec

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The torch backend also takes float64 (the oracle's dtype); neither takes integer, bool, complex or fp8.
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: the values its own TRITON_INTERPRET parser
    (``getenv_bool``) takes as true."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1, got {device.type} tensors")
    return backend


def _expect(cond: bool, exc: type[Exception], msg: str) -> None:
    if not cond:
        raise exc(msg)


def _check_tensor(t, name: str, ndim: int, layout: str) -> None:
    _expect(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _expect(t.ndim == ndim, ValueError, f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _check_caches(k_cache, v_cache, device) -> None:
    _check_tensor(k_cache, "k_cache", 4, "[num_pages, page_size, num_kv_heads, head_dim]")
    for dim, size in zip(("page_size", "num_kv_heads", "head_dim"), k_cache.shape[1:]):
        # an empty pool (num_pages 0) is valid; an empty page, head count or head is not (page ids divide by it)
        _expect(size > 0, ValueError, f"k_cache {dim} must be positive, got shape {tuple(k_cache.shape)} "
                                      "[num_pages, page_size, num_kv_heads, head_dim]")
    _check_tensor(v_cache, "v_cache", 4, "[num_pages, page_size, num_kv_heads, head_dim]")
    _expect(v_cache.shape == k_cache.shape, ValueError,
            f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    _expect(v_cache.dtype == k_cache.dtype, TypeError,
            f"v_cache dtype {v_cache.dtype} must equal k_cache dtype {k_cache.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _expect(t.device == device, ValueError, f"{name} is on {t.device}, expected {device}")
        _expect(t.stride(-1) == 1, ValueError, f"{name} must be contiguous in head_dim (stride(-1) == 1)")


def _check_index(t, name: str, ndim: int, layout: str, device) -> None:
    _check_tensor(t, name, ndim, layout)
    _expect(t.dtype in INDEX_DTYPES, TypeError, f"{name} must be int32 or int64, got {t.dtype}")
    _expect(t.device == device, ValueError, f"{name} is on {t.device}, expected {device}")


def _check_float_dtype(t: torch.Tensor, name: str, backend: str) -> None:
    """The backend computes in ``t``'s dtype: integer, bool, complex and fp8 are refused by both."""
    allowed = KERNEL_DTYPES if backend == "triton" else TORCH_DTYPES
    _expect(t.dtype in allowed, TypeError, f"{name} dtype must be one of {allowed} for backend {backend!r}, got {t.dtype}")


def _check_sm_scale(sm_scale, head_dim: int) -> float:
    """``sm_scale`` as the float the kernels take. A real number (int, float, numpy scalar), finite and
    positive; None means ``head_dim ** -0.5``. bool, complex and tensors are refused: a tensor would
    need a host read to become the kernel's scalar argument, so the caller converts it, knowingly."""
    if sm_scale is None:
        return head_dim ** -0.5
    _expect(isinstance(sm_scale, numbers.Real) and not isinstance(sm_scale, bool), TypeError,
            f"sm_scale must be a real number (int or float), got {type(sm_scale).__name__}")
    try:
        value = float(sm_scale)
    except OverflowError:   # an int past float's range
        value = math.inf
    _expect(math.isfinite(value) and value > 0, ValueError, f"sm_scale must be finite and positive, got {sm_scale}")
    return value


def _contiguous_indices(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels read index tensors as dense rows (only block_table's row stride is passed), so a
    strided view is copied here, on its device and without a host sync, before the range checks:
    the checks then check exactly the memory the kernel reads."""
    return tuple(t.contiguous() for t in tensors)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, backend: str = "auto", check_indices: bool = True) -> None:
    """Scatter new pre-RoPE keys and values into the paged caches, in place.

    Args:
        k: ``[T, num_kv_heads, head_dim]`` new keys, *before* RoPE; fp16/bf16/fp32 (torch backend: or fp64).
        v: ``[T, num_kv_heads, head_dim]`` new values.
        k_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, dtype of k.
        v_cache: same shape and dtype as k_cache.
        slot_mapping: ``[T]`` int32/int64, ``page * page_size + offset`` of each token; -1 skips it.
            Any strides (a strided view is copied on its device first).
    """
    _check_tensor(k, "k", 3, "[T, num_kv_heads, head_dim]")
    _check_tensor(v, "v", 3, "[T, num_kv_heads, head_dim]")
    _expect(v.shape == k.shape, ValueError, f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    _check_caches(k_cache, v_cache, k.device)
    _expect(k.shape[1:] == k_cache.shape[2:], ValueError,
            f"k is [T, {k.shape[1]}, {k.shape[2]}] but k_cache holds [.., .., {k_cache.shape[2]}, {k_cache.shape[3]}]")
    for name, t in (("k", k), ("v", v)):
        _expect(t.dtype == k_cache.dtype, TypeError, f"{name} dtype {t.dtype} must equal k_cache dtype {k_cache.dtype}")
        _expect(t.device == k_cache.device, ValueError, f"{name} is on {t.device}, expected {k_cache.device}")
        _expect(t.stride(-1) == 1, ValueError, f"{name} must be contiguous in head_dim (stride(-1) == 1)")
    _check_index(slot_mapping, "slot_mapping", 1, "[T]", k.device)
    _expect(slot_mapping.shape[0] == k.shape[0], ValueError,
            f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    chosen = _pick_backend(backend, k.device)
    _check_float_dtype(k, "k", chosen)
    (slot_mapping,) = _contiguous_indices(slot_mapping)
    if check_indices and slot_mapping.numel():
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = slot_mapping.min().item(), slot_mapping.max().item()
        _expect(lo >= -1 and hi < num_slots, ValueError,
                f"slot_mapping entries must be in [-1, {num_slots}) (num_pages * page_size), got [{lo}, {hi}]")
    if chosen == "torch":
        return reference.write_kv(k, v, k_cache, v_cache, slot_mapping)
    from cattn.launch import launch_write_kv
    launch_write_kv(k, v, k_cache, v_cache, slot_mapping)   # a copy: exact in bf16 under the interpreter too


def check_batch(block_table: torch.Tensor, kv_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                num_pages: int, page_size: int, total_q: int) -> int:
    """Check the values of a batch description once; returns ``max_q_len``. Reads them on the host.

    Raises ValueError if ``cu_seqlens_q`` is not a non-decreasing run from 0 to ``total_q``, if any
    ``kv_len < q_len`` or ``kv_len`` exceeds the table's pages, or a used page id is outside the pool.
    """
    cu = cu_seqlens_q.cpu().long()
    q_lens = cu[1:] - cu[:-1]
    _expect(cu[0].item() == 0 and cu[-1].item() == total_q, ValueError,
            f"cu_seqlens_q must start at 0 and end at total_q={total_q}, got {cu[0].item()}..{cu[-1].item()}")
    _expect(bool((q_lens >= 0).all()), ValueError, "cu_seqlens_q must be non-decreasing")
    lens = kv_lens.cpu().long()
    bad = (lens < q_lens).nonzero()
    _expect(bad.numel() == 0, ValueError,
            "kv_lens must be >= each sequence's q_len (query tokens are the last q_len of their sequence); "
            f"sequence {bad[0].item() if bad.numel() else -1} violates it")
    max_pages = block_table.shape[1]
    _expect(bool((lens <= max_pages * page_size).all()), ValueError,
            f"kv_lens exceed block_table capacity ({max_pages} pages x page_size {page_size})")
    used = torch.arange(max_pages)[None, :] < ((lens + page_size - 1) // page_size)[:, None]
    pages = block_table.cpu().long()[used]
    _expect(bool(((pages >= 0) & (pages < num_pages)).all()), ValueError,
            f"block_table entries used by kv_lens must be page ids in [0, {num_pages})")
    return int(q_lens.max().item()) if q_lens.numel() else 0


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    kv_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, rope: RopeSpec | None, *,
                    sm_scale: float | None = None, causal: bool = True, sliding_window: int | None = None,
                    logit_softcap: float | None = None, out: torch.Tensor | None = None,
                    backend: str = "auto", max_q_len: int | None = None,
                    check_indices: bool = True) -> torch.Tensor:
    """Attention of new query tokens over a paged, pre-RoPE KV cache; RoPE is applied inside.

    Sequence ``b`` has ``kv_lens[b]`` cached tokens (its new tokens' K/V already written) and
    ``q_len = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` query tokens, the last ``q_len`` of the
    sequence: query ``j`` sits at position ``kv_len - q_len + j`` and cached token ``i`` at ``i``.
    Prefill (``q_len == kv_len``), extend and decode (every ``q_len == 1``) share this entry.

    Args:
        q: ``[total_q, num_q_heads, head_dim]`` fp16/bf16/fp32 queries *before* RoPE (the torch backend
            also takes fp64). Under ``TRITON_INTERPRET=1`` the Triton backend computes bf16 in fp32.
        k_cache: ``[num_pages, page_size, num_kv_heads, head_dim]`` pre-RoPE keys, q's dtype;
            ``num_q_heads`` must be a multiple of ``num_kv_heads`` (GQA).
        v_cache: values, same shape and dtype as ``k_cache``.
        block_table: ``[B, max_pages]`` int32/int64, page ids of each sequence in order.
        kv_lens: ``[B]`` int32/int64, tokens cached per sequence.
        cu_seqlens_q: ``[B + 1]`` int32/int64, prefix sums of the query lengths. The index tensors
            may have any strides (a strided view is copied on its device first).
        rope: the model's `RopeSpec`, or None for no rotation.
        sm_scale: softmax scale, a finite positive int or float (not bool, complex or a tensor),
            default ``head_dim ** -0.5``.
        causal: mask keys after each query's position (bottom-right aligned).
        sliding_window: None, or an int >= 1: the query at position ``p`` sees only keys at positions
            ``k`` with ``p - k < sliding_window`` (HF's convention), on top of ``causal``.
        logit_softcap: None, or a finite float > 0: scores become
            ``logit_softcap * tanh(q.k * sm_scale / logit_softcap)`` before masking and softmax (Gemma 2).
        out: optional ``[total_q, num_q_heads, head_dim]`` output buffer of q's dtype.
        backend: ``"auto"`` (Triton on CUDA tensors; on CPU `cattn.cpu_attention`: SDPA over keys rotated
            from the cos/sin table), ``"triton"`` or ``"torch"`` (the plain reference, `cattn.reference`).
        max_q_len: the largest ``q_len`` if the caller knows it (saves a host read).
        check_indices: check the index tensors' values (host sync); see `check_batch`.

    Returns:
        ``[total_q, num_q_heads, head_dim]`` in q's dtype (``out`` if given).
    """
    _check_tensor(q, "q", 3, "[total_q, num_q_heads, head_dim]")
    _expect(q.shape[1] > 0, ValueError, f"q num_q_heads must be positive, got shape {tuple(q.shape)}")
    _check_caches(k_cache, v_cache, q.device)
    num_pages, page_size, num_kv_heads, head_dim = k_cache.shape
    _expect(q.shape[2] == head_dim, ValueError, f"q head_dim {q.shape[2]} must equal k_cache head_dim {head_dim}")
    _expect(q.shape[1] % num_kv_heads == 0, ValueError,
            f"q has {q.shape[1]} heads, not a multiple of k_cache's {num_kv_heads} KV heads")
    _expect(q.dtype == k_cache.dtype, TypeError, f"q dtype {q.dtype} must equal k_cache dtype {k_cache.dtype}")
    _expect(q.stride(-1) == 1, ValueError, "q must be contiguous in head_dim (stride(-1) == 1)")
    _check_index(block_table, "block_table", 2, "[B, max_pages]", q.device)
    batch = block_table.shape[0]
    _check_index(kv_lens, "kv_lens", 1, "[B]", q.device)
    _expect(kv_lens.shape[0] == batch, ValueError, f"kv_lens has {kv_lens.shape[0]} entries, block_table {batch} rows")
    _check_index(cu_seqlens_q, "cu_seqlens_q", 1, "[B + 1]", q.device)
    _expect(cu_seqlens_q.shape[0] == batch + 1, ValueError,
            f"cu_seqlens_q must have B + 1 = {batch + 1} entries, got {cu_seqlens_q.shape[0]}")
    _expect(rope is None or isinstance(rope, RopeSpec), TypeError, f"rope must be a RopeSpec or None, got {type(rope).__name__}")
    _expect(rope is None or rope.rotary_dim <= head_dim, ValueError,
            f"rope.rotary_dim {rope.rotary_dim if rope else 0} exceeds head_dim {head_dim}")
    _expect(sliding_window is None or (isinstance(sliding_window, int) and not isinstance(sliding_window, bool)),
            TypeError, f"sliding_window must be None or an int, got {type(sliding_window).__name__}")
    _expect(sliding_window is None or sliding_window >= 1, ValueError,
            f"sliding_window must be >= 1 (tokens), got {sliding_window}")
    _expect(logit_softcap is None or (isinstance(logit_softcap, (int, float)) and not isinstance(logit_softcap, bool)),
            TypeError, f"logit_softcap must be None or a float, got {type(logit_softcap).__name__}")
    _expect(logit_softcap is None or (math.isfinite(logit_softcap) and logit_softcap > 0), ValueError,
            f"logit_softcap must be finite and > 0, got {logit_softcap}")
    if out is not None:
        _check_tensor(out, "out", 3, "[total_q, num_q_heads, head_dim]")
        _expect(out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, ValueError,
                f"out must match q: {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
        _expect(out.stride(-1) == 1, ValueError, "out must be contiguous in head_dim (stride(-1) == 1)")
    sm_scale = _check_sm_scale(sm_scale, head_dim)
    chosen = _pick_backend(backend, q.device)
    _check_float_dtype(q, "q", chosen)
    block_table, kv_lens, cu_seqlens_q = _contiguous_indices(block_table, kv_lens, cu_seqlens_q)
    if check_indices:
        max_q_len = check_batch(block_table, kv_lens, cu_seqlens_q, num_pages, page_size, q.shape[0])
    if chosen == "torch":
        # "auto" off CUDA takes the CPU path built for speed; "torch" asks for the plain reference (the oracle)
        attend = cpu_attention.paged_attention if backend == "auto" else reference.paged_attention
        return attend(q, k_cache, v_cache, block_table, kv_lens, cu_seqlens_q, rope, sm_scale=sm_scale,
                      causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap, out=out)
    from cattn.launch import launch_paged_attention
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if batch else 0
    bf16_as_fp32 = q.dtype == torch.bfloat16 and interpreting()
    if bf16_as_fp32:
        # The interpreter multiplies bf16 bit patterns, not values: run on fp32 copies (the caches are
        # copied whole, acceptable at the interpreter's sizes) and round the output to bf16 once.
        bf16_out, q, k_cache, v_cache, out = out, q.float(), k_cache.float(), v_cache.float(), None
    attended = launch_paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_seqlens_q, rope,
                                      sm_scale=sm_scale, causal=causal, out=out, max_q_len=max_q_len,
                                      sliding_window=sliding_window,
                                      logit_softcap=None if logit_softcap is None else float(logit_softcap))
    if bf16_as_fp32:
        return attended.to(torch.bfloat16) if bf16_out is None else bf16_out.copy_(attended)
    return attended


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Rotate ``x [T, H, head_dim]`` at integer ``positions [T]`` by ``rope``; returns x's dtype."""
    _check_tensor(x, "x", 3, "[T, num_heads, head_dim]")
    _check_tensor(positions, "positions", 1, "[T]")
    _expect(positions.shape[0] == x.shape[0], ValueError, f"positions has {positions.shape[0]} entries for {x.shape[0]} tokens")
    _expect(not (positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool), TypeError,
            f"positions must be integers, got {positions.dtype}")
    _check_float_dtype(x, "x", "torch")
    _expect(positions.device == x.device, ValueError, f"positions is on {positions.device}, expected {x.device}")
    _expect(isinstance(rope, RopeSpec), TypeError, f"rope must be a RopeSpec, got {type(rope).__name__}")
    _expect(rope.rotary_dim <= x.shape[2], ValueError, f"rope.rotary_dim {rope.rotary_dim} exceeds head_dim {x.shape[2]}")
    return reference.apply_rope(x, positions, rope)


def dequant_kv(k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, *, phase: int = 0,
               group: int = 128) -> None:
    """Expand 8-bit history KV (`cattn.store.kvformat.codec`) into page slots, in place (Triton).

    Args:
        k_codes, v_codes: ``[T, num_kv_heads, head_dim]`` int8 or float8_e4m3fn, contiguous.
        k_scales: ``[G, 2, num_kv_heads, head_dim]`` per-channel key steps and offsets in the caches' dtype;
            token ``t`` uses row ``(phase + t) // group``.
        v_scales: ``[T, num_kv_heads]`` per-token value scales in the caches' dtype.
        k_cache, v_cache: contiguous ``[num_pages, page_size, num_kv_heads, head_dim]`` fp16/bf16/fp32.
        slot_mapping: ``[T]`` int, ``page * page_size + offset``; -1 skips a token.
    """
    _check_tensor(k_codes, "k_codes", 3, "[T, num_kv_heads, head_dim]")
    _check_caches(k_cache, v_cache, k_codes.device)
    T, heads, head_dim = k_codes.shape
    _expect(k_codes.dtype in (torch.int8, torch.float8_e4m3fn), TypeError,
            f"k_codes must be int8 or float8_e4m3fn, got {k_codes.dtype}")
    _expect(k_cache.dtype in (torch.float16, torch.bfloat16, torch.float32), TypeError,
            f"k_cache must be fp16/bf16/fp32, got {k_cache.dtype}")
    _expect(tuple(k_cache.shape[2:]) == (heads, head_dim) and k_cache.is_contiguous() and v_cache.is_contiguous(),
            ValueError, f"k_cache and v_cache must be contiguous [num_pages, page_size, {heads}, {head_dim}]")
    _expect(isinstance(group, int) and group >= 1 and isinstance(phase, int) and 0 <= phase < group, ValueError,
            f"need group >= 1 and 0 <= phase < group, got phase={phase!r}, group={group!r}")
    rows = -(-(phase + T) // group)
    for name, t, shape, dtype in (("v_codes", v_codes, (T, heads, head_dim), k_codes.dtype),
                                  ("v_scales", v_scales, (T, heads), k_cache.dtype)):
        _expect(isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == dtype, ValueError,
                f"{name} must be {list(shape)} {dtype}, got {getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}")
    _expect(isinstance(k_scales, torch.Tensor) and k_scales.ndim == 4 and k_scales.shape[0] >= rows
            and tuple(k_scales.shape[1:]) == (2, heads, head_dim) and k_scales.dtype == k_cache.dtype, ValueError,
            f"k_scales must be [>= {rows}, 2, {heads}, {head_dim}] {k_cache.dtype}, got "
            f"{getattr(k_scales, 'shape', k_scales)} {getattr(k_scales, 'dtype', '')}")
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes), ("k_scales", k_scales), ("v_scales", v_scales)):
        _expect(t.device == k_cache.device and t.is_contiguous(), ValueError, f"{name} must be contiguous on "
                f"{k_cache.device}")
    _check_index(slot_mapping, "slot_mapping", 1, "[T]", k_cache.device)
    _expect(slot_mapping.shape[0] == T, ValueError, f"slot_mapping has {slot_mapping.shape[0]} entries for {T} tokens")
    from cattn.launch import launch_dequant_kv
    launch_dequant_kv(k_codes, k_scales, v_codes, v_scales, k_cache, v_cache, slot_mapping.to(torch.int64).contiguous(),
                      phase=phase, group=group)
