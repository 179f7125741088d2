"""bench/hf_cpu.py's quick run: every code path (timings, greedy comparison, peak memory in fresh processes,
ChatSession against recompute, JSON, PNG) on a tiny random Llama."""
import json
import time

from bench import hf_cpu
from bench.common import REPO

SKIP = {".git", "__pycache__", ".pytest_cache", ".hypothesis"}


def written_since(t0: float) -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*")
                  if p.is_file() and not SKIP & set(p.relative_to(REPO).parts) and p.stat().st_mtime >= t0)


def test_quick_run_measures_stock_and_patched_and_writes_only_to_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    t0 = time.time()
    assert hf_cpu.main(["--quick"]) == 0
    report = json.loads((tmp_path / "hf_cpu_quick.json").read_text())

    assert report["environment"]["device"] == "cpu" and report["environment"]["cattn"]
    assert report["quick"] and report["threads"] >= 1 and report["mismatches"] == []
    assert set(report["models"]) == {"tiny"} and report["models"]["tiny"]["kv_heads"] == 2
    assert [(r["model"], r["context"]) for r in report["rows"]] == [("tiny", 32), ("tiny", 64)]
    for row in report["rows"]:
        assert row["greedy_match"] and row["greedy"] == "same"
        for variant in ("stock", "cattn"):
            assert row[f"{variant}_prefill_s"] > 0 and row[f"{variant}_decode_tok_s"] > 0
            assert all(v > 0 for runs in row["runs"][variant].values() for v in runs)
        assert row["prefill_speed"] > 0 and row["decode_speed"] > 0
    memory = report["rows"][-1]["memory"]          # --quick: the longest context only, each in its own process
    for variant in ("stock", "cattn"):
        m = memory[variant]
        assert "error" not in m, m
        assert m["peak_rss_bytes"] >= m["loaded_rss_bytes"] > 0 and m["added_bytes"] >= 0 and m["prefill_s"] > 0

    assert [c["history"] for c in report["chat"]] == [64, 160] and report["chat_skipped"] == []
    for chat in report["chat"]:
        assert chat["greedy_match"] and chat["cattn_ttft_s"] > 0 and chat["stock_ttft_s"] > 0
        assert chat["speedup"] == chat["stock_ttft_s"] / chat["cattn_ttft_s"]
        assert 0 < chat["prefilled_tokens"] < chat["prompt_tokens"] and chat["reused_tokens"] >= chat["history"] // 2

    verdicts = {c["check"]: c["holds"] for c in report["acceptance"]}   # --quick measures none of the contexts
    assert verdicts.pop("greedy tokens identical to stock (every run)") is True
    assert len(verdicts) == 9 and set(verdicts.values()) == {None}

    png = tmp_path / "hf_cpu_quick.png"
    assert report["png"] == str(png) and png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "stock prefill s" in out and "ChatSession TTFT s" in out and "MISMATCH" not in out
    assert "Acceptance (issue 21)" in out and "not measured" in out
    assert written_since(t0) == []
