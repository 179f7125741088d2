"""Tuned tile configurations: the file format, the lookup by device, the fallback to the rule, and the
machine-code gate covering every entry of every shipped file."""
from __future__ import annotations

import json

import pytest
import torch

from cattn import configs, launch
from cattn.configs import TileConfig


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    """A configs folder holding a tuned file for a pretend 'NVIDIA Test GPU' at cuda:0."""
    payload = {"device": "NVIDIA Test GPU",
               "prefill": {"bf16_d128_g4": {"block_rows": 128, "block_n": 128, "num_warps": 8, "num_stages": 2}},
               "decode": {"bf16_d128_g4": {"block_rows": 16, "block_n": 32, "num_warps": 4, "num_stages": 2}}}
    (tmp_path / "nvidia-test-gpu.json").write_text(json.dumps(payload))
    monkeypatch.setattr(configs, "HERE", tmp_path)
    monkeypatch.setattr(configs, "_file_of", lambda index: "nvidia-test-gpu.json")
    configs.load.cache_clear()
    yield tmp_path
    configs.load.cache_clear()


def test_device_file_name():
    assert configs.device_file_name("NVIDIA H200") == "nvidia-h200.json"
    assert configs.device_file_name("NVIDIA GeForce RTX 4090 (x)") == "nvidia-geforce-rtx-4090-x.json"


def test_launchers_use_the_tuned_entry_on_its_device_and_the_rule_elsewhere(tuned_dir):
    cuda = torch.device("cuda:0")
    assert launch.prefill_config(128, 4, torch.bfloat16, cuda) == TileConfig(128, 128, 8, 2)
    assert launch.decode_config(128, 4, torch.bfloat16, cuda) == TileConfig(16, 32, 4, 2)
    # another problem, another device, the interpreter: the rule
    assert launch.prefill_config(64, 4, torch.bfloat16, cuda) == launch.rule_prefill_config(64, 4, torch.bfloat16)
    assert launch.prefill_config(128, 4, torch.float16, cuda) == launch.rule_prefill_config(128, 4, torch.float16)
    assert launch.prefill_config(128, 4, torch.bfloat16, torch.device("cpu")) == launch.rule_prefill_config(
        128, 4, torch.bfloat16)


def test_every_tuned_entry_is_a_shipped_configuration(tuned_dir):
    names = {c.name: c for c in launch.shipped_configs()}
    entry = names["tuned[nvidia-test-gpu]_prefill_bf16_d128_g4"]
    assert (entry.constexprs["BLOCK_R"], entry.constexprs["BLOCK_N"], entry.num_warps, entry.num_stages) == (
        128, 128, 8, 2)
    assert "tuned[nvidia-test-gpu]_decode_bf16_d128_g4" in names


@pytest.mark.parametrize("entry, message", [
    ({"block_rows": 128, "block_n": 64, "num_warps": 8}, "num_stages"),
    ({"block_rows": 96, "block_n": 64, "num_warps": 8, "num_stages": 2}, "power of two"),
    ({"block_rows": 128, "block_n": 0, "num_warps": 8, "num_stages": 2}, "block_n"),
    ({"block_rows": 128, "block_n": 64, "num_warps": 8.0, "num_stages": 2}, "num_warps"),
])
def test_a_bad_tuned_entry_names_the_file_and_the_entry(entry, message):
    with pytest.raises(ValueError, match=message) as info:
        configs.parse({"prefill": {"bf16_d128_g4": entry}}, "x.json")
    assert "x.json" in str(info.value) and "bf16_d128_g4" in str(info.value)


def test_shipped_files_parse():
    for path in configs.shipped_files():
        configs.parse(json.loads(path.read_text()), path.name)
