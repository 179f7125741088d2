"""Tile configurations tuned per device: ``cattn/configs/<device>.json``, written by ``bench/tune.py`` on it.

A file maps a kernel (``prefill``, ``decode``) and a problem class (``<dtype>_d<head_dim>_g<group>``)
to the `TileConfig` that measured fastest there among those that pass the machine-code gate.
The launchers look a problem up in the file of the device they run on and fall back to the
rule of `cattn.launch` for anything the file does not hold (another device, another shape,
the interpreter). CI compiles and gates every entry of every file shipped here.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
KERNELS = ("prefill", "decode")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class TileConfig:
    """One tile configuration: rows per program, keys per tile, warps, software-pipeline stages."""

    block_rows: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_rows", "block_n", "num_warps", "num_stages"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"TileConfig.{name} must be a positive int, got {value!r}")
        for name in ("block_rows", "block_n", "num_warps"):
            if getattr(self, name) & (getattr(self, name) - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two, got {getattr(self, name)}")


def device_file_name(device_name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200.json"``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + ".json"


def problem_key(dtype: torch.dtype, head_dim: int, group: int) -> str:
    return f"{DTYPE_NAMES[dtype]}_d{head_dim}_g{group}"


def parse(payload: dict, source: str) -> dict[str, dict[str, TileConfig]]:
    """``{kernel: {problem key: TileConfig}}`` of a tuned file's payload; errors name ``source`` and the entry."""
    out = {}
    for kernel in KERNELS:
        entries = payload.get(kernel, {})
        if not isinstance(entries, dict):
            raise ValueError(f"{source}: '{kernel}' must map problem keys to configurations")
        out[kernel] = {}
        for key, cfg in entries.items():
            try:
                out[kernel][key] = TileConfig(**{f: cfg[f] for f in ("block_rows", "block_n", "num_warps",
                                                                      "num_stages")})
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{source}: {kernel}[{key!r}] is not a tile configuration: {exc}") from exc
    return out


@lru_cache(maxsize=None)
def load(file_name: str) -> dict[str, dict[str, TileConfig]]:
    """The tuned configurations in ``cattn/configs/<file_name>`` (empty if there is none)."""
    path = HERE / file_name
    if not path.exists():
        return {kernel: {} for kernel in KERNELS}
    return parse(json.loads(path.read_text()), str(path.name))


def shipped_files() -> list[Path]:
    return sorted(HERE.glob("*.json"))


def tuned(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> TileConfig | None:
    """The tuned configuration of this problem on ``device``, or None."""
    if device.type != "cuda" or dtype not in DTYPE_NAMES:
        return None
    return load(_file_of(device.index if device.index is not None else torch.cuda.current_device()))[kernel].get(
        problem_key(dtype, head_dim, group))


@lru_cache(maxsize=None)
def _file_of(device_index: int) -> str:
    return device_file_name(torch.cuda.get_device_name(device_index))
