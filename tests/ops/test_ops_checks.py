"""Bad input to every public op: the right exception type, raised before anything runs, naming the argument.

Each case starts from a valid call and breaks exactly one thing. Mixed devices use the 'meta'
device as the second device, so the checks are exercised on a CPU-only machine.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import cattn
from cattn import RopeSpec
from tests.ops.op_args import D, HKV, HQ, NUM_PAGES, PAGE, ROPE, valid_attention_args, valid_write_args


def non_contiguous_head_dim(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, stride(-1) == 2."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def call_attention(args: dict, **kwargs):
    a = dict(args)
    return cattn.paged_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("block_table"),
                                 a.pop("kv_lens"), a.pop("cu_seqlens_q"), a.pop("rope"), backend="torch",
                                 **{**a, **kwargs})


def test_valid_calls_pass():
    """The baselines the bad cases are derived from are accepted (so each failure is the one change)."""
    out = call_attention(valid_attention_args())
    assert out.shape == (4, HQ, D) and torch.isfinite(out).all()
    cattn.write_kv(**valid_write_args(), backend="torch")
    assert cattn.check_batch(**{k: v for k, v in valid_attention_args().items()
                                if k in ("block_table", "kv_lens", "cu_seqlens_q")},
                             num_pages=NUM_PAGES, page_size=PAGE, total_q=4) == 3


META = torch.device("meta")
# (case id, argument name, replacement builder from the valid args, exception, message fragment)
ATTENTION_CASES = [
    ("q-not-tensor", "q", lambda a: a["q"].numpy(), TypeError, "q must be a torch.Tensor"),
    ("q-rank", "q", lambda a: a["q"][None], ValueError, r"q must be \[total_q, num_q_heads, head_dim\]"),
    ("q-head-dim", "q", lambda a: torch.randn(4, HQ, D + 2), ValueError, "q head_dim 10 must equal k_cache head_dim 8"),
    ("heads-do-not-divide", "q", lambda a: torch.randn(4, 3, D), ValueError, "q has 3 heads, not a multiple of k_cache's 2"),
    ("q-dtype", "q", lambda a: a["q"].half(), TypeError, "q dtype torch.float16 must equal k_cache dtype"),
    ("q-head-dim-strided", "q", lambda a: non_contiguous_head_dim(a["q"]), ValueError, "q must be contiguous in head_dim"),
    ("k_cache-rank", "k_cache", lambda a: a["k_cache"][0], ValueError, r"k_cache must be \[num_pages, page_size"),
    ("v_cache-rank", "v_cache", lambda a: a["v_cache"].flatten(0, 1), ValueError, r"v_cache must be \[num_pages"),
    ("v_cache-shape", "v_cache", lambda a: a["v_cache"][:-1], ValueError, "v_cache shape .* must equal k_cache shape"),
    ("v_cache-dtype", "v_cache", lambda a: a["v_cache"].double(), TypeError, "v_cache dtype torch.float64 must equal k_cache"),
    ("k_cache-device", "k_cache", lambda a: a["k_cache"].to(META), ValueError, "k_cache is on meta, expected cpu"),
    ("v_cache-device", "v_cache", lambda a: a["v_cache"].to(META), ValueError, "v_cache is on meta, expected cpu"),
    ("k_cache-strided", "k_cache", lambda a: non_contiguous_head_dim(a["k_cache"]), ValueError, "k_cache must be contiguous in head_dim"),
    ("v_cache-strided", "v_cache", lambda a: non_contiguous_head_dim(a["v_cache"]), ValueError, "v_cache must be contiguous in head_dim"),
    ("block_table-rank", "block_table", lambda a: a["block_table"].flatten(), ValueError, r"block_table must be \[B, max_pages\]"),
    ("block_table-dtype", "block_table", lambda a: a["block_table"].float(), TypeError, "block_table must be int32 or int64"),
    ("block_table-device", "block_table", lambda a: a["block_table"].to(META), ValueError, "block_table is on meta"),
    ("block_table-past-pool", "block_table", lambda a: torch.tensor([[4, NUM_PAGES], [0, 5]], dtype=torch.int32),
     ValueError, r"block_table entries used by kv_lens must be page ids in \[0, 6\)"),
    ("block_table-negative", "block_table", lambda a: torch.tensor([[4, 1], [-1, 5]], dtype=torch.int32),
     ValueError, "block_table entries"),
    ("kv_lens-rank", "kv_lens", lambda a: a["kv_lens"][None], ValueError, r"kv_lens must be \[B\]"),
    ("kv_lens-count", "kv_lens", lambda a: a["kv_lens"][:1], ValueError, "kv_lens has 1 entries, block_table 2 rows"),
    ("kv_lens-dtype", "kv_lens", lambda a: a["kv_lens"].float(), TypeError, "kv_lens must be int32 or int64"),
    ("kv_lens-device", "kv_lens", lambda a: a["kv_lens"].to(META), ValueError, "kv_lens is on meta"),
    ("kv_len-below-q_len", "kv_lens", lambda a: torch.tensor([2, 5], dtype=torch.int32), ValueError,
     "kv_lens must be >= each sequence's q_len.*sequence 0"),
    ("kv_lens-past-table", "kv_lens", lambda a: torch.tensor([7, 9], dtype=torch.int32), ValueError,
     "kv_lens exceed block_table capacity"),
    ("cu_seqlens_q-count", "cu_seqlens_q", lambda a: a["cu_seqlens_q"][:2], ValueError, "cu_seqlens_q must have B \\+ 1 = 3"),
    ("cu_seqlens_q-dtype", "cu_seqlens_q", lambda a: a["cu_seqlens_q"].float(), TypeError, "cu_seqlens_q must be int32"),
    ("cu_seqlens_q-device", "cu_seqlens_q", lambda a: a["cu_seqlens_q"].to(META), ValueError, "cu_seqlens_q is on meta"),
    ("cu_seqlens_q-end", "cu_seqlens_q", lambda a: torch.tensor([0, 3, 3], dtype=torch.int32), ValueError,
     "cu_seqlens_q must start at 0 and end at total_q=4"),
    ("cu_seqlens_q-decreasing", "cu_seqlens_q", lambda a: torch.tensor([0, 5, 4], dtype=torch.int32), ValueError,
     "cu_seqlens_q must be non-decreasing"),
    ("rope-type", "rope", lambda a: "llama3", TypeError, "rope must be a RopeSpec or None, got str"),
    ("rope-too-wide", "rope", lambda a: RopeSpec(torch.ones(D)), ValueError, "rope.rotary_dim 16 exceeds head_dim 8"),
    ("out-shape", "out", lambda a: torch.empty(4, HQ, D + 1), ValueError, "out must match q"),
    ("out-dtype", "out", lambda a: torch.empty(4, HQ, D, dtype=torch.float16), ValueError, "out must match q"),
    ("out-device", "out", lambda a: torch.empty(4, HQ, D, device=META), ValueError, "out must match q"),
    ("out-rank", "out", lambda a: torch.empty(4, HQ * D), ValueError, r"out must be \[total_q"),
    ("out-strided", "out", lambda a: non_contiguous_head_dim(torch.empty(4, HQ, D)), ValueError,
     "out must be contiguous in head_dim"),
]


@pytest.mark.parametrize("name, build, exc, match", [c[1:] for c in ATTENTION_CASES],
                         ids=[c[0] for c in ATTENTION_CASES])
def test_paged_attention_rejects(name, build, exc, match):
    args = valid_attention_args()
    args[name] = build(args)
    with pytest.raises(exc, match=match) as info:
        call_attention(args)
    assert name in str(info.value)


def test_paged_attention_ignores_unused_block_table_entries():
    """Entries past each sequence's pages are padding and may hold anything."""
    args = valid_attention_args()
    padded = dict(args, block_table=torch.tensor([[4, 1, 99], [0, 5, -7]], dtype=torch.int32))
    torch.testing.assert_close(call_attention(padded), call_attention(args), atol=0, rtol=0)


