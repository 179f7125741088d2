"""Re-rotating keys cached after RoPE (`cattn.vllm.shift`) against a float64 reference: every rope
type cattn supports, both rotary styles, partial rotary, fp32/bf16/fp16, shifts up to 128K, both
block layouts; one rotation's rounding and no more."""
import logging

import pytest
import torch
from transformers import LlamaConfig, Phi3Config

from cattn.rope import RopeSpec
from cattn.vllm.block_layout import CpuVecLayout, FlashLayout
from cattn.vllm.shift import relocate, rope_for, rotate_keys, shift_angles, shift_refusal, sliding_window_of

logging.getLogger("transformers").setLevel(logging.ERROR)

H, D = 2, 32
TINY = dict(hidden_size=H * D * 2, num_attention_heads=2 * H, num_key_value_heads=H, head_dim=D,
            intermediate_size=64, num_hidden_layers=1, vocab_size=64)
BIG = 1 << 17   # 128K
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096},
    "partial": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}


def spec(name: str, style: str = "neox") -> RopeSpec:
    if name == "longrope":
        half = D // 2
        config = Phi3Config(**TINY, max_position_embeddings=BIG * 4, original_max_position_embeddings=BIG * 2,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                             "long_factor": [1.0 + 0.5 * i for i in range(half)]})
    else:
        config = LlamaConfig(**TINY, max_position_embeddings=BIG * 2, rope_parameters=ROPES[name])
    return RopeSpec.from_config(config, style=style)


