"""A chunk's tokens in the host pool, whatever its format: `chunk_segment` makes the views, and an 8-bit
chunk's are a `QuantSegment` (codes and scales) with the same methods as a lossless `Segment`.

Dequantization happens where the copy to the pages does (`scatter_layer`): on CUDA the 8-bit bytes
cross PCIe and a Triton kernel expands them straight into the page slots (`cattn.ops.dequant_kv`);
on CPU torch expands them in cache-sized blocks. Quantization happens where a layer is saved
(`write_layer`): on the device before the copy to the host when the KV is there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cattn.store.kvformat.codec import (
    CODE_DTYPES, KEY_GROUP, dequantize_keys, dequantize_values, num_key_groups, quantize_keys, quantize_values)
from cattn.store.layout import KVLayout
from cattn.store.lease import Segment

_READ_IT = "read it with scatter_layer(), layer() or read_into(), write it with write_layer()"
_CPU_BLOCK = 128   # tokens per CPU dequantization block (stays in cache until gathered); shorter runs of
                  # consecutive slots are gathered too, longer ones written in place


def chunk_segment(layout: KVLayout, buf: torch.Tensor, num_tokens: int, start: int = 0, lo: int = 0,
                  hi: int | None = None) -> Segment | QuantSegment:
    """Tokens ``[lo, hi)`` (default all) of the chunk of ``num_tokens`` whose payload is the uint8 buffer
    ``buf`` (a pool extent, at least ``layout.payload_nbytes(num_tokens)`` long), as the entry's tokens
    from ``start`` on: a `Segment` of views (lossless) or a `QuantSegment` of views (8-bit)."""
    hi = num_tokens if hi is None else hi
    if not layout.quantized:
        k, v = layout.views(buf, num_tokens)
        return Segment(start, k[:, lo:hi], v[:, lo:hi])
    L, h, d, b = layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block(num_tokens)
    blocks = buf[:L * b.nbytes].view(L, b.nbytes)
    codes, g = num_tokens * h * d, num_key_groups(num_tokens)

    def part(offset: int, nbytes: int, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return blocks[:, offset:offset + nbytes].view(dtype).view(L, *shape)

    code = CODE_DTYPES[layout.kv_format]
    item = layout.dtype.itemsize
    return QuantSegment(start, part(b.k_codes, codes, code, num_tokens, h, d)[:, lo:hi],
                        part(b.v_codes, codes, code, num_tokens, h, d)[:, lo:hi],
                        part(b.k_scales, g * 2 * h * d * item, layout.dtype, g, 2, h, d)[:, lo // KEY_GROUP:],
                        part(b.v_scales, num_tokens * h * item, layout.dtype, num_tokens, h)[:, lo:hi],
                        lo % KEY_GROUP, layout.kv_format)


@dataclass(frozen=True)
class QuantSegment:
    """Tokens ``[start, start + n)`` of an entry, held 8-bit (`cattn.store.kvformat.codec`).

    Attributes:
        k_codes, v_codes: ``[L, n, Hkv, D]`` int8 / float8_e4m3fn views; each layer's slice is contiguous.
        k_scales: ``[L, G, 2, Hkv, D]`` model dtype: the chunk's key scale rows (step, offset) from the one of
            the first token.
        v_scales: ``[L, n, Hkv]`` model dtype.
        phase: the first token's place in its key group (token ``t`` uses row ``(phase + t) // KEY_GROUP``).
        kv_format: ``"int8"`` or ``"fp8"``.
    """

    start: int
    k_codes: torch.Tensor
    v_codes: torch.Tensor
    k_scales: torch.Tensor
    v_scales: torch.Tensor
    phase: int
    kv_format: str

    @property
    def num_tokens(self) -> int:
        return self.k_codes.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype it dequantizes to."""
        return self.k_scales.dtype

    @property
    def nbytes(self) -> int:
        rows = num_key_groups(self.phase + self.num_tokens)
        return self.k_codes.nbytes + self.v_codes.nbytes + self.k_scales[:, :rows].nbytes + self.v_scales.nbytes

    @property
    def k(self):
        raise TypeError(f"an 8-bit segment holds codes and scales, not k: {_READ_IT}")

    @property
    def v(self):
        raise TypeError(f"an 8-bit segment holds codes and scales, not v: {_READ_IT}")

    def layers_from(self, first: int) -> QuantSegment:
        return QuantSegment(self.start, self.k_codes[first:], self.v_codes[first:], self.k_scales[first:],
                            self.v_scales[first:], self.phase, self.kv_format)

    def layer(self, layer: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s ``k, v [n, Hkv, D]`` in the model dtype, dequantized on ``device``."""
        kc, ks, vc, vs = self._layer_on(layer, torch.device(device))
        return (dequantize_keys(kc, ks, self.dtype, phase=self.phase),
                dequantize_values(vc, vs, self.dtype))

    def read_into(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Dequantize the segment into ``k, v [L, n, Hkv, D]`` of the model dtype on the host, layer by layer in
        place (each layer's slice must be contiguous, as a whole entry's tensors' are)."""
        for layer in range(self.k_codes.shape[0]):
            kc, ks, vc, vs = self._layer_on(layer, torch.device("cpu"))
            dequantize_keys(kc, ks, self.dtype, phase=self.phase, out=k[layer])
            dequantize_values(vc, vs, self.dtype, out=v[layer])

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, non_blocking: bool = False) -> None:
        """Quantize layer ``layer``'s ``k, v [n, Hkv, D]`` into the segment (a whole chunk: ``phase`` 0): on
        their device, then copied to the host (queued on the current stream with ``non_blocking``)."""
        if self.phase:
            raise ValueError("only a whole chunk's segment is written")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"k and v must be {self.dtype}, got {k.dtype} and {v.dtype}")
        out = (self.k_codes[layer], self.k_scales[layer], self.v_codes[layer], self.v_scales[layer])
        if k.device.type == "cpu" and v.device.type == "cpu":   # straight into the pool
            quantize_keys(k, self.kv_format, codes=out[0], scales=out[1])
            quantize_values(v, self.kv_format, codes=out[2], scales=out[3])
            return
        made = quantize_keys(k, self.kv_format) + quantize_values(v, self.kv_format)
        for dst, src in zip(out, made):
            dst.copy_(src, non_blocking=non_blocking)

    def scatter_layer(self, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
        """Dequantize layer ``layer`` into paged caches ``[num_pages, page_size, Hkv, D]`` at ``slots [n]
        int64``: on CUDA the codes and scales are copied (asynchronously, on the current stream) and a
        Triton kernel writes the slots; on CPU torch does, a block of tokens at a time."""
        device = k_cache.device
        kc, ks, vc, vs = self._layer_on(layer, device)
        if device.type == "cuda":
            from cattn.ops import dequant_kv   # the kernel's public op; imported only where it runs
            dequant_kv(kc, ks, vc, vs, k_cache, v_cache, slots, phase=self.phase)
            return
        k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        block = None
        for a, b, direct in _runs(slots):
            at, n = self.phase + a, b - a
            if direct:   # consecutive slots: dequantize straight into the cache
                dst = slots[a].item()
                k_out, v_out = k_flat[dst:dst + n], v_flat[dst:dst + n]
            else:        # scattered: dequantize into a block in cache, then gather it in
                block = torch.empty(_CPU_BLOCK, *kc.shape[1:], dtype=self.dtype) if block is None else block
                k_out = v_out = block[:n]
            k = dequantize_keys(kc[a:b], ks[at // KEY_GROUP:], self.dtype, phase=at % KEY_GROUP, out=k_out)
            if not direct:
                k_flat.index_copy_(0, slots[a:b], k)
            v = dequantize_values(vc[a:b], vs[a:b], self.dtype, out=v_out)
            if not direct:
                v_flat.index_copy_(0, slots[a:b], v)

    def _layer_on(self, layer: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        rows = num_key_groups(self.phase + self.num_tokens)
        parts = (self.k_codes[layer], self.k_scales[layer, :rows], self.v_codes[layer], self.v_scales[layer])
        return tuple(p.to(device, non_blocking=True) for p in parts)


def _runs(slots: torch.Tensor) -> list[tuple[int, int, bool]]:
    """``slots [n]`` cut into ``(a, b, consecutive)`` pieces: runs of at least ``_CPU_BLOCK`` consecutive
    slots (written in place), and the rest in blocks of at most ``_CPU_BLOCK`` tokens."""
    n = slots.numel()
    breaks = [0] + (torch.nonzero(slots.diff() != 1).flatten() + 1).tolist() + [n]
    out, loose = [], 0          # loose: where the tokens not yet in a piece start
    for a, b in zip(breaks, breaks[1:]):
        if b - a >= _CPU_BLOCK:
            out += [(x, min(x + _CPU_BLOCK, a), False) for x in range(loose, a, _CPU_BLOCK)]
            out.append((a, b, True))
            loose = b
    out += [(x, min(x + _CPU_BLOCK, n), False) for x in range(loose, n, _CPU_BLOCK)]
    return out
