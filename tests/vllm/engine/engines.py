"""Running vLLM engines and servers for the connector's tests: each engine in a process of its own
(`driver.py`), on the embedded SmolLM2 exported as safetensors, and the conversations they chat."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).with_name("driver.py")
REPO = Path(__file__).resolve().parents[3]
BLOCK = 32   # the CPU attention backend's block size

CONVERSATION = ["What is the capital of France?", "And what is the capital of Germany?",
                "Which of the two cities has more inhabitants?", "Which river flows through Berlin?",
                "What language is spoken in Vienna?"]
MAX_TOKENS = 20

_FACTS = ["The museum opens at nine and closes at six, except on public holidays.",
          "Guests may bring one small bag; larger luggage goes to the cloakroom by the entrance.",
          "Guided tours start every hour from the main hall and last about forty minutes.",
          "Photography without flash is allowed in the permanent collection but not in special exhibitions.",
          "The cafe on the second floor serves soup, sandwiches and cakes until half past five.",
          "Children under twelve enter free when they come with an adult.",
          "The garden behind the museum holds sculptures from the nineteenth century."]


def system_prompt(sentences: int, topic: str) -> str:
    """A system prompt of about ``12 * sentences`` tokens: an assistant's brief on ``topic``."""
    body = " ".join(_FACTS[i % len(_FACTS)] for i in range(sentences))
    return f"You are a helpful assistant for visitors of the {topic}. Answer briefly. Facts: {body}"


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")


def run_engine(tmp_path: Path, name: str, engine: dict, work: list[dict], settle_s: float = 0) -> list[list[dict]]:
    """Run ``work`` (see driver.py) on a fresh engine in its own process; every conversation's turns."""
    job, out = tmp_path / f"{name}.json", tmp_path / f"{name}.out.json"
    job.write_text(json.dumps({"engine": engine, "work": work, "settle_s": settle_s}))
    proc = subprocess.run([sys.executable, str(DRIVER), str(job), str(out)], env=env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"engine {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())["chats"]


def conversation(**kw) -> dict:
    return dict(user_turns=CONVERSATION, max_tokens=MAX_TOKENS, **kw)


def replies(turns: list[dict]) -> list[str]:
    return [t["reply"] for t in turns]


def shard_files(store: Path, rank: int, session: str) -> list[Path]:
    """The chunk files of one rank's shard of ``session`` (any TP size)."""
    return sorted(store.glob(f"tp*-rank{rank}/*/*/{session}/*.kv"))


def corrupt(path: Path) -> None:
    """Flip a byte of the payload: the header still names the tokens, the checksum fails."""
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))

