"""The KV transport backends the tests run over: `ucx` only where ucxx is installed.

ucxx (with libucx and rmm, ~250 MB of CUDA packages) is the optional `ucx` extra
(`pip install -e ".[test,ucx]"`); without it every ucx case is skipped with a reason that says so
(`pytest -rs`, on by default in pyproject.toml, lists it in the summary).
"""

from __future__ import annotations

import importlib.util

import pytest

HAVE_UCXX = importlib.util.find_spec("ucxx") is not None
UCX_MISSING = "ucxx is not installed (the `ucx` extra: pip install -e \".[test,ucx]\"); ucx transport not tested"


def backends(*names: str) -> list:
    """pytest params for `names`, the ucx one marked to skip when ucxx is absent."""
    return [pytest.param(n, marks=pytest.mark.skipif(not HAVE_UCXX, reason=UCX_MISSING)) if n == "ucx" else n
            for n in names]
