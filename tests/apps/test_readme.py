"""Every Python snippet of the README runs as written, on CPU; its setup commands are the ones CI runs."""
import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_snippet_runs(index, request, tmp_path, monkeypatch, capsys):
    code = SNIPPETS[index]
    monkeypatch.chdir(tmp_path)
    smollm2 = (None, None)
    if "load_model" in code:
        # `load_model()` would load the embedded SmolLM2 again: hand it the copy this test session loaded.
        smollm2 = request.getfixturevalue("smollm2")
        monkeypatch.setattr("cattn.hf.load_model", lambda *a, **k: smollm2)
    from cattn.hf import is_patched, revert_cattn

    namespace = {"__name__": f"readme_snippet_{index}"}
    try:
        exec(compile(code, f"README.md python snippet {index + 1}", "exec"), namespace)
    finally:
        if smollm2[0] is not None and is_patched(smollm2[0]):
            revert_cattn(smollm2[0])
        if "chat" in namespace:
            namespace["chat"].close()
    if "paged_attention" in code:
        out, k_cache = namespace["out"], namespace["k_cache"]
        assert out.shape == namespace["q"].shape and out.isfinite().all()
        assert namespace["seqs"].kv_lens(["chat-1"]).tolist() == [namespace["new_tokens"] - 512]
        assert k_cache.device.type == "cpu" or k_cache.is_cuda
    if "ChatSession" in code:
        replies = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
        assert len(replies) >= 2
        assert len(namespace["chat"].turns) == 2 and namespace["chat"].turns[1].prefilled_tokens < \
            namespace["chat"].turns[1].prompt_tokens


def test_the_readme_setup_is_what_ci_runs():
    setup = re.search(r"```bash\n(python3 -m venv \.venv && \. \.venv/bin/activate\n.*?)```", README, re.S)
    assert setup, "the README's setup block starts with the virtual environment step"
    commands = [line.split("#")[0].strip() for line in setup.group(1).splitlines()]
    assert commands[1:] == ["make demo", "make test"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ".venv/bin/python"])
    assert ignored.returncode in (0, 128)      # ignored; 128: not a git checkout (a source archive)
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()


def test_the_readmes_replay_figures_are_the_committed_jsons():
    """The paper's replay as the README cites it: each figure is the committed JSON's, rounded as written,
    and the JSON says which commit made it and when."""
    said = re.search(r"finds the history in DRAM for ([\d.]+)% of turns, against ([\d.]+)% for LRU and ([\d.]+)% "
                     r"for the\s+offline Belady bound, and cuts the mean time to first token from (\d+) ms "
                     r"\(recompute every\s+turn\) to (\d+) ms", README)
    assert said is not None
    report = json.loads((REPO / "bench/results/replay_paper.json").read_text())
    assert report["environment"]["git_commit"] and report["environment"]["timestamp"]
    rows = {r["policy"]: r for r in report["results"]}
    in_dram = [f"{100 * rows[p]['dram_hit_rate']:.1f}" for p in ("scheduler", "lru", "belady")]
    ttft = [f"{1000 * rows[p]['ttft_mean_s']:.0f}" for p in ("recompute", "scheduler")]
    assert list(said.groups()) == in_dram + ttft
