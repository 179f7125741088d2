"""cattn: KV caches that outlive the turn. Triton paged attention with RoPE applied inside the
kernel over a pre-RoPE cache, and a host-side hierarchy that keeps every conversation's history."""
import importlib
import importlib.util

from cattn.logs import set_verbosity

__version__ = "0.1.0"

# Public names -> the module that defines them. Imported on first use, so that `import cattn` (and
# `cattn --help`) does not pay for torch, triton or transformers; ChatSession needs the `hf` extra.
_EXPORTS = {
    "apply_rope": "cattn.ops", "check_batch": "cattn.ops", "paged_attention": "cattn.ops", "write_kv": "cattn.ops",
    "PagedSequences": "cattn.paged", "PagePool": "cattn.paged", "PoolExhaustedError": "cattn.paged",
    "RopeSpec": "cattn.rope", "ChatSession": "cattn.chat.session",
}
__all__ = [*_EXPORTS, "set_verbosity"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")    # `cattn.reference` after a bare `import cattn`
    else:
        raise AttributeError(f"module 'cattn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
