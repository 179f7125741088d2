"""Runs one vLLM engine in its own process for the connector tests: ``python driver.py job.json out.json``.

The job names the engine (`EngineSpec` fields, ``connector`` as `CattnVllmConfig` fields or null) and
the work to run in order: each item is one conversation (`Conversation` fields), run alone, or
``{"interleave": [conversation, ...]}``, run turn by turn round-robin, or a conversation with a
``budget``: its client drops the oldest messages to fit (`truncating_chat`). The output holds every
conversation's turns, in the order the job names them.
"""
import json
import sys
import time


def main(job_path: str, out_path: str) -> None:
    from cattn.vllm import CattnVllmConfig
    from cattn.vllm.chat import (Conversation, EngineSpec, build_llm, interleaved, truncating_chat,
                                 turns_json)

    job = json.load(open(job_path))
    engine = dict(job["engine"])
    if engine.get("connector") is not None:
        engine["connector"] = CattnVllmConfig(**engine["connector"])
    llm = build_llm(EngineSpec(**engine))
    chats = []
    for item in job["work"]:
        if "budget" in item:   # one conversation whose client drops its oldest messages to fit a budget
            item = dict(item)
            budget = item.pop("budget")
            chats.append(truncating_chat(llm, Conversation(**item), budget))
            continue
        convs = [Conversation(**c) for c in item.get("interleave", [item])]
        chats += [turns_json(turns) for turns in interleaved(llm, convs)]
    with open(out_path, "w") as f:
        json.dump({"chats": chats}, f)
    # Under the multi-process engine the last saves are written after the last reply: the engine keeps
    # stepping until they are; give it that moment before the process (and the engine) goes.
    time.sleep(job.get("settle_s", 0))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
