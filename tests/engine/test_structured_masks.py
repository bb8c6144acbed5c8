"""The step's token masks at the manager's boundary (real xgrammar, SmolLM2's tokenizer, no model):
batched matcher updates give, step by step, the bitmask of one matcher fed one token at a time;
tokens in flight, tokens given at admission, a grammar's end and a rejected token; host buffers are
reused, not allocated per step."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pdserve.common.engine.bitmask_buffers import BitmaskBuffers
from pdserve.common.engine.outputs import PLACEHOLDER_TOKEN, ScheduledRequest
from pdserve.common.engine.structured_output import StructuredOutputManager
from pdserve.common.request import Request, RequestStatus
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokenizer import Tokenizer

VOCAB = 49152 + 100  # a model vocabulary past the tokenizer's, as Llama-3's is past SmolLM2's
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    return Tokenizer(smollm2_tokenizer_dir)


def scheduled(req: Request, inflight: bool) -> ScheduledRequest:
    last = PLACEHOLDER_TOKEN if inflight else (req.output_token_ids or req.prompt_token_ids)[-1]
    return ScheduledRequest(req_id=req.request_id, input_token_ids=[last], start_pos=0, block_ids=[],
                            sample=True, params=req.params, prompt_token_ids=req.prompt_token_ids,
                            output_token_ids=req.output_token_ids)


def allowed(row: np.ndarray, stop_ids) -> list[int]:
    ids = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
    return [int(t) for t in ids if t not in stop_ids]


@pytest.mark.parametrize("num_threads,num_shares", [(1, 1), (3, 1), (3, 2)])
def test_batched_steps_equal_one_matcher_one_token_at_a_time(tokenizer, num_threads, num_shares):
    """(3, 1): xgrammar's own threads fill the 5 grammar rows; (3, 2): two worker shares."""
    eos = tuple(tokenizer.eos_token_ids)
    manager = StructuredOutputManager(tokenizer, VOCAB, eos, num_threads=num_threads, num_shares=num_shares)
    grammar = SamplingParams(temperature=0, structured_outputs={"json": SCHEMA})
    given = tokenizer.encode('{"name": "ab', add_special_tokens=False)
    reqs = [Request(f"r{i}", [1, 2, 3], grammar, eos) for i in range(4)]
    reqs.append(Request("given", [1, 2, 3], grammar, eos, output_token_ids=given))  # a decode worker's admission
    reqs.append(Request("plain", [1, 2, 3], SamplingParams(temperature=0), eos))  # no constraint: all bits set
    compiled = manager.grammars.compile(grammar.structured_outputs)
    refs = {r.request_id: manager.grammars.matcher(compiled) for r in reqs[:5]}
    for t in given:
        assert refs["given"].accept_token(t)
    stop = set(manager.grammars.stop_token_ids)
    width = manager.num_words
    expected = np.empty(width, np.int32)
    carry = {}  # tokens the previous step sampled, still "in flight" (odd steps are overlapped)
    for step in range(12):
        mask = manager.fill([scheduled(r, r.request_id in carry) for r in reqs], carry.__getitem__)
        if carry:  # engine order: the previous step completes after this step's mask is filled
            for r in reqs:
                r.append_output_token(carry[r.request_id])
            assert manager.update(reqs) == ([], [])
            carry = {}
        assert mask.shape == (len(reqs), width) and mask.dtype == torch.int32
        rows = mask.numpy()
        for i, r in enumerate(reqs):
            if r.request_id == "plain":
                assert (rows[i] == -1).all()
                continue
            refs[r.request_id].fill_next_token_bitmask(torch.from_numpy(expected))
            assert np.array_equal(rows[i], expected), (step, r.request_id)
        for i, r in enumerate(reqs):
            choices = allowed(rows[i], stop)
            token = choices[(3 * i + step) % len(choices)]  # rows walk different paths through the grammar
            if r.request_id in refs:
                assert refs[r.request_id].accept_token(token)
            if step % 2 == 0:
                carry[r.request_id] = token
            else:
                r.append_output_token(token)
        if not carry:
            assert manager.update(reqs) == ([], [])
    assert manager._buffers.num_allocations == 1
    assert manager.stats.num_fills == 12 and manager.stats.fill_seconds > 0 and manager.stats.update_seconds > 0
    # a token the grammar rejects breaks only its request; xgrammar agrees it is not allowed
    refs["r0"].fill_next_token_bitmask(torch.from_numpy(expected))
    bits = np.unpackbits(expected.view(np.uint8), bitorder="little")
    bad = int(np.flatnonzero(bits[:49152] == 0)[-1])
    assert not refs["r0"].accept_token(bad)
    reqs[0].append_output_token(bad)
    assert manager.update(reqs) == ([], ["r0"])
    rows = manager.fill([scheduled(r, False) for r in reqs]).numpy()
    assert (rows[0] == -1).all()  # a broken row is left unmasked; the engine finishes it with an error


