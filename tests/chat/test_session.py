"""ChatSession: history reuse, edits, truncation without recompute, save/open, isolation, bad input.

Tiny random models with an in-memory byte tokenizer cover the logic; SmolLM2-135M (real
weights, fp32) covers a real conversation against the stock model.
"""
import copy
import json

import pytest
import torch

from cattn.hf import apply_cattn, revert_cattn
from cattn.chat.session import ChatSession, common_prefix, render
from cattn.store.contract import KVEntry
from cattn.store.memory import MemoryStore
from tests.chat.stock import GREEDY, SYSTEM, matches_stock, matches_stock_over_kept_kv, prompt_ids, reply_ids


def test_turns_match_stock_and_prefill_only_what_the_store_lacks(chat_model):
    model, tok = chat_model
    session = ChatSession(model, tok, session_id="s", system=SYSTEM)
    stored: list[int] = []
    for n, text in enumerate(["Hello there", "Tell me more", "And then?"]):
        session.send(text, **GREEDY)
        turn, prompt = session.turns[-1], prompt_ids(session)
        assert prompt == render(tok, session.messages[:-1], generation_prompt=True)
        assert matches_stock(model, session)
        assert turn.reused_tokens == min(common_prefix(stored, prompt), len(prompt) - 1)
        assert turn.prefilled_tokens == turn.prompt_tokens - turn.reused_tokens
        assert (turn.reused_tokens > 0) == (n > 0)
        stored = session.store.lookup(session.key).tolist()
        assert stored == (prompt + reply_ids(session))[:-1]          # the last reply token is never fed
        assert turn.kv_bytes == len(stored) * 2 * 2 * 2 * 16 * 4     # layers * (K, V) * heads * dim * fp32


def test_edited_earlier_message_costs_only_the_tokens_after_the_edit(chat_model):
    model, tok = chat_model
    session = ChatSession(model, tok, session_id="s", system=SYSTEM)
    session.send("The sky is blue", **GREEDY)
    session.send("Why is that", **GREEDY)
    edited = copy.deepcopy(session.messages) + [{"role": "user", "content": "Sure?"}]
    edited[1]["content"] = "The sky is grey"
    before = session.store.lookup(session.key).tolist()
    session.send(edited, **GREEDY)
    prompt = prompt_ids(session)
    assert session.turns[-1].reused_tokens == common_prefix(before, prompt) > 0
    assert prompt == render(tok, edited, generation_prompt=True)
    assert matches_stock(model, session)


def test_truncation_one_layer_reply_equals_stock_from_scratch_on_kept_tokens(tiny_model, byte_tokenizer):
    """One layer: K/V depend on the token alone, so after dropping old turns the reply must equal the stock
    model's from scratch on the kept token ids, positions renumbered; and the kept KV is not recomputed."""
    model = apply_cattn(tiny_model("llama", num_hidden_layers=1), page_size=4)
    keep = len(render(byte_tokenizer, [{"role": "system", "content": SYSTEM}], generation_prompt=False))
    session = ChatSession(model, byte_tokenizer, session_id="s", system=SYSTEM, max_context=112, keep_first=keep)
    drops = 0
    for text in ["First question", "Second one", "Third here", "Fourth now", "Fifth, last"]:
        session.send(text, **GREEDY)
        turn, prompt = session.turns[-1], prompt_ids(session)
        assert turn.prompt_tokens + 6 <= 112
        assert matches_stock(model, session)
        drops += turn.dropped_tokens > 0
        if turn.dropped_tokens:
            assert turn.dropped_tokens % 4 == 0 and turn.reused_tokens > keep
            assert prompt[:keep] == render(byte_tokenizer, session.messages[:1], generation_prompt=False)
    assert drops >= 2


def test_truncation_reply_equals_stock_over_kept_kv_smollm2(smollm2):
    """Real weights: after truncation the kept KV (computed with the dropped turns in view) is reused as is,
    rotated at renumbered positions; the stock model given exactly that KV replies the same tokens."""
    model, tok = smollm2
    apply_cattn(model)
    try:
        system = [{"role": "system", "content": "You are a helpful assistant."}]
        keep = len(render(tok, system, generation_prompt=False))
        session = ChatSession(model, tok, session_id="trunc", system=system[0]["content"], max_context=88,
                              keep_first=keep)
        dropped = 0
        for text in ["What is the capital of France?", "And of Germany?", "Which one is larger?", "Thanks!"]:
            session.send(text, max_new_tokens=16, do_sample=False)
            turn = session.turns[-1]
            if turn.dropped_tokens:
                dropped += 1
                assert turn.reused_tokens > keep
                assert prompt_ids(session)[:keep] == render(tok, system, generation_prompt=False)
                assert matches_stock_over_kept_kv(model, session)
        assert dropped >= 1
    finally:
        revert_cattn(model)


def test_smollm2_five_turns_equal_stock_and_prefill_only_new_tokens(smollm2):
    model, tok = smollm2
    apply_cattn(model)
    try:
        session = ChatSession(model, tok, session_id="chat", system="You are a helpful assistant.")
        cached = 0
        for text in ["What is the capital of France?", "And of Germany?", "Which one is larger?",
                     "Name a river in each.", "Thanks, that is all."]:
            session.send(text, max_new_tokens=16, do_sample=False)
            turn, prompt = session.turns[-1], prompt_ids(session)
            assert prompt == render(tok, session.messages[:-1], generation_prompt=True)
            assert matches_stock(model, session)
            assert turn.reused_tokens == cached and turn.prefilled_tokens == len(prompt) - cached
            cached = len(prompt) + turn.generated_tokens - 1
    finally:
        revert_cattn(model)


