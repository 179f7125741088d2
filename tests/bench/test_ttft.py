"""bench/ttft.py's CPU path: the same code as on a GPU, on a tiny Llama-3 config."""
import json

from bench import ttft


def test_quick_run_times_every_way_and_streamed_equals_resident(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert ttft.main(["--quick", "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "ttft_quick.json").read_text())
    assert report["environment"]["device"] == "cpu" and report["host_to_device_bytes_per_s"] > 0
    assert [r["history"] for r in report["rows"]] == [48, 160] and report["skipped"] == []
    layers, kv_heads, head_dim = (ttft.TINY_LLAMA3[k] for k in ("num_hidden_layers", "num_key_value_heads",
                                                                 "head_dim"))
    for row in report["rows"]:
        assert row["history_kv_bytes"] == 2 * layers * row["history"] * kv_heads * head_dim * 4
        assert row["dram_equals_resident_max_abs"] == 0 and row["same_first_token"]
        assert all(len(runs) == 2 and min(runs) > 0 for runs in row["runs_ms"].values())
        assert 1 <= row["preload_layers"] <= layers and row["exposed_ms"] > 0
        assert row["target_ms"] == 1.1 * max(row["copy_ms"], row["resident_ms"]) and row["target_met"] is None
        # (d): the rule's k layers resident, the rest streamed: the same logits, exactly the rule's share held
        assert row["partial_equals_resident_max_abs"] == 0 and row["partial_same_first_token"]
        assert len(row["runs_ms"]["partial"]) == 2 and row["partial_target_met"] is None
        assert abs(row["partial_share"] - row["preload_layers"] / layers) < 1e-12 and row["partial_bytes"] > 0
    out = capsys.readouterr().out
    assert "(c) DRAM ms" in out and "(d) k resident ms" in out and "a GPU effect" in out