def test_grammar_end_then_any_token_breaks(tokenizer):
    """A matcher that accepted EOS where the grammar may end has terminated: update() reports it
    ended; a further token (the extra overlapped step's) is rejected."""
    eos = tuple(tokenizer.eos_token_ids)
    manager = StructuredOutputManager(tokenizer, VOCAB, eos)
    params = SamplingParams(temperature=0, structured_outputs={"choice": ["yes"]})
    req = Request("r", [1, 2], params, eos, output_token_ids=tokenizer.encode("yes", add_special_tokens=False))
    mask = manager.fill([scheduled(req, False)]).numpy()
    assert allowed(mask[0], ()) == sorted(manager.grammars.stop_token_ids)
    req.append_output_token(eos[0])
    assert manager.update([req]) == (["r"], [])
    req.append_output_token(eos[0])
    assert manager.update([req]) == ([], ["r"])
    req.status = RequestStatus.FINISHED_STOPPED
    manager.update([req])
    assert manager.num_requests == 0


def test_bitmask_buffers_are_reused_and_grow():
    buffers = BitmaskBuffers(num_words=5, device=torch.device("cpu"))
    a = buffers.acquire(3)
    a.zero_()
    b = buffers.acquire(2)
    assert b.data_ptr() == a.data_ptr() and (b == -1).all() and b.shape == (2, 5)
    assert buffers.to_device(b) is b
    big = buffers.acquire(100)
    assert big.shape == (100, 5) and (big == -1).all() and buffers.num_allocations == 2


@pytest.mark.gpu
def test_pinned_ring_copies_and_guards_reuse():
    """CUDA: pinned slots in a ring, each reused after its copy's event; the device copy holds
    what the host wrote even when the host buffer is refilled right after."""
    from pdserve.common.engine.bitmask_buffers import NUM_SLOTS
    buffers = BitmaskBuffers(num_words=4008, device=torch.device("cuda"))
    outs = []
    for step in range(3 * NUM_SLOTS):
        host = buffers.acquire(64)
        assert host.is_pinned()
        host[:, 0] = step
        outs.append(buffers.to_device(host))
    torch.cuda.synchronize()
    assert buffers.num_allocations == NUM_SLOTS
    for step, out in enumerate(outs):
        assert out.device.type == "cuda" and (out[:, 0] == step).all() and (out[:, 1:] == -1).all()


