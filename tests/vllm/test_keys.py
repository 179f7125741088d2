"""The vLLM connector's pure parts (no vLLM needed): tenants, session ids, block chains, its config."""
import random

import pytest

from cattn.store import EntryKey, common_prefix
from cattn.vllm import CattnVllmConfig, kv_transfer_config
from cattn.vllm.keys import block_chain, client_session, content_session, tenant_of


def test_tenant_is_a_hash_of_the_salt():
    assert tenant_of(None, "default") == tenant_of("", "default") == "default"
    a, b = tenant_of("alice's salt / with spaces", "default"), tenant_of("bob", "default")
    assert a != b and a == tenant_of("alice's salt / with spaces", "x")
    EntryKey(a, "0" * 32, "s")   # a valid store name, whatever the salt held
    assert "alice" not in a


def test_client_session_ids():
    assert client_session("conv-42") == "conv-42"
    for odd in ("../etc", "c-1234", "s-abc", "x" * 200, "has space"):
        s = client_session(odd)
        assert s.startswith("s-") and s != odd
        EntryKey("t", "0" * 32, s)
    with pytest.raises(TypeError, match="session id"):
        client_session(17)
    with pytest.raises(TypeError, match="session id"):
        client_session("")


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_block_chain_is_a_prefix_hash(block_size):
    rng = random.Random(block_size)
    ids = [rng.randrange(50000) for _ in range(5 * block_size + block_size // 2)]
    chain = block_chain(ids, block_size)
    assert len(chain) == 5 and len(set(chain)) == 5
    longer = block_chain(ids + [rng.randrange(50000) for _ in range(3 * block_size)], block_size)
    assert longer[:5] == chain
    other = list(ids)
    other[block_size + block_size // 2] ^= 1       # a change in block 1 changes digest 1 and every later one
    changed = block_chain(other, block_size)
    assert changed[0] == chain[0] and all(x != y for x, y in zip(changed[1:], chain[1:]))
    assert block_chain(ids[:block_size - 1], block_size) == []
    assert content_session(chain) != content_session(chain[:4])


def test_common_prefix():
    rng = random.Random(0)
    a = [rng.randrange(100) for _ in range(37)]
    assert common_prefix(a, a) == 37 and common_prefix(a, a[:10]) == 10 and common_prefix([], a) == 0
    b = a[:21] + [a[21] + 1] + a[22:]
    assert common_prefix(a, b) == 21


def test_config_from_extra_config():
    cfg = CattnVllmConfig.from_extra_config({"cattn.dram_bytes": 1 << 20, "cattn.disk_dir": "somewhere",
                                             "other.key": 1})
    assert cfg.dram_bytes == 1 << 20 and cfg.disk_dir == "somewhere" and cfg.persist
    assert CattnVllmConfig.from_extra_config(cfg.to_extra_config()) == cfg
    with pytest.raises(ValueError, match="cattn.dram_byte"):
        CattnVllmConfig.from_extra_config({"cattn.dram_byte": 5})
    with pytest.raises(ValueError, match="cattn.dram_bytes"):
        CattnVllmConfig(dram_bytes=0)
    with pytest.raises(ValueError, match="default_tenant"):
        CattnVllmConfig(default_tenant="../x")
    with pytest.raises(TypeError, match="persist"):
        CattnVllmConfig(persist="yes")


def test_kv_transfer_config():
    cfg = kv_transfer_config(CattnVllmConfig(dram_bytes=1 << 20))
    assert cfg["kv_connector"] == "CattnConnector" and cfg["kv_connector_module_path"] == "cattn.vllm.connector"
    assert cfg["kv_role"] == "kv_both" and cfg["kv_load_failure_policy"] == "recompute"
    assert cfg["kv_connector_extra_config"]["cattn.dram_bytes"] == 1 << 20
    with pytest.raises(ValueError, match="kv_load_failure_policy"):
        kv_transfer_config(kv_load_failure_policy="ignore")


def test_model_key_covers_vllm_version_tp_size_and_weights(tmp_path):
    from types import SimpleNamespace

    from cattn.vllm.keys import model_fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    hf = SimpleNamespace(architectures=["LlamaForCausalLM"], num_hidden_layers=30, hidden_size=576,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152)
    config = SimpleNamespace(model_config=SimpleNamespace(model=str(tmp_path), revision=None, dtype="float32",
                                                          hf_config=hf),
                             cache_config=SimpleNamespace(cache_dtype="auto", block_size=32))
    key = model_fingerprint(config, vllm_version="0.32.0", tensor_parallel=3)
    assert key == model_fingerprint(config, vllm_version="0.32.0", tensor_parallel=3)
    assert key != model_fingerprint(config, vllm_version="0.33.0", tensor_parallel=3)   # another vLLM
    assert key != model_fingerprint(config, vllm_version="0.32.0", tensor_parallel=1)   # another TP size
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert key != model_fingerprint(config, vllm_version="0.32.0", tensor_parallel=3)   # other weights
