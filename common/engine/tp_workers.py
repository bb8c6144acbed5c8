"""Tensor-parallel execution: rank 0's runner in the engine process, ranks 1..N-1 in worker processes.

The scheduler and the block manager run once, in the engine process; each step is sent to the
other ranks, and every rank runs the same forward pass on its shard (models/parallel.py):

    engine process (rank 0)                                worker process (rank r, spawned)
    EngineCore.step -> TPDriverRunner.launch(sched)
        encode_step(sched) once, --pipe--> each worker     recv -> decode_step -> ModelRunner.launch
        ModelRunner.launch(sched)    <=== all-reduces ===>  same forward on its shard
        logits gathered here, sampled, tokens broadcast ==> kept for its next step's inputs
        (plain-greedy steps: each rank's shard argmax, all-gathered; greedy_tail.py)
    PendingOutput.result() (polling the ranks' liveness while it waits)

Step messages go over one pipe per worker, pickled once: the fields a runner that does not sample
reads (ids, tokens to run, positions, block tables, prompt_logprobs with its prompt); measured
on CPU against torch.distributed's broadcast_object_list over gloo (docs/tensor-parallel.md).

Start-up: rank 0 opens a TCPStore and starts the workers (`python -c` of `worker_entry`, so the
user's __main__ is never re-imported; the first pipe message is their configuration), waits
until each has joined (noticing one that died on the way), then every rank builds its
ModelRunner in lockstep: the KV pool is the smallest any rank can hold, CUDA graphs are captured
on every rank (their all-reduces inside).

KV transport (disaggregated workers): each rank r > 0 also gets one end of a socketpair, its KV
link: a thread of the worker (kv_transfer/tp_agent.py) serves and fills rank r's KV shard for
rank 0's worker process, which holds the other end (`TPWorkers.kv_links`); idle otherwise.

Failure: a rank that exits (killed, or failed in a step) ends the instance. A watchdog thread
sees its process exit (a pidfd) and aborts rank 0's NCCL communicator (so nothing on the device waits
for it); the next launch / result / idle check raises RankDeadError (an EngineDeadError), which
EngineCore does not absorb: AsyncLLM fails every open request and reports unhealthy, LLM.generate
raises. An error on rank 0 in a step is fatal too (the other ranks would wait in a collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import logging
import multiprocessing.connection as mpc
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from pdserve.common.config import ArchConfig, ConfigError, EngineConfig, SchedulerConfig
from pdserve.common.engine.greedy_tail import plain_greedy
from pdserve.common.engine.model_runner import ModelRunner, PendingOutput, resolve_device
from pdserve.common.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from pdserve.common.engine.tp_comm import TPComm, peer_memory_used
from pdserve.common.engine_client import EngineDeadError
from pdserve.common.sampling_params import SamplingParams

log = logging.getLogger("pdserve.tp")

COLLECTIVE_TIMEOUT_S = 600  # a collective waits this long for a slow rank (loading weights, compiling)
JOIN_TIMEOUT_S = 120  # spawned workers must import and reach the store within this
# Once serving, a step that rank 0 waits on (its launch, whose collectives wait for every rank,
# or its result) for longer than this means a rank is stalled (frozen: SIGSTOP, a hung device):
# the watchdog kills the ranks, so the instance fails as for a dead rank (its requests are
# resubmitted) instead of holding them until the collective's own COLLECTIVE_TIMEOUT_S.
STEP_TIMEOUT_S = float(os.environ.get("PDSERVE_TP_STEP_TIMEOUT_S", "60"))


class RankDeadError(EngineDeadError):
    """A tensor-parallel rank is gone (or a step failed on one): the instance cannot go on."""


def rank_device(device: str, rank: int) -> str:
    """cpu -> cpu; cuda -> cuda:rank; cuda:k -> cuda:(k + rank)."""
    if not device.startswith("cuda"):
        return device
    base = int(device.partition(":")[2] or 0)
    return f"cuda:{base + rank}"


# ---- step messages --------------------------------------------------------------------------------
def encode_step(sched: SchedulerOutput, scheduled: list[ScheduledRequest] | None = None) -> bytes:
    """`scheduled`: the step's requests as rank 0 runs them (n-gram drafts appended: SpecDecoder.prepare)."""
    rows = [(s.req_id, s.input_token_ids, s.start_pos, s.block_ids, s.sample, s.params.prompt_logprobs,
             s.prompt_token_ids if s.params.prompt_logprobs is not None else None, s.spec_token_ids)
            for s in (sched.scheduled if scheduled is None else scheduled)]
    return pickle.dumps((rows, sched.num_batched_tokens, sched.finished_req_ids, sched.preempted_req_ids,
                         sched.all_greedy, sched.spec_verifies), protocol=pickle.HIGHEST_PROTOCOL)