def test_fill_beside_the_engine_thread_equals_serial_fill(tokenizer):
    """The engine's overlapped order without the runner's hook: start_fill(k) returns before step
    k-1's tokens exist, the engine thread appends them and runs update() (which accepts them and
    starts the fill: nothing called tokens_arrived), then joins. Masks and update() results equal a serial fill's, step by step, including a
    request aborted while its fill runs (its state is dropped, the fill still completes)."""
    eos = tuple(tokenizer.eos_token_ids)
    serial = StructuredOutputManager(tokenizer, VOCAB, eos, num_threads=1)
    beside = StructuredOutputManager(tokenizer, VOCAB, eos, num_threads=3, num_shares=3)
    grammar = SamplingParams(temperature=0, structured_outputs={"json": SCHEMA})
    reqs = [Request(f"r{i}", [1, 2, 3], grammar, eos) for i in range(9)]
    reqs.append(Request("bad", [1, 2, 3], SamplingParams(temperature=0, bad_words=["name"]), eos))
    stop = set(serial.grammars.stop_token_ids)
    carry = {}
    for step in range(10):
        rows = [scheduled(r, r.request_id in carry) for r in reqs]
        gate, timed_out = threading.Event(), []

        def inflight(req_id):  # the device: step k-1's tokens arrive only when the gate opens
            if not gate.wait(timeout=10):
                timed_out.append(req_id)
            return carry[req_id]
        fill = beside.start_fill(rows, inflight if carry else None)  # must not wait for the gate
        gate.set()
        expected = serial.fill(rows, carry.__getitem__ if carry else None).numpy().copy()
        for r in reqs:
            if r.request_id in carry:
                r.append_output_token(carry[r.request_id])
        if step == 4:  # aborted while its fill is in flight
            reqs[2].status = RequestStatus.FINISHED_ABORTED
        assert beside.update(reqs) == serial.update(reqs) == ([], [])
        mask = fill.join().numpy()
        assert not timed_out and np.array_equal(mask, expected), step
        carry = {}
        for i, r in enumerate(reqs):  # rows walk different paths through the grammar
            if not r.is_finished():
                choices = allowed(mask[i], stop)
                carry[r.request_id] = choices[(5 * i + step) % len(choices)]
        reqs = [r for r in reqs if not r.is_finished()]
    assert beside.num_requests == serial.num_requests == len(reqs)
    assert beside.stats.num_fills == 10 and beside.stats.join_seconds >= 0
    for r in reqs:  # every sampled token accepted exactly once
        state = beside._states[r.request_id]
        if state.matcher is not None:
            assert state.num_accepted == r.num_output_tokens and not state.broken


def test_shares_no_worker_started_run_on_the_engine_thread(tokenizer):
    """Every worker busy: the engine thread takes the queued shares back when it waits for them
    to start (here in start_fill: every token is on the host), once each, and the mask is the
    serial fill's."""
    eos = tuple(tokenizer.eos_token_ids)
    serial = StructuredOutputManager(tokenizer, VOCAB, eos, num_threads=1)
    beside = StructuredOutputManager(tokenizer, VOCAB, eos, num_threads=2, num_shares=2)
    grammar = SamplingParams(temperature=0, structured_outputs={"json": SCHEMA})
    given = tokenizer.encode('{"name": "x', add_special_tokens=False)
    reqs = [Request(f"r{i}", [1, 2, 3], grammar, eos, output_token_ids=given[:1 + i % 3]) for i in range(8)]
    rows = [scheduled(r, False) for r in reqs]
    gate = threading.Event()
    busy = beside._workers.submit(lambda k, share: gate.wait(10), [[], []])
    try:
        fill = beside.start_fill(rows)  # accepts, then takes both shares back
        assert beside.update(reqs) == ([], [])
        mask = fill.join()
        assert fill.num_taken_back == 2 and beside.stats.num_shares_taken_back == 2
    finally:
        gate.set()
    assert all(f.result() for f in busy)
    assert np.array_equal(mask.numpy(), serial.fill(rows).numpy())


