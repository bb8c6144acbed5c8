"""The worker's own flags (torch-free, so building the `pdserve` parser imports no engine)."""

from __future__ import annotations

import argparse

from pdserve.common.config import env_flag
from pdserve.common.kv_transfer import BACKENDS
from pdserve.services.worker.kv_transfer_config import add_kv_transfer_config_arg


def add_worker_args(p: argparse.ArgumentParser) -> None:
    from pdserve.common.stat_logger import add_stat_log_args
    add_stat_log_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address the gRPC, KV and metrics servers bind to")
    p.add_argument("--advertise-host", default=None,
                   help="address the router and other workers reach this one at (default: --host, or this "
                        "machine's IP when --host is a wildcard such as 0.0.0.0, e.g. in a container)")
    p.add_argument("--grpc-port", type=int, default=0, help="0: pick a free port")
    p.add_argument("--metrics-port", type=int, default=0, help="port of this worker's /metrics (0: pick a free port)")
    p.add_argument("--kv-transport", default=None, choices=[b for b in BACKENDS if b != "local"],
                   help="how decode workers pull KV blocks from prefill workers (default: tcp; nccl: a 2-rank "
                        "NCCL group per prefill-decode pair on GPUs, gloo on CPU; ipc: one host only, decode reads the "
                        "prefill's cache through CUDA IPC (GPUs with peer access) or shared memory (CPU))")
    add_kv_transfer_config_arg(p)
    p.add_argument("--redis-url", default=None, help="register in this Redis (pdserve router finds it there)")
    p.add_argument("--instance-id", default=None, help="name in the registry (default: ROLE-HOST-RANDOM)")
    p.add_argument("--lease-ttl", type=float, default=30.0, help="seconds a prefilled KV stays pinned for decode")
    p.add_argument("--pull-deadline", type=float, default=10.0, help="seconds a decode waits for a KV pull")
    p.add_argument("--stream-interval-ms", type=float, default=20.0,
                   help="decode: a request's tokens go to the router at most this often, the steps between "
                        "coalesced into one message; the first token is never held (0: one message per step; "
                        "under load the router's per-message cost is 1P1D's limit: at 100 req/s on two H200s, "
                        "20 ms took TTFT p90 from 8.8 s to 0.36 s, docs/benchmarks.md)")
    p.add_argument("--stream-messages-per-s", type=float, default=2000.0,
                   help="decode: at most about this many messages a second over all open streams: with many "
                        "streams each one's interval grows past --stream-interval-ms to streams / this (every "
                        "message costs the decode's GIL a gRPC write, and protobuf's allocator a trim every "
                        "10,000; 0: no cap)")
    p.add_argument("--kv-events-interval", type=float, default=0.1,
                   help="seconds between publications of prefix-cache changes to the prefix index")
    p.add_argument("--internal-token", default=env_flag("PDSERVE_INTERNAL_TOKEN"),
                   help="shared secret every gRPC call must carry (router, other workers); "
                        "default: $PDSERVE_INTERNAL_TOKEN, none: calls are not checked")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds a SIGTERM waits for running requests before stopping")
    p.add_argument("--ready-file", default=None,
                   help="write 'grpc_address kv_address metrics_address' here once serving")