def decode_step(payload: bytes, params_cache: dict) -> SchedulerOutput:
    rows, num_tokens, finished, preempted, all_greedy, spec_verifies = pickle.loads(payload)
    scheduled = []
    for req_id, tokens, start, blocks, sample, prompt_logprobs, prompt, drafts in rows:
        params = params_cache.get(prompt_logprobs)
        if params is None:
            params = params_cache[prompt_logprobs] = SamplingParams(prompt_logprobs=prompt_logprobs)
        scheduled.append(ScheduledRequest(req_id, tokens, start, blocks, sample, params, prompt or [], [],
                                          spec_token_ids=drafts))
    return SchedulerOutput(scheduled, num_tokens, finished, preempted, all_greedy=all_greedy,
                           spec_verifies=spec_verifies)


# ---- the engine side ------------------------------------------------------------------------------
class TPWorkers:
    """Ranks 1..N-1: their processes, step pipes, liveness; and rank 0's TPComm."""

    def __init__(self, config: EngineConfig, arch: ArchConfig, path: str, max_model_len: int,
                 sched_cfg: SchedulerConfig):
        n = config.parallel.tensor_parallel_size
        device = str(resolve_device(config.model.device))  # "auto" -> cuda / cpu
        if device.startswith("cuda"):
            first = int(device.partition(":")[2] or 0)
            if first + n > torch.cuda.device_count():
                raise ConfigError(f"--tensor-parallel-size {n} needs GPUs {first}..{first + n - 1}; "
                                  f"{torch.cuda.device_count()} visible")
        if device.startswith("cuda") and peer_memory_used():  # every rank must choose the same
            if config.parallel.all_reduce in ("fused", "symm_mem"):
                raise ConfigError(f"--tp-all-reduce {config.parallel.all_reduce}: peer memory can be set up by "
                                  "one tensor-parallel engine per process; this process had one (use nccl, or a "
                                  "new process)")
            if config.parallel.all_reduce == "auto":
                log.warning("tensor parallelism: an earlier engine of this process mapped peer memory; this one "
                            "uses NCCL's all-reduce (the fused all-reduce needs a new process)")
                config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, all_reduce="nccl"))
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        store = dist.TCPStore("127.0.0.1", 0, n, True, timeout, wait_for_workers=False)
        self.procs: list[subprocess.Popen] = []
        self._exits: list[int] = []  # pidfds: readable once the worker exited
        self._steps: list[mpc.Connection] = []
        self._status: list[mpc.Connection] = []
        self.kv_links: list[socket.socket] = []  # rank 0's end of each rank's KV link (tp_agent.py)
        self.dead: str | None = None
        self._closed = False
        self._blocked_since: float | None = None  # when rank 0 began waiting on the current step
        self._status_lock = threading.Lock()  # the watchdog and the engine thread both read status pipes
        for rank in range(1, n):
            step_r, step_w = mpc.Pipe(duplex=False)
            status_r, status_w = mpc.Pipe(duplex=False)
            kv_link, kv_link_child = socket.socketpair()
            rank_cfg = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                              device=rank_device(device, rank)))
            fds = (step_r.fileno(), status_w.fileno(), kv_link_child.fileno())
            proc = subprocess.Popen([sys.executable, "-c", "from pdserve.common.engine.tp_workers import "
                                     f"worker_entry; worker_entry({fds[0]}, {fds[1]}, {fds[2]})"], pass_fds=fds)
            step_r.close()
            status_w.close()
            kv_link_child.close()
            self.kv_links.append(kv_link)
            self.procs.append(proc)
            self._exits.append(os.pidfd_open(proc.pid))
            self._steps.append(step_w)
            self._status.append(status_r)
            step_w.send((rank, n, store.port, rank_cfg, arch, path, max_model_len, sched_cfg))
        try:
            self._wait_joined(store, n)
            self.comm = TPComm(0, n, store, torch.device(rank_device(device, 0)), COLLECTIVE_TIMEOUT_S,
                               config.parallel.all_reduce)
        except BaseException:
            self.shutdown()
            raise
        self._stop_r, self._stop_w = mpc.Pipe(duplex=False)
        self._watchdog = threading.Thread(target=self._watch, name="pdserve-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _wait_joined(self, store, n: int) -> None:
        keys = [f"joined/{r}" for r in range(1, n)]
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not store.check(keys):
            if (dead := self._find_dead(0.05)) is not None:
                raise ConfigError(f"tensor-parallel start-up failed: {dead}")
            if time.monotonic() > deadline:
                raise ConfigError(f"tensor-parallel workers did not start within {JOIN_TIMEOUT_S} s")

    def wait_ready(self) -> None:
        """Each worker's runner is built (its error, if it failed, becomes a ConfigError here)."""
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT_S  # rank 0's own build already waited in collectives
        for rank, status in enumerate(self._status, start=1):
            while not status.poll(0.05):
                if (dead := self._find_dead(0)) is not None:
                    raise ConfigError(f"tensor-parallel start-up failed: {dead}")
                if time.monotonic() > deadline:
                    raise ConfigError(f"tensor-parallel rank {rank} did not report its runner built within "
                                      f"{COLLECTIVE_TIMEOUT_S} s")
            kind, detail = status.recv()
            if kind != "ready":
                raise ConfigError(f"tensor-parallel rank {rank} failed to start: {detail}")

    def _find_dead(self, timeout: float) -> str | None:
        """A message naming the first exited worker (and its error), after waiting up to `timeout`."""
        exited = set(mpc.wait(self._exits, timeout))  # pidfds of exited workers
        for rank, (proc, status, exit_fd) in enumerate(zip(self.procs, self._status, self._exits), start=1):
            if exit_fd in exited or proc.poll() is not None:
                # Popen.poll() answers None while another thread (the watchdog) reaps the process
                deadline = time.monotonic() + 1.0
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                detail = ""
                with self._status_lock:
                    try:
                        while status.poll():
                            kind, text = status.recv()
                            detail = f": {text}" if kind == "error" else detail
                    except (EOFError, OSError):
                        pass
                return f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.returncode}{detail}"
        return None

    def _watch(self) -> None:
        while True:
            ready = mpc.wait(self._exits + [self._stop_r], timeout=min(1.0, STEP_TIMEOUT_S / 4))
            if self._stop_r in ready or self._closed:
                return
            if ready:
                self.dead = self._find_dead(0) or "a tensor-parallel rank exited"
                break
            since = self._blocked_since
            if since is not None and time.monotonic() - since > STEP_TIMEOUT_S:
                self.dead = (f"a tensor-parallel step did not finish within {STEP_TIMEOUT_S:g} s "
                             "(a rank is stalled); its ranks were killed")
                for proc in self.procs:  # a stopped process dies too; the collective then fails
                    proc.kill()
                break
        log.error("%s: the instance is failing", self.dead)
        self.comm.abort()

    @contextlib.contextmanager
    def blocked(self):
        """Rank 0 waits on a step inside this (the watchdog's STEP_TIMEOUT_S)."""
        self._blocked_since = time.monotonic()
        try:
            yield
        finally:
            self._blocked_since = None

    def check(self) -> None:
        if self.dead is not None:
            raise self.fail(None)

    def send_step(self, sched: SchedulerOutput, scheduled: list[ScheduledRequest] | None = None) -> None:
        self.check()
        payload = encode_step(sched, scheduled)
        for conn in self._steps:
            try:
                conn.send_bytes(payload)
            except OSError as e:
                raise self.fail(e) from e

    def fail(self, error: BaseException | None) -> RankDeadError:
        """The error that ends the instance: the dead rank if there is one, else rank 0's own error.
        Stops the remaining workers (they would wait forever in a collective)."""
        message = self.dead or self._find_dead(1.0) or f"tensor-parallel rank 0 failed: {error}"
        self.dead = message
        self.shutdown()
        return RankDeadError(message)

    def wait(self, pending: PendingOutput) -> RunnerOutput:
        with self.blocked():
            while not pending.ready():  # a CUDA event wait spins too; this one also sees a dead rank
                self.check()
                time.sleep(0)  # lets other threads (the HTTP event loop) take the GIL
            return pending.result()

    def shutdown(self) -> None:
        """Stop the workers (an empty step message, then a kill for any that lingers) and the group."""
        if self._closed:
            return
        self._closed = True
        if hasattr(self, "_stop_w"):
            self._stop_w.send(None)
        for conn in self._steps:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass
            conn.close()
        if hasattr(self, "comm"):  # the live ranks end the group in their loop at the same time
            self.comm.close(peers_alive=self.dead is None)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for fd in self._exits:
            os.close(fd)
        self._exits = []
        for link in self.kv_links:
            link.close()


