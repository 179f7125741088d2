"""The 8-bit KV codes against float64: keys per channel (over groups of tokens), values per token, int8 and
fp8 e4m3, for fp16/bf16/fp32 models; odd shapes, tokens starting inside a group, zero and constant
channels; bad arguments refused by name."""
from __future__ import annotations

import pytest
import torch

from cattn.store.kvformat.codec import (
    KEY_GROUP, QMAX, dequantize_keys, dequantize_values, num_key_groups, quantize_keys, quantize_values)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
SHAPES = [(1, 1, 1), (3, 2, 5), (KEY_GROUP, 1, 8), (KEY_GROUP + 1, 3, 7), (2 * KEY_GROUP + 37, 2, 64)]


def bound(x: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor, kv_format: str, dtype,
          offset: torch.Tensor | None = None) -> torch.Tensor:
    """Per element, the documented error bound (float64): half a step (int8) or the e4m3 rounding of the
    distance from the offset (fp8), plus the model dtype's rounding of the result (and fp32's, before it)."""
    x, deq, scale = x.double(), deq.double(), scale.double()
    centred = x if offset is None else x - offset.double()
    if kv_format == "int8":
        code_err = 0.5 * scale
    else:   # 3 mantissa bits
        code_err = centred.abs() * 2.0**-4 + scale * 2.0**-10
    return code_err * (1 + 1e-4) + deq.abs() * (UNIT_ROUNDOFF[dtype] + 2.0**-24)


