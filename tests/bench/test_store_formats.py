"""bench/store_formats.py's quick run: both formats through every operation, the table's rows and ratios."""
import json

from bench import store_formats


def test_quick_run_compares_both_formats(tmp_path, capsys):
    out = tmp_path / "formats.json"
    store_formats.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    ops = [r["op"] for r in report["rows"]]
    assert ops == ["dram save", "dram load into pages", "dram load() (fresh tensors)", "disk demote (flush)",
                   "disk promote (acquire)", "disk promote, layer-wise into pages", "dram tokens held per GiB",
                   "disk tokens held per GiB"]
    for r in report["rows"]:
        if "held" in r:
            # a 4 MiB entry is 32 tokens: it pays a whole key group's row of steps and offsets, and its chunk
            # files' headers count too (a long entry holds 1.95x, bench/results/store_formats_cpu.json)
            assert r["ratio"] > 1.7
        else:
            assert set(r["seconds"]) == {"lossless", "int8"} and r["median"]["ratio"] > 0
    assert "disk promote" in capsys.readouterr().out
