"""cos/sin tables for the kernels: RoPE without trigonometry in the key loop.

A kernel that computed ``cos(position * inv_freq)`` per key tile would spend half its
instructions in libdevice's precise ``sinf``/``cosf`` (about 25 instructions a call, no
MUFU), and every key past position ~105K would take their slow path through local
memory. Instead each `RopeSpec` gets, per device and dtype, a table

    table[s, p, :]  =  cos(p * f_s) * attention_scaling  |  sin(p * f_s) * attention_scaling

of ``[num_sets, num_positions, rotary_dim]``, where set 0 holds the frequencies of short
sequences and set 1 (longrope only) those of sequences longer than
``original_max_position``. The kernels read a row per key and per query.

Numerics: the table is HF's own ``cos``/``sin`` tensor. The angle is ``p * inv_freq`` in
fp32, cos and sin are taken in fp32, multiplied by ``attention_scaling`` in fp32 and
rounded to the model dtype, exactly as HF's rotary embedding does before its multiply
(for 16-bit models it is bf16/fp16, for fp32 models fp32). HF then rotates in the model
dtype (each product rounded); the kernels rotate in fp32 from the same cos/sin and round
once, so their error is at most HF's.

Growth: a table covers a power-of-two number of positions (at least `MIN_POSITIONS`) and
is rebuilt larger when a launch may read past it; the launcher sizes it from the block
table's width, an upper bound on every ``kv_len`` known without a host sync. Positions
are never clamped.
"""
from __future__ import annotations

import threading
import weakref

import torch

from cattn.rope import RopeSpec

MIN_POSITIONS = 4096
_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # RopeSpec -> {(device, dtype): table}
_lock = threading.Lock()


def build_table(rope: RopeSpec, num_positions: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[num_sets, num_positions, rotary_dim]`` cos | sin of positions ``0..num_positions-1``, in ``dtype``.

    ``num_sets`` is 2 for longrope (short factors, then long), else 1.
    """
    sets = [rope.inv_freq] if rope.long_inv_freq is None else [rope.inv_freq, rope.long_inv_freq]
    positions = torch.arange(num_positions, dtype=torch.float32, device=device)
    rows = []
    for inv_freq in sets:
        angle = positions[:, None] * inv_freq.to(device=device, dtype=torch.float32)[None, :]   # fp32, as HF
        scale = float(rope.attention_scaling)
        rows.append(torch.cat([angle.cos() * scale, angle.sin() * scale], dim=-1).to(dtype))
    return torch.stack(rows).contiguous()


def cos_sin_table(rope: RopeSpec, num_positions: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The cached table of ``rope`` on ``device`` in ``dtype`` covering at least ``num_positions`` positions.

    Built once per (spec, device, dtype) and grown by powers of two; the same tensor is
    returned while it is large enough, so a step's layers share it.
    """
    device = torch.device(device)
    with _lock:
        per_spec = _tables.setdefault(rope, {})
        table = per_spec.get((device, dtype))
        if table is None or table.shape[1] < num_positions:
            size = max(MIN_POSITIONS, 1 << max(0, int(num_positions) - 1).bit_length())
            table = build_table(rope, size, dtype, device)
            per_spec[(device, dtype)] = table
        return table
