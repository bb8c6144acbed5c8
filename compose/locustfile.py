"""Load test of a pdserve OpenAI endpoint (`pdserve serve`, the router of `pdserve up` or of the
compose stack) with locust: streamed /v1/completions and /v1/chat/completions, measuring time to
first token and time per output token as their own locust entries beside the requests.

    pip install locust                       # not a pdserve dependency
    locust -f compose/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 2m \\
        --csv /tmp/pdserve-load            # or without --headless: the web UI on :8089

Settings (environment, read here only): PDSERVE_MODEL (default: the first of /v1/models),
PDSERVE_API_KEY, PDSERVE_MAX_TOKENS (64), PDSERVE_SHARED_PREFIX (1: every prompt starts with the
same system prompt, so the router's prefix-aware routing and the prefix cache have work to do).
Entries in locust's table: "POST /v1/completions (stream)" and "... chat" are whole requests;
"TTFT completions|chat" is the time to the first streamed token; "TPOT ..." the mean time per
output token after it (milliseconds, as locust shows every entry).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

MAX_TOKENS = int(os.environ.get("PDSERVE_MAX_TOKENS", "64"))
SHARED_PREFIX = os.environ.get("PDSERVE_SHARED_PREFIX", "1") == "1"
SYSTEM = ("You are a helpful assistant for a travel agency. Answer briefly and accurately, and say "
          "so when you do not know. ") * 4
TOPICS = ["Paris", "the Alps", "Lisbon", "a week in Japan", "train travel", "packing light", "Iceland",
          "museums in Rome", "a budget for Berlin", "the best season for Greece"]


class OpenAIUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        key = os.environ.get("PDSERVE_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = os.environ.get("PDSERVE_MODEL")
        if not self.model:
            with self.client.get("/v1/models", headers=self.headers, name="GET /v1/models",
                                 catch_response=True) as r:
                self.model = r.json()["data"][0]["id"] if r.ok else "default"

    def _question(self) -> str:
        return f"Tell me about {random.choice(TOPICS)} (request {random.randrange(10**6)})."

    @task(1)
    def completion(self) -> None:
        prompt = (SYSTEM if SHARED_PREFIX else "") + self._question()
        self._stream("/v1/completions", {"prompt": prompt}, "completions",
                     lambda chunk: chunk["choices"][0].get("text"))

    @task(2)
    def chat(self) -> None:
        messages = ([{"role": "system", "content": SYSTEM}] if SHARED_PREFIX else []) + \
                   [{"role": "user", "content": self._question()}]
        self._stream("/v1/chat/completions", {"messages": messages}, "chat",
                     lambda chunk: chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None)

    def _stream(self, path: str, body: dict, kind: str, text_of) -> None:
        body = {**body, "model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.7, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = None
        tokens = 0
        with self.client.post(path, json=body, headers=self.headers, stream=True, catch_response=True,
                              name=f"POST {path} (stream)") as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            for line in r.iter_lines():
                if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and text_of(chunk) and first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            if first is None:
                r.failure("no token streamed")
                return
            r.success()
        _record(f"TTFT {kind}", 1000 * (first - start))
        if tokens > 1:
            _record(f"TPOT {kind}", 1000 * (end - first) / (tokens - 1))


def _record(name: str, ms: float) -> None:
    events.request.fire(request_type="METRIC", name=name, response_time=ms, response_length=0, exception=None,
                        context={})
