"""Greedy chat on SmolLM2 across two processes: turn 1 on one "serving machine", turn 2 on another with its
own DRAM and disk over the same Redis (one server, and a 3-master cluster), each store built from a config
file. Turn 2 prefills only the new tokens and both replies equal stock transformers'."""
from __future__ import annotations

import json

import pytest

from cattn.hf import apply_cattn, revert_cattn
from cattn.chat.session import ChatSession
from cattn.store import build_store
from tests.chat.stock import matches_stock
from tests.store.redis_machines import peer
from tests.store.redis_servers import RedisCluster, RedisServer, require_redis

GREEDY16 = dict(max_new_tokens=8, do_sample=False)
TURN_ONE = """
import json, sys
from cattn.hf import apply_cattn, load_model
from cattn.chat.session import ChatSession
from cattn.store import build_store
from tests.chat.stock import matches_stock
model, tok = load_model()
apply_cattn(model)
out = {}
for name, config in zip(sys.argv[1::2], sys.argv[2::2]):
    store = build_store(config)
    session = ChatSession(model, tok, session_id="moving-" + name, system="You are a helpful assistant.", store=store)
    session.send("What is the capital of France?", max_new_tokens=8, do_sample=False)
    turn = session.turns[-1]
    out[name] = dict(state=session.save(), cached=turn.prompt_tokens + turn.generated_tokens - 1,
                     stock=matches_stock(model, session))
    store.close()
print(json.dumps(out))
"""


def config_file(path, urls, cluster: bool, disk) -> str:
    path.write_text(f"""
[store]
dram_bytes = "64MiB"
[disk]
path = "{disk}"
capacity_bytes = "256MiB"
[redis]
urls = {json.dumps(list(urls))}
cluster = {str(cluster).lower()}
timeout_s = 2.0
""")
    return str(path)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    require_redis()
    root = tmp_path_factory.mktemp("redis")
    single = RedisServer(root)
    try:
        cluster = RedisCluster(root / "cluster")
    except BaseException:
        single.stop()
        raise
    yield {"server": ((single.url,), False), "cluster": (cluster.urls, True)}
    cluster.stop()
    single.stop()


def test_smollm2_turn_two_in_another_process_prefills_only_new_tokens(smollm2, servers, tmp_path):
    args = []
    for name, (urls, cluster) in servers.items():
        args += [name, config_file(tmp_path / f"peer-{name}.toml", urls, cluster, tmp_path / f"peer-disk-{name}")]
    code = f"import sys; sys.argv[1:] = {args!r}\n" + TURN_ONE
    turn_one = json.loads(peer(code, {}, timeout=600).strip().splitlines()[-1])
    model, tok = smollm2
    apply_cattn(model)
    try:
        for name, (urls, cluster) in servers.items():
            first = turn_one[name]
            assert first["stock"], f"{name}: turn 1 differs from stock"
            store = build_store(config_file(tmp_path / f"{name}.toml", urls, cluster, tmp_path / f"disk-{name}"))
            session = ChatSession(model, tok, session_id=f"moving-{name}", store=store)
            messages = first["state"]["messages"] + [{"role": "user", "content": "And of Germany?"}]
            session.send(messages, **GREEDY16)
            turn = session.turns[-1]
            assert turn.reused_tokens == first["cached"] > 0, name
            assert turn.prefilled_tokens == turn.prompt_tokens - first["cached"], name
            assert matches_stock(model, session), name
            assert store.stats()["redis"]["hits"] >= 1
            store.close(persist=False)
    finally:
        revert_cattn(model)