class TPDriverRunner(ModelRunner):
    """Rank 0's ModelRunner: each launch first sends the step to the other ranks; a failure is fatal."""

    def __init__(self, workers: TPWorkers, *args, **kwargs):
        self.workers = None  # while every rank builds its runner in lockstep, steps are not sent
        super().__init__(*args, tp=workers.comm, **kwargs)
        workers.wait_ready()
        self.workers = workers

    def launch(self, sched: SchedulerOutput, token_masks=None) -> PendingOutput:
        """`token_masks`: as ModelRunner.launch (rank 0 samples, so only it masks)."""
        if self.workers is None:
            return super().launch(sched)  # start-up (the CUDA profiling step): every rank runs its own
        # the greedy tail or the Sampler: the same choice on every rank (the message carries it)
        sched.all_greedy = self.greedy_tail is not None and plain_greedy(sched)
        # drafts are proposed here, on rank 0 (n-gram, or a draft model of its own), and travel with the step
        scheduled = None
        if self.spec is not None:
            scheduled = self.spec.prepare(sched)
            sched.spec_verifies = self.spec.verifies()
        try:
            with self.workers.blocked():  # on a CPU, the launch itself waits in the collectives
                self.workers.send_step(sched, scheduled)
                return _TPPending(super().launch(sched, token_masks), self.workers)
        except RankDeadError:
            raise
        except Exception as e:
            raise self.workers.fail(e) from e

    def check_alive(self) -> None:
        if self.workers is not None:
            self.workers.check()

    def shutdown(self) -> None:
        # CUDA graphs hold NCCL work of the group (the embedding's all-reduce): freed first, as on
        # every rank, or NCCL's teardown of the group waits on them (seen on 2 x H200: > 10 s)
        super().shutdown()
        if self.workers is not None:
            self.workers.shutdown()


