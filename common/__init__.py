"""pdserve.common: the engine core and everything shared by the services.

`from pdserve.common import LLM, SamplingParams` is the offline API. Names load lazily so that
torch-free users of this package (the router) never import torch by importing it.
"""

_EXPORTS = {
    "LLM": "pdserve.common.engine.llm",
    "AsyncLLM": "pdserve.common.engine.async_llm",
    "SamplingParams": "pdserve.common.sampling_params",
    "RequestOutput": "pdserve.common.outputs",
    "CompletionOutput": "pdserve.common.outputs",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pdserve.common' has no attribute {name!r}")
