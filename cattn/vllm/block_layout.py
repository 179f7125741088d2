"""How vLLM's attention backends lay out one KV block, as a pair of pure functions.

The connector stores a block as vLLM hands it over, row for row; that is exact for any layout, but it
cannot say which numbers are token ``t``'s key. A shifted load (docs/vllm.md, "Truncation") needs
exactly that: tokens come out of stored blocks at their old positions, their keys are rotated, and
they go into other blocks at other offsets. A `BlockLayout` decodes whole blocks into token-major
keys and values and encodes them back, bit for bit (it only moves numbers).

Layouts known (each probed against the backend's own cache writer, see tests/vllm/test_block_layout.py):

- ``cpu-vec`` and ``cpu-vec16``: vLLM 0.32's CPU backend with ISA ``vec``/``vec16`` (fp32, bf16,
  fp16). The connector sees a layer as ``[B, H, N, 2D]``; per block and head, the backend's
  ``2*N*D`` numbers are the key cache (``N*D``, *transposed*: element ``d*N + t`` is ``key[t, d]``)
  then the value cache (``N*D``, token-major: element ``t*D + d`` is ``value[t, d]``).
- ``flash``: FlashAttention's ``[2, num_blocks, N, H, D]`` cache, token-major; blocks are the
  selection ``cache[:, block_ids]`` of shape ``[2, B, N, H, D]``. (The worker takes 4-D caches only
  today, so this layout is tested on synthetic tensors only.)

Any other backend or ISA (``amx`` keeps bf16 blocks in AMX tiles) is unknown: `layout_named`
returns None and the connector never shifts into it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuVecLayout:
    """vLLM's CPU backend, ISA ``vec``/``vec16``: blocks ``[B, H, N, 2D]`` (the connector's view)."""

    name: str = "cpu-vec"

    def decode(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``blocks [B, H, N, 2D]`` -> ``(key, value)``, each ``[B, N, H, D]`` (new tensors, same dtype)."""
        if blocks.ndim != 4 or blocks.shape[-1] % 2:
            raise ValueError(f"blocks must be [B, H, N, 2D], got {tuple(blocks.shape)}")
        b, h, n, c = blocks.shape
        d = c // 2
        flat = blocks.reshape(b, h, 2 * n * d)
        key = flat[..., :n * d].reshape(b, h, d, n).permute(0, 3, 1, 2)
        value = flat[..., n * d:].reshape(b, h, n, d).permute(0, 2, 1, 3)
        return key.contiguous(), value.contiguous()

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``key, value [B, N, H, D]`` -> ``blocks [B, H, N, 2D]``, the inverse of `decode`."""
        _check_pair(key, value)
        b, n, h, d = key.shape
        k = key.permute(0, 2, 3, 1).reshape(b, h, n * d)
        v = value.permute(0, 2, 1, 3).reshape(b, h, n * d)
        return torch.cat([k, v], dim=-1).reshape(b, h, n, 2 * d)


@dataclass(frozen=True)
class FlashLayout:
    """FlashAttention's cache: blocks ``[2, B, N, H, D]`` (``cache[:, block_ids]``), token-major."""

    name: str = "flash"

    def decode(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``blocks [2, B, N, H, D]`` -> ``(key, value)``, each ``[B, N, H, D]``."""
        if blocks.ndim != 5 or blocks.shape[0] != 2:
            raise ValueError(f"blocks must be [2, B, N, H, D], got {tuple(blocks.shape)}")
        return blocks[0].clone(), blocks[1].clone()

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``key, value [B, N, H, D]`` -> ``blocks [2, B, N, H, D]``."""
        _check_pair(key, value)
        return torch.stack([key, value])


BlockLayout = CpuVecLayout | FlashLayout

_LAYOUTS = {"cpu-vec": CpuVecLayout("cpu-vec"), "cpu-vec16": CpuVecLayout("cpu-vec16"), "flash": FlashLayout()}


def layout_named(name: str | None) -> BlockLayout | None:
    """The layout called ``name`` (``"cpu-<isa>"`` for vLLM's CPU backend, ``"flash"``), or None if
    unknown: an unknown layout is never decoded."""
    return _LAYOUTS.get(name) if isinstance(name, str) else None


def _check_pair(key: torch.Tensor, value: torch.Tensor) -> None:
    if not isinstance(key, torch.Tensor) or key.ndim != 4:
        raise ValueError(f"key must be a [B, N, H, D] tensor, got {getattr(key, 'shape', key)!r}")
    if not isinstance(value, torch.Tensor) or value.shape != key.shape or value.dtype != key.dtype:
        raise ValueError(f"value must match key's shape {tuple(key.shape)} and dtype {key.dtype}, got "
                         f"{getattr(value, 'shape', value)!r} {getattr(value, 'dtype', '')}")
