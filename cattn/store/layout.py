"""How one chunk of a session's KV is laid out in bytes, in the host pool and in a chunk file.

A chunk holds ``m`` consecutive tokens of one session. Lossless (the default): ``k [L, m, Hkv, D]``
followed by ``v [L, m, Hkv, D]``, both C-contiguous, so one layer's slice ``k[l]`` is one contiguous
run of bytes (what a layer-wise copy wants). 8-bit (``kv_format`` ``"int8"`` or ``"fp8"``,
`cattn.store.kvformat.codec`): one block per layer, so that a layer is one run of bytes and one read,
its scales inside it (and so inside its checksum)::

    layer l: k codes [m, Hkv, D] | v codes [m, Hkv, D] | k scales [G, 2, Hkv, D] | v scales [m, Hkv]

codes 1 byte each, scales in the model dtype (a key group's row: step, then offset),
``G = ceil(m / KEY_GROUP)``, each part starting on a 16-byte boundary. Headers record an 8-bit layout
with the version of its codes (`CODE_VERSION`): an entry written by codes of another version is a
miss, never misread. Token ids are kept beside the bytes (in memory, and in the chunk file's header),
not inside them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cattn.store.kvformat.codec import FORMATS, LOSSLESS, num_key_groups

# KV an 8-bit format applies to (the Triton dequantization writes these); fp64 (test oracles) and KV that is
# already 8 bits wide stay lossless.
QUANTIZABLE = (torch.float16, torch.bfloat16, torch.float32)
ALIGN = 256  # bytes: extents start on a boundary that suits memcpy and DMA alike
CODE_VERSION = 2   # of the 8-bit codes: 2 centres the keys (step and offset per channel); 1 was symmetric

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)}


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class QuantBlock:
    """Byte offsets of the parts of one layer's block in an 8-bit chunk of ``num_tokens``, and its size."""

    k_codes: int
    v_codes: int
    k_scales: int
    v_scales: int
    nbytes: int

    @classmethod
    def of(cls, num_tokens: int, num_kv_heads: int, head_dim: int, scale_itemsize: int) -> QuantBlock:
        codes = num_tokens * num_kv_heads * head_dim
        k_scales = 2 * align_up(codes, 16)
        v_scales = k_scales + align_up(num_key_groups(num_tokens) * 2 * num_kv_heads * head_dim * scale_itemsize, 16)
        return cls(0, align_up(codes, 16), k_scales, v_scales,
                   align_up(v_scales + num_tokens * num_kv_heads * scale_itemsize, 16))


