"""cattn: KV caches that outlive the turn. Triton paged attention with RoPE applied inside the
kernel over a pre-RoPE cache, and a host-side hierarchy that keeps every conversation's history."""
from cattn.ops import apply_rope, check_batch, paged_attention, write_kv
from cattn.paged import PagedSequences, PagePool, PoolExhaustedError
from cattn.rope import RopeSpec

__all__ = ["apply_rope", "check_batch", "paged_attention", "write_kv", "ChatSession", "PagePool", "PagedSequences",
           "PoolExhaustedError", "RopeSpec"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # ChatSession needs transformers (the optional `hf` extra): import it only when asked for.
    if name == "ChatSession":
        from cattn.session import ChatSession
        return ChatSession
    raise AttributeError(f"module 'cattn' has no attribute {name!r}")
