"""RopeSpec and apply_rope against transformers' own rotary modules, one rope type at a time.

Each test builds a tiny config, rotates the same random Q through HF's rotary embedding and
``apply_rotary_pos_emb`` and through ``cattn.apply_rope`` at random (non-sequential) positions,
and compares in fp32, where both compute angles as ``position * inv_freq`` in fp32.
"""
from __future__ import annotations

import logging

import pytest
import torch

import cattn
from cattn import RopeSpec

transformers = pytest.importorskip("transformers")
from transformers import CohereConfig, LlamaConfig, Phi3Config, PhiConfig  # noqa: E402
from transformers.models.cohere import modeling_cohere  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.phi import modeling_phi  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402

# Same fp32 angles on both sides; only the order of the final multiply-adds differs.
ATOL, RTOL = 2e-5, 1e-5
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
            intermediate_size=64, vocab_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
NUM_HEADS, HEAD_DIM = 4, 16

# transformers warns about deliberately odd tiny configs; keep the test log readable
logging.getLogger("transformers").setLevel(logging.ERROR)


def hf_rotate(rotary, apply_rotary_pos_emb, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` the way an HF attention layer does; returns ``[T, H, D]``."""
    cos, sin = rotary(x, positions[None, :])
    xt = x.transpose(0, 1)[None]                   # [1, H, T, D], HF's layout
    rotated, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
    return rotated[0].transpose(0, 1)


def random_positions(n: int, high: int) -> torch.Tensor:
    return torch.randint(0, high, (n,))


def llama_config(rope_parameters: dict, **extra) -> LlamaConfig:
    return LlamaConfig(**TINY, max_position_embeddings=256, rope_parameters=rope_parameters, **extra)


LLAMA_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
    # wavelengths of head_dim 16 span 6..2e4 tokens: all three llama3 bands (< 16, 16..64, > 64) are hit
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope_type", list(LLAMA_TYPES))
def test_llama_rope_types_match_transformers(rope_type):
    config = llama_config(LLAMA_TYPES[rope_type])
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    spec = RopeSpec.from_config(config)

    torch.testing.assert_close(spec.inv_freq, rotary.inv_freq.float(), atol=0, rtol=0)
    assert spec.attention_scaling == pytest.approx(rotary.attention_scaling, rel=1e-12)
    assert spec.style == "neox" and spec.rotary_dim == HEAD_DIM
    if rope_type == "yarn":
        assert spec.attention_scaling > 1.0        # the scaling is exercised, not just 1.0 == 1.0

    x = torch.randn(40, NUM_HEADS, HEAD_DIM)
    positions = random_positions(40, 256)
    expected = hf_rotate(rotary, modeling_llama.apply_rotary_pos_emb, x, positions)
    torch.testing.assert_close(cattn.apply_rope(x, positions, spec), expected, atol=ATOL, rtol=RTOL)


def test_from_model_equals_from_config_and_models_rotary():
    config = llama_config(LLAMA_TYPES["llama3"])
    model = transformers.LlamaForCausalLM(config)
    spec = RopeSpec.from_model(model)
    torch.testing.assert_close(spec.inv_freq, model.model.rotary_emb.inv_freq.float(), atol=0, rtol=0)
    assert spec.fingerprint() == RopeSpec.from_config(config).fingerprint()
    assert spec.attention_scaling == model.model.rotary_emb.attention_scaling


def phi3_longrope_config() -> Phi3Config:
    half = HEAD_DIM // 2
    return Phi3Config(**TINY, max_position_embeddings=256, original_max_position_embeddings=64,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                       "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                       "long_factor": [1.0 + 0.5 * i for i in range(half)]})


@pytest.mark.parametrize("seq_len", [1, 40, 64, 65, 200])
def test_longrope_short_and_long_regimes(seq_len):
    """HF switches to the long factors once a sequence exceeds original_max_position_embeddings (64)."""
    config = phi3_longrope_config()
    spec = RopeSpec.from_config(config)
    assert spec.original_max_position == 64
    assert not torch.equal(spec.inv_freq, spec.long_inv_freq)
    rotary = modeling_phi3.Phi3RotaryEmbedding(config)
    assert spec.attention_scaling == pytest.approx(rotary.attention_scaling) and spec.attention_scaling > 1.0

    x = torch.randn(seq_len, NUM_HEADS, HEAD_DIM)
    positions = torch.arange(seq_len)        # HF picks the regime from max(position_ids) + 1
    expected = hf_rotate(rotary, modeling_phi3.apply_rotary_pos_emb, x, positions)
    at_len = spec.at_length(seq_len)
    expected_inv = spec.long_inv_freq if seq_len > 64 else spec.inv_freq
    torch.testing.assert_close(at_len.inv_freq, expected_inv, atol=0, rtol=0)
    torch.testing.assert_close(cattn.apply_rope(x, positions, at_len), expected, atol=ATOL, rtol=RTOL)


def test_longrope_regimes_differ():
    """The long regime really rotates differently (so the regime test above can fail)."""
    spec = RopeSpec.from_config(phi3_longrope_config())
    x, positions = torch.randn(8, NUM_HEADS, HEAD_DIM), torch.arange(60, 68)
    short, long = cattn.apply_rope(x, positions, spec.at_length(64)), cattn.apply_rope(x, positions, spec.at_length(65))
    assert (short - long).abs().max() > 1e-2


@pytest.mark.parametrize("factor", [0.5, 0.25])
def test_partial_rotary_matches_phi(factor):
    config = PhiConfig(**TINY, max_position_embeddings=256, partial_rotary_factor=factor)
    spec = RopeSpec.from_config(config)
    rotary_dim = int(HEAD_DIM * factor)
    assert spec.rotary_dim == rotary_dim

    x = torch.randn(30, NUM_HEADS, HEAD_DIM)
    positions = random_positions(30, 256)
    rot = hf_rotate(modeling_phi.PhiRotaryEmbedding(config), modeling_phi.apply_rotary_pos_emb,
                    x[..., :rotary_dim].contiguous(), positions)
    expected = torch.cat((rot, x[..., rotary_dim:]), dim=-1)   # Phi passes the tail through untouched
    out = cattn.apply_rope(x, positions, spec)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


def test_partial_rotary_with_yarn():
    """Scaled rope types honour partial_rotary_factor too (HF's yarn init reads it)."""
    params = dict(LLAMA_TYPES["yarn"], partial_rotary_factor=0.5)
    config = PhiConfig(**TINY, max_position_embeddings=256, rope_parameters=params)
    spec = RopeSpec.from_config(config)
    assert spec.rotary_dim == HEAD_DIM // 2 and spec.attention_scaling > 1.0
    x, positions = torch.randn(20, NUM_HEADS, HEAD_DIM), random_positions(20, 256)
    rot = hf_rotate(modeling_phi.PhiRotaryEmbedding(config), modeling_phi.apply_rotary_pos_emb,
                    x[..., : HEAD_DIM // 2].contiguous(), positions)
    torch.testing.assert_close(cattn.apply_rope(x, positions, spec), torch.cat((rot, x[..., HEAD_DIM // 2:]), -1),
                               atol=ATOL, rtol=RTOL)


def test_gptj_style_matches_cohere():
    """Cohere rotates interleaved pairs (2i, 2i+1), as GPT-J does."""
    config = CohereConfig(**TINY, max_position_embeddings=256)
    spec = RopeSpec.from_config(config, style="gptj")
    x, positions = torch.randn(30, NUM_HEADS, HEAD_DIM), random_positions(30, 256)
    expected = hf_rotate(modeling_cohere.CohereRotaryEmbedding(config), modeling_cohere.apply_rotary_pos_emb,
                         x, positions)
    torch.testing.assert_close(cattn.apply_rope(x, positions, spec), expected, atol=ATOL, rtol=RTOL)
    neox = cattn.apply_rope(x, positions, RopeSpec.from_config(config))
    assert (neox - expected).abs().max() > 1e-2       # the two styles are not interchangeable


def test_gptj_partial_matches_hand_written_interleaved():
    """Interleaved partial rotary, written out pair by pair: (x[2i], x[2i+1]) rotated by pos * inv_freq[i]."""
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, 12, 2).float() / 12))
    spec = RopeSpec(inv_freq, attention_scaling=0.9, style="gptj")
    x, positions = torch.randn(10, 3, 16, dtype=torch.float64), random_positions(10, 1000)
    expected = x.clone()
    for i in range(6):
        angle = (positions.float() * inv_freq[i]).double()[:, None]
        c, s = angle.cos() * 0.9, angle.sin() * 0.9
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        expected[..., 2 * i], expected[..., 2 * i + 1] = a * c - b * s, b * c + a * s
    torch.testing.assert_close(cattn.apply_rope(x, positions, spec), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("source", ["config", "model"])
def test_dynamic_rope_is_refused(source):
    config = llama_config({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic.*not supported"):
        if source == "config":
            RopeSpec.from_config(config)
        else:
            RopeSpec.from_model(transformers.LlamaForCausalLM(config))


INV = torch.tensor([1.0, 0.1, 0.01])
# (case id, RopeSpec kwargs, exception, message: each names the field)
BAD_SPECS = [
    ("style", dict(inv_freq=INV, style="rotate"), ValueError, "style must be 'neox' or 'gptj'"),
    ("inv_freq-2d", dict(inv_freq=torch.ones(2, 2)), TypeError, r"inv_freq must be a 1-D tensor"),
    ("inv_freq-list", dict(inv_freq=[1.0, 0.1]), TypeError, "inv_freq must be a torch.Tensor"),
    ("inv_freq-empty", dict(inv_freq=torch.ones(0)), ValueError, "inv_freq must hold at least one frequency"),
    ("inv_freq-int", dict(inv_freq=torch.ones(3, dtype=torch.int64)), TypeError, "inv_freq must be a real floating-point"),
    ("inv_freq-bool", dict(inv_freq=torch.ones(3, dtype=torch.bool)), TypeError, "inv_freq must be a real floating-point"),
    ("inv_freq-complex", dict(inv_freq=INV.to(torch.complex64)), TypeError, "inv_freq must be a real floating-point"),
    ("inv_freq-nan", dict(inv_freq=torch.tensor([1.0, float("nan")])), ValueError, "inv_freq must be finite"),
    ("inv_freq-inf", dict(inv_freq=torch.tensor([float("inf"), 1.0])), ValueError, "inv_freq must be finite"),
    ("scaling-bool", dict(inv_freq=INV, attention_scaling=True), TypeError, "attention_scaling must be a real number"),
    ("scaling-complex", dict(inv_freq=INV, attention_scaling=1j), TypeError, "attention_scaling must be a real number"),
    ("scaling-tensor", dict(inv_freq=INV, attention_scaling=torch.tensor(1.0)), TypeError,
     "attention_scaling must be a real number"),
    ("scaling-str", dict(inv_freq=INV, attention_scaling="1.0"), TypeError, "attention_scaling must be a real number"),
    ("scaling-zero", dict(inv_freq=INV, attention_scaling=0.0), ValueError, "attention_scaling must be finite and positive"),
    ("scaling-negative", dict(inv_freq=INV, attention_scaling=-1.0), ValueError, "attention_scaling must be finite and positive"),
    ("scaling-nan", dict(inv_freq=INV, attention_scaling=float("nan")), ValueError, "attention_scaling must be finite"),
    ("scaling-inf", dict(inv_freq=INV, attention_scaling=float("inf")), ValueError, "attention_scaling must be finite"),
    ("scaling-huge-int", dict(inv_freq=INV, attention_scaling=10**400), ValueError, "attention_scaling must be finite"),
    ("long-without-switch", dict(inv_freq=INV, long_inv_freq=INV / 2), ValueError,
     "long_inv_freq and original_max_position go together"),
    ("switch-without-long", dict(inv_freq=INV, original_max_position=64), ValueError,
     "long_inv_freq and original_max_position go together"),
    ("long-length", dict(inv_freq=INV, long_inv_freq=INV[:2], original_max_position=64), ValueError,
     r"long_inv_freq must have inv_freq's shape \(3,\), got \(2,\)"),
    ("long-nan", dict(inv_freq=INV, long_inv_freq=torch.tensor([1.0, float("nan"), 0.1]), original_max_position=64),
     ValueError, "long_inv_freq must be finite"),
    ("long-int", dict(inv_freq=INV, long_inv_freq=torch.ones(3, dtype=torch.int32), original_max_position=64),
     TypeError, "long_inv_freq must be a real floating-point"),
    ("long-2d", dict(inv_freq=INV, long_inv_freq=INV[None], original_max_position=64), TypeError,
     "long_inv_freq must be a 1-D tensor"),
    ("switch-zero", dict(inv_freq=INV, long_inv_freq=INV / 2, original_max_position=0), ValueError,
     "original_max_position must be positive, got 0"),
    ("switch-negative", dict(inv_freq=INV, long_inv_freq=INV / 2, original_max_position=-64), ValueError,
     "original_max_position must be positive"),
    ("switch-float", dict(inv_freq=INV, long_inv_freq=INV / 2, original_max_position=64.0), TypeError,
     "original_max_position must be an int, got float"),
    ("switch-bool", dict(inv_freq=INV, long_inv_freq=INV / 2, original_max_position=True), TypeError,
     "original_max_position must be an int, got bool"),
]


@pytest.mark.parametrize("kwargs, exc, match", [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_spec_validates_every_field_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RopeSpec(**kwargs)


def test_spec_normalises_valid_fields():
    """fp64/fp16 frequencies become fp32 (as HF computes angles), ints and numpy scalars plain Python."""
    np = pytest.importorskip("numpy")
    spec = RopeSpec(INV.double(), attention_scaling=np.float32(1.5), long_inv_freq=INV.half(),
                    original_max_position=np.int64(64))
    assert spec.inv_freq.dtype == spec.long_inv_freq.dtype == torch.float32
    assert type(spec.attention_scaling) is float and spec.attention_scaling == 1.5
    assert type(spec.original_max_position) is int and spec.original_max_position == 64
    assert RopeSpec(INV, attention_scaling=2).attention_scaling == 2.0


def _longrope_batch(kv_len: int, q_len: int, num_kv_heads: int = 1, group: int = 2, page: int = 8):
    num_pages = -(-kv_len // page)
    k_cache = torch.randn(num_pages, page, num_kv_heads, HEAD_DIM)
    v_cache = torch.randn(num_pages, page, num_kv_heads, HEAD_DIM)
    return (torch.randn(q_len, num_kv_heads * group, HEAD_DIM), k_cache, v_cache,
            torch.randperm(num_pages).to(torch.int32)[None], torch.tensor([kv_len], dtype=torch.int32),
            torch.tensor([0, q_len], dtype=torch.int32))


@pytest.mark.parametrize("kv_len, q_len", [(64, 1), (64, 10), (65, 1), (65, 10), (90, 40)])
def test_longrope_backends_agree_on_the_switch(kv_len, q_len):
    """Both backends take the long factors for a whole sequence once kv_len > original_max_position
    (64), for every query and key of it, including those at positions below 64, as HF does when
    its forward call reaches that length; at kv_len 64 both keep the short factors."""
    spec = RopeSpec.from_config(phi3_longrope_config())
    regime = RopeSpec(spec.long_inv_freq if kv_len > 64 else spec.inv_freq, spec.attention_scaling)
    other = RopeSpec(spec.inv_freq if kv_len > 64 else spec.long_inv_freq, spec.attention_scaling)
    batch = _longrope_batch(kv_len, q_len)
    as64 = [t.double() if t.is_floating_point() else t for t in batch]
    want = cattn.reference.paged_attention(*as64, regime)
    not_want = cattn.reference.paged_attention(*as64, other)
    assert (want - not_want).abs().max() > 1e-3          # the regimes differ: the test can tell them apart
    for backend in ("torch", "triton"):
        got = cattn.paged_attention(*batch, spec, backend=backend)
        torch.testing.assert_close(got.double(), want, atol=5e-6, rtol=5e-6)


def test_at_length_is_identity_without_long_factors():
    spec = RopeSpec.from_config(llama_config(LLAMA_TYPES["default"]))
    assert spec.at_length(10 ** 6) is spec


def test_a_spec_moves_to_the_meta_device():
    """Models built on the meta device (accelerate's empty weights) move their spec there: its values were
    checked where they were made, and a meta tensor has none to check."""
    spec = RopeSpec.from_config(phi3_longrope_config())
    meta = spec.to("meta")
    assert meta.inv_freq.is_meta and meta.long_inv_freq.is_meta and meta.rotary_dim == spec.rotary_dim
    assert meta.original_max_position == spec.original_max_position and meta.attention_scaling == spec.attention_scaling
    with pytest.raises(TypeError, match="inv_freq must be a real floating-point tensor"):
        RopeSpec(torch.zeros(4, dtype=torch.int64, device="meta"))
