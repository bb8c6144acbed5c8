"""`pdserve router --workers 2` in front of a 1P1D stack of real processes: two router processes
on one port (SO_REUSEPORT) answer the official openai client from separate connections with the
offline engine's tokens, and /metrics sums both processes' request metrics; a killed router process takes the parent and its sibling down (exit 1)
instead of leaving a half-served port; SIGTERM stops them all cleanly, and a SIGKILLed parent
leaves no process behind (PR_SET_PDEATHSIG), also when it dies while its children still start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from stack import ROUTER_FLAGS, Stack

openai = pytest.importorskip("openai")

PROMPTS = [[(n * 131 + j * 17) % 30000 + 100 for j in range(40)] for n in range(6)]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "multiprocessing.spawn"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(scope="module")
def stack(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[[]], decode=[[]], router_flags=(*ROUTER_FLAGS, "--workers", "2"))
    yield s
    s.close()


def test_two_router_processes_serve_the_same_answers(stack, tiny_models):
    workers = children(stack.procs["router"].pid)
    assert len(workers) == 2, workers
    offline = LLM(tiny_models["llama"], num_gpu_blocks_override=512, dtype="float32")
    try:
        want = [o.outputs[0].text for o in offline.generate(
            [{"prompt_token_ids": p} for p in PROMPTS],
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)]
    finally:
        offline.shutdown()
    got = []
    for prompt in PROMPTS:  # a client (and so a connection) each: the kernel spreads them over the processes
        with openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
            got.append(r.choices[0].text)
    assert got == want
    assert all(os.path.exists(f"/proc/{pid}") for pid in workers)
    # /metrics sums the request metrics of both processes, whichever answers the scrape
    import urllib.request
    for _ in range(6):  # a connection each: both processes answer some
        text = urllib.request.urlopen(stack.base_url + "/metrics", timeout=30).read().decode()
        finished = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("vllm:request_success_total{"))
        assert finished == len(PROMPTS), finished
        generated = [line for line in text.splitlines() if line.startswith("vllm:generation_tokens_total{")]
        assert generated and float(generated[0].rsplit(" ", 1)[1]) == 8 * len(PROMPTS)
        assert "vllm:time_to_first_token_seconds_count" in text


def test_stored_responses_are_seen_by_every_router_process(stack):
    """A response stored through one connection is retrieved and continued through new ones (a
    client each, so the kernel spreads them over both processes): the store is the fleet's Redis."""
    def client():
        return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    with client() as c:
        first = c.responses.create(model="tiny", input="Say hi", max_output_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    for _ in range(6):
        with client() as c:
            assert c.responses.retrieve(first.id).output_text == first.output_text
            follow = c.responses.create(model="tiny", input="More", previous_response_id=first.id,
                                        max_output_tokens=2, temperature=0, extra_body={"ignore_eos": True})
            assert follow.usage.input_tokens > first.usage.input_tokens


def test_a_dead_router_process_ends_the_router(stack):
    parent = stack.procs["router"]
    first, second = children(parent.pid)
    os.kill(first, signal.SIGKILL)
    assert parent.wait(timeout=60) == 1
    deadline = time.time() + 10
    while alive(second) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(second)
    # whatever supervises the router starts it again; SIGTERM then stops every process cleanly
    stack.start_router((*ROUTER_FLAGS, "--workers", "2"))
    restarted = stack.procs["router"]
    workers = children(restarted.pid)
    assert len(workers) == 2
    restarted.terminate()
    assert restarted.wait(timeout=60) == 0
    assert not any(alive(pid) for pid in workers)
    # a SIGKILLed parent: its processes get SIGTERM from the kernel and free the port
    stack.start_router((*ROUTER_FLAGS, "--workers", "2"))
    workers = children(stack.procs["router"].pid)
    stack.kill("router")
    deadline = time.time() + 30
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)


@pytest.mark.parametrize("moment", ["importing", "one listens"])
def test_a_parent_killed_while_its_children_start_leaves_none(stack, moment):
    """Killed before a child set its death signal (the child sees a new parent and stops), or
    after one child listens while the other is about to report (it must not wait on the parent)."""
    log = open(os.path.join(stack.tmp, "router-start.log"), "a")
    parent = subprocess.Popen(
        [sys.executable, "-m", "pdserve.services.router", "--redis-url", stack.redis.url, "--model", stack.model,
         "--port", "0", "--served-model-name", "tiny", *ROUTER_FLAGS, "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    workers = []
    while len(workers) < 2 and time.time() < deadline:
        workers = children(parent.pid)
        time.sleep(0.01)
    assert len(workers) == 2
    if moment == "one listens":
        while not any(listening(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.01)
    parent.kill()
    parent.wait()
    deadline = time.time() + 30
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), open(log.name).read()[-2000:]


def listening(pid: int) -> bool:
    """Whether the process holds a listening TCP socket."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    return True
    return False


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except FileNotFoundError:
        return False
