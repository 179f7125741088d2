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


# ---- zero-size dimensions, dtypes, sm_scale: both backends -----------------------------------

BOTH_BACKENDS = ["torch", "triton"]


def call_attention_on(backend: str, args: dict, **kwargs):
    a = dict(args)
    return cattn.paged_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("block_table"),
                                 a.pop("kv_lens"), a.pop("cu_seqlens_q"), a.pop("rope"), backend=backend,
                                 **{**a, **kwargs})


# (case id, cache shape, q shape, message: the tensor and its zero dimension)
ZERO_SIZE_CASES = [
    ("page_size", (NUM_PAGES, 0, HKV, D), (4, HQ, D), "k_cache page_size must be positive"),
    ("num_kv_heads", (NUM_PAGES, PAGE, 0, D), (4, HQ, D), "k_cache num_kv_heads must be positive"),
    ("head_dim", (NUM_PAGES, PAGE, HKV, 0), (4, HQ, 0), "k_cache head_dim must be positive"),
    ("num_q_heads", (NUM_PAGES, PAGE, HKV, D), (4, 0, D), "q num_q_heads must be positive"),
]


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
@pytest.mark.parametrize("cache_shape, q_shape, match", [c[1:] for c in ZERO_SIZE_CASES],
                         ids=[c[0] for c in ZERO_SIZE_CASES])
def test_paged_attention_rejects_zero_size_dims(backend, cache_shape, q_shape, match):
    """An empty page, head count or head is a ValueError naming the tensor and the dimension
    (not a ZeroDivisionError from the page arithmetic)."""
    args = dict(valid_attention_args(), q=torch.randn(q_shape), k_cache=torch.randn(cache_shape),
                v_cache=torch.randn(cache_shape))
    with pytest.raises(ValueError, match=match):
        call_attention_on(backend, args)


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
@pytest.mark.parametrize("cache_shape, dim", [((NUM_PAGES, 0, HKV, D), "page_size"), ((NUM_PAGES, PAGE, 0, D), "num_kv_heads"),
                                              ((NUM_PAGES, PAGE, HKV, 0), "head_dim")])
def test_write_kv_rejects_zero_size_dims(backend, cache_shape, dim):
    k = torch.randn(3, *cache_shape[2:])
    args = dict(valid_write_args(), k=k, v=k.clone(), k_cache=torch.randn(cache_shape), v_cache=torch.randn(cache_shape))
    with pytest.raises(ValueError, match=f"k_cache {dim} must be positive"):
        cattn.write_kv(**args, backend=backend)


def test_empty_pool_and_empty_batch_are_valid():
    """Zero pages or zero query tokens are not errors: nothing is read."""
    empty = torch.empty(0, PAGE, HKV, D)
    out = cattn.paged_attention(torch.empty(0, HQ, D), empty, empty.clone(), torch.empty(0, 1, dtype=torch.int32),
                                torch.empty(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), ROPE,
                                backend="torch")
    assert out.shape == (0, HQ, D)
    cattn.write_kv(torch.empty(0, HKV, D), torch.empty(0, HKV, D), empty, empty.clone(),
                   torch.empty(0, dtype=torch.int32), backend="torch")


NON_FLOAT_DTYPES = [torch.int32, torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2]


def tensor_of(dtype: torch.dtype, shape) -> torch.Tensor:
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.randn(shape) > 0
    return torch.randn(shape).mul(3).to(dtype)


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
@pytest.mark.parametrize("dtype", NON_FLOAT_DTYPES, ids=str)
def test_paged_attention_refuses_non_float_dtypes(backend, dtype):
    """Integer, bool, complex and fp8 q/k/v: a TypeError naming q on both backends, the same dtype
    everywhere so that no other check fires first."""
    args = valid_attention_args()
    for name in ("q", "k_cache", "v_cache"):
        args[name] = tensor_of(dtype, args[name].shape)
    with pytest.raises(TypeError, match=f"q dtype must be one of .* for backend '{backend}', got {dtype}"):
        call_attention_on(backend, args)


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
@pytest.mark.parametrize("dtype", NON_FLOAT_DTYPES, ids=str)
def test_write_kv_refuses_non_float_dtypes(backend, dtype):
    args = valid_write_args()
    for name in ("k", "v", "k_cache", "v_cache"):
        args[name] = tensor_of(dtype, args[name].shape)
    before = args["k_cache"].clone()
    with pytest.raises(TypeError, match=f"k dtype must be one of .* for backend '{backend}', got {dtype}"):
        cattn.write_kv(**args, backend=backend)
    assert torch.equal(args["k_cache"], before)


def test_torch_backend_takes_float64():
    """float64 (the oracle's dtype) is the torch backend's only addition to the kernels' dtypes."""
    args = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in valid_attention_args().items()}
    out = call_attention_on("torch", args)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


