"""A pdserve worker: one process serving both the Prefill and the Decode gRPC services over one
engine. `process.py` assembles and runs it (its docstring tells the lifecycle), `state.py` is who
it is and what it reports, `events.py` publishes its prefix cache, `args.py` its flags."""