@pytest.mark.parametrize("num_threads,num_shares,num_grammar", [(1, 1, 6), (4, 1, 6), (4, 2, 6), (4, 1, 40)])
def test_accept_where_the_tokens_land_equals_serial_fill(tokenizer, num_threads, num_shares, num_grammar):
    """The runner's hook: start_fill(k) snapshots the rows and starts nothing; the previous step's
    PendingOutput.result() (engine thread) runs tokens_arrived(): every row accepts its in-flight
    token, then the workers fill. Mixed rows (grammar, plain, allowed_token_ids, bad_words, a
    grammar row finishing on its token, one aborted while its fill runs): masks and update()
    results equal a serial fill's step by step, and update() finds every token accepted. 40 grammar
    rows: the accept is split over several threads at once (GrammarWorkers.accept_in_parallel)."""
    from pdserve.common.engine.model_runner import PendingOutput
    from pdserve.common.engine.outputs import RunnerOutput
    eos = tuple(tokenizer.eos_token_ids)
    serial = StructuredOutputManager(tokenizer, VOCAB, eos, num_threads=1)
    beside = StructuredOutputManager(tokenizer, VOCAB, eos, num_threads=num_threads, num_shares=num_shares)
    grammar = SamplingParams(temperature=0, structured_outputs={"json": SCHEMA})
    reqs = [Request(f"g{i}", [1, 2, 3], grammar, eos) for i in range(num_grammar)]
    reqs.append(Request("plain", [1, 2, 3], SamplingParams(temperature=0), eos))
    reqs.append(Request("allowed", [1, 2, 3], SamplingParams(temperature=0, allowed_token_ids=[5, 7, 40, 900]), eos))
    reqs.append(Request("bad", [1, 2, 3], SamplingParams(temperature=0, bad_words=["name", "x y"]), eos))
    reqs.append(Request("ends", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4,
                                                          structured_outputs={"json": SCHEMA}), eos))
    stop = set(serial.grammars.stop_token_ids)
    carry = {}
    for step in range(9):
        rows = [scheduled(r, r.request_id in carry) for r in reqs]
        pending = PendingOutput(RunnerOutput(sampled_token_ids={}), list(carry), torch.tensor(list(carry.values())))
        fill = beside.start_fill(rows, (lambda rid, p=pending: p.result().sampled_token_ids[rid]) if carry else None)
        pending.when_result(fill.tokens_arrived)
        assert (fill.started_at is None) == bool(carry)  # in flight: nothing runs before the tokens land
        expected = serial.fill(rows, carry.__getitem__ if carry else None).numpy().copy()
        assert pending.result().sampled_token_ids == carry
        assert fill.started_at is not None  # accepted and started right there, on this thread
        for r in reqs:
            if r.request_id in carry:
                r.append_output_token(carry[r.request_id])
                if r.num_output_tokens >= (r.params.max_tokens or 1 << 30):
                    r.status = RequestStatus.FINISHED_LENGTH
        if step == 5:
            reqs[1].status = RequestStatus.FINISHED_ABORTED
        before = {id(st): st.num_accepted for st in beside._states.values()}
        assert beside.update(reqs) == serial.update(reqs) == ([], [])
        assert all(st.num_accepted == before[id(st)] for st in beside._states.values())  # nothing left to accept
        mask = fill.join().numpy()
        assert np.array_equal(mask, expected), step
        carry = {}
        for i, r in enumerate(reqs):
            if not r.is_finished():
                choices = allowed(mask[i], stop)
                carry[r.request_id] = choices[(7 * i + step) % len(choices)]
        reqs = [r for r in reqs if not r.is_finished()]
    assert [r.request_id for r in reqs if r.request_id in ("ends", "g1")] == []
    assert beside.num_requests == serial.num_requests == len(reqs) - 1  # "plain" has no state
    stats = beside.stats
    assert stats.num_fills == 9 and stats.accept_seconds > 0 and stats.fill_seconds > 0
    from pdserve.common.engine.grammar_workers import ACCEPT_ROWS_PER_THREAD
    assert (beside._workers._accept_pool is not None) == (num_grammar >= 2 * ACCEPT_ROWS_PER_THREAD)
    for r in reqs:  # every sampled token accepted exactly once
        state = beside._states.get(r.request_id)
        if state is not None and state.matcher is not None:
            assert state.num_accepted == r.num_output_tokens and not state.broken


def test_pending_output_runs_when_result_once_where_the_tokens_land():
    from pdserve.common.engine.model_runner import PendingOutput
    from pdserve.common.engine.outputs import RunnerOutput
    calls = []
    pending = PendingOutput(RunnerOutput(sampled_token_ids={}), ["a"], torch.tensor([3]))
    pending.when_result(lambda: calls.append(pending.result().sampled_token_ids["a"]))  # re-entrant read
    assert calls == []
    pending.result()
    pending.result()
    assert calls == [3]
    pending.when_result(lambda: calls.append("late"))  # resolved already: now
    assert calls == [3, "late"]

    def fail():
        raise RuntimeError("sampler")
    failed = PendingOutput(RunnerOutput(sampled_token_ids={}), ["a"], sample=fail)
    failed.when_result(lambda: calls.append("never"))
    with pytest.raises(RuntimeError):
        failed.result()
    assert calls == [3, "late"]
