"""vLLM's HTTP-server flags of an OpenAI front end (serve and router): CORS, TLS, a proxy's root path,
logging and the docs pages.

    --allowed-origins / --allowed-methods / --allowed-headers   JSON lists (default ["*"], as vLLM)
    --allow-credentials                                         CORS credentials (default off)
    --ssl-certfile [--ssl-keyfile] [--ssl-ca-certs --ssl-cert-reqs N]   serve HTTPS (N = 2: clients
                                                                must present a certificate the CA file signs)
    --root-path PATH                                            the prefix a path-routing proxy strips
    --uvicorn-log-level L, --disable-uvicorn-access-log         uvicorn's logging (access log at info and below)
    --disable-fastapi-docs                                      no /docs, /redoc, /openapi.json

The TLS files are loaded once while the arguments are checked, so a missing or mismatched file is a
one-line error before the model loads, not a traceback from uvicorn after it. /metrics on its own
`--metrics-port` stays plain HTTP (a scrape network apart from the API's).
Kept apart from app.py so the command-line parsers can offer the flags without importing FastAPI.
"""

from __future__ import annotations

import argparse
import json
import ssl

from pdserve.common.config import ConfigError


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings such as '[\"*\"]', got {text!r}")
    return value


def add_http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-origins", type=_json_list, default=["*"],
                   help='CORS: origins browsers may call from, a JSON list (default ["*"])')
    p.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS: allowed methods, a JSON list")
    p.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS: allowed headers, a JSON list")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies, auth)")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM; may hold the key)")
    p.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    p.add_argument("--ssl-ca-certs", default=None, help="CA certificates that sign the clients' certificates")
    p.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE), choices=[0, 1, 2],
                   help="client certificates: 0 not asked, 1 optional, 2 required (checked against --ssl-ca-certs)")
    p.add_argument("--root-path", default="",
                   help="the path prefix a reverse proxy routes to this server and strips (FastAPI's root_path)")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (info and below also log each request, unless "
                        "--disable-uvicorn-access-log)")
    p.add_argument("--disable-uvicorn-access-log", action="store_true", help="no access log line per request")
    p.add_argument("--disable-fastapi-docs", action="store_true",
                   help="serve no OpenAPI document or docs pages (/openapi.json, /docs, /redoc)")


def check_http_args(args: argparse.Namespace) -> None:
    """Fail with a one-line message on TLS files that do not load, before anything slow starts."""
    if args.ssl_keyfile and not args.ssl_certfile:
        raise ConfigError("--ssl-keyfile needs --ssl-certfile")
    if (args.ssl_ca_certs or args.ssl_cert_reqs) and not args.ssl_certfile:
        raise ConfigError("--ssl-ca-certs / --ssl-cert-reqs need --ssl-certfile (client certificates are a TLS feature)")
    if args.ssl_cert_reqs and not args.ssl_ca_certs:
        raise ConfigError("--ssl-cert-reqs needs --ssl-ca-certs to check the clients' certificates against")
    if args.root_path and not args.root_path.startswith("/"):
        raise ConfigError(f"--root-path must start with '/', got {args.root_path!r}")
    if not args.ssl_certfile:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--ssl-certfile {args.ssl_certfile}"
                          + (f" / --ssl-keyfile {args.ssl_keyfile}" if args.ssl_keyfile else "")
                          + f": cannot load the certificate and its key: {e.strerror or e}") from None
    if args.ssl_ca_certs:
        try:
            context.load_verify_locations(args.ssl_ca_certs)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"--ssl-ca-certs {args.ssl_ca_certs}: cannot load: {e.strerror or e}") from None


def scheme(args: argparse.Namespace) -> str:
    return "https" if args.ssl_certfile else "http"


def uvicorn_options(args: argparse.Namespace) -> dict:
    """uvicorn.Config's keywords for these flags."""
    return {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile, "ssl_ca_certs": args.ssl_ca_certs,
            "ssl_cert_reqs": args.ssl_cert_reqs, "root_path": args.root_path, "log_level": args.uvicorn_log_level,
            "access_log": args.uvicorn_log_level in ("info", "debug", "trace") and not args.disable_uvicorn_access_log}


def add_cors(app, args: argparse.Namespace) -> None:
    from fastapi.middleware.cors import CORSMiddleware
    app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                       allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials)
