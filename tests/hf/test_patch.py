"""apply_cattn / revert_cattn, the supported families, and the model fingerprint."""
import copy
import logging
import re
import subprocess
import sys

import pytest
import torch
import transformers

from cattn.hf import SUPPORTED_MODEL_TYPES, apply_cattn, fingerprint, is_patched, revert_cattn
from cattn.hf.attention import CattnAttention
from cattn.hf.step import PagedLayout


def test_unsupported_model_type_is_refused_with_the_supported_list():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="llama, mistral, mixtral, .*; got .gpt2."):
        apply_cattn(model)
    assert not is_patched(model)
    table = {"llama", "mixtral", "qwen3_moe", "phi3", "olmo2", "granite", "gpt_neox", "cohere", "gemma2"}
    assert table <= set(SUPPORTED_MODEL_TYPES)


def test_check_supported_refuses_from_the_config_alone(tmp_path):
    """What a loader calls before reading weights: the config file is all it needs."""
    from cattn.hf import check_supported

    transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]      # no weights, no tokenizer
    config = transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    with pytest.raises(ValueError, match=r"cattn supports model types llama, .*gemma2.*; got 'gpt2'"):
        check_supported(config)
    assert check_supported(transformers.Qwen3Config()).qk_norm == "head"


def test_dynamic_rope_bad_page_size_and_backend_are_refused(tiny_model):
    dynamic = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        apply_cattn(dynamic)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="page_size"):
        apply_cattn(model, page_size=0)
    with pytest.raises(ValueError, match="backend"):
        apply_cattn(model, backend="cuda")
    assert not is_patched(model) and model.config._attn_implementation != "cattn"


def test_patch_keeps_weights_and_revert_restores_the_stock_model(tiny_model):
    model = tiny_model("qwen3")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
    implementation = model.config._attn_implementation

    apply_cattn(model, page_size=8)
    layers = model.get_decoder().layers
    assert all(isinstance(layer.self_attn, CattnAttention) for layer in layers)
    assert model.config._attn_implementation == "cattn"
    assert model.state_dict().keys() == before.keys()
    assert PagedLayout.of(model) == PagedLayout(num_layers=2, num_kv_heads=2, head_dim=16, page_size=8,
                                                sliding_windows=(None, None))
    apply_cattn(model, page_size=4)                        # re-patching takes the new settings
    assert PagedLayout.of(model).page_size == 4

    assert "_prepare_cache_for_generation" in vars(model)   # generate makes a PagedCache

    revert_cattn(model)
    assert not is_patched(model) and model.config._attn_implementation == implementation
    assert "_prepare_cache_for_generation" not in vars(model)
    assert all(not hasattr(layer.self_attn, "_cattn_backend") for layer in layers)
    assert all(torch.equal(model.state_dict()[name], t) for name, t in before.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    with pytest.raises(ValueError, match="not patched"):
        revert_cattn(model)


def test_fingerprint_tracks_weights_dtype_and_rope(tiny_model):
    model = tiny_model("llama")
    fp = fingerprint(model)
    assert re.fullmatch(r"[0-9a-f]{32}", fp)
    assert fingerprint(copy.deepcopy(model)) == fp
    assert fingerprint(apply_cattn(copy.deepcopy(model))) == fp          # patching changes no weight

    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.get_decoder().layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert fingerprint(nudged) != fp
    assert fingerprint(copy.deepcopy(model).to(torch.float64)) != fp
    other_rope = tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    other_rope.load_state_dict(model.state_dict())
    assert fingerprint(other_rope) != fp


def test_fingerprint_is_remembered_until_a_weight_changes_in_place(tiny_model, monkeypatch):
    fingerprint_module = sys.modules["cattn.hf.fingerprint"]   # the package exports the function by that name

    model = tiny_model("llama")
    fp = fingerprint(model)
    with monkeypatch.context() as m:   # a second call on unchanged weights must not hash them again
        m.setattr(fingerprint_module.xxhash, "xxh3_128", lambda: pytest.fail("weights hashed again"))
        assert fingerprint(model) == fp
    weight = model.get_decoder().layers[0].self_attn.k_proj.weight
    with torch.no_grad():
        weight[0, 0] += 1e-3
    assert fingerprint(model) != fp
    with torch.no_grad():
        weight[0, 0] -= 1e-3
    changed_back = fingerprint(model)
    assert changed_back == fingerprint(copy.deepcopy(model))


def test_import_cattn_does_not_import_transformers_and_chat_session_is_lazy():
    code = "import sys, cattn; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    import cattn
    from cattn.chat.session import ChatSession
    assert cattn.ChatSession is ChatSession and "ChatSession" in cattn.__all__


def test_load_model_refuses_an_unsupported_type_before_reading_weights(tmp_path, byte_tokenizer):
    """A folder with a GPT-2 config and a tokenizer but no weight file: the type is refused (ValueError
    listing the supported ones), not a missing-weights error, so no weight was ever looked for."""
    import transformers

    from cattn.hf import load_model

    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    byte_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supports model types .*llama") as info:
        load_model(tmp_path)
    assert "gpt2" in str(info.value)


def test_patching_a_patched_model_says_what_it_did(tiny_model, caplog):
    model = apply_cattn(tiny_model("llama"), page_size=8)
    layers = [layer.self_attn for layer in model.get_decoder().layers]
    with caplog.at_level(logging.WARNING, logger="cattn"):
        assert apply_cattn(model, page_size=8) is model
    assert "apply_cattn: LlamaForCausalLM is already patched by cattn (page_size=8, backend='auto'); nothing to do" \
        in caplog.text
    assert [layer.self_attn for layer in model.get_decoder().layers] == layers   # the same modules: a no-op
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cattn"):
        apply_cattn(model, page_size=4, backend="torch")
    assert ("apply_cattn: LlamaForCausalLM was patched by cattn with page_size=8, backend='auto'; re-patched with "
            "page_size=4, backend='torch'") in caplog.text
    assert PagedLayout.of(model).page_size == 4
    revert_cattn(model)


def test_a_model_built_on_the_meta_device_patches_and_runs_once_materialised(tiny_model):
    """accelerate builds large checkpoints on the meta device, then loads the weights: patching in between
    must work, and the patched model must then equal the stock one."""
    stock = tiny_model("llama")
    with torch.device("meta"):
        model = type(stock)(stock.config)
    apply_cattn(model)
    model.to_empty(device="cpu")
    model.load_state_dict(stock.state_dict())
    model.get_decoder().rotary_emb.inv_freq.copy_(stock.get_decoder().rotary_emb.inv_freq)
    ids = torch.randint(0, 256, (1, 9))
    want = stock.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)