class _TPPending:
    """A launched step whose wait notices a dead rank instead of blocking on the device forever."""

    def __init__(self, pending: PendingOutput, workers: TPWorkers):
        self._pending, self._workers = pending, workers

    def ready(self) -> bool:
        return self._pending.ready()

    def result(self) -> RunnerOutput:
        try:
            return self._workers.wait(self._pending)
        except RankDeadError:
            raise
        except Exception as e:
            raise self._workers.fail(e) from e


def start_tensor_parallel(config: EngineConfig, arch: ArchConfig, path: str, max_model_len: int,
                          sched_cfg: SchedulerConfig) -> TPDriverRunner:
    """Spawn ranks 1..N-1 and build rank 0's runner; returns it (its `workers` hold the rest)."""
    workers = TPWorkers(config, arch, path, max_model_len, sched_cfg)
    try:
        return TPDriverRunner(workers, config.model, config.cache, arch, path, max_model_len,
                              scheduler_cfg=sched_cfg, enforce_eager=config.enforce_eager,
                              speculative=config.speculative_config)
    except ConfigError:
        workers.fail(None)
        raise
    except BaseException as e:  # a worker that died takes rank 0's collective down with it: name it
        dead = workers.dead or workers._find_dead(1.0)
        workers.fail(e)
        if dead is None:
            raise
        raise ConfigError(f"tensor-parallel start-up failed: {dead}") from e


