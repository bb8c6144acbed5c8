"""pdserve.common.kv_transfer: moving paged KV blocks between engines (base.py has the picture).

BACKENDS is here, torch-free, so that flag parsers can offer the names without importing torch.
"""

BACKENDS = ("tcp", "ucx", "nccl", "ipc", "local")
