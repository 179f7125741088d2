"""Cost model of the simulated replay: model shapes, the machine, and what each step costs.

Every figure is derived from a model's shape and a few hardware constants (see
docs/replay.md for the assumptions):

- KV bytes per token = 2 (K and V) x layers x KV heads x head_dim x dtype bytes on the GPU; in the
  host tiers and over PCIe the same, or with ``kv_format`` 8-bit one byte per element plus scales.
- Prefill FLOPs of n new tokens after h cached ones = 2 x params x n (the matmuls)
  + 4 x layers x query heads x head_dim x (n h + n^2 / 2) (QK^T and PV, causal);
  time = FLOPs / (GPUs x peak x MFU).
- Decode, batched: each step reads the weights once for the batch and each
  sequence's KV once, so one output token costs weights / batch + its context's KV,
  over the GPUs' HBM bandwidth.
- History KV comes host->GPU over PCIe (one link per GPU, tensor parallel) layer by
  layer while the new tokens prefill, so only max(0, load - prefill) is exposed; a
  history on disk is first read into DRAM at the disk's read bandwidth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from cattn.store.kvformat.names import FORMATS, LOSSLESS, host_bytes_per_token


@dataclass(frozen=True)
class ModelShape:
    """The shape figures the cost model needs (HF config names in comments)."""

    name: str
    num_layers: int       # num_hidden_layers
    num_heads: int        # num_attention_heads
    num_kv_heads: int     # num_key_value_heads
    head_dim: int
    params: float         # parameter count
    max_context: int      # max_position_embeddings
    dtype_bytes: int = 2  # fp16/bf16 weights and KV

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model shape: name must be a non-empty string, got {self.name!r}")
        for f in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "max_context", "dtype_bytes"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model shape {self.name!r}: {f} must be an int >= 1, got {value!r}")
        if isinstance(self.params, bool) or not isinstance(self.params, (int, float)) or not self.params > 0:
            raise ValueError(f"model shape {self.name!r}: params must be > 0, got {self.params!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model shape {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes


MODELS = {m.name: m for m in (
    ModelShape("llama2-13b", 40, 40, 40, 128, 13.0e9, 4096),
    ModelShape("llama2-70b", 80, 64, 8, 128, 69.0e9, 4096),
    ModelShape("llama3-8b", 32, 32, 8, 128, 8.03e9, 8192),
    ModelShape("llama3.1-8b", 32, 32, 8, 128, 8.03e9, 131072),
    ModelShape("llama3.1-70b", 80, 64, 8, 128, 70.6e9, 131072),
    ModelShape("qwen2.5-7b", 28, 28, 4, 128, 7.62e9, 32768),
    ModelShape("qwen2.5-7b-128k", 28, 28, 4, 128, 7.62e9, 131072),  # YaRN x4, as Qwen documents it
    ModelShape("falcon-40b", 60, 128, 8, 64, 41.8e9, 2048),
)}


def model_shape(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


_DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}
_SPEC_FIELDS = {"name": "name", "layers": "num_layers", "heads": "num_heads", "kv_heads": "num_kv_heads",
                "head_dim": "head_dim", "params": "params", "context": "max_context", "dtype": "dtype_bytes"}


def parse_model_shape(spec: str) -> ModelShape:
    """Any model shape from ``key=value`` pairs, e.g.
    ``layers=32,kv_heads=8,head_dim=128,dtype=bf16,context=131072,params=8.03e9``.

    Keys: ``layers``, ``kv_heads``, ``head_dim``, ``context`` (tokens), ``dtype`` (of the KV and the
    weights: fp32, fp16, bf16, fp8 or a byte count), and the prefill cost as ``params`` (matmul FLOPs
    per token = 2 x params) or ``flops_per_token``; optional ``heads`` (query heads, default
    ``kv_heads``) and ``name``. Raises ValueError naming the bad or missing field.
    """
    if not isinstance(spec, str):
        raise TypeError(f"model shape spec must be a string, got {type(spec).__name__}")
    fields: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = (t.strip() for t in part.partition("="))
        if not eq or not value:
            raise ValueError(f"model shape: expected key=value, got {part!r}")
        if key not in _SPEC_FIELDS and key != "flops_per_token":
            raise ValueError(f"model shape: unknown field {key!r}; use {', '.join([*_SPEC_FIELDS, 'flops_per_token'])}")
        try:
            if key == "name":
                fields["name"] = value
            elif key == "dtype":
                fields["dtype_bytes"] = _DTYPE_BYTES[value.lower()] if value.lower() in _DTYPE_BYTES else int(value)
            elif key in ("params", "flops_per_token"):
                fields["params"] = float(value) / (2 if key == "flops_per_token" else 1)
            else:
                number = float(value)
                if number != int(number):
                    raise ValueError
                fields[_SPEC_FIELDS[key]] = int(number)
        except (ValueError, OverflowError):
            raise ValueError(f"model shape: field {key!r} has a bad value {value!r}") from None
    missing = [k for k in ("layers", "kv_heads", "head_dim", "context") if _SPEC_FIELDS[k] not in fields]
    if "params" not in fields:
        missing.append("params (or flops_per_token)")
    if missing:
        raise ValueError(f"model shape: missing field(s) {', '.join(missing)}")
    fields.setdefault("num_heads", fields["num_kv_heads"])
    fields.setdefault("name", "custom")
    return ModelShape(**fields)


@dataclass(frozen=True)
class Hardware:
    """The serving machine; defaults are the paper's (4x A100-80GB SXM, PCIe Gen4, NVMe SSDs).

    Attributes:
        gpus: GPUs serving one model (tensor parallel).
        peak_flops: dense fp16/bf16 FLOP/s of one GPU.
        mfu: fraction of peak that prefill reaches.
        hbm_bytes_per_s: HBM bandwidth of one GPU.
        pcie_bytes_per_s: host->GPU bandwidth of one GPU's link (pinned memory).
        disk_read_bytes_per_s, disk_write_bytes_per_s: the SSD array.
        decode_batch: sequences decoded together (continuous batching).
        gpu_hour_usd, dram_gb_hour_usd, disk_gb_hour_usd: prices for the cost figure.
    """

    gpus: int = 4
    peak_flops: float = 312e12
    mfu: float = 0.5
    hbm_bytes_per_s: float = 2.0e12
    pcie_bytes_per_s: float = 25e9
    disk_read_bytes_per_s: float = 5e9
    disk_write_bytes_per_s: float = 3e9
    decode_batch: int = 32
    gpu_hour_usd: float = 5.12
    dram_gb_hour_usd: float = 0.0079
    disk_gb_hour_usd: float = 0.00018

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class CostModel:
    """What each step costs. ``kv_format``: how the host tiers keep KV (`cattn.store.kvformat`): it sets
    the bytes of a history in DRAM and on disk, read from disk and sent over PCIe (dequantized on the
    GPU, whose pages and decode reads stay in the model dtype)."""

    model: ModelShape
    hw: Hardware = field(default_factory=Hardware)
    kv_format: str = LOSSLESS

    def __post_init__(self):
        if self.kv_format not in FORMATS:
            raise ValueError(f"kv_format must be one of {FORMATS}, got {self.kv_format!r}")

    @property
    def host_kv_bytes_per_token(self) -> float:
        """Bytes of one token's K and V in the host tiers and over PCIe (`host_bytes_per_token`)."""
        m = self.model
        return host_bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim, m.dtype_bytes, self.kv_format)

    def prefill_time(self, new_tokens: int, cached_tokens: int) -> float:
        """Seconds to prefill ``new_tokens`` after ``cached_tokens`` of history KV."""
        m, n, h = self.model, new_tokens, cached_tokens
        flops = 2 * m.params * n + 4 * m.num_layers * m.num_heads * m.head_dim * (n * h + n * n / 2)
        return flops / (self.hw.gpus * self.hw.peak_flops * self.hw.mfu)

    def decode_time(self, output_tokens: int, context_tokens: int) -> float:
        """GPU seconds this sequence's share of batched decode costs (context before the first output)."""
        hbm = self.hw.gpus * self.hw.hbm_bytes_per_s
        mean_context = context_tokens + output_tokens / 2
        per_token = self.model.weight_bytes / self.hw.decode_batch + mean_context * self.model.kv_bytes_per_token
        return output_tokens * per_token / hbm

    def recompute_time(self, prompt_tokens: int, output_tokens: int) -> float:
        """GPU seconds (of the whole server) a turn costs when it prefills its whole prompt."""
        return self.prefill_time(prompt_tokens, 0) + self.decode_time(output_tokens, prompt_tokens)

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of ``tokens`` tokens' history in the host tiers (and over PCIe)."""
        return math.ceil(tokens * self.host_kv_bytes_per_token)

    def host_to_gpu_time(self, nbytes: int) -> float:
        return nbytes / (self.hw.gpus * self.hw.pcie_bytes_per_s)

    def disk_read_time(self, nbytes: int) -> float:
        return nbytes / self.hw.disk_read_bytes_per_s

    def dollars(self, gpu_seconds: float, dram_bytes: int, disk_bytes: int, seconds: float) -> float:
        """Busy GPU time plus provisioned DRAM and disk over the serving time."""
        hours = seconds / 3600
        return (gpu_seconds / 3600 * self.hw.gpu_hour_usd + dram_bytes / 1e9 * hours * self.hw.dram_gb_hour_usd
                + disk_bytes / 1e9 * hours * self.hw.disk_gb_hour_usd)
