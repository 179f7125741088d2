"""A `ChatSession` whose history is on disk only: it streams in layer by layer during the prefill, as much
of it as the disk delivers in time (the rest is prefilled); a layer that fails its checksum mid-prefill
costs a recompute of the turn, never a wrong token."""
import random
import threading

import pytest
from transformers.generation.streamers import BaseStreamer

from cattn.chat.buffer_rule import BufferRule
from cattn.chat.session import ChatSession, common_prefix
from cattn.store import DiskTier, TieredStore
from cattn.store.tiered.migration import evict_dram_locked
from cattn.store.policy.base import Scheduler
from tests.chat.stock import GREEDY, SYSTEM, first_turn_on_disk, matches_stock, prompt_ids
from tests.store.gated_tiers import GatedDisk, GatedLayers, corrupt_layer, wait_until


def open_disk(tmp_path):
    disk = GatedLayers(tmp_path, 4 << 20)
    disk.permits = threading.Semaphore(1 << 20)   # counted, never held back
    return disk


class Recording(BaseStreamer):
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ends += 1


def test_a_history_on_disk_only_streams_in_layer_by_layer(chat_model, tmp_path):
    model, tok = chat_model
    state = first_turn_on_disk(chat_model, tmp_path)
    disk = open_disk(tmp_path)
    (entry,), _ = disk.scan()
    store = TieredStore(1 << 20, disk)
    again = ChatSession.open(model, tok, state, store=store)
    stored = store.lookup(again.key).tolist()      # (the chunks' headers only)
    again.send("Which number?", **GREEDY)
    turn = again.turns[-1]
    assert turn.reused_tokens == common_prefix(stored, prompt_ids(again)) > 0 and matches_stock(model, again)
    assert store.stats()["disk"]["layerwise_reads"] == 1
    # every chunk that holds a reused token is read, layer by layer (the prompt's, and the reply's unless
    # the reply renders otherwise in the next prompt); none is read whole
    starts = [sum(hi - lo for _, lo, hi in entry.views[:i]) for i in range(len(entry.views))]
    chunks = sum(start < turn.reused_tokens for start in starts)
    assert disk.whole_reads == 0 and disk.layer_reads == model.config.num_hidden_layers * chunks
    again.send("And the one after?", **GREEDY)       # the read left the history in DRAM: a DRAM hit
    assert again.turns[-1].reused_tokens > turn.reused_tokens and matches_stock(model, again)
    store.close(persist=False)


def test_a_layer_corrupt_mid_prefill_recomputes_the_turn(chat_model, tmp_path):
    model, tok = chat_model
    state = first_turn_on_disk(chat_model, tmp_path)
    corrupt_layer(tmp_path, 0, random.randrange(model.config.num_hidden_layers))
    store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20))
    again = ChatSession.open(model, tok, state, store=store)
    streamer = Recording()
    again.send("Which number?", streamer=streamer, **GREEDY)
    assert again.turns[-1].reused_tokens == 0 and matches_stock(model, again)
    assert store.stats()["disk"]["corrupt"] == 1 and len(again.turns) == 1   # one turn, whatever it took
    # a streamer sees the turn once: the prompt, then the reply's tokens, then its end
    assert streamer.puts[0] == prompt_ids(again) and streamer.ends == 1
    assert sum(streamer.puts[1:], []) == again.token_ids.tolist()[len(prompt_ids(again)):]
    again.send("And the one after?", **GREEDY)       # the recomputed turn was saved: reused again
    assert again.turns[-1].reused_tokens > 0 and matches_stock(model, again)
    store.close(persist=False)


def test_a_layer_lost_mid_forward_redoes_the_turn_once(chat_model, tmp_path, monkeypatch):
    """Every layer is read inside the forward (no preload): the loss surfaces in ``generate`` itself."""
    model, tok = chat_model
    state = first_turn_on_disk(chat_model, tmp_path)
    corrupt_layer(tmp_path, 0, model.config.num_hidden_layers - 1)
    monkeypatch.setattr(BufferRule, "preload", lambda *args: 0)
    store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20))
    again = ChatSession.open(model, tok, state, store=store)
    streamer = Recording()
    again.send("Which number?", streamer=streamer, **GREEDY)
    assert again.turns[-1].reused_tokens == 0 and matches_stock(model, again)
    assert store.stats()["disk"]["corrupt"] == 1 and store.stats()["disk"]["layerwise_reads"] == 1
    assert streamer.puts[0] == prompt_ids(again) and streamer.ends == 1       # the prompt once, not twice
    assert sum(streamer.puts[1:], []) == again.token_ids.tolist()[len(prompt_ids(again)):]
    again.send("And the one after?", **GREEDY)
    assert again.turns[-1].reused_tokens > 0 and matches_stock(model, again)
    store.close(persist=False)


