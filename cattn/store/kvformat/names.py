"""The host tiers' KV formats by name, and their bytes per token (no torch here: the store's config and
the replay's cost model read them)."""

LOSSLESS = "lossless"
FORMATS = (LOSSLESS, "int8", "fp8")        # "fp8": float8 e4m3 (finite, ±448)
KEY_GROUP = 128                             # tokens per key scale row (`cattn.store.kvformat.codec`)


def host_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int,
                         kv_format: str = LOSSLESS) -> float:
    """Bytes one token's K and V take in the host tiers (DRAM, disk, Redis) and over PCIe, in a long chunk:
    the model dtype's (lossless), or one byte per element plus the scales in the model dtype (a key scale
    row of steps and offsets per ``KEY_GROUP`` tokens, a value scale per token and head) for an 8-bit format. A short chunk
    pays its last key group's scales whole, and every part of it rounds up to 16 bytes."""
    if kv_format not in FORMATS:
        raise ValueError(f"kv_format must be one of {FORMATS}, got {kv_format!r}")
    elements = num_kv_heads * head_dim
    if kv_format == LOSSLESS:
        return 2 * num_layers * elements * dtype_bytes
    return num_layers * (2 * elements + 2 * elements * dtype_bytes / KEY_GROUP + num_kv_heads * dtype_bytes)
