"""What the stock model replies, to check a chat session against: the greedy settings and system prompt of
the tiny-model chats, a turn's prompt and reply token ids, and whether the stock (unpatched) model would
have replied what the session did; plus a first turn saved to disk, for the tests that restart from it."""
import torch
from transformers.cache_utils import DynamicCache

from cattn import apply_rope
from cattn.hf import CACHE_KWARG, apply_cattn, is_patched, revert_cattn
from cattn.rope import RopeSpec
from cattn.chat.session import ChatSession
from cattn.store import DiskTier, TieredStore

SYSTEM = "Be brief."
GREEDY = dict(max_new_tokens=6, do_sample=False)


def stock_choices(model, prompt: list[int], reply: list[int], cache=None) -> list[int]:
    """What stock greedy decoding picks at each step of ``reply``, teacher-forced on ``prompt + reply``
    in one forward of the unpatched weights (after the tokens already in ``cache``, if given).

    Greedy decoding takes the argmax at every step, so this equals ``reply`` exactly when the stock
    model, generating greedily from ``prompt``, replies ``reply`` token for token."""
    patched = is_patched(model)
    if patched:
        revert_cattn(model)
    try:
        past = 0 if cache is None else cache.get_seq_length()
        ids = torch.tensor([(prompt + reply[:-1])[past:]])
        extra = {} if cache is None else {CACHE_KWARG: cache}
        with torch.no_grad():
            logits = model(ids, **extra).logits[0]
        return logits[len(prompt) - 1 - past:].argmax(-1).tolist()
    finally:
        if patched:
            apply_cattn(model)


def reply_ids(session) -> list[int]:
    return session.token_ids[session.turns[-1].prompt_tokens:].tolist()


def prompt_ids(session) -> list[int]:
    return session.token_ids[:session.turns[-1].prompt_tokens].tolist()


def matches_stock(model, session) -> bool:
    return stock_choices(model, prompt_ids(session), reply_ids(session)) == reply_ids(session)


def matches_stock_over_kept_kv(model, session) -> bool:
    """Whether the stock model, given the session's stored KV of its reused prompt prefix rotated at
    positions 0..n-1, replies what the session replied."""
    turn = session.turns[-1]
    entry = session.store.load(session.key, turn.reused_tokens)
    assert entry.token_ids.tolist() == prompt_ids(session)[:turn.reused_tokens]
    rope, positions = RopeSpec.from_model(model), torch.arange(turn.reused_tokens)
    cache = DynamicCache()
    for layer in range(entry.k.shape[0]):
        cache.update(apply_rope(entry.k[layer], positions, rope).transpose(0, 1)[None],
                     entry.v[layer].transpose(0, 1)[None], layer)
    return stock_choices(model, prompt_ids(session), reply_ids(session), cache) == reply_ids(session)


def first_turn_on_disk(chat_model, tmp_path) -> dict:
    """One turn saved through a store over ``tmp_path`` that then closed: a new process finds the history
    on disk only. Returns the session's state for `ChatSession.open`."""
    model, tok = chat_model
    store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20))
    session = ChatSession(model, tok, session_id="s", tenant="acme", store=store, system=SYSTEM)
    session.send("Remember the number seven", **GREEDY)
    state = session.save()
    store.close()
    return state
