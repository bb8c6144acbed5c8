"""What operators see: /metrics of a real router, prefill and decode worker and `pdserve serve`
(vLLM's names, request metrics on the workers too, metrics on their own port), and the
deployment files checked against the real code: every compose / Kubernetes command parses with
the `pdserve` CLI parser and builds a valid config, and every metric the Grafana dashboard
queries is one that these running processes export."""

from __future__ import annotations

import json
import os
import py_compile
import re
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from servers import ServeProcess
from stack import ROUTER_FLAGS, Stack

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
VLLM_NAMES = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:num_requests_running", "vllm:num_requests_waiting",
              "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries",
              "vllm:prefix_cache_hits", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
              "vllm:request_success"]


def scrape(url: str) -> dict[str, list]:
    """family name -> samples (name, labels, value), as Prometheus reads them."""
    text = httpx.get(url, timeout=10).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def sample_names(families: dict[str, list]) -> set[str]:
    return {s.name for samples in families.values() for s in samples}


def total(families, family: str, suffix: str = "") -> float:
    return sum(s.value for s in families[family] if s.name == family + suffix)


@pytest.fixture(scope="module")
def running(tiny_models):
    """A 1P1D stack that served one chat request, and a `pdserve serve` with --metrics-port."""
    stack = Stack(tiny_models["llama"], prefill=[[]], decode=[[]], router_flags=(*ROUTER_FLAGS, "--metrics-port", "0"))
    serve = ServeProcess("--model", tiny_models["llama"], "--num-gpu-blocks-override", "256",
                         "--metrics-port", "0").start()
    try:
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        serve.wait_ready()
        with openai.OpenAI(base_url=serve.url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
            c.completions.create(model=c.models.list().data[0].id, prompt="Once upon", max_tokens=4, temperature=0)
        ready = [line for line in stack.log("router").splitlines() if line.startswith("pdserve router: ready in")]
        assert len(ready) == 1 and re.search(r"ready in \d+\.\d\d s, metrics on http://\S+/metrics$", ready[0])
        assert httpx.get(stack.base_url + "/metrics", timeout=5).status_code == 404  # on its own port only
        scraped = {"router": scrape(ready[0].rsplit(" ", 1)[1])}
        for role in ("prefill", "decode"):
            scraped[role] = scrape(stack.ready_addresses(f"{role}-0")[2])
        yield stack, serve, scraped
    finally:
        serve.close()
        stack.close()


def test_every_process_exports_vllm_names_and_workers_count_requests(running):
    _, _, scraped = running
    for role, families in scraped.items():
        missing = [n for n in VLLM_NAMES if n not in families]
        assert not missing, f"{role} lacks {missing}"
    for role in ("prefill", "decode"):  # request metrics from the worker's own deltas
        w = scraped[role]
        assert total(w, "vllm:time_to_first_token_seconds", "_count") == 1
        assert total(w, "vllm:request_queue_time_seconds", "_count") == 1
        assert total(w, "vllm:request_success", "_total") == 1
    assert total(scraped["prefill"], "vllm:generation_tokens", "_total") == 1  # the first token only
    assert total(scraped["decode"], "vllm:generation_tokens", "_total") == 5  # the other five
    assert total(scraped["decode"], "vllm:inter_token_latency_seconds", "_count") == 4
    assert total(scraped["router"], "vllm:generation_tokens", "_total") == 6
    assert "pdserve:kv_transfer_received_bytes" in scraped["decode"] and "pdserve:routing_decisions" in scraped["router"]
    assert not any(n.startswith("pdserve:gpu_") for f in scraped.values() for n in sample_names(f))  # CPU: none


def test_serve_prints_its_start_up_time_and_serves_metrics_on_their_own_port(running):
    _, serve, _ = running
    timing = [line for line in serve.lines if line.startswith("pdserve serve: ready in")]
    assert len(timing) == 1 and re.match(r"pdserve serve: ready in \d+\.\d\d s \(engine \d+\.\d\d s\), metrics on "
                                         r"http://127\.0\.0\.1:\d+/metrics$", timing[0]), serve.lines
    metrics_url = timing[0].rsplit(" ", 1)[1]
    families = scrape(metrics_url)
    assert not [n for n in VLLM_NAMES if n not in families]
    assert total(families, "vllm:request_queue_time_seconds", "_count") == 1  # serve: arrival -> scheduled
    assert total(families, "vllm:generation_tokens", "_total") >= 1
    assert httpx.get(serve.url + "/metrics", timeout=5).status_code == 404  # not on the API port


def test_gpu_series_come_from_an_nvml_reading_and_are_absent_on_cpu():
    from pdserve.common.gpu_metrics import gpu_stats_source
    from pdserve.common.metrics import ServerMetrics, StatsCollector
    from pdserve.common.stats import GpuStats
    import torch
    assert gpu_stats_source(torch.device("cpu")) is None
    reading = GpuStats(index=0, memory_used_bytes=3 << 30, memory_total_bytes=80 << 30, utilization=0.5)
    text = ServerMetrics("m", 1024, StatsCollector("m", gpu=lambda: reading)).render().decode()
    values = {(s.name, s.labels["gpu"]): s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name.startswith("pdserve:gpu_")}
    assert values == {("pdserve:gpu_utilization_perc", "0"): 0.5, ("pdserve:gpu_memory_used_bytes", "0"): 3 << 30,
                      ("pdserve:gpu_memory_total_bytes", "0"): 80 << 30}


@pytest.mark.gpu
def test_gpu_series_on_a_cuda_engine():
    import torch
    from pdserve.common.gpu_metrics import gpu_stats_source
    read = gpu_stats_source(torch.device("cuda", 0))
    g = read()
    assert 0 < g.memory_used_bytes <= g.memory_total_bytes and 0 <= g.utilization <= 1


# ---- deployment files against the real code ---------------------------------------------------
def env_file() -> dict[str, str]:
    values = {}
    for line in (COMPOSE / ".env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with the .env values."""
    if isinstance(value, str):
        def one(m):
            name, op, rest = m.group(1), m.group(2), m.group(3)
            assert name in env or op == ":-", f"${{{name}}} is not set in compose/.env"
            return env.get(name, rest)
        return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def check_command(argv: list[str], where: str) -> None:
    """Parse as `pdserve ARGV` with the real parser and build what the command would build."""
    from pdserve.common.config import engine_config
    from pdserve.services.cli import build_parser
    from pdserve.services.worker.kv_transfer_config import resolve_kv_flags
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `pdserve {' '.join(argv)}` does not parse")
    if args.command in ("prefill", "decode"):
        resolve_kv_flags(args, args.command)
        engine_config(args)
    return args


def compose_services() -> dict[str, dict]:
    env = env_file()
    base = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    gpu = yaml.safe_load((COMPOSE / "docker-compose.gpu.yml").read_text())["services"]
    merged = {name: interpolate(s, env) for name, s in base.items()}
    overlay = {name: interpolate({**base[name], **s}, env) for name, s in gpu.items()}
    return merged, overlay


def test_compose_and_kubernetes_commands_parse_with_the_real_cli():
    base, gpu = compose_services()
    assert {"redis", "router", "prefill", "decode", "prometheus", "grafana"} <= set(base)
    for file, services in (("docker-compose.yml", base), ("docker-compose.gpu.yml", gpu)):
        for name in ("router", "prefill", "decode"):
            s = services[name]
            args = check_command(s["command"], f"{file} {name}")
            assert args.command == name
            assert "redis://:change-me-redis@redis:6379/0" == args.redis_url  # the password reaches every role
            port = args.port if name == "router" else args.metrics_port
            health = base[name]["environment"]["PDSERVE_HEALTH_URL"]
            assert health.startswith(f"http://127.0.0.1:{port}/"), (name, health)
            # stopped no sooner than the process's own grace period ends (docker's default: 10 s)
            assert int(s["stop_grace_period"].removesuffix("s")) >= args.shutdown_grace + 5, (file, name)
        for name in ("prefill", "decode"):
            assert int(services[name]["deploy"]["replicas"]) >= 1
    for name in ("prefill", "decode"):  # GPUs reserved per role, the CUDA device asked for
        assert gpu[name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert check_command(gpu[name]["command"], name).device == "cuda"
    assert "--requirepass" in base["redis"]["command"]
    for manifest in sorted((COMPOSE / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(manifest.read_text()):
            if not doc or doc.get("kind") != "Deployment":
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["image"].startswith("pdserve"):
                    argv = [re.sub(r"\$\((\w+)\)", lambda m: {"POD_IP": "10.0.0.7"}.get(m.group(1), "x"), a)
                            for a in c["args"]]
                    args = check_command(argv, manifest.name)
                    assert doc["metadata"]["name"] == f"pdserve-{args.command}"
                    grace = doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
                    assert grace >= args.shutdown_grace + 5, manifest.name  # killed only after its own grace
    py_compile.compile(str(COMPOSE / "locustfile.py"), doraise=True)  # syntax only: locust is not a dependency


def test_dashboard_queries_only_metrics_a_running_stack_exports(running):
    _, _, scraped = running
    from pdserve.common.metrics import ServerMetrics, StatsCollector
    from pdserve.common.stats import GpuStats
    exported = set().union(*(sample_names(f) for f in scraped.values()))
    gpu_text = ServerMetrics("m", 1024, StatsCollector("m", gpu=lambda: GpuStats(index=0))).render().decode()
    exported |= {s.name for f in text_string_to_metric_families(gpu_text) for s in f.samples}  # GPU workers only
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in prometheus["scrape_configs"]}
    assert jobs == {"router", "prefill", "decode"}
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "pdserve.json").read_text())
    datasource = yaml.safe_load((COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("first token", "inter-token", "throughput", "running", "waiting", "kv cache usage",
                  "prefix cache hit rate", "kv transfer rate", "by role"):
        assert topic in titles, topic
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == uid
    for expr in exprs:
        for name in re.findall(r"\b(?:vllm|pdserve):[a-z0-9_]+", expr):
            assert name in exported, f"dashboard queries {name}, which nothing exports ({expr})"
        for job in re.findall(r'job=~?"([^"]+)"', expr):
            assert set(job.split("|")) <= jobs, expr


def test_inter_token_latency_counts_every_token_of_a_coalesced_delta():
    """Decode sends several steps as one delta (--stream-interval-ms): one ITL sample per token."""
    from pdserve.common.metrics import ServerMetrics
    from pdserve.common.outputs import EngineOutput
    from pdserve.common.request_metrics import DeltaTracker
    m = ServerMetrics("m", 1024)
    tracker = DeltaTracker(m, arrival_time=100.0, num_prompt_tokens=8, n=1)
    tracker.observe([EngineOutput("r", 0, [5, 6])], now=100.5)  # first delta: 2 tokens together
    tracker.observe([EngineOutput("r", 0, [7, 8, 9])], now=100.8)  # 3 steps coalesced
    tracker.observe([EngineOutput("r", 0, [10], finish_reason="length")], now=100.9)
    text = m.render().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("vllm:inter_token_latency_seconds_") and not s.labels.get("le")}
    assert samples["vllm:inter_token_latency_seconds_count"] == 5  # 6 tokens, the first has no gap
    assert abs(samples["vllm:inter_token_latency_seconds_sum"] - 0.4) < 1e-9  # 0 + 3 x 0.1 + 0.1