def test_save_then_open_continues_from_the_store(chat_model):
    model, tok = chat_model
    store = MemoryStore()
    first = ChatSession(model, tok, session_id="s", tenant="acme", store=store, system=SYSTEM)
    first.send("Remember the number seven", **GREEDY)
    state = json.loads(json.dumps(first.save()))
    first.close()
    again = ChatSession.open(model, tok, state, store=store)
    assert again.messages == first.messages and torch.equal(again.token_ids, store.lookup(again.key))
    stored = store.lookup(again.key).tolist()
    again.send("Which number?", **GREEDY)
    first_prompt = first.turns[-1].prompt_tokens
    assert first_prompt <= again.turns[-1].reused_tokens == common_prefix(stored, prompt_ids(again))
    assert matches_stock(model, again)


def test_open_refuses_another_model_and_another_tenant(chat_model, tiny_model):
    model, tok = chat_model
    store = MemoryStore()
    session = ChatSession(model, tok, session_id="s", tenant="acme", store=store, system=SYSTEM)
    session.send("A secret for acme", **GREEDY)
    state = session.save()
    held = store.lookup(session.key)

    other_weights = apply_cattn(tiny_model("qwen3"), page_size=4)
    other_rope = apply_cattn(tiny_model("qwen3", rope_parameters={"rope_type": "default", "rope_theta": 99.0}))
    other_rope.load_state_dict(model.state_dict())
    for other in (other_weights, other_rope):
        with pytest.raises(ValueError, match="different model"):
            ChatSession.open(other, tok, state, store=store)
    with pytest.raises(LookupError, match="tenant 'intruder'"):
        ChatSession.open(model, tok, state, store=store, tenant="intruder")

    intruder = ChatSession(model, tok, session_id="s", tenant="intruder", store=store, system=SYSTEM)
    intruder.send("A secret for acme", **GREEDY)
    assert intruder.turns[-1].reused_tokens == 0
    assert torch.equal(store.lookup(session.key), held)


def test_corrupt_entry_is_a_miss_never_wrong_kv(chat_model):
    model, tok = chat_model
    session = ChatSession(model, tok, session_id="s", system=SYSTEM)
    session.send("Hello", **GREEDY)
    ids = session.store.lookup(session.key)
    bad = torch.randn(2, ids.shape[0], 1, 16)                 # one KV head where the model has two
    session.store.save(session.key, KVEntry(ids, bad, bad.clone()))
    session.send("Again", **GREEDY)
    assert session.turns[-1].reused_tokens == 0
    assert matches_stock(model, session)


@pytest.mark.parametrize("message, error", [
    ("", ValueError), ("  \n", ValueError), ([], TypeError), (42, TypeError),
    ([{"role": "user", "content": " "}], ValueError), ([{"role": "user"}], TypeError)])
def test_empty_or_malformed_message_is_refused(chat_model, message, error):
    model, tok = chat_model
    session = ChatSession(model, tok, session_id="s", system=SYSTEM)
    with pytest.raises(error, match="message"):
        session.send(message)
    assert session.store.lookup(session.key) is None and session.messages == [{"role": "system", "content": SYSTEM}]


def test_bad_settings_are_refused(tiny_model, byte_tokenizer, chat_model):
    model, tok = chat_model
    with pytest.raises(ValueError, match="apply_cattn"):
        ChatSession(tiny_model("llama"), tok, session_id="s")
    with pytest.raises(ValueError, match="session_id"):
        ChatSession(model, tok, session_id="../etc")
    with pytest.raises(ValueError, match="keep_first"):
        ChatSession(model, tok, session_id="s", max_context=32, keep_first=32)
    no_template = copy.deepcopy(byte_tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        ChatSession(model, no_template, session_id="s")
    session = ChatSession(model, tok, session_id="s", max_context=24)
    with pytest.raises(ValueError, match="exceed max_context"):
        session.send("a message far longer than the whole context allows", **GREEDY)


def test_close_forgets_unsaved_kv_and_ends_the_session(chat_model):
    model, tok = chat_model
    store = MemoryStore()
    with ChatSession(model, tok, session_id="gone", store=store) as session:
        session.send("Hi", **GREEDY)
        assert store.lookup(session.key) is not None
    assert store.lookup(session.key) is None
    with pytest.raises(RuntimeError, match="closed"):
        session.send("Hi again")
    kept = ChatSession(model, tok, session_id="kept", store=store)
    kept.send("Hi", **GREEDY)
    kept.save()
    kept.close()
    assert store.lookup(kept.key) is not None


def test_edit_inside_dropped_history_recomputes_instead_of_serving_stale_kv(chat_model, byte_tokenizer):
    model, tok = chat_model
    session = ChatSession(model, tok, session_id="s", system=SYSTEM, max_context=112, keep_first=4)
    for text in ["First question", "Second one", "Third here"]:
        session.send(text, **GREEDY)
    assert sum(t.dropped_tokens for t in session.turns) > 0
    edited = copy.deepcopy(session.messages) + [{"role": "user", "content": "Next"}]
    edited[1]["content"] = "First answer"                     # a message whose tokens were dropped
    session.send(edited, **GREEDY)
    turn = session.turns[-1]
    assert turn.reused_tokens == 0
    assert matches_stock(model, session)