def rope64(x: torch.Tensor, pos: torch.Tensor, rope: RopeSpec, *, scaled: bool = True) -> torch.Tensor:
    """The model's rotation in float64: angle ``fp32(pos * f)`` (as HF and vLLM take it), cos and sin
    times the attention scaling; ``x [T, H, D]`` float64."""
    angle = (pos.float()[:, None] * rope.inv_freq).double()
    scale = rope.attention_scaling if scaled else 1.0
    c, s = (angle.cos() * scale)[:, None], (angle.sin() * scale)[:, None]
    rd, out = rope.rotary_dim, x.clone()
    xs, ys = (x[..., :rd // 2], x[..., rd // 2:rd]) if rope.style == "neox" else (x[..., 0:rd:2], x[..., 1:rd:2])
    rx, ry = xs * c - ys * s, ys * c + xs * s
    out[..., :rd] = torch.cat([rx, ry], -1) if rope.style == "neox" else torch.stack([rx, ry], -1).flatten(-2)
    return out


def shift64(stored: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """The reference shift, all float64: rotate ``stored`` by the model's angle at ``dst`` minus its
    angle at ``src`` (each ``fp32(pos * f)``, as the model takes it)."""
    f = rope.inv_freq
    angle = (dst.float()[:, None] * f).double() - (src.float()[:, None] * f).double()
    x = stored.double()
    rd, out = rope.rotary_dim, x.clone()
    c, s = angle.cos()[:, None], angle.sin()[:, None]
    xs, ys = (x[..., :rd // 2], x[..., rd // 2:rd]) if rope.style == "neox" else (x[..., 0:rd:2], x[..., 1:rd:2])
    rx, ry = xs * c - ys * s, ys * c + xs * s
    out[..., :rd] = torch.cat([rx, ry], -1) if rope.style == "neox" else torch.stack([rx, ry], -1).flatten(-2)
    return out


MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    exp = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exp - MANTISSA[dtype])


def positions(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    dst = torch.randint(0, 4096, (n,), generator=gen)
    shift = torch.randint(1, BIG + 1, (n,), generator=gen)
    shift[:4] = torch.tensor([1, 7, 4096, BIG])
    return dst + shift, dst


CASES = [(name, "neox") for name in (*ROPES, "longrope")] + [("default", "gptj"), ("partial", "gptj")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,style", CASES)
def test_one_rotation_one_rounding(name, style, dtype):
    rope, gen = spec(name, style), torch.Generator().manual_seed(0)
    src, dst = positions(200, gen)
    k = torch.randn(200, H, D, generator=gen, dtype=torch.float64) * 3
    stored = rope64(k, src, rope).to(dtype)                        # what the cache holds
    out = rotate_keys(stored, *shift_angles(rope, src, dst), rope)
    ref = shift64(stored, src, dst, rope)
    assert out.dtype == dtype
    err = (out.double() - ref).abs()
    # rounded once to dtype (half a spacing), plus fp32 arithmetic on the way (a few fp32 ulps)
    bound = 0.5 * spacing(ref, dtype) + 8 * 2.0 ** -24 * stored.double().abs().amax(-1, keepdim=True)
    assert bool((err <= bound).all()), float((err / bound).max())
    if dtype != torch.float32:   # and not worse than rounding the reference itself, but for near-ties
        assert float((out != ref.to(dtype)).double().mean()) < 0.02
    assert torch.equal(out[..., rope.rotary_dim:], stored[..., rope.rotary_dim:])   # partial: untouched


@pytest.mark.parametrize("name,style", CASES)
def test_the_shift_is_the_recompute_rotation(name, style):
    """Rotating a key cached at ``src`` gives, in exact arithmetic, the key cached at ``dst`` (the
    angle difference is the model's own angles', not ``fp32(shift * f)``), attention scaling kept."""
    rope, gen = spec(name, style), torch.Generator().manual_seed(1)
    src, dst = positions(100, gen)
    k = torch.randn(100, H, D, generator=gen, dtype=torch.float64)
    shifted = shift64(rope64(k, src, rope), src, dst, rope)
    torch.testing.assert_close(shifted, rope64(k, dst, rope), atol=1e-9, rtol=0)


def test_a_second_truncation_from_the_original_costs_one_rounding_not_two():
    """Truncating twice from the stored original keeps one rounding; re-rotating the shifted copy
    (which the connector never does: shifted requests are not saved) would round twice."""
    rope, gen = spec("default"), torch.Generator().manual_seed(2)
    src = torch.randint(50_000, 60_000, (400,), generator=gen)
    first, second = src - 3000, src - 9000
    stored = rope64(torch.randn(400, H, D, generator=gen, dtype=torch.float64), src, rope).to(torch.bfloat16)
    once = rotate_keys(stored, *shift_angles(rope, src, second), rope)
    twice = rotate_keys(rotate_keys(stored, *shift_angles(rope, src, first), rope),
                        *shift_angles(rope, first, second), rope)
    ref = shift64(stored, src, second, rope)
    assert bool(((once.double() - ref).abs() <= 0.5 * spacing(ref, torch.bfloat16) + 1e-6).all())
    assert (twice.double() - ref).abs().mean() > (once.double() - ref).abs().mean()


def cpu_blocks(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """vLLM's CPU writer, as probed: per block and head, K transposed (``d*N + t``), then V (``t*D + d``)."""
    b, n, h, d = key.shape
    out = torch.empty(b, h, 2 * n * d, dtype=key.dtype)
    for t in range(n):
        for dd in range(d):
            out[:, :, dd * n + t] = key[:, t, :, dd]
            out[:, :, n * d + t * d + dd] = value[:, t, :, dd]
    return out.reshape(b, h, n, 2 * d)


def test_cpu_layout_decodes_the_backend_order_and_round_trips():
    key, value = torch.randn(3, 4, H, D), torch.randn(3, 4, H, D)
    blocks = cpu_blocks(key, value)
    k, v = CpuVecLayout().decode(blocks)
    assert torch.equal(k, key) and torch.equal(v, value)
    assert torch.equal(CpuVecLayout().encode(k, v), blocks)
    flash = FlashLayout().encode(key, value)
    assert flash.shape == (2, 3, 4, H, D) and all(torch.equal(a, b) for a, b in zip(FlashLayout().decode(flash),
                                                                                      (key, value)))


@pytest.mark.parametrize("layout", [CpuVecLayout(), FlashLayout()], ids=["cpu-vec", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_relocate_moves_tokens_across_blocks_and_rotates_only_the_shifted_keys(layout, dtype):
    """Stored tokens 0..11 (keep 0..4, drop 5..9): destination = 0..4 then 10..10+11, a shift of 5 that
    is no multiple of the block size; keys of the shifted tokens rotated, values bit-for-bit."""
    rope, n, gen = spec("llama3"), 4, torch.Generator().manual_seed(3)
    stored_pos = torch.arange(28)
    k = rope64(torch.randn(28, H, D, generator=gen, dtype=torch.float64), stored_pos, rope).to(dtype)
    v = torch.randn(28, H, D, generator=gen).to(dtype)
    blocks = layout.encode(k.reshape(7, n, H, D), v.reshape(7, n, H, D))
    at, drop = 5, 5
    index = torch.cat([torch.arange(at), torch.arange(at + drop, 20 + drop)])   # 20 destination tokens
    dst = torch.arange(at, 20)
    out = relocate(blocks, layout, index, at, *shift_angles(rope, dst + drop, dst), rope, n)
    ok, ov = (x.reshape(20, H, D) for x in layout.decode(out))
    assert torch.equal(ov, v[index]) and torch.equal(ok[:at], k[:at])
    ref = shift64(k[at + drop:20 + drop], dst + drop, dst, rope)
    assert bool(((ok[at:].double() - ref).abs() <= 0.5 * spacing(ref, dtype) + 1e-5).all())


def test_refusals_name_their_reason():
    long = spec("longrope")
    assert shift_refusal(long, stored_end=100, prompt_len=90, sliding_window=None) is None
    assert "longrope" in shift_refusal(long, stored_end=BIG * 2 + 1, prompt_len=90, sliding_window=None)
    assert "sliding window" in shift_refusal(spec("default"), stored_end=600, prompt_len=90, sliding_window=512)
    assert "dynamic" in shift_refusal(None, stored_end=1, prompt_len=1, sliding_window=None, rope_reason="dynamic")
    dynamic = LlamaConfig(**TINY, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
                          architectures=["LlamaForCausalLM"])
    rope, reason = rope_for(dynamic)
    assert rope is None and "dynamic" in reason
    rope, reason = rope_for(LlamaConfig(**TINY, architectures=["SomethingNewForCausalLM"]))
    assert rope is None and "rotary style" in reason
    rope, _ = rope_for(LlamaConfig(**TINY, architectures=["LlamaForCausalLM"]))
    assert rope is not None and rope.style == "neox"
    assert sliding_window_of(LlamaConfig(**TINY)) is None