@dataclass(frozen=True)
class KVLayout:
    """Shape, dtype and stored format shared by every chunk of an entry.

    ``dtype`` is the model's KV dtype (what a reader gets back); ``kv_format`` how the chunks hold it:
    ``"lossless"`` (the dtype's own bytes) or an 8-bit format (codes and scales, see the module docstring).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    kv_format: str = LOSSLESS

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES.values():
            raise TypeError(f"KV dtype must be one of {sorted(DTYPES)}, got {self.dtype}")
        if self.kv_format not in FORMATS:
            raise ValueError(f"kv_format must be one of {FORMATS}, got {self.kv_format!r}")
        if self.kv_format != LOSSLESS and self.dtype not in QUANTIZABLE:
            raise TypeError(f"an 8-bit kv_format needs a KV dtype in {QUANTIZABLE}, got {self.dtype}")

    def stored_as(self, kv_format: str) -> KVLayout:
        """This layout as a store of ``kv_format`` keeps it: fp64 KV, and KV already 8 bits wide, stay lossless."""
        fmt = kv_format if self.dtype in QUANTIZABLE else LOSSLESS
        return self if fmt == self.kv_format else KVLayout(self.num_layers, self.num_kv_heads, self.head_dim,
                                                           self.dtype, fmt)

    @property
    def quantized(self) -> bool:
        return self.kv_format != LOSSLESS

    def block(self, num_tokens: int) -> QuantBlock:
        """The per-layer block of an 8-bit chunk of ``num_tokens``."""
        return QuantBlock.of(num_tokens, self.num_kv_heads, self.head_dim, self.dtype.itemsize)

    @classmethod
    def of(cls, entry) -> KVLayout:
        """The layout of ``entry`` (a `cattn.store.contract.KVEntry`: its ``token_ids``, ``k``, ``v``); raises
        TypeError on k/v dtype mismatch or int64-less token ids."""
        if entry.v.dtype != entry.k.dtype:
            raise TypeError(f"entry.v dtype {entry.v.dtype} must equal entry.k dtype {entry.k.dtype}")
        if entry.token_ids.dtype != torch.int64:
            raise TypeError(f"entry.token_ids must be int64, got {entry.token_ids.dtype}")
        num_layers, _, num_kv_heads, head_dim = entry.k.shape
        return cls(num_layers, num_kv_heads, head_dim, entry.k.dtype)

    @property
    def token_nbytes(self) -> int:
        """Bytes of K and V of one token across all layers, in the model dtype (what a reader gets)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def payload_nbytes(self, num_tokens: int) -> int:
        """Bytes a chunk of ``num_tokens`` holds in this layout's format."""
        if self.quantized:
            return self.num_layers * self.block(num_tokens).nbytes
        return num_tokens * self.token_nbytes

    def layer_spans(self, num_tokens: int) -> list[tuple[tuple[int, int], ...]]:
        """Per layer, the ``(offset, nbytes)`` runs of a chunk's payload that hold it, in order: ``k[l]`` and
        ``v[l]`` (lossless), or its one block (8-bit)."""
        if self.quantized:
            n = self.block(num_tokens).nbytes
            return [((l * n, n),) for l in range(self.num_layers)]
        half = self.payload_nbytes(num_tokens) // 2
        n = half // self.num_layers
        return [((l * n, n), (half + l * n, n)) for l in range(self.num_layers)]

    def extent_nbytes(self, num_tokens: int) -> int:
        """Bytes a chunk of ``num_tokens`` takes in the host pool (aligned)."""
        return align_up(self.payload_nbytes(num_tokens))

    def views(self, buf: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v [L, num_tokens, Hkv, D]`` views of the uint8 buffer ``buf`` (at least the payload long);
        lossless layouts only (`cattn.store.kvformat.segment.chunk_segment` reads either)."""
        if self.quantized:
            raise ValueError(f"a {self.kv_format} chunk holds codes and scales, not k and v: use chunk_segment")
        half = self.payload_nbytes(num_tokens) // 2
        shape = (self.num_layers, num_tokens, self.num_kv_heads, self.head_dim)
        return buf[:half].view(self.dtype).view(shape), buf[half:2 * half].view(self.dtype).view(shape)

    def to_json(self) -> dict:
        """The layout as the disk and Redis headers record it (a lossless one exactly as before formats)."""
        out = dict(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                   dtype=str(self.dtype).removeprefix("torch."))
        return out | (dict(kv_format=self.kv_format, codes=CODE_VERSION) if self.quantized else {})

    @classmethod
    def from_json(cls, d: dict) -> KVLayout:
        """Raises KeyError/TypeError/ValueError on anything this version does not know."""
        if set(d) - {"num_layers", "num_kv_heads", "head_dim", "dtype", "kv_format", "codes"}:
            raise ValueError(f"unknown layout fields {sorted(set(d))}")
        if d.get("kv_format", LOSSLESS) != LOSSLESS and d.get("codes") != CODE_VERSION:
            raise ValueError(f"8-bit codes of version {d.get('codes', 1)}; this version reads {CODE_VERSION}")
        return cls(d["num_layers"], d["num_kv_heads"], d["head_dim"], DTYPES[d["dtype"]], d.get("kv_format", LOSSLESS))
