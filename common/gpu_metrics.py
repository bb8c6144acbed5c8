"""GPU memory and utilization for /metrics, read through NVML (nvidia-ml-py), only where the
engine runs on a CUDA device; on a CPU engine, or without a driver, there is no source and the
series are simply absent (no error, one INFO line).

    gpu_stats_source(engine device) -> callable returning GpuStats at scrape time, or None

The NVML device is found by the CUDA device's UUID, so CUDA_VISIBLE_DEVICES renumbering does not
point the metrics at another GPU.
"""

from __future__ import annotations

import logging
from typing import Callable

from pdserve.common.stats import GpuStats

log = logging.getLogger("pdserve.metrics")


def gpu_stats_source(device) -> Callable[[], GpuStats] | None:
    """`device`: the engine's torch.device. None unless it is CUDA and NVML answers."""
    if getattr(device, "type", None) != "cuda":
        return None
    try:
        import pynvml
        import torch
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
        if uuid:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as e:  # no nvidia-ml-py, no driver, a MIG or virtual device NVML does not list
        log.info("GPU metrics off: NVML is not available (%s)", e)
        return None

    def read() -> GpuStats:
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return GpuStats(index=index, memory_used_bytes=int(mem.used), memory_total_bytes=int(mem.total),
                        utilization=util.gpu / 100.0)
    return read
