"""`cattn demo` end to end through the CLI entry point, on SmolLM2 (loaded once per test session)."""
import re

import pytest

from cattn.apps import cli
from cattn.apps.demo import FIRST_TURN_RUNS, SCRIPT, store_summary
from cattn.hf import is_patched

ROW = re.compile(r"^\s*(\d+) \|\s*(\d+) \|\s*(\d+) \|\s*([\d.]+) \|\s*([\d.]+) \|\s*([\d.]+) \|\s*(yes|no)$", re.M)


def test_demo_prefills_only_new_tokens_with_replies_identical_to_stock(smollm2, monkeypatch, capsys):
    model, tokenizer = smollm2
    monkeypatch.setattr("cattn.hf.load_model", lambda path, device, dtype: (model, tokenizer))
    assert cli.main(["demo", "--turns", "3", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    rows = [tuple(m.groups()) for m in ROW.finditer(out)]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    for n, (_, cattn_prefill, stock_prefill, _, _, kv_mib, same) in enumerate(rows, 1):
        assert same == "yes" and float(kv_mib) > 0
        assert (int(cattn_prefill) == int(stock_prefill)) if n == 1 else (0 < int(cattn_prefill) < int(stock_prefill))
    for user in SCRIPT[:3]:
        assert f"user: {user}" in out
    assert "prefilled tokens in all" in out and not is_patched(model)
    # the real hierarchy served turns 2 and 3 from DRAM, layer by layer
    assert re.search(r"store: the KV of each turn's new tokens \([\d.]+ MiB in all\) was kept in a \d+ MiB "
                     r"host-memory \(DRAM\) pool;\n\s+the next turn found its history there twice, "
                     r"missed it 0 times\n", out)
    assert re.search(r"\n\s+each history came back layer by layer \(2 loads, [\d.]+ MiB\)", out)
    assert "disk tier" not in out.split("store:")[1]         # never used, so not mentioned
    assert "Turn 1 is no faster: nothing is cached yet" in out
    # turn 1 is the same work both ways: its TTFTs are medians of interleaved runs, later turns' one run each
    assert f"(medians of {FIRST_TURN_RUNS} runs each)" in out.split("turn 2  user")[0]
    assert "runs each" not in out.split("turn 2  user")[1]
    assert f"TTFT of turn 1: median of {FIRST_TURN_RUNS} runs of each path" in out


@pytest.mark.parametrize("argv, message", [
    (["--turns", "0"], "--turns"), (["--turns", str(len(SCRIPT) + 1)], "--turns"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--first-turn-runs", "0"], "--first-turn-runs"),
    (["--model", "no/such/dir"], "not a directory")])
def test_demo_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *argv])
    assert message in f"{exc.value.code} {capsys.readouterr().err}"     # argparse's errors go to stderr


def test_demo_runs_a_local_model_directory_and_refuses_unsupported_families(tiny_model, byte_tokenizer, tmp_path,
                                                                             capsys):
    import transformers

    llama = tmp_path / "llama"
    tiny_model("llama", max_position_embeddings=2048).save_pretrained(llama)     # the script's bytes fit
    byte_tokenizer.save_pretrained(llama)
    assert cli.main(["demo", "--model", str(llama), "--turns", "2", "--max-new-tokens", "4"]) == 0
    rows = [m.groups() for m in ROW.finditer(capsys.readouterr().out)]
    assert len(rows) == 2 and all(r[-1] == "yes" for r in rows) and int(rows[1][1]) < int(rows[1][2])

    gpt2 = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=258)
    transformers.GPT2LMHeadModel(config).save_pretrained(gpt2)
    byte_tokenizer.save_pretrained(gpt2)
    with pytest.raises(SystemExit, match="got 'gpt2'"):
        cli.main(["demo", "--model", str(gpt2)])


@pytest.mark.parametrize("hits, misses, said", [(1, 0, "there once, missed it 0 times"),
                                                (2, 1, "there twice, missed it once"),
                                                (3, 4, "there 3 times, missed it 4 times")])
def test_the_store_summary_counts_in_words(hits, misses, said):
    dram = dict(bytes_in=2**20, capacity_bytes=2**24, hits=hits, misses=misses, evictions=0)
    summary = store_summary(dict(dram=dram, transfer=dict(loads=0)))
    assert f"the next turn found its history {said}" in summary


def test_the_store_summary_says_one_of_a_thing_in_the_singular():
    dram = dict(bytes_in=2**20, capacity_bytes=2**24, hits=1, misses=1, evictions=1)
    moved = dict(loads=1, bytes=2**20, load_s_exposed=0.001, load_s_hidden=0.002)
    summary = store_summary(dict(dram=dram, disk=dict(hits=1, bytes_in=2**20), transfer=moved))
    assert "1 session moved out" in summary and "served 1 turn\n" in summary and "(1 load, 1.0 MiB)" in summary