@pytest.mark.parametrize("disk_bytes_per_s, reads", [(1.0, False), (1e15, True)])
def test_a_slow_disk_is_not_read_a_fast_one_is(chat_model, tmp_path, disk_bytes_per_s, reads):
    model, tok = chat_model
    store = TieredStore(1 << 20, open_disk(tmp_path), disk_read_bytes_per_s=disk_bytes_per_s)
    session = ChatSession(model, tok, session_id="s", store=store, system=SYSTEM)
    session.send("Remember the number seven", **GREEDY)   # measures the prefill's time per layer and token
    session.settle_saves()
    store.flush()
    with store.state.lock:                              # the history leaves DRAM: on disk only
        while evict_dram_locked(store.state):
            pass
    assert store.tokens_in_dram(session.key) == 0
    session.send("Which number?", **GREEDY)
    turn = session.turns[-1]
    assert (turn.reused_tokens > 0) == reads and matches_stock(model, session)
    assert store.stats()["disk"]["layerwise_reads"] == reads
    store.close(persist=False)


def test_the_split_is_where_the_read_meets_the_prefill():
    rule = BufferRule(num_layers=4, token_nbytes=1000)
    assert rule.disk_tokens(100, 0, 10, 1e6) == 100          # nothing measured yet: read it all
    rule.measured((10, 10e-3))                                # 1 ms per layer and new token: 4 ms a token
    assert rule.disk_tokens(100, 0, 10, None) == 100          # the disk's speed unknown: read it all
    # reading p tokens takes p ms, prefilling the other 110 - p takes 4 (110 - p) ms: they meet at 88
    assert rule.disk_tokens(100, 0, 10, 1e6) == 88
    assert rule.disk_tokens(100, 30, 10, 1e6) == 94           # 30 in DRAM: p - 30 = 4 (110 - p)
    assert rule.disk_tokens(100, 30, 10, 1.0) == 30           # a disk slower than anything: DRAM only
    assert rule.disk_tokens(100, 0, 10, 1e15) == 100          # a disk faster than compute: all of it
    assert rule.disk_tokens(20, 20, 10, 1e6) == 20


class WholeReadsGated(GatedDisk):
    """The prefetch lane's whole-chunk reads wait for permits; layer-wise reads are counted, never held."""

    layer_reads = 0

    def open_layers(self, key, layout, chunk_id, num_tokens):
        r = super().open_layers(key, layout, chunk_id, num_tokens)
        read_layer, disk = r.read_layer, self

        def counted(layer, into):
            disk.layer_reads += 1
            read_layer(layer, into)
        r.read_layer = counted
        return r


def test_a_turn_starting_mid_prefetch_reads_on_layer_by_layer(chat_model, tmp_path):
    model, tok = chat_model
    store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20))
    first = ChatSession(model, tok, session_id="s", store=store, system=SYSTEM)
    for text in ("Remember the number seven", "And the number eight"):
        first.send(text, **GREEDY)
    state = first.save()
    store.close()
    chunks = len(list(tmp_path.rglob("*.kv")))
    assert chunks >= 3
    disk = WholeReadsGated(tmp_path, 4 << 20)
    store = TieredStore(1 << 20, disk, policy=Scheduler(), high_watermark=1.0, partial_prefetch=True)
    again = ChatSession.open(model, tok, state, store=store)
    assert store.update_queue([again.key]) == [again.key]
    disk.permits.release()                                   # the lane reads the oldest chunk ...
    wait_until(lambda: disk.entered == 2, "the lane to begin the second chunk")
    store.job_started(again.key)                              # ... the job starts while the second is read
    disk.permits.release()
    store.sync()
    in_dram = store.tokens_in_dram(again.key)
    assert in_dram > 0 and store.stats()["disk"]["prefetch_stopped"] == 1
    stored = store.lookup(again.key).tolist()
    again.send("Which numbers?", **GREEDY)
    reused = again.turns[-1].reused_tokens
    assert reused == common_prefix(stored, prompt_ids(again)) > in_dram and matches_stock(model, again)
    assert len(disk.read) == 2                                # the lane stopped after the chunk in flight
    layers = model.config.num_hidden_layers                   # and the job read on, layer by layer
    assert store.stats()["disk"]["layerwise_reads"] == 1 and disk.layer_reads and disk.layer_reads % layers == 0
    store.close(persist=False)