# ---- a worker process ------------------------------------------------------------------------------
def worker_entry(steps_fd: int, status_fd: int, kv_link_fd: int | None = None) -> None:
    """Rank r: read its configuration, join, build the runner on its shard, then run every step
    the engine sends until an empty message (shutdown) or EOF (the engine process is gone).
    kv_link_fd: its end of the KV link, served by a KV agent thread (module docstring)."""
    steps, status = mpc.Connection(steps_fd, writable=False), mpc.Connection(status_fd, readable=False)
    rank, world_size, store_port, config, arch, path, max_model_len, sched_cfg = steps.recv()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s tp-rank{rank} %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)  # where it waits (services/entry.py)
    _exit_with_parent()
    if config.model.device == "cpu":  # N ranks share the cores (oversubscribed gloo ranks crawl)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        store = dist.TCPStore("127.0.0.1", store_port, world_size, False, timeout)
        store.set(f"joined/{rank}", "1")
        comm = TPComm(rank, world_size, store, torch.device(config.model.device), COLLECTIVE_TIMEOUT_S,
                      config.parallel.all_reduce)
        runner = ModelRunner(config.model, config.cache, arch, path, max_model_len, scheduler_cfg=sched_cfg,
                             enforce_eager=config.enforce_eager, tp=comm, speculative=config.speculative_config)
        # CPU: this rank does not see the block pool (rank 0's): its KV pages are populated up to
        # one batch at start, then fault in on first use
        runner.kv_frontier = lambda: 0
    except BaseException as e:
        log.exception("start-up failed")
        _report(status, "error", f"{type(e).__name__}: {e}")
        os._exit(1)
    if kv_link_fd is not None:
        from pdserve.common.kv_transfer.tp_agent import start_agent
        start_agent(kv_link_fd, runner.kv_cache)
    _report(status, "ready", runner.num_blocks)
    params_cache: dict = {}
    orderly = False  # an empty step: rank 0 shuts down and ends the group with the others
    while True:
        try:
            payload = steps.recv_bytes()
        except EOFError:  # the engine is gone
            break
        if not payload:
            orderly = True
            break
        try:
            runner.launch(decode_step(payload, params_cache))
        except BaseException as e:  # the other ranks wait in a collective: end this one, rank 0 sees it
            log.exception("step failed")
            _report(status, "error", f"{type(e).__name__}: {e}")
            os._exit(1)
    runner.shutdown()  # its CUDA graphs first: they hold the group's NCCL work (TPDriverRunner.shutdown)
    comm.close(peers_alive=orderly)


def _report(status: mpc.Connection, kind: str, detail) -> None:
    try:
        status.send((kind, detail))
    except OSError:  # the engine is gone
        os._exit(1)


def _exit_with_parent() -> None:
    """A worker blocked on the device (an NCCL collective whose peer died) would outlive the
    engine: a thread ends the process when its parent is gone."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="pdserve-tp-parent-watch", daemon=True).start()
