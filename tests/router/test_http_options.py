"""vLLM's HTTP flags on serve and the router: HTTPS (and client certificates), CORS, --root-path.

Real servers: `pdserve serve` on a tiny model with the official openai client over TLS, and the
router process (a real redis-server, no workers needed for what is checked here).
"""

from __future__ import annotations

import json
import queue
import shutil
import ssl
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from servers import ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for a test cert")

ORIGIN = "https://ui.example"


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> dict[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA), and a client certificate it does not sign."""
    d = tmp_path_factory.mktemp("tls")
    files = {}
    for name, cn, extra in (("server", "127.0.0.1", ["-addext", "subjectAltName=IP:127.0.0.1"]),
                            ("stranger", "someone", [])):
        key, crt = str(d / f"{name}.key"), str(d / f"{name}.crt")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
                        "-days", "1", "-subj", f"/CN={cn}", *extra], check=True, capture_output=True)
        files[name + "_key"], files[name + "_crt"] = key, crt
    return files


def _preflight(base: str, origin: str, verify) -> httpx.Response:
    return httpx.options(base + "/v1/chat/completions", verify=verify, timeout=10,
                         headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                  "Access-Control-Request-Headers": "authorization,content-type"})


def test_serve_over_https_with_cors_and_a_root_path(tiny_models, cert):
    flags = ("--model", tiny_models["llama"], "--num-gpu-blocks-override", "64", "--max-model-len", "128",
             "--ssl-certfile", cert["server_crt"], "--ssl-keyfile", cert["server_key"],
             "--allowed-origins", json.dumps([ORIGIN]), "--allowed-methods", '["GET", "POST"]',
             "--root-path", "/llm", "--api-key", "sekret", "--uvicorn-log-level", "info")
    with ServeProcess(*flags) as proc:
        assert proc.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=cert["server_crt"])
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="sekret",
                               http_client=httpx.Client(verify=trust, timeout=60))
        chat = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                              messages=[{"role": "user", "content": "hi"}], temperature=0)
        assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.completion_tokens >= 1

        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
            httpx.get(proc.url + "/v1/models", timeout=10)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no answer
            httpx.get(proc.url.replace("https://", "http://") + "/v1/models", timeout=10)

        allowed = _preflight(proc.url, ORIGIN, trust)  # browsers send preflights without the key
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "access-control-allow-origin" not in _preflight(proc.url, "https://evil.example", trust).headers
        simple = httpx.get(proc.url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer sekret"},
                           verify=trust, timeout=10)
        assert simple.headers["access-control-allow-origin"] == ORIGIN

        # behind a proxy that routes /llm/... here and strips the prefix: the app still answers
        # /v1/..., and its OpenAPI document names the prefix for clients
        docs = httpx.get(proc.url + "/openapi.json", verify=trust, timeout=10).json()
        assert docs["servers"] == [{"url": "/llm"}]
        assert any('"GET /llm/openapi.json' in line for line in proc.more_lines()), proc.lines  # info: access log


class RouterProcess:
    def __init__(self, redis_url: str, tokenizer: str, *flags: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "pdserve.services.router", "--redis-url", redis_url,
                                      "--model", tokenizer, "--port", "0", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue = queue.Queue()
        self.output: list[str] = []  # stdout and stderr, complete after close()
        self.reader = threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout] + [lines.put(None)],
                                       daemon=True)
        self.reader.start()
        self.lines = lines
        deadline = time.monotonic() + 120
        while True:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if line is None:
                raise RuntimeError("the router did not start:\n" + "".join(self.output))
            self.output.append(line)
            if line.startswith("pdserve router serving"):
                self.url = line.split(" on ")[1].split()[0]
                return

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        while (line := self.lines.get_nowait() if not self.lines.empty() else None) is not None:
            self.output.append(line)


def test_router_requires_client_certificates_and_answers_preflights(redis_url, tiny_models, cert):
    router = RouterProcess(redis_url, tiny_models["llama"], "--ssl-certfile", cert["server_crt"],
                           "--ssl-keyfile", cert["server_key"], "--ssl-ca-certs", cert["server_crt"],
                           "--ssl-cert-reqs", "2", "--allowed-origins", json.dumps([ORIGIN]),
                           "--disable-fastapi-docs", "--uvicorn-log-level", "info", "--disable-uvicorn-access-log")
    try:
        assert router.url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=cert["server_crt"])
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake is refused
            httpx.get(router.url + "/v1/models", verify=trusted, timeout=10)
        stranger = ssl.create_default_context(cafile=cert["server_crt"])
        stranger.load_cert_chain(cert["stranger_crt"], cert["stranger_key"])
        with pytest.raises(httpx.HTTPError):  # a certificate the CA file does not sign
            httpx.get(router.url + "/v1/models", verify=stranger, timeout=10)

        member = ssl.create_default_context(cafile=cert["server_crt"])
        member.load_cert_chain(cert["server_crt"], cert["server_key"])
        models = httpx.get(router.url + "/v1/models", verify=member, timeout=10)
        assert models.status_code == 200 and models.json()["data"]
        preflight = _preflight(router.url, ORIGIN, member)
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
        for page in ("/openapi.json", "/docs", "/redoc"):  # --disable-fastapi-docs
            assert httpx.get(router.url + page, verify=member, timeout=10).status_code == 404
    finally:
        router.close()
    assert not any("/v1/models HTTP" in line for line in router.output), router.output  # no access log


@pytest.mark.parametrize("command, flags, message", [
    ("serve", ("--ssl-keyfile", "k.pem"), "--ssl-keyfile needs --ssl-certfile"),
    ("serve", ("--ssl-certfile", "/nonexistent.pem"), "cannot load the certificate"),
    ("serve", ("--ssl-certfile", "CERT", "--ssl-cert-reqs", "2"), "--ssl-cert-reqs needs --ssl-ca-certs"),
    ("serve", ("--allowed-origins", "https://a.example"), "expected a JSON list of strings"),
    ("serve", ("--root-path", "llm"), "--root-path must start with '/'"),
    # the router checks the same flags with the same code, before it connects to Redis
    ("router", ("--ssl-certfile", "/nonexistent.pem"), "cannot load the certificate"),
    ("router", ("--allowed-origins", "*"), "expected a JSON list of strings"),
])
def test_bad_http_flags_are_one_line_errors(command, flags, message, cert):
    flags = tuple(cert["server_crt"] if f == "CERT" else f for f in flags)
    extra = ("--redis-url", "redis://127.0.0.1:1") if command == "router" else ()
    proc = subprocess.run([sys.executable, "-m", "pdserve.services.cli", command, *extra, *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