def key_rows_per_token(scales: torch.Tensor, n: int, phase: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, offset)``, each ``[n, Hkv, D]``: the scale row of each token."""
    rows = scales[(phase + torch.arange(n)) // KEY_GROUP]
    return rows[:, 0], rows[:, 1]


def near(got: torch.Tensor, exact: torch.Tensor, dtype) -> torch.Tensor:
    """``got`` is ``exact`` rounded to ``dtype`` (to nearest or up; fp16's subnormals to their spacing)."""
    tiny = torch.finfo(dtype).smallest_normal * 2.0**-9 if dtype == torch.float16 else 0.0
    return (got.double() - exact).abs() <= exact.abs() * 2 * UNIT_ROUNDOFF[dtype] + tiny


@pytest.mark.parametrize("kv_format", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_the_bound(kv_format, dtype, shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    # channels of all sizes, most of them off zero (as pre-RoPE keys' outliers are)
    k = (torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[-1])
         + torch.randn(shape[1:], generator=g) * 4).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype) * 3
    kc, ks = quantize_keys(k, kv_format)
    vc, vs = quantize_values(v, kv_format)
    assert ks.shape == (num_key_groups(shape[0]), 2, *shape[1:]) and vs.shape == shape[:2]
    assert ks.dtype == vs.dtype == dtype and kc.dtype == vc.dtype and kc.element_size() == 1
    k_back, v_back = dequantize_keys(kc, ks, dtype), dequantize_values(vc, vs, dtype)
    assert k_back.dtype == v_back.dtype == dtype
    (k_step, k_offset), v_scale = key_rows_per_token(ks, shape[0]), vs.unsqueeze(-1).expand(shape)
    assert ((k.double() - k_back.double()).abs() <= bound(k, k_back, k_step, kv_format, dtype, k_offset)).all()
    assert ((v.double() - v_back.double()).abs() <= bound(v, v_back, v_scale, kv_format, dtype)).all()
    # a key row: the offset is the middle of the group's range (rounded to the model dtype), the step the
    # larger distance from it to the range's ends over QMAX, rounded up; a value's scale its absmax over QMAX
    rows = torch.arange(shape[0]) // KEY_GROUP
    groups = [k[rows == r].double() for r in range(ks.shape[0])]
    hi, lo = torch.stack([x.amax(0) for x in groups]), torch.stack([x.amin(0) for x in groups])
    assert near(ks[:, 1], (hi + lo) / 2, dtype).all()
    offset = ks[:, 1].double()
    for got, reach in ((ks[:, 0], torch.maximum(hi - offset, offset - lo)), (vs, v.double().abs().amax(-1))):
        exact = reach / QMAX[kv_format]
        assert (got.double() >= exact * (1 - 2.0**-40)).all() and near(got, exact, dtype).all()


def test_centred_keys_fit_channels_far_from_zero():
    """Why keys are centred: a channel that sits in a narrow band far from zero (a pre-RoPE outlier channel)
    gets its levels spread over the band, not over [-absmax, absmax]."""
    k = torch.randn(256, 2, 64) * 0.1
    k[..., [3, 40]] += 8.0
    codes, scales = quantize_keys(k, "int8")
    err = (dequantize_keys(codes, scales, torch.float32) - k)[..., [3, 40]].abs().max()
    band = (k[..., [3, 40]].amax() - k[..., [3, 40]].amin()).item()
    assert err <= band / 2 / 127 / 2 * 1.01          # half a step of the band, not of the channel's absmax
    assert err * 10 < k[..., [3, 40]].abs().amax() / 127 / 2


@pytest.mark.parametrize("kv_format", ["int8", "fp8"])
@pytest.mark.parametrize("phase", [0, 1, KEY_GROUP - 1])
def test_tokens_starting_inside_a_group(kv_format, phase):
    """A view of a chunk's tokens from ``lo`` on (a truncation) reads its scales from row ``lo // group``."""
    k = torch.randn(3 * KEY_GROUP + 5, 2, 16).to(torch.bfloat16)
    codes, scales = quantize_keys(k, kv_format)
    whole = dequantize_keys(codes, scales, torch.bfloat16)
    for lo in (phase, KEY_GROUP + phase, 2 * KEY_GROUP + phase):
        for hi in (lo + 1, lo + 7, k.shape[0]):
            part = dequantize_keys(codes[lo:hi], scales[lo // KEY_GROUP:], torch.bfloat16, phase=lo % KEY_GROUP)
            assert torch.equal(part, whole[lo:hi])


@pytest.mark.parametrize("kv_format", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_constant_channels(kv_format, dtype):
    k = torch.randn(KEY_GROUP + 9, 2, 8).to(dtype)
    k[:, 0, 3] = 0                       # a zero channel
    k[:, 1, 5] = -2.5                    # a constant one
    k[KEY_GROUP:, 1, 1] = 0              # zero in one group only
    v = torch.randn(20, 2, 8).to(dtype)
    v[4] = 0                             # a zero token
    v[7, 1] = 0.75                       # a constant (token, head)
    kc, ks = quantize_keys(k, kv_format)
    vc, vs = quantize_values(v, kv_format)
    k_back, v_back = dequantize_keys(kc, ks, dtype), dequantize_values(vc, vs, dtype)
    assert torch.equal(k_back[:, 0, 3], torch.zeros_like(k_back[:, 0, 3])) and (ks[:, :, 0, 3] == 0).all()
    assert torch.equal(k_back[KEY_GROUP:, 1, 1], torch.zeros_like(k_back[KEY_GROUP:, 1, 1]))
    assert torch.equal(v_back[4], torch.zeros_like(v_back[4]))
    assert torch.isfinite(k_back).all() and torch.isfinite(v_back).all()
    # a constant key channel is its own offset, step 0: back exactly
    assert (ks[:, 0, 1, 5] == 0).all() and torch.equal(k_back[:, 1, 5], k[:, 1, 5])
    assert (v_back[7, 1].double() - 0.75).abs().max() <= 0.75 * (4 * UNIT_ROUNDOFF[dtype] + 1e-6)


def test_per_channel_keys_fit_outlier_channels_better_than_per_token():
    """Why keys are per channel: a few channels ten times larger than the rest (pre-RoPE keys' outliers)
    cost a per-token scale most of its resolution on every other channel."""
    k = torch.randn(256, 2, 64)
    k[..., [3, 40]] *= 10
    codes, scales = quantize_keys(k, "int8")
    per_channel = (dequantize_keys(codes, scales, torch.float32) - k).pow(2).mean()
    codes, scales = quantize_values(k, "int8")   # the per-token code, used on keys
    per_token = (dequantize_values(codes, scales, torch.float32) - k).pow(2).mean()
    assert per_channel * 4 < per_token


def test_outputs_can_be_given():
    k = torch.randn(10, 2, 8).to(torch.float16)
    codes, scales = torch.empty(10, 2, 8, dtype=torch.int8), torch.empty(1, 2, 2, 8, dtype=torch.float16)
    assert quantize_keys(k, "int8", codes=codes, scales=scales)[0] is codes
    out = torch.empty_like(k)
    assert dequantize_keys(codes, scales, torch.float16, out=out) is out
    k32 = k.float()
    quantize_keys(k32, "int8")
    assert torch.equal(k32, k.float())   # the input is never scaled in place


def test_bad_arguments_are_refused_by_name():
    k = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="kv_format"):
        quantize_keys(k, "int4")
    with pytest.raises(ValueError, match="kv_format"):
        quantize_values(k, "lossless")
    with pytest.raises(TypeError, match="kv_format"):
        quantize_values(k, 8)
    with pytest.raises(ValueError, match="k must be"):
        quantize_keys(k[0], "int8")
    with pytest.raises(TypeError, match="v must be"):
        quantize_values(k.to(torch.int32), "int8")
    with pytest.raises(ValueError, match="group"):
        quantize_keys(k, "int8", group=0)
    with pytest.raises(ValueError, match="codes"):
        quantize_keys(k, "int8", codes=torch.empty(4, 2, 8, dtype=torch.uint8))
    codes, scales = quantize_keys(k, "int8")
    with pytest.raises(ValueError, match="scales"):
        dequantize_keys(codes, scales.half(), torch.float32)
    with pytest.raises(ValueError, match="phase"):
        dequantize_keys(codes, scales, torch.float32, phase=KEY_GROUP)
    with pytest.raises(TypeError, match="dtype"):
        dequantize_values(codes, torch.ones(4, 2), torch.int8)
    with pytest.raises(ValueError, match="codes"):
        dequantize_values(codes.float(), scales, torch.float32)
    with pytest.raises(ValueError, match="out"):
        dequantize_keys(codes, scales, torch.float32, out=torch.empty(3, 2, 8))
