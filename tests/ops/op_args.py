"""Valid arguments of the public ops, small enough for the interpreter: each check test breaks one thing."""
import torch

from cattn import RopeSpec

NUM_PAGES, PAGE, HKV, HQ, D = 6, 4, 2, 4, 8
ROPE = RopeSpec(1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D)))


def valid_attention_args() -> dict:
    """Two sequences: q_len 3 over kv_len 7 (pages 4, 1) and q_len 1 over kv_len 5 (pages 0, 5)."""
    return dict(
        q=torch.randn(4, HQ, D),
        k_cache=torch.randn(NUM_PAGES, PAGE, HKV, D),
        v_cache=torch.randn(NUM_PAGES, PAGE, HKV, D),
        block_table=torch.tensor([[4, 1], [0, 5]], dtype=torch.int32),
        kv_lens=torch.tensor([7, 5], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, 3, 4], dtype=torch.int32),
        rope=ROPE,
    )


def valid_write_args() -> dict:
    return dict(k=torch.randn(3, HKV, D), v=torch.randn(3, HKV, D),
                k_cache=torch.randn(NUM_PAGES, PAGE, HKV, D), v_cache=torch.randn(NUM_PAGES, PAGE, HKV, D),
                slot_mapping=torch.tensor([5, -1, 23], dtype=torch.int32))
