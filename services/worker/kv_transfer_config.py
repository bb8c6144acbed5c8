"""`--kv-transfer-config JSON`: vLLM's spelling of the KV transport flags (torch-free).

    vLLM key                  pdserve
    kv_connector              --kv-transport: a pdserve backend name (tcp, ucx, nccl, ipc), or vLLM's
                              NixlConnector (UCX underneath) -> ucx, P2pNcclConnector /
                              PyNcclConnector -> nccl (where that backend exists)
    kv_role                   must agree with the command: kv_producer = prefill, kv_consumer =
                              decode, kv_both = either (every pdserve worker serves both halves)
    engine_id                 --instance-id

Every other vLLM key (kv_ip, kv_port, kv_rank, kv_parallel_size, kv_buffer_size, ...) is refused
by name: a pdserve worker's KV server picks its own port and is found through Redis, so those
settings have no meaning here, and silently ignoring them would hide a misconfiguration.
"""

from __future__ import annotations

import json

from pdserve.common.config import ConfigError
from pdserve.common.kv_transfer import BACKENDS

VLLM_CONNECTORS = {"NixlConnector": "ucx", "P2pNcclConnector": "nccl", "PyNcclConnector": "nccl"}
ROLES = {"kv_producer": ("prefill",), "kv_consumer": ("decode",), "kv_both": ("prefill", "decode")}
KNOWN_KEYS = ("kv_connector", "kv_role", "engine_id")
DEFAULT_TRANSPORT = "tcp"


def parse_kv_transfer_config(text: str, role: str | None) -> dict:
    """{"kv_transport": ..., "instance_id": ...} (only the keys given) from the JSON of
    `--kv-transfer-config`; `role` is the command's (None for `pdserve up`: both roles)."""
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--kv-transfer-config is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError("--kv-transfer-config must be a JSON object, e.g. '{\"kv_connector\": \"tcp\"}'")
    unknown = sorted(set(cfg) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(f"--kv-transfer-config: {', '.join(unknown)} not supported (pdserve reads "
                          f"{', '.join(KNOWN_KEYS)}; KV servers pick their own ports and are found through Redis)")
    out = {}
    if "kv_connector" in cfg:
        name = cfg["kv_connector"]
        backend = VLLM_CONNECTORS.get(name, name)
        offered = [b for b in BACKENDS if b != "local"]
        if backend not in offered:
            raise ConfigError(f"--kv-transfer-config: kv_connector {name!r} is not available here "
                              f"(choose {', '.join(offered)}, or {', '.join(VLLM_CONNECTORS)})")
        out["kv_transport"] = backend
    if "kv_role" in cfg:
        roles = ROLES.get(cfg["kv_role"])
        if roles is None:
            raise ConfigError(f"--kv-transfer-config: kv_role must be one of {', '.join(ROLES)}, got {cfg['kv_role']!r}")
        if role is None and cfg["kv_role"] != "kv_both":
            raise ConfigError("--kv-transfer-config: `pdserve up` starts both roles; kv_role must be kv_both")
        if role is not None and role not in roles:
            raise ConfigError(f"--kv-transfer-config: kv_role {cfg['kv_role']!r} does not match `pdserve {role}`")
    if "engine_id" in cfg:
        if role is None:
            raise ConfigError("--kv-transfer-config: engine_id names one worker; `pdserve up` starts several")
        out["instance_id"] = str(cfg["engine_id"])
    return out


def resolve_kv_flags(args, role: str | None) -> None:
    """Fold --kv-transfer-config into args.kv_transport (and args.instance_id for a worker); a
    value given both ways must agree. Unset, the transport is tcp."""
    given = parse_kv_transfer_config(args.kv_transfer_config, role) if args.kv_transfer_config else {}
    for key, flag in (("kv_transport", "--kv-transport"), ("instance_id", "--instance-id")):
        if key not in given:
            continue
        current = getattr(args, key, None)
        if current is not None and current != given[key]:
            raise ConfigError(f"{flag} {current} and --kv-transfer-config ({given[key]}) disagree")
        setattr(args, key, given[key])
    if args.kv_transport is None:
        args.kv_transport = DEFAULT_TRANSPORT


def config_for_transport(config, transport: str):
    """The engine config a worker of `transport` runs: with ipc a CPU KV pool is allocated in
    memory that the host's other workers can map (CacheConfig.shared_host_kv); otherwise as given."""
    if transport != "ipc":
        return config
    import dataclasses
    return dataclasses.replace(config, cache=dataclasses.replace(config.cache, shared_host_kv=True))


def add_kv_transfer_config_arg(p) -> None:
    p.add_argument("--kv-transfer-config", default=None, metavar="JSON",
                   help="vLLM's spelling of the KV flags: {\"kv_connector\": \"tcp\"|\"ucx\"|\"nccl\"|\"ipc\"|\"NixlConnector\"..., "
                        "\"kv_role\": \"kv_producer\"|\"kv_consumer\"|\"kv_both\", \"engine_id\": ...}; other keys "
                        "are refused")