SM_SCALE_CASES = [
    ("bool", True, TypeError, "sm_scale must be a real number .*got bool"),
    ("complex", 0.3 + 0j, TypeError, "sm_scale must be a real number .*got complex"),
    ("tensor", torch.tensor(0.3), TypeError, "sm_scale must be a real number .*got Tensor"),
    ("str", "0.3", TypeError, "sm_scale must be a real number .*got str"),
    ("zero", 0.0, ValueError, "sm_scale must be finite and positive, got 0.0"),
    ("negative", -0.25, ValueError, "sm_scale must be finite and positive, got -0.25"),
    ("nan", float("nan"), ValueError, "sm_scale must be finite and positive, got nan"),
    ("inf", float("inf"), ValueError, "sm_scale must be finite and positive, got inf"),
    ("huge-int", 10**400, ValueError, "sm_scale must be finite and positive"),
]


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
@pytest.mark.parametrize("value, exc, match", [c[1:] for c in SM_SCALE_CASES], ids=[c[0] for c in SM_SCALE_CASES])
def test_sm_scale_must_be_a_finite_positive_real(backend, value, exc, match):
    with pytest.raises(exc, match=match):
        call_attention_on(backend, valid_attention_args(), sm_scale=value)


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_sm_scale_takes_ints_and_numpy_scalars(backend):
    np = pytest.importorskip("numpy")
    args = valid_attention_args()
    want = call_attention_on(backend, args, sm_scale=0.5)
    torch.testing.assert_close(call_attention_on(backend, args, sm_scale=np.float64(0.5)), want, atol=0, rtol=0)
    torch.testing.assert_close(call_attention_on(backend, args, sm_scale=1),
                               call_attention_on(backend, args, sm_scale=1.0), atol=0, rtol=0)


# ---- bf16 under the interpreter ----------------------------------------------------------------

def bf16_attention_args(q_lens: list[int], kv_lens: list[int]) -> dict:
    pages = [-(-n // PAGE) for n in kv_lens]
    table = torch.randperm(NUM_PAGES * 2)[: sum(pages)].split(pages)
    return dict(q=torch.randn(sum(q_lens), HQ, D).bfloat16(),
                k_cache=torch.randn(NUM_PAGES * 2, PAGE, HKV, D).bfloat16(),
                v_cache=torch.randn(NUM_PAGES * 2, PAGE, HKV, D).bfloat16(),
                block_table=torch.nn.utils.rnn.pad_sequence(table, batch_first=True).to(torch.int32),
                kv_lens=torch.tensor(kv_lens, dtype=torch.int32),
                cu_seqlens_q=torch.tensor([0] + q_lens).cumsum(0).to(torch.int32), rope=ROPE)


@pytest.mark.parametrize("q_lens, kv_lens", [([3, 1], [9, 5]), ([1, 1], [11, 2])], ids=["extend", "decode"])
@pytest.mark.parametrize("with_out", [False, True])
def test_bf16_under_the_interpreter_is_computed_in_fp32(q_lens, kv_lens, with_out):
    """The interpreter (these tests' Triton, see conftest) multiplies bf16 bit patterns (values around
    1e9 came back); the Triton backend computes bf16 in fp32 there: the reference rounded to bf16."""
    args = bf16_attention_args(q_lens, kv_lens)
    out = torch.full_like(args["q"], float("nan")) if with_out else None
    got = call_attention_on("triton", args, out=out)
    assert got.dtype == torch.bfloat16 and (out is None or got.data_ptr() == out.data_ptr())
    a = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in args.items()}
    want = cattn.reference.paged_attention(a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["kv_lens"],
                                           a["cu_seqlens_q"], ROPE)
    # fp32 compute, one rounding to bf16 (8 bits of mantissa: relative error <= 2**-9) at the end
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=2**-8)


def test_bf16_write_kv_under_the_interpreter_is_exact():
    """write_kv is a copy: bit patterns are all it moves, so bf16 needs no detour."""
    args = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in valid_write_args().items()}
    expected = [args[c].clone() for c in ("k_cache", "v_cache")]
    cattn.reference.write_kv(args["k"], args["v"], *expected, args["slot_mapping"])
    cattn.write_kv(**args, backend="triton")
    assert torch.equal(args["k_cache"], expected[0]) and torch.equal(args["v_cache"], expected[1])


@pytest.mark.parametrize("value, interpreting", [("1", True), ("true", True), ("ON", True), ("yes", True),
                                                 ("0", False), ("", False), ("2", False)])
def test_interpreter_detected_as_triton_reads_the_variable(monkeypatch, value, interpreting):
    from cattn import ops
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert ops._interpreting() is interpreting
