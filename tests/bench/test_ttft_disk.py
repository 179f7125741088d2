"""bench/ttft_disk.py's CPU path: a history on disk only, read whole or layer by layer, on a tiny Llama-3."""
import json

from bench import ttft_disk


def test_quick_run_reads_the_disk_both_ways_with_the_same_logits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert ttft_disk.main(["--quick", "--repeats", "1", "--dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "ttft_disk_quick.json").read_text())
    assert report["environment"]["device"] == "cpu"
    assert [r["history"] for r in report["rows"]] == [48, 160]
    for row in report["rows"]:
        assert row["whole_vs_layerwise_max_abs"] == 0 and row["same_first_token"]
        assert all(len(runs) == 2 and min(runs) > 0 for runs in row["runs_ms"].values())
        assert row["history_bytes"] > 0 and row["target_met"] is None
        assert row["reach_ms"] >= max(row["plain_read_ms"], row["resident_ms"])
    assert not list(tmp_path.glob("cattn-ttft-disk-*"))      # the chunk files went with the run
    assert "(f) layer-wise ms" in capsys.readouterr().out
