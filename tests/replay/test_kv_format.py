"""The replay's cost model takes the store's KV format: its host bytes per token are the 8-bit layout's,
which the disk, PCIe and the tiers' capacities see; GPU pages and decode keep the model dtype."""
import pytest
import torch

from cattn.replay.costmodel import CostModel, Hardware, ModelShape, model_shape
from cattn.replay.sim import simulate
from cattn.replay.workload import ArrivalConfig, SyntheticConfig, schedule, synthetic_conversations
from cattn.store.kvformat.names import host_bytes_per_token
from cattn.store.layout import KVLayout


@pytest.mark.parametrize("kv_format", ["lossless", "int8", "fp8"])
@pytest.mark.parametrize("shape", [(32, 8, 128), (30, 3, 64), (40, 40, 128)])
def test_host_bytes_per_token_is_the_chunk_layouts(kv_format, shape):
    layers, heads, head_dim = shape
    lay = KVLayout(layers, heads, head_dim, torch.bfloat16, kv_format)
    m = 128 * 64                                   # a long chunk: whole key groups, every part aligned
    assert lay.payload_nbytes(m) / m == host_bytes_per_token(layers, heads, head_dim, 2, kv_format)


def test_the_8_bit_format_halves_what_crosses_the_disk_and_pcie_not_the_gpu():
    lossless = CostModel(model_shape("llama3.1-8b"))
    int8 = CostModel(model_shape("llama3.1-8b"), kv_format="int8")
    assert lossless.kv_bytes(1000) == 1000 * lossless.model.kv_bytes_per_token
    assert 1.9 < lossless.kv_bytes(1000) / int8.kv_bytes(1000) < 2.0
    assert int8.disk_read_time(int8.kv_bytes(1000)) < 0.53 * lossless.disk_read_time(lossless.kv_bytes(1000))
    assert int8.decode_time(100, 4000) == lossless.decode_time(100, 4000)      # pages stay in the model dtype
    with pytest.raises(ValueError, match="kv_format"):
        CostModel(model_shape("llama3.1-8b"), kv_format="int4")


def test_a_store_of_half_the_bytes_keeps_more_in_dram():
    jobs = schedule(synthetic_conversations(SyntheticConfig(num_sessions=60, seed=3)),
                    ArrivalConfig(rate=2.0, think_mean=30.0, seed=3))
    runs = {}
    for fmt in ("lossless", "int8"):
        cost = CostModel(ModelShape("13b-32k", 40, 40, 40, 128, 13.0e9, 32768), Hardware(), kv_format=fmt)
        runs[fmt] = simulate(jobs, "lru", 2 * 10**9, 20 * 10**9, cost)
    dram = {fmt: sum(t.tier == "dram" for t in res.records) for fmt, res in runs.items()}
    assert dram["int8"] > dram["lossless"]