def test_paged_attention_bad_out_leaves_buffer_untouched():
    args = valid_attention_args()
    out = torch.randn(4, HQ, D)
    snapshot = out.clone()
    args["kv_lens"] = torch.tensor([2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_lens"):
        call_attention(args, out=out)
    assert torch.equal(out, snapshot)


def test_triton_backend_rejects_float64():
    args = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in valid_attention_args().items()}
    a = dict(args)
    with pytest.raises(TypeError, match="q dtype must be one of"):
        cattn.paged_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("block_table"),
                              a.pop("kv_lens"), a.pop("cu_seqlens_q"), a.pop("rope"), backend="triton")


@pytest.mark.parametrize("op", ["paged_attention", "write_kv"])
def test_bad_backend_name(op):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        if op == "paged_attention":
            a = valid_attention_args()
            cattn.paged_attention(*a.values(), backend="cuda")
        else:
            cattn.write_kv(**valid_write_args(), backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors or TRITON_INTERPRET=1"):
        cattn.write_kv(**valid_write_args(), backend="triton")


WRITE_CASES = [
    ("k-not-tensor", "k", lambda a: a["k"].tolist(), TypeError, "k must be a torch.Tensor, got list"),
    ("k-rank", "k", lambda a: a["k"][0], ValueError, r"k must be \[T, num_kv_heads, head_dim\]"),
    ("v-rank", "v", lambda a: a["v"][None], ValueError, r"v must be \[T, num_kv_heads, head_dim\]"),
    ("v-shape", "v", lambda a: a["v"][:2], ValueError, "v shape .* must equal k shape"),
    ("k-dtype", "k", lambda a: a["k"].half(), TypeError, "k dtype torch.float16 must equal k_cache dtype"),
    ("v-dtype", "v", lambda a: a["v"].half(), TypeError, "v dtype torch.float16 must equal k_cache dtype"),
    ("v-device", "v", lambda a: a["v"].to(META), ValueError, "v is on meta, expected cpu"),
    ("k_cache-device", "k_cache", lambda a: a["k_cache"].to(META), ValueError, "k_cache is on meta, expected cpu"),
    ("k-strided", "k", lambda a: non_contiguous_head_dim(a["k"]), ValueError, "k must be contiguous in head_dim"),
    ("v-strided", "v", lambda a: non_contiguous_head_dim(a["v"]), ValueError, "v must be contiguous in head_dim"),
    ("k_cache-strided", "k_cache", lambda a: non_contiguous_head_dim(a["k_cache"]), ValueError, "k_cache must be contiguous"),
    ("v_cache-shape", "v_cache", lambda a: a["v_cache"][:, :2], ValueError, "v_cache shape"),
    ("v_cache-dtype", "v_cache", lambda a: a["v_cache"].half(), TypeError, "v_cache dtype"),
    ("slot_mapping-rank", "slot_mapping", lambda a: a["slot_mapping"][None], ValueError, r"slot_mapping must be \[T\]"),
    ("slot_mapping-dtype", "slot_mapping", lambda a: a["slot_mapping"].float(), TypeError, "slot_mapping must be int32 or int64"),
    ("slot_mapping-device", "slot_mapping", lambda a: a["slot_mapping"].to(META), ValueError, "slot_mapping is on meta"),
    ("slot_mapping-count", "slot_mapping", lambda a: a["slot_mapping"][:2], ValueError, "slot_mapping has 2 entries for 3 tokens"),
    ("slot-past-pool", "slot_mapping", lambda a: torch.tensor([5, 24, 0], dtype=torch.int32), ValueError,
     r"slot_mapping entries must be in \[-1, 24\)"),
    ("slot-below-minus-one", "slot_mapping", lambda a: torch.tensor([5, -2, 0], dtype=torch.int64), ValueError,
     r"slot_mapping entries must be in \[-1, 24\)"),
]


@pytest.mark.parametrize("name, build, exc, match", [c[1:] for c in WRITE_CASES], ids=[c[0] for c in WRITE_CASES])
def test_write_kv_rejects_and_writes_nothing(name, build, exc, match):
    args = valid_write_args()
    args[name] = build(args)
    caches = [args[c].clone() if args[c].device.type == "cpu" else None for c in ("k_cache", "v_cache")]
    with pytest.raises(exc, match=match) as info:
        cattn.write_kv(**args, backend="torch")
    assert name in str(info.value)
    for before, c in zip(caches, ("k_cache", "v_cache")):
        if before is not None:
            assert torch.equal(args[c], before)


def test_write_kv_rejects_head_shape_unlike_the_cache():
    args = dict(valid_write_args(), k=torch.randn(3, HKV + 1, D), v=torch.randn(3, HKV + 1, D))
    with pytest.raises(ValueError, match=r"k is \[T, 3, 8\] but k_cache holds \[\.\., \.\., 2, 8\]"):
        cattn.write_kv(**args, backend="torch")


APPLY_ROPE_CASES = [
    ("x-rank", "x", lambda a: a["x"][0], ValueError, r"x must be \[T, num_heads, head_dim\]"),
    ("positions-rank", "positions", lambda a: a["positions"][None], ValueError, r"positions must be \[T\]"),
    ("positions-count", "positions", lambda a: a["positions"][:3], ValueError, "positions has 3 entries for 5 tokens"),
    ("positions-float", "positions", lambda a: a["positions"].float(), TypeError, "positions must be integers"),
    ("positions-bool", "positions", lambda a: a["positions"] > 2, TypeError, "positions must be integers"),
    ("positions-complex", "positions", lambda a: a["positions"].to(torch.complex64), TypeError, "positions must be integers"),
    ("x-int", "x", lambda a: a["x"].int(), TypeError, "x dtype must be one of"),
    ("x-fp8", "x", lambda a: a["x"].to(torch.float8_e4m3fn), TypeError, "x dtype must be one of"),
    ("positions-not-tensor", "positions", lambda a: a["positions"].tolist(), TypeError, "positions must be a torch.Tensor"),
    ("positions-device", "positions", lambda a: a["positions"].to(META), ValueError, "positions is on meta, expected cpu"),
    ("rope-type", "rope", lambda a: None, TypeError, "rope must be a RopeSpec, got NoneType"),
    ("rope-too-wide", "rope", lambda a: RopeSpec(torch.ones(D)), ValueError, "rope.rotary_dim 16 exceeds head_dim 8"),
]


@pytest.mark.parametrize("name, build, exc, match", [c[1:] for c in APPLY_ROPE_CASES],
                         ids=[c[0] for c in APPLY_ROPE_CASES])
def test_apply_rope_rejects(name, build, exc, match):
    args = dict(x=torch.randn(5, HQ, D), positions=torch.arange(5), rope=ROPE)
    args[name] = build(args)
    with pytest.raises(exc, match=match) as info:
        cattn.apply_rope(**args)
    assert name in str(info.value)


def test_check_batch_names_the_bad_value():
    args = valid_attention_args()
    batch = dict(block_table=args["block_table"], kv_lens=args["kv_lens"], cu_seqlens_q=args["cu_seqlens_q"])
    with pytest.raises(ValueError, match=r"block_table entries used by kv_lens must be page ids in \[0, 5\)"):
        cattn.check_batch(**batch, num_pages=5, page_size=PAGE, total_q=4)     # page 5 is outside a 5-page pool
    with pytest.raises(ValueError, match="kv_lens exceed block_table capacity"):
        cattn.check_batch(**batch, num_pages=NUM_PAGES, page_size=3, total_q=4)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0 and end at total_q=5"):
        cattn.check_batch(**batch, num_pages=NUM_PAGES, page_size=PAGE, total_q=5)


@pytest.mark.parametrize("rope_type", ["dynamic", "ntk_mixed", "longrope_dynamic"])
def test_unsupported_rope_types_name_the_config(rope_type):
    config = SimpleNamespace(rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0},
                             hidden_size=32, num_attention_heads=4)
    with pytest.raises(ValueError, match="config: rope_type '.*not supported"):
        RopeSpec.from_config(config)
