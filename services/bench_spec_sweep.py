"""`pdserve bench spec --sweep`: n-gram settings compared without running them, from greedy outputs.

Greedy outputs do not depend on speculation, so how n-gram proposals would fare for a setting
(prompt_lookup_min, prompt_lookup_max, k) follows from the prompts and their greedy outputs
alone: replay the engine's steps for one request at a time (batch 1) with the real lookup
(spec_decode/ngram.py), accepting the longest prefix of the drafts that the output continues.

The step pattern replayed is the overlapped engine's (spec_decode/pipeline.py):

    lookup found drafts  -> a verify step: accepted + 1 tokens; the next step waits for it
    lookup found nothing -> a plain step (1 token); the step after it launches before that
                            result is known: its lookup runs on the history without the token in
                            flight, one token further, the first token found guessing it
                            (a verify step "launched while a plain step runs", --guess-verify-ms)
    the guess was wrong  -> its drafts are dropped (the engine knows before that step's result):
                            a step of one token, and the next launches first again

    bridge=True          -> after a verify step whose drafts are kept, a bridge step launched
                            before its result (one row per outcome, --bridge-ms): one token more,
                            and the step after it launches first, past a guess (pipeline.py);
                            none if the verify step accepted more drafts than the bridge had rows

(`guess=False` replays the engine before the guess: the step after a plain one was plain too,
without a lookup.) Predicted ms per output token from measured step costs (--plain-ms,
--verify-ms, --guess-verify-ms: the `ms` of plain, verify and guessed verify steps in
`pdserve bench spec`'s per-step table), per request (its decode steps' time / its tokens after
the first, as bench spec's ms/token), averaged; speedup = --none-ms / that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdserve.common.engine.spec_decode.ngram import lookup


@dataclass
class Replay:
    """One setting over a set of requests."""
    steps: int = 0  # decode steps (after each request's first token)
    verify_steps: int = 0  # steps carrying drafts
    guess_steps: int = 0  # of them, launched while a plain step ran (drafts past a guessed token)
    guess_hits: int = 0  # of those, the guess was right
    dropped: int = 0  # guess steps whose guess was wrong: drafts dropped, not verified
    bridge_steps: int = 0  # steps launched before a verify step's result, one row per outcome
    bridge_void: int = 0  # of them, without a row for the outcome (no token)
    lookups: int = 0  # steps that ran the lookup (with room for drafts)
    draft_tokens: int = 0
    accepted: int = 0
    tokens: int = 0  # output tokens after each request's first
    ms_per_token: list = None  # per request, predicted

    def row(self) -> dict:
        return {"propose_fraction": self.verify_steps / max(self.lookups, 1),
                "verify_fraction": self.verify_steps / max(self.steps, 1),
                "guess_fraction": self.guess_steps / max(self.verify_steps, 1),
                "guess_hit_rate": self.guess_hits / max(self.guess_steps, 1),
                "acceptance": self.accepted / max(self.draft_tokens, 1),
                "mean_accepted_length": 1 + self.accepted / max(self.verify_steps - self.dropped, 1),
                "tokens_per_step": self.tokens / max(self.steps, 1),
                "ms_per_token": sum(self.ms_per_token) / len(self.ms_per_token)}


def replay(samples: list[tuple[list[int], list[int]]], min_n: int, max_n: int, k: int, max_tokens: int,
           plain_ms: float, verify_ms: float, guess_verify_ms: float | None = None, guess: bool = True,
           drop: bool = True, bridge: bool = False, bridge_ms: float | None = None) -> Replay:
    """samples: (prompt ids, greedy output ids) per request -> the replayed steps' totals.
    guess_verify_ms: the cost of a verify step launched while a plain step ran (default verify_ms).
    drop=False: the engine before drafts past a wrong guess were dropped (it verified them, and
    the next step waited for that result). bridge: the engine's bridge steps (bridge_ms each,
    default verify_ms)."""
    guess_verify_ms = verify_ms if guess_verify_ms is None else guess_verify_ms
    bridge_ms = verify_ms if bridge_ms is None else bridge_ms
    r = Replay(ms_per_token=[])
    for prompt, output in samples:
        history = np.asarray(prompt + output, np.int32)
        num_prompt, end = len(prompt), len(output)
        # n: output tokens decided (one maybe in flight); the first comes from the prefill, which
        # drafted nothing: the next step launches before its result
        n, inflight, ms = 1, True, 0.0
        while n < end:
            r.steps += 1
            room = min(k, max_tokens - n - 1)  # scheduler: max_draft_tokens (n counts the token in flight)
            drafts = history[:0]
            if room > 0 and not (inflight and not guess):
                r.lookups += 1
                found = lookup(history[:num_prompt + n - inflight], min_n, max_n, room + inflight)
                drafts = found[inflight:]
            hit = not inflight or (drafts.size and found[0] == history[num_prompt + n - 1])
            if drafts.size:
                r.verify_steps += 1
                r.guess_steps += inflight
                r.guess_hits += int(inflight and hit)
                ms += guess_verify_ms if inflight else verify_ms
            if drafts.size and (hit or not drop):
                truth = history[num_prompt + n:num_prompt + n + drafts.size]
                same = drafts[:truth.size] == truth
                accepted = int(np.argmin(same)) if not same.all() else truth.size
                r.draft_tokens += drafts.size
                r.accepted += accepted
                gained = min(accepted + 1, end - n)
                inflight = False  # the next step waits for this one's result
                room_bridge = min(k, max_tokens - n - 2)  # its slots: the verify step's token in flight
                if bridge and room_bridge >= 0:
                    r.steps += 1
                    r.bridge_steps += 1
                    ms += bridge_ms
                    if n + gained < end and accepted < min(drafts.size, room_bridge) + 1:
                        gained += 1  # its row `accepted`: one token more, in flight when the next launches
                        inflight = True
                    elif n + gained < end:
                        r.bridge_void += 1
            elif drafts.size:  # a wrong guess: its drafts dropped, the step makes one token, the next launches first
                r.dropped += 1
                gained = 1
            else:
                gained = 1
                ms += plain_ms
                # a step without drafts lets the next launch first (before the guess: unless it was
                # launched first itself, having drafted nothing because its input was in flight)
                inflight = guess or not inflight
            n += gained
        r.tokens += end - 1
        if end > 1:
            r.ms_per_token.append(ms / (end - 1))
    return r


def sweep(samples, mins, maxs, ks, max_tokens: int, plain_ms: float, verify_ms: float, none_ms: float,
          guess_verify_ms: float | None = None, bridge_ms: float | None = None) -> list[dict]:
    """Per setting, the replay of the engine (guesses, drafts past a wrong one dropped, bridge
    steps), and its speedup without bridge steps, without the guess and with wrong guesses'
    drafts verified (the engines before)."""
    rows = []
    for lo in mins:
        for hi in maxs:
            if lo > hi:
                continue
            for k in ks:
                row = replay(samples, lo, hi, k, max_tokens, plain_ms, verify_ms, guess_verify_ms, bridge=True,
                             bridge_ms=bridge_ms).row()
                no_bridge = replay(samples, lo, hi, k, max_tokens, plain_ms, verify_ms, guess_verify_ms).row()
                before = replay(samples, lo, hi, k, max_tokens, plain_ms, verify_ms, guess=False).row()
                kept = replay(samples, lo, hi, k, max_tokens, plain_ms, verify_ms, guess_verify_ms, drop=False).row()
                row.update(prompt_lookup_min=lo, prompt_lookup_max=hi, k=k, speedup=none_ms / row["ms_per_token"],
                           speedup_no_bridge=none_ms / no_bridge["ms_per_token"],
                           speedup_no_guess=none_ms / before["ms_per_token"],
                           speedup_no_drop=none_ms / kept["ms_per_token"])
                rows.append(row)
    return rows


def print_sweep(rows: list[dict]) -> None:
    print(f"{'min':>3} {'max':>3} {'k':>2} | {'propose':>7} {'verify':>6} {'guessed':>7} {'hit':>5} {'accept':>6} "
          f"{'mean len':>8} {'tok/step':>8} | {'ms/tok':>6} {'speedup':>7} {'no bridge':>9} {'no guess':>8} {'no drop':>7}")
    for r in sorted(rows, key=lambda r: r["ms_per_token"]):
        print(f"{r['prompt_lookup_min']:>3} {r['prompt_lookup_max']:>3} {r['k']:>2} | {r['propose_fraction']:>7.2f} "
              f"{r['verify_fraction']:>6.2f} {r['guess_fraction']:>7.2f} {r['guess_hit_rate']:>5.2f} "
              f"{r['acceptance']:>6.2f} {r['mean_accepted_length']:>8.2f} {r['tokens_per_step']:>8.2f} | "
              f"{r['ms_per_token']:>6.3f} {r['speedup']:>7.2f} {r['speedup_no_bridge']:>9.2f} {r['speedup_no_guess']:>8.2f} "
              f"{r['speedup_no_drop']:>7.2f}")


# Step costs of SmolLM2 (packaged GGUF) bf16 on one H200 at batch 1 (docs/benchmarks.md, issue 14).
# GUESS: a verify step launched while a plain step runs, its host work hidden: an estimate (the
# device time of a verify step, about a plain step's) until `bench spec` measures it.
H200_NONE_MS, H200_PLAIN_MS, H200_VERIFY_MS, H200_GUESS_VERIFY_MS = 0.940, 1.058, 1.414, 1.0


def add_sweep_args(p) -> None:
    p.add_argument("--sweep", action="store_true",
                   help="replay n-gram settings (--sweep-min/-max/-k) on greedy outputs instead of running them "
                        "(batch 1, the first --sequential-prompts prompts); predicted ms/token from step costs")
    p.add_argument("--sweep-min", type=int, nargs="+", default=[1, 2, 3], help="prompt_lookup_min values (default: %(default)s)")
    p.add_argument("--sweep-max", type=int, nargs="+", default=[3, 4, 5], help="prompt_lookup_max values (default: %(default)s)")
    p.add_argument("--sweep-k", type=int, nargs="+", default=[3, 4, 5, 6, 8], help="k values (default: %(default)s)")
    p.add_argument("--none-ms", type=float, default=H200_NONE_MS, help="ms/token without speculation (default: %(default)s, H200 bf16)")
    p.add_argument("--plain-ms", type=float, default=H200_PLAIN_MS, help="ms of a step without drafts (default: %(default)s)")
    p.add_argument("--verify-ms", type=float, default=H200_VERIFY_MS, help="ms of a verify step (default: %(default)s)")
    p.add_argument("--guess-verify-ms", type=float, default=H200_GUESS_VERIFY_MS,
                   help="ms of a verify step launched while a plain step runs (default: %(default)s, an estimate)")
    p.add_argument("--bridge-ms", type=float, default=None,
                   help="ms of a bridge step (launched before a verify step's result; default: --guess-verify-ms)")


def run_sweep(args, llm, prompts: list[list[int]]) -> None:
    from pdserve.common.sampling_params import SamplingParams
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=args.max_tokens), use_tqdm=False)
    samples = [(p, list(o.outputs[0].token_ids)) for p, o in zip(prompts, outs)]
    bridge_ms = args.guess_verify_ms if args.bridge_ms is None else args.bridge_ms
    rows = sweep(samples, args.sweep_min, args.sweep_max, args.sweep_k, args.max_tokens,
                 args.plain_ms, args.verify_ms, args.none_ms, args.guess_verify_ms, bridge_ms)
    print(f"{len(samples)} prompts, {sum(len(o) for _, o in samples)} greedy tokens; step costs: plain {args.plain_ms} ms, "
          f"verify {args.verify_ms} ms, guessed verify {args.guess_verify_ms} ms, bridge {bridge_ms} ms, "
          f"none {args.none_ms} ms/token")
    print_sweep(rows)
    if args.json_out:
        import json
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
