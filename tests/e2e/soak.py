"""Soak run (not a CI test; numbers go to docs/reliability.md): a 2P2D stack of real processes
under a long run of requests, sampling every process's resident memory, then checking that every
KV pool is full again and no lease is held.

    python tests/e2e/soak.py [--requests 5000] [--concurrency 16] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from conftest import build_tiny_model  # noqa: E402
from stack import Stack  # noqa: E402

from pdserve.common.model_path import default_model_path  # noqa: E402
from pdserve.common.tokenizer import gguf_tokenizer_folder  # noqa: E402
from pdserve.services import loadgen  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main(args) -> dict:
    model = args.model or build_tiny_model(tempfile.mkdtemp(prefix="soak-model-"), "llama",
                                           gguf_tokenizer_folder(default_model_path()))
    stack = Stack(model, prefill=[[], []], decode=[[], []])
    try:
        names = ["router", "prefill-0", "prefill-1", "decode-0", "decode-1"]
        samples = []

        def sample(done: int) -> None:
            samples.append({"requests": done, **{n: round(rss_mb(stack.procs[n].pid), 1) for n in names}})
        requests = loadgen.random_requests(args.requests, args.input_len, args.output_len, 0.5, 49152, seed=1)
        sample(0)
        results = []
        t0 = time.time()
        chunk = max(args.requests // 10, 1)
        for start in range(0, args.requests, chunk):
            part, _ = await loadgen.run_load(stack.base_url, "tiny", requests[start:start + chunk], float("inf"),
                                             args.concurrency, seed=start)
            results += part
            sample(len(results))
        wall = time.time() - t0
        metrics = {w: stack.metrics(w) for w in names[1:]}
        pools = {w: (m["pdserve:kv_blocks_free"], m["pdserve:kv_blocks_total"], m["pdserve:kv_leases_active"])
                 for w, m in metrics.items()}
        failed = sum(1 for r in results if not r.ok)
        return {"requests": len(results), "failed": failed, "wall_s": round(wall, 1),
                "req_per_s": round(len(results) / wall, 1), "rss_mb": samples, "pools_free_total_leases": pools,
                "pools_full": all(free == total and leases == 0 for free, total, leases in pools.values()),
                "handoffs": stack.stats()["handoffs"]}
    finally:
        stack.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--model", default=None)
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=1))
