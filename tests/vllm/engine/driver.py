"""Runs one vLLM engine in its own process for the connector tests: ``python driver.py job.json out.json``.

The job names the engine (`EngineSpec` fields, ``connector`` as `CattnVllmConfig` fields or null) and
the chats to run in order; the output holds each chat's turns and the store's counters.
"""
import json
import sys


def main(job_path: str, out_path: str) -> None:
    from cattn.vllm import CattnVllmConfig
    from cattn.vllm.chat import EngineSpec, build_llm, chat, store_stats, turns_json

    job = json.load(open(job_path))
    engine = dict(job["engine"])
    if engine.get("connector") is not None:
        engine["connector"] = CattnVllmConfig(**engine["connector"])
    llm = build_llm(EngineSpec(**engine))
    chats = [turns_json(chat(llm, c["turns"], cache_salt=c.get("salt"), session=c.get("session"),
                             max_tokens=c.get("max_tokens", 24))) for c in job["chats"]]
    with open(out_path, "w") as f:
        json.dump({"chats": chats, "store": store_stats()}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
