"""How one chunk of a session's KV is laid out in bytes, in the host pool and in a chunk file.

A chunk holds ``m`` consecutive tokens of one session: ``k [L, m, Hkv, D]`` followed
by ``v [L, m, Hkv, D]``, both C-contiguous, so one layer's slice ``k[l]`` is one
contiguous run of bytes (what a layer-wise copy wants). Token ids are kept beside
the bytes (in memory, and in the chunk file's header), not inside them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 256  # bytes: extents start on a boundary that suits memcpy and DMA alike

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)}


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype shared by every chunk of an entry."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES.values():
            raise TypeError(f"KV dtype must be one of {sorted(DTYPES)}, got {self.dtype}")

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
        """Bytes of K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def payload_nbytes(self, num_tokens: int) -> int:
        return num_tokens * self.token_nbytes

    def extent_nbytes(self, num_tokens: int) -> int:
        """Bytes a chunk of ``num_tokens`` takes in the host pool (aligned)."""
        return align_up(self.payload_nbytes(num_tokens))

    def views(self, buf: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v [L, num_tokens, Hkv, D]`` views of the uint8 buffer ``buf`` (at least the payload long)."""
        half = self.payload_nbytes(num_tokens) // 2
        shape = (self.num_layers, num_tokens, self.num_kv_heads, self.head_dim)
        return buf[:half].view(self.dtype).view(shape), buf[half:2 * half].view(self.dtype).view(shape)

    def to_json(self) -> dict:
        return dict(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                    dtype=str(self.dtype).removeprefix("torch."))

    @classmethod
    def from_json(cls, d: dict) -> KVLayout:
        """Raises KeyError/TypeError/ValueError on anything this version does not know."""
        return cls(d["num_layers"], d["num_kv_heads"], d["head_dim"], DTYPES[d["dtype"]])
