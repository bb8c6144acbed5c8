"""Start a real disaggregated stack for tests: redis-server, prefill/decode worker processes,
the router process; each on a free loopback port, torn down at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from redis_server import RedisServer, free_port  # noqa: E402


# Tests of the KV handoff want every prompt disaggregated, however short (the router's default
# sends prompts under 64 tokens straight to decode).
ROUTER_FLAGS = ("--disagg-min-prompt-tokens", "0")


class Stack:
    def __init__(self, model: str, prefill: list[list[str]], decode: list[list[str]], kv_transport: str = "tcp",
                 router_flags: tuple[str, ...] = ROUTER_FLAGS, commands: dict[str, list[str]] | None = None):
        """`prefill` / `decode`: one list of extra flags per instance; `router_flags`: the router's;
        `commands`: instance name -> the command that starts it instead of `python -m
        pdserve.services.ROLE` (e.g. a worker with an injected fault)."""
        self.model = model
        self.tmp = tempfile.mkdtemp(prefix="pdserve-stack-")
        self.redis = RedisServer().start()
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.env = {**os.environ, "UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}
        self.argv: dict[str, list[str]] = {}
        ready = []
        for role, flag_sets in (("prefill", prefill), ("decode", decode)):
            for i, flags in enumerate(flag_sets):
                name = f"{role}-{i}"
                rf = os.path.join(self.tmp, name + ".ready")
                ready.append((name, rf))
                command = (commands or {}).get(name, [sys.executable, "-m", f"pdserve.services.{role}"])
                self.argv[name] = [*command, "--redis-url", self.redis.url, "--model", model, "--instance-id", name,
                                   "--ready-file", rf, "--kv-transport", kv_transport,
                                   "--num-gpu-blocks-override", "512", "--dtype", "float32", *flags]
                self._spawn(name)
        deadline = time.time() + 180
        for name, rf in ready:
            while not os.path.exists(rf):
                if self.procs[name].poll() is not None or time.time() > deadline:
                    self.close()
                    raise RuntimeError(f"{name} failed to start: {self.log(name)[-2000:]}")
                time.sleep(0.2)
        self.start_router(router_flags, deadline)

    def _spawn(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(self.argv[name], env=self.env,
                                            stdout=open(os.path.join(self.tmp, name + ".log"), "a"),
                                            stderr=subprocess.STDOUT)

    def restart(self, name: str, timeout_s: float = 120) -> None:
        """Start a stopped or killed worker again with its flags; returns once it is ready."""
        rf = os.path.join(self.tmp, name + ".ready")
        if os.path.exists(rf):
            os.remove(rf)
        self._spawn(name)
        deadline = time.time() + timeout_s
        while not os.path.exists(rf):
            if self.procs[name].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{name} failed to restart: {self.log(name)[-2000:]}")
            time.sleep(0.2)

    def metrics(self, name: str) -> dict[str, float]:
        """A worker's /metrics as {sample name: value} (unlabelled view: the last sample wins)."""
        from prometheus_client.parser import text_string_to_metric_families
        text = httpx.get(self.ready_addresses(name)[2], timeout=5).text
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}

    def start_router(self, flags=ROUTER_FLAGS, deadline: float | None = None,
                     command: tuple[str, ...] = (sys.executable, "-m", "pdserve.services.router")) -> None:
        """Start (or, after kill("router") / stop("router"), start again) the router on the same port."""
        deadline = deadline or time.time() + 120
        earlier = len(self.log("router"))  # the log is appended to across restarts
        self.procs["router"] = subprocess.Popen(
            [*command, "--redis-url", self.redis.url, "--model",
             self.model, "--port", str(self.port), "--served-model-name", "tiny", *flags],
            stdout=open(os.path.join(self.tmp, "router.log"), "a"), stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}"
        while True:
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200 and \
                        ("--workers" not in flags or "processes on the port" in self.log("router")[earlier:]):
                    break  # with --workers: every child listens, not only the one that answered
            except httpx.HTTPError:
                pass
            if self.procs["router"].poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"router failed to start: {self.log('router')[-2000:]}")
            time.sleep(0.2)

    def ready_addresses(self, name: str) -> tuple[str, str, str]:
        """(gRPC address, KV address, metrics URL) the worker registered, from its ready file."""
        with open(os.path.join(self.tmp, name + ".ready")) as f:
            grpc_address, kv_address, metrics_url = f.read().split()
        return grpc_address, kv_address, metrics_url

    def log(self, name: str) -> str:
        path = os.path.join(self.tmp, name + ".log")
        return open(path).read() if os.path.exists(path) else ""

    def stats(self) -> dict:
        return httpx.get(self.base_url + "/admin/stats", timeout=5).json()

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait()

    def stop(self, name: str) -> None:
        """SIGTERM and wait: the process shuts down cleanly."""
        self.procs[name].terminate()
        self.procs[name].wait(timeout=30)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.close()
        shutil.rmtree(self.tmp, ignore_errors=True)  # the workers' ready files and logs


async def greedy_stream(client, model: str, prompt: str, max_tokens: int, progressed) -> str:
    """A streamed greedy completion's text (ignore_eos); `progressed` (an asyncio.Event) is set
    once some text came, so a test can inject its fault mid-stream."""
    text = ""
    async for chunk in await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                       stream=True, temperature=0, extra_body={"ignore_eos": True}):
        text += chunk.choices[0].text if chunk.choices else ""
        if len(text) > 10:
            progressed.set()
    return text


def wait_for(what: str, predicate, timeout_s: float) -> None:
    """Polls `predicate` every 0.1 s; fails the test with `what` after `timeout_s`."""
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.1)


async def router_client(stack: Stack, model: str):
    """-> (InstancePool, DisaggClient) in this process: the router's request path over the stack's
    Redis and workers, for tests that hook into it (close the pool when done)."""
    from pdserve.common.prefix_index import PrefixIndex
    from pdserve.common.registry import Registry
    from pdserve.common.tokenizer import load_tokenizer
    from pdserve.services.router.disagg_client import DisaggClient
    from pdserve.services.router.instances import InstancePool
    from pdserve.services.router.routing import RoutingConfig
    url = stack.redis.url
    pool = InstancePool(Registry(url), PrefixIndex(url, timeout_s=0.25), RoutingConfig(disagg_min_prompt_tokens=0))
    await pool.start()
    return pool, DisaggClient(load_tokenizer(model), "tiny", pool)
