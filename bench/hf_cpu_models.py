"""What bench/hf_cpu.py measures with: its models and tokenizers, a timed greedy ``generate``, switching a
model between stock and patched, and the peak-memory measurement, one fresh process per measurement.

    python -m bench.hf_cpu_models '{"model": "tiny", "variant": "cattn", "context": 64}'   # one measurement

The last line a measurement prints is ``HF_CPU_MEMORY {json}``: the process's peak RSS during the prefill,
its RSS after loading the model, and what the prefill added.
"""
from __future__ import annotations

if __package__ in (None, ""):   # run by path (python bench/hf_cpu_models.py): import `bench` as `python -m` does,
    import pathlib               # and without bench/ itself on the path (bench/kernels.py would shadow the
    import sys                   # `kernels` package that transformers imports)
    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

import gc
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import REPO
from bench.ttft import LLAMA3_ROPE, TINY_LLAMA3

# Llama-3's proportions (GQA 4:1, head_dim 64 of the 1B/3B models, llama3 rope, ffn 3.5x) scaled to fit a CPU.
LLAMA3_CPU = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, vocab_size=32768, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE)
SHAPES = {"llama": LLAMA3_CPU, "tiny": TINY_LLAMA3}
MODELS = ("smollm2", "llama", "tiny")      # smollm2: the embedded SmolLM2-135M-Instruct (GGUF, fp32)
SEED = 0
MARKER = "HF_CPU_MEMORY "


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens, then <|im_start|> and <|im_end|>) with a ChatML template,
    built in memory: the random models' tokenizer (one character of ASCII text is one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def load(name: str):
    """``(model, tokenizer)``, fp32 on CPU, unpatched: the embedded SmolLM2, or a random-weight Llama of
    ``SHAPES[name]`` drawn from `SEED` (no download) with the byte tokenizer."""
    if name == "smollm2":
        from cattn.hf import load_model
        return load_model()
    from bench.ttft import build_model

    torch.manual_seed(SEED)
    return build_model(SHAPES[name], torch.float32, torch.device("cpu")), byte_tokenizer()


def describe(model) -> dict:
    c = model.config.get_text_config()
    return dict(model_type=c.model_type, layers=c.num_hidden_layers, hidden=c.hidden_size,
                q_heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                vocab=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
                parameters=sum(p.numel() for p in model.parameters()), dtype=str(model.dtype).removeprefix("torch."))


def set_variant(model, variant: str) -> None:
    """Make ``model`` stock (``"stock"``) or cattn-patched (``"cattn"``), and check that it is."""
    from cattn.hf import apply_cattn, is_patched, revert_cattn

    if variant == "cattn" and not is_patched(model):
        apply_cattn(model)
    elif variant == "stock" and is_patched(model):
        revert_cattn(model)
    if is_patched(model) != (variant == "cattn"):
        raise RuntimeError(f"model should be {variant} but is_patched says {is_patched(model)}")


def streamer():
    """A ``generate`` streamer that keeps the time of every ``put`` (the first is the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return Stamps()


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens after ``ids`` ``[1, n]`` (no early stop at EOS):
    ``prefill_s`` from the call to the first new token, ``decode_s`` from it to the last, the tokens."""
    stamps = streamer()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=stamps,
                             pad_token_id=model.config.get_text_config().vocab_size - 1)
    first = stamps.times[1]
    return dict(prefill_s=first - start, decode_s=stamps.times[-1] - first,
                tokens=out[0, ids.shape[1]:].tolist())


def random_prompt(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- peak memory: one measurement per fresh process ------------------------------------------------

def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in bytes; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The peak RSS since the last `reset_peak` (else since the process began), in bytes."""
    peak = _status_bytes("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


def measure(spec: dict) -> dict:
    """In this process: load ``spec["model"]``, make it ``spec["variant"]``, prefill a random prompt of
    ``spec["context"]`` tokens (``generate`` of one new token); the RSS after loading and the peak during it."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, _ = load(spec["model"])
    set_variant(model, spec["variant"])
    ids = random_prompt(model.config.get_text_config().vocab_size, spec["context"], spec.get("seed", SEED))
    gc.collect()
    loaded = _status_bytes("VmRSS")
    since_load = reset_peak()
    run = timed_generate(model, ids, 1)
    peak = peak_rss()
    added = peak - loaded if loaded is not None else None
    return dict(peak_rss_bytes=peak, loaded_rss_bytes=loaded, added_bytes=added, peak_since_load=since_load,
                prefill_s=run["prefill_s"], threads=torch.get_num_threads())


def measure_in_subprocess(spec: dict, timeout_s: float | None = None) -> dict:
    """`measure` in a fresh ``python -m bench.hf_cpu_models`` process (so peaks never mix); on failure a
    dict with ``error``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    try:
        done = subprocess.run([sys.executable, "-m", "bench.hf_cpu_models", json.dumps(spec)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout_s} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return dict(error=f"exit {done.returncode}: {done.stderr.strip()[-600:]}")


def measure_all(specs: list[dict], jobs: int = 1) -> list[dict]:
    """`measure_in_subprocess` of every spec, ``jobs`` processes at a time (each its own peak)."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(measure_in_subprocess, specs))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import transformers
    transformers.logging.set_verbosity_error()
    print(MARKER + json.dumps(measure(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
