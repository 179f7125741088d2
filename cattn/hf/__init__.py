"""Drop-in cattn attention for Hugging Face models: `apply_cattn`, `revert_cattn`, `PagedCache` (over
the `ModelPages` that hold its K/V).

>>> model = cattn.hf.apply_cattn(AutoModelForCausalLM.from_pretrained(path))
>>> cache = cattn.hf.PagedCache(model)
>>> out = model.generate(ids, past_key_values=cache, max_new_tokens=64)   # `cache=` from transformers 5.24
"""
from cattn.hf.cache import PagedCache
from cattn.hf.compat import CACHE_KWARG
from cattn.hf.fingerprint import fingerprint
from cattn.hf.loading import embedded_model_path, load_model
from cattn.hf.pages import ModelPages
from cattn.hf.patch import SUPPORTED_MODEL_TYPES, apply_cattn, check_supported, is_patched, revert_cattn
from cattn.hf.step import PagedLayout

__all__ = ["CACHE_KWARG", "ModelPages", "PagedCache", "PagedLayout", "SUPPORTED_MODEL_TYPES", "apply_cattn",
           "check_supported", "embedded_model_path", "fingerprint", "is_patched", "load_model", "revert_cattn"]
