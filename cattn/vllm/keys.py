"""Store keys for vLLM requests: tenant from ``cache_salt``, session from the client or from content,
and the model fingerprint from vLLM's model config and the weight files."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import xxhash

from cattn.store.contract import check_name

CONTENT_PREFIX = "c-"      # sessions named by content; a client's own ids never start with it
_CLIENT_PREFIX = "s-"      # a client's session id that is not a valid store name is hashed under this


def tenant_of(cache_salt: str | None, default: str) -> str:
    """The store tenant of a request: its ``cache_salt``, hashed (a salt is a secret and may hold any
    characters; the hash is a valid file name and reveals nothing), or ``default`` without one."""
    if not cache_salt:
        return default
    return "t-" + xxhash.xxh3_128_hexdigest(cache_salt.encode())


def client_session(value) -> str:
    """A session id a client passed in ``kv_transfer_params``: kept when it is a valid store name
    that cannot be mistaken for a content session, hashed otherwise. Raises TypeError if not a str."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"kv_transfer_params session id must be a non-empty str, got {value!r}")
    try:
        if not value.startswith((CONTENT_PREFIX, _CLIENT_PREFIX)):
            return check_name(value, "session id")
    except ValueError:
        pass
    return _CLIENT_PREFIX + xxhash.xxh3_128_hexdigest(value.encode())


def block_chain(token_ids: list[int], block_size: int) -> list[int]:
    """``[n // block_size]`` chained xxh3-64 digests: digest i covers blocks 0..i, so equal digests
    mean (up to a hash collision, which the caller rules out by comparing tokens) equal prefixes."""
    out, prev = [], 0
    ids = torch.tensor(token_ids[:len(token_ids) // block_size * block_size], dtype=torch.int64)
    for i in range(ids.numel() // block_size):
        h = xxhash.xxh3_64(prev.to_bytes(8, "little"))
        h.update(ids[i * block_size:(i + 1) * block_size].numpy().tobytes())
        prev = h.intdigest()
        out.append(prev)
    return out


def content_session(chain: list[int]) -> str:
    return f"{CONTENT_PREFIX}{chain[-1]:016x}{len(chain):x}"


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_file_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _file_digests:
        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        _file_digests[memo] = h.hexdigest()
    return _file_digests[memo]


def model_fingerprint(vllm_config, *, vllm_version: str, tensor_parallel: int) -> str:
    """xxh3-128 of what decides the KV a vLLM worker writes: vLLM's version (its attention backends
    lay blocks out as they like), the tensor parallel size (which KV heads each rank holds), the
    architecture, shapes, dtypes, the KV cache dtype and block size, and the weights: every weight
    file's bytes for a local model directory, else name and revision.

    vLLM caches keys after RoPE, so its entries are not interchangeable with cattn's own pre-RoPE
    ones; the ``vllm`` tag keeps them apart even for the same weights.
    """
    mc = vllm_config.model_config
    hf = mc.hf_config
    parts = ["vllm-kv-after-rope", mc.model, str(mc.revision), str(mc.dtype),
             str(vllm_config.cache_config.cache_dtype), repr(getattr(hf, "architectures", None)),
             repr(tuple(getattr(hf, k, None) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                        "num_key_value_heads", "head_dim", "vocab_size"))),
             repr(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None)),
             f"vllm {vllm_version}", f"tp {tensor_parallel}", f"block {vllm_config.cache_config.block_size}"]
    folder = Path(mc.model)
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix in _WEIGHT_SUFFIXES and path.is_file():
                parts.append(f"{path.name}:{_file_digest(path)}")
    return xxhash.xxh3_128_hexdigest("\n".join(parts).encode())


def default_disk_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cattn" / "vllm-store")
