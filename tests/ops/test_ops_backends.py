"""Bad input to the ops on both backends alike (zero-size dimensions, dtypes, sm_scale), and bf16 under
the interpreter: computed in fp32, rounded once."""
from __future__ import annotations

import pytest
import torch

import cattn
from tests.ops.op_args import D, HKV, HQ, NUM_PAGES, PAGE, ROPE, valid_attention_args, valid_write_args

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
    assert ops.interpreting() is interpreting
