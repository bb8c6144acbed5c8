"""A real worker process whose forward pass fails for requests seeded with FAULT_SEED, and whose
engine dies (EngineDeadError, as when a tensor-parallel rank's process died) at a step of a
request seeded with FATAL_SEED (fault injection for tests): `python faulty_worker.py ROLE [worker flags]`."""

import sys

FAULT_SEED = 666
FATAL_SEED = 667

if __name__ == "__main__":
    from pdserve.common.engine.model_runner import ModelRunner
    from pdserve.services.worker.process import main

    real_launch = ModelRunner.launch

    def launch(self, sched, *args, **kwargs):
        if any(s.params.seed == FATAL_SEED for s in sched.scheduled):
            from pdserve.common.engine_client import EngineDeadError
            raise EngineDeadError("injected fault: the executor died")
        if any(s.params.seed == FAULT_SEED for s in sched.scheduled):
            raise RuntimeError("injected fault: the device failed this step")
        return real_launch(self, sched, *args, **kwargs)

    ModelRunner.launch = launch
    sys.exit(main(sys.argv[1], sys.argv[2:]))
