"""configure_ucx_env: operator settings win, its own defaults follow the CPU/GPU choice."""

from __future__ import annotations

import json
import os

from pdserve.common.kv_transfer.ucx import configure_ucx_env

NAMES = ["UCX_TLS", "UCX_NET_DEVICES", "UCX_TCP_TX_SEG_SIZE", "UCX_TCP_RX_SEG_SIZE",
         "UCX_TCP_CM_REUSEADDR", "UCXPY_ENABLE_PYTHON_FUTURE", "UCX_WARN_UNUSED_ENV_VARS",
         "PDSERVE_UCX_DEFAULTS"]


def test_defaults_follow_the_device_and_operator_values_win(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UCX_TCP_TX_SEG_SIZE", "1M")  # set by the operator

    configure_ucx_env(on_gpu=False, net_devices="lo")
    assert os.environ["UCX_TLS"] == "tcp"
    assert os.environ["UCX_NET_DEVICES"] == "lo"
    assert os.environ["UCX_TCP_TX_SEG_SIZE"] == "1M"
    assert os.environ["UCX_TCP_RX_SEG_SIZE"] == "512K"
    assert os.environ["UCXPY_ENABLE_PYTHON_FUTURE"] == "1"
    assert "UCX_TCP_TX_SEG_SIZE" not in json.loads(os.environ["PDSERVE_UCX_DEFAULTS"])

    # A later GPU configuration (also in a child that inherited this environment) replaces
    # the defaults set above, keeps the operator's value and the devices it was not given.
    configure_ucx_env(on_gpu=True)
    assert os.environ["UCX_TLS"] == "tcp,cuda_copy,cuda_ipc"
    assert os.environ["UCX_NET_DEVICES"] == "lo"
    assert os.environ["UCX_TCP_TX_SEG_SIZE"] == "1M"

    monkeypatch.setenv("UCX_TLS", "rc,cuda_copy")  # the operator chooses the transports
    configure_ucx_env(on_gpu=False)
    assert os.environ["UCX_TLS"] == "rc,cuda_copy"
