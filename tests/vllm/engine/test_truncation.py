"""The paper's truncation inside vLLM's multi-process engine, on the embedded SmolLM2: a client keeps
the system prompt and the last messages within a token budget; once it drops its oldest messages,
the next turn loads the system prompt and the kept messages through cattn (the span's keys
re-rotated to their new positions) with ``cattn.truncation`` on, and recomputes the span with it off.
Also: vLLM's own CPU cache writer lays out blocks as `CpuVecLayout` decodes them."""
import os

import pytest
import torch

if os.environ.get("CATTN_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (see docs/vllm.md)")
else:
    import vllm  # noqa: F401  (CI's vLLM block: a missing vLLM is a failure, not a skip)

from cattn.vllm.block_layout import CpuVecLayout  # noqa: E402
from tests.vllm.engine.engines import run_engine, system_prompt  # noqa: E402
from tests.vllm.engine.hf_reference import patched_model, truncated_logprobs  # noqa: E402

QUESTIONS = ["When does the museum open?", "Can I bring my dog?", "Is there a cafe?", "Are tours free?",
             "Can children enter free?", "Where is the garden?", "May I take photos?", "Is there a cloakroom?",
             "How long is a tour?", "What is in the garden?"]
BUDGET = 520


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpu_backends_writer_matches_the_layout(dtype):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    n, h, d = 32, 2, 64
    isa = _get_attn_isa(dtype, n, d)
    if isa not in ("vec", "vec16"):
        pytest.skip(f"ISA {isa} is not a known layout (the connector never shifts into it)")
    # small integers: exact in bf16; key and value distinct everywhere
    key = torch.arange(n * h * d).reshape(n, h, d).remainder(251).to(dtype)
    value = (torch.arange(n * h * d).reshape(n, h, d).remainder(241) - 120).to(dtype)
    cache = torch.zeros(1, h, 2 * n, d, dtype=dtype)        # the backend's [B, H, 2N, D] view
    ops.cpu_attn_reshape_and_cache(key, value, cache[:, :, :n], cache[:, :, n:], torch.arange(n), isa)
    blocks = cache.reshape(1, h, n, 2 * d)                   # the connector's [B, H, N, 2D] view
    k, v = CpuVecLayout().decode(blocks)
    assert torch.equal(k[0], key) and torch.equal(v[0], value)


def engine(model_dir, store, truncation: bool) -> dict:
    return dict(model=model_dir, in_process=False, max_model_len=1024,
                connector=dict(dram_bytes=64 << 20, disk_dir=str(store), truncation=truncation))


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-truncation")
    work = [dict(user_turns=QUESTIONS, max_tokens=16, system=system_prompt(24, "city museum"), session="visitor",
                 budget=BUDGET)]
    return {name: run_engine(tmp, name, engine(model_dir, tmp / name, on), work, settle_s=3)[0]
            for name, on in (("on", True), ("off", False))}


def test_the_turn_after_the_first_drop_loads_the_kept_history_re_rotated(runs, model_dir):
    on, off = runs["on"], runs["off"]
    drop = next(i for i, t in enumerate(on) if t["dropped_messages"])
    assert all(t["prompt_tokens"] <= BUDGET for t in on) and off[drop]["dropped_messages"]
    assert [t["reply_ids"] for t in on[:drop]] == [t["reply_ids"] for t in off[:drop]]   # same until the drop
    turn, report = on[drop], on[drop]["cattn"]
    assert report["shifted_by"] > 0 and not report["load_failed"] and report["saved_tokens"] == 0
    kept_history = turn["prompt_tokens"] - 40    # all but the new question and the template around it
    assert turn["external_tokens"] >= 0.8 * kept_history
    assert turn["external_tokens"] == report["loaded_tokens"] == report["matched_tokens"]
    # the same truncation by cattn's own path (keys before RoPE): the same log-probabilities
    previous = on[drop - 1]
    original = previous["prompt_ids"] + previous["reply_ids"]
    want = truncated_logprobs(patched_model(model_dir), original, report["shift_at"], report["shifted_by"], turn["prompt_ids"],
                              turn["reply_ids"], report["matched_tokens"])
    torch.testing.assert_close(torch.tensor(turn["logprobs"][:8]), torch.tensor(want[:8]), atol=2e-3, rtol=0)
    # off: only the system prompt (the common prefix) comes back; the kept messages are prefilled
    assert off[drop]["cattn"]["shifted_by"] == 0
    assert off[drop]["external_tokens"] <= report["shift_at"]
