"""`pdserve admin list|drain|resume|set-role --router http://HOST:PORT [ID] [ROLE]`: the operator's
client of the router's /admin routes (admin.py). Imports nothing heavy at module level: building
the `pdserve` parser must stay fast.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("admin", help="operate a router's fleet: list, drain, resume, set-role")
    asub = p.add_subparsers(dest="admin", required=True)
    for name, help_ in (("list", "instances with role, status, load, KV usage, cached blocks"),
                        ("drain", "stop sending an instance new work"), ("resume", "undo a drain"),
                        ("set-role", "drain an instance, then switch its role (no restart)")):
        a = asub.add_parser(name, help=help_)
        a.add_argument("--router", required=True, help="router base URL, e.g. http://127.0.0.1:8000")
        a.add_argument("--api-key", default=None, help="the router's --api-key, if it has one")
        if name != "list":
            a.add_argument("instance_id", help="as `pdserve admin list` shows it")
        if name == "set-role":
            a.add_argument("role", help="the new role: prefill, decode or both")
            a.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the drain")
        a.add_argument("--json", action="store_true", help="print the router's JSON answer")
        a.set_defaults(func=cmd_admin)


def cmd_admin(args) -> None:
    import json

    import httpx

    from pdserve.common.config import ConfigError
    from pdserve.common.registry import ROLES
    if args.admin == "set-role" and args.role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {args.role!r}")
    base = args.router.rstrip("/") + "/admin/instances"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        if args.admin == "list":
            r = httpx.get(base, headers=headers, timeout=10)
        elif args.admin == "set-role":
            r = httpx.post(f"{base}/{args.instance_id}/role", json={"role": args.role, "timeout_s": args.timeout},
                           headers=headers, timeout=args.timeout + 30)
        else:
            r = httpx.post(f"{base}/{args.instance_id}/{args.admin}", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach the router at {args.router}: {e}") from None
    if r.status_code != 200:
        raise ConfigError(f"router answered {r.status_code}: {_error_message(r)}")
    data = r.json()
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.admin == "list":
        print(format_instances(data))
    else:
        print(f"{data['instance_id']}: role={data['role']} status={data['status']}"
              + (f" (drained in {data['drained_s']} s; worker reports {data['reported_role']})"
                 if "drained_s" in data else ""))


def format_instances(data: dict) -> str:
    rows = [("ID", "ROLE", "STATUS", "ADDRESS", "RUN", "WAIT", "KV%", "CACHED", "INDEXED", "HIT%", "REPORTS")]
    for i in data["instances"]:
        load = i["load"] or {}
        rate = i["prefix_hit_rate"]
        rows.append((i["instance_id"], i["role"], i["status"], i["grpc_address"], str(load.get("num_running", "-")),
                     str(load.get("num_waiting", "-")), f"{100 * (i['kv_usage'] or 0):.0f}",
                     str(i["cached_blocks"]), str(i["indexed_blocks"]), "-" if rate is None else f"{100 * rate:.0f}",
                     f"{i['reported_role']}/{i['reported_status']}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    redis = "up" if data["redis_up"] else "DOWN (load-only routing, last known instances)"
    return "\n".join(lines + [f"redis: {redis}; routing: {data['routing']}"])


def _error_message(r) -> str:
    """The message of an error answer (the app's OpenAI-style {"error": {...}}, or FastAPI's)."""
    try:
        body = r.json()
    except ValueError:
        return r.text
    if isinstance(body.get("error"), dict):
        return body["error"].get("message", r.text)
    return str(body.get("detail", r.text))
