"""The observability stack as shipped: prometheus.yml passes promtool, the Grafana
provisioning and docker-compose.yml agree with each other, and a REAL Prometheus
scraping a proxy under emulator traffic returns data for every query of every
dashboard panel (a panel that would show nothing fails)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.emulator import Fault
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text
from tests.support.procs import free_port, require_tool

ROOT = Path(__file__).resolve().parent.parent.parent
DASHBOARDS = {
    "orproxy-cost": ROOT / "grafana" / "dashboards" / "cost.json",
    "orproxy-reliability": ROOT / "grafana" / "dashboards" / "reliability.json",
}
DATASOURCE = {"type": "prometheus", "uid": "orproxy-prometheus"}
HELLO = [{"role": "user", "content": "Say hello in five words."}]
APP_KEY, SCRAPER_KEY = "app-secret", "scraper-secret"
SCRAPE_S = 1
# What Grafana would put in: $__rate_interval is four scrape intervals at least.
RATE_INTERVAL = f"{4 * SCRAPE_S}s"
SCRAPES_WITH_TRAFFIC = 5


def tool(name: str) -> str:
    return require_tool(name, "prometheus")


def load_yaml(name: str) -> Any:
    return yaml.safe_load((ROOT / name).read_text())


def dashboard(uid: str) -> dict[str, Any]:
    return json.loads(DASHBOARDS[uid].read_text())


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in doc["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", ()))  # collapsed rows keep their panels inside
    return [p for p in found if p.get("type") != "row"]


# ------------------------------------------------------------------ static checks


def test_prometheus_yml_passes_promtool_check_config(tmp_path):
    # The key file is compose's secret, absent here: checked with a stand-in of it.
    shipped = load_yaml("prometheus.yml")
    (job,) = [job for job in shipped["scrape_configs"] if job["job_name"] == "orproxy"]
    assert job["authorization"]["credentials_file"] == "/run/secrets/orproxy-metrics-key"
    compose = load_yaml("docker-compose.yml")
    assert "orproxy-metrics-key" in compose["services"]["prometheus"]["secrets"]
    assert compose["secrets"]["orproxy-metrics-key"] == {"environment": "ORPROXY_METRICS_KEY"}
    assert "ORPROXY_METRICS_KEY" in compose["services"]["proxy"]["environment"]
    key_file = tmp_path / "orproxy-metrics-key"
    key_file.write_text("scraper-secret")
    job["authorization"]["credentials_file"] = str(key_file)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    checked = subprocess.run(
        [tool("promtool"), "check", "config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, f"promtool check config failed:\n{checked.stdout}{checked.stderr}"
    assert "SUCCESS" in checked.stdout + checked.stderr
    jobs = {job["job_name"]: job for job in load_yaml("prometheus.yml")["scrape_configs"]}
    assert jobs["orproxy"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["orproxy"]["static_configs"][0]["targets"] == ["proxy:8080"]


def test_grafana_provisioning_works_as_is():
    datasource = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert (source["uid"], source["type"]) == ("orproxy-prometheus", "prometheus")
    assert source["url"] == "http://prometheus:9090"
    scrape = load_yaml("prometheus.yml")["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape  # or $__rate_interval is computed from the wrong interval

    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/orproxy.yml").read_text())
    (files,) = provider["providers"]
    assert files["type"] == "file"
    grafana = load_yaml("docker-compose.yml")["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/dashboards"] == files["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"

    for uid, path in DASHBOARDS.items():
        text = path.read_text()
        assert "${DS_" not in text and "__inputs" not in text, f"{path.name} must name its datasource by uid"
        doc = json.loads(text)
        assert doc["uid"] == uid and doc["title"] and not doc.get("id")
        ids = [p["id"] for p in panels(doc)]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in panels(doc):
            where = f"{path.name}: panel {panel['title']!r}"
            assert panel["datasource"] == DATASOURCE, where
            assert panel["targets"], f"{where} has no query"
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE and target["expr"].strip(), where
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{where} is wider than the dashboard"
    titles = {p["title"] for uid in DASHBOARDS for p in panels(dashboard(uid))}
    for wanted in (
        "Spend today against the daily budget",
        "Burn rate (USD/hour)",
        "Projected spend at end of day",
        "Cost by model (USD/hour)",
        "Cost by virtual model (USD/hour)",
        "Savings against the baseline (USD/hour)",
        "Credits left",
        "Requests by status",
        "Fallbacks by reason",
        "Failed attempts (retries) by reason",
        "Cooldowns",
        "Rate limit remaining",
        "Request latency p50 / p95 / p99",
        "Time to first token p50 / p95 / p99",
    ):
        assert wanted in titles


def test_compose_and_dockerfile_fit_together():
    compose = load_yaml("docker-compose.yml")["services"]
    assert set(compose) == {"proxy", "prometheus", "grafana"}
    proxy = compose["proxy"]
    assert proxy["build"] == "."
    assert "./config.yaml:/etc/orproxy/config.yaml:ro" in proxy["volumes"]
    named = {v.split(":")[0]: v.split(":")[1] for v in proxy["volumes"] if not v.startswith(".")}
    assert list(named.values()) == ["/var/lib/orproxy/data"]
    assert set(named) <= set(load_yaml("docker-compose.yml")["volumes"])
    assert "8080:8080" in proxy["ports"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["prometheus"]["volumes"]
    env = compose["grafana"]["environment"]
    assert (env["GF_AUTH_ANONYMOUS_ENABLED"], env["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == ("true", "Viewer")

    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in re.sub(r"\\\n", " ", dockerfile).splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("RUN pip install .") for line in instructions)
    cmd = json.loads(next(line for line in instructions if line.startswith("CMD "))[4:])
    assert cmd == ["serve", "--config", "/etc/orproxy/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
    assert json.loads(next(line for line in instructions if line.startswith("ENTRYPOINT "))[11:]) == ["orproxy"]
    assert "/var/lib/orproxy/data" in next(line for line in instructions if line.startswith("VOLUME "))
    # The config's relative data/ (beside /etc/orproxy/config.yaml) is the volume.
    assert any("ln -s /var/lib/orproxy/data /etc/orproxy/data" in line for line in instructions)
    compile(healthcheck()[-1], "HEALTHCHECK", "exec")  # the python -c snippet is valid Python
    # Everything COPY takes is let through by .dockerignore (it ignores all, then re-includes).
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for line in instructions:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists() and source.rstrip("/") in allowed, f"COPY {source}"


def healthcheck() -> list[str]:
    line = next(
        line
        for line in re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text()).splitlines()
        if line.startswith("HEALTHCHECK")
    )
    command = json.loads(line.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2] and "urllib" in command[2]
    return command


# ------------------------------------------------------------------ a real Prometheus


def scrape_config_for(target: str, path: Path) -> Path:
    """The shipped prometheus.yml, pointed at the test's proxy, scraping every second, its key file
    (compose's secret) written beside it."""
    config = load_yaml("prometheus.yml")
    config["global"].update(
        scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s", scrape_timeout=f"{SCRAPE_S}s"
    )
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "orproxy"]
    job["static_configs"] = [{"targets": [target]}]
    key_file = path.with_name("orproxy-metrics-key")
    key_file.write_text(SCRAPER_KEY)
    job["authorization"]["credentials_file"] = str(key_file)
    path.write_text(yaml.safe_dump(config))
    return path


def substitute(expr: str, doc: dict[str, Any], range_s: int) -> str:
    """Grafana's variables as Grafana would fill them for this test's time range."""
    values = {
        "__rate_interval": RATE_INTERVAL,
        "__interval": f"{SCRAPE_S}s",
        "__range": f"{range_s}s",
        "__range_s": str(range_s),
    }
    for variable in doc.get("templating", {}).get("list", ()):
        current = variable.get("current", {}).get("value")
        everything = current in ("$__all", ["$__all"]) or current == [] or current is None
        values[variable["name"]] = (
            variable.get("allValue") or ".*"
            if everything
            else (current if isinstance(current, str) else "|".join(current))
        )

    def fill(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", fill, expr)


class PrometheusServer:
    def __init__(self, config: Path, data: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self._log_path = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, session: aiohttp.ClientSession, within_s: float = 20) -> None:
        with self._log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(*self._args, stdout=log, stderr=log)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                break
            try:
                async with session.get(f"{self.url}/-/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        pytest.fail(f"Prometheus did not become ready within {within_s:g}s ({shlex.join(self._args)}):\n{self.log()}")

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")[-4000:] if self._log_path.exists() else ""

    async def query(self, session: aiohttp.ClientSession, expr: str, **params: Any) -> list[dict[str, Any]]:
        path = "query_range" if "start" in params else "query"
        async with session.post(f"{self.url}/api/v1/{path}", data={"query": expr, **params}) as response:
            body = await response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def shows_something(result: list[dict[str, Any]]) -> bool:
    """At least one sample that a panel would draw (NaN draws nothing)."""
    for series in result:
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        if any(not math.isnan(float(value)) for _, value in points):
            return True
    return False


async def drive_traffic(proxy, emulator, until: Callable[[], Awaitable[bool]], within_s: float) -> int:
    """Each dashboard needs its kind of traffic: costs, a failing primary (fallbacks, retries, a
    cooldown), a rate-limit reading, streams (time to first token), some client errors, the
    same cacheable request again and again (what the response cache saved), and batches."""
    emulator.state.faults.set("anthropic/claude-sonnet-4.5", Fault(status=503))  # quality's primary
    emulator.state.faults.set("mistralai/mistral-7b-instruct", Fault(rate_limit=(100, 5, 4_000_000_000_000)))
    client = proxy.client(api_key=APP_KEY)
    sent = 0

    async def stream(model: str) -> None:
        async for _ in await client.chat.completions.create(model=model, messages=HELLO, stream=True):
            pass

    async def bogus() -> None:
        with contextlib.suppress(Exception):
            await client.chat.completions.create(model="no-such-model", messages=HELLO)

    async def batch() -> None:  # the batch panels: a small batch each round, its lines run by the proxy
        lines = [
            {
                "custom_id": f"{sent}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "cheap", "messages": HELLO},
            }
            for i in range(2)
        ]
        uploaded = await client.files.create(file=("b.jsonl", b"\n".join(map(orjson.dumps, lines))), purpose="batch")
        await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        await asyncio.gather(
            client.chat.completions.create(model="cheap", messages=HELLO),
            client.chat.completions.create(model="quality", messages=HELLO),
            client.chat.completions.create(model="code", messages=HELLO),
            stream("cheap"),
            stream("balanced"),
            bogus(),
            client.chat.completions.create(model="balanced", messages=HELLO, temperature=0),
            batch(),
        )
        sent += 7
        if await until():
            return sent
        await asyncio.sleep(0.25)
    pytest.fail(f"Prometheus did not scrape the proxy enough within {within_s:g}s")


@pytest.mark.slow
@pytest.mark.realtime  # a real Prometheus discovers and scrapes the proxy on its own real-time schedule
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(make_proxy, emulator, tmp_path):
    # A short cooldown: the failing primary keeps cycling through fallbacks, cooldown and retry.
    retry = (
        "retry: {attempts_per_model: 2, backoff_s: 0.01, max_retry_after_s: 2, "
        "cooldown: {failures: 3, window_s: 60, cooldown_s: 2}}"
    )
    text = proxy_config_text(emulator.url, retry=retry).replace(
        "    api_key_env: TEST_OPENROUTER_KEY\n", "    api_key_env: TEST_OPENROUTER_KEY\n    credits_poll_s: 1\n", 1
    )
    budget = "budget: {daily_usd: 5, downgrade: [{at: 0.9, map: {quality: cheap}}]}\n"
    # Client keys, so /metrics needs the scraper's key: Prometheus sends it as the shipped config says.
    keys = "keys: [{name: app, key_env: APP_KEY}]\nmetrics: {key_env: SCRAPER_KEY}\n"
    env = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "APP_KEY": APP_KEY}
    proxy = await make_proxy(config_text=text + budget + keys, env={**env, "SCRAPER_KEY": SCRAPER_KEY})
    target = proxy.url.removeprefix("http://")
    server = PrometheusServer(
        scrape_config_for(target, tmp_path / "prometheus.yml"), tmp_path / "tsdb", tmp_path / "prometheus.log"
    )
    failures: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        try:
            await server.start(session)
            started = time.time()

            async def scraped_enough() -> bool:
                # Prometheus scrapes new targets only after its ~5 s discovery tick; rates need several
                # scrapes with traffic in between.
                result = await server.query(session, 'count_over_time(up{job="orproxy"}[1m])')
                return bool(result) and float(result[0]["value"][1]) >= SCRAPES_WITH_TRAFFIC

            sent = await drive_traffic(proxy, emulator, scraped_enough, within_s=30)

            # Wait (bounded) until Prometheus has scraped everything that was sent.
            deadline = time.monotonic() + 15
            seen = 0.0
            while time.monotonic() < deadline:
                result = await server.query(session, "sum(orproxy_requests_total)")
                seen = float(result[0]["value"][1]) if result else 0.0
                if seen >= sent:
                    break
                await asyncio.sleep(0.25)
            assert seen >= sent, f"Prometheus saw {seen:g} of {sent} requests:\n{server.log()}"
            assert [float(s["value"][1]) for s in await server.query(session, 'up{job="orproxy"}')] == [1.0]

            end = time.time()
            range_s = max(1, math.ceil(end - started))
            for uid in DASHBOARDS:
                doc = dashboard(uid)
                for panel in panels(doc):
                    for target_query in panel["targets"]:
                        expr = substitute(target_query["expr"], doc, range_s)
                        where = f"{doc['title']} / {panel['title']} [{target_query['refId']}]: {expr}"
                        try:
                            if target_query.get("instant"):
                                result = await server.query(session, expr, time=end)
                            else:
                                result = await server.query(session, expr, start=started, end=end, step=SCRAPE_S)
                        except AssertionError as exc:
                            failures.append(f"{where}\n    -> query refused: {exc}")
                            continue
                        if not shows_something(result):
                            failures.append(f"{where}\n    -> no data ({len(result)} series, all empty or NaN)")

            # Scrapes were clean: no sample was dropped as a duplicate of another.
            async with session.get(f"{server.url}/metrics") as response:
                exposition = await response.text()
            own = {s.name: s.value for f in text_string_to_metric_families(exposition) for s in f.samples}
            assert own.get("prometheus_target_scrapes_sample_duplicate_timestamp_total", 0) == 0
            assert own.get("prometheus_target_scrapes_sample_out_of_order_total", 0) == 0

            # The image's HEALTHCHECK command, pointed at this proxy, says healthy.
            command = healthcheck()
            command[2] = command[2].replace("127.0.0.1:8080", target)
            check = await asyncio.create_subprocess_exec(shutil.which("python") or "python3", *command[1:])
            assert await asyncio.wait_for(check.wait(), 10) == 0
        finally:
            await server.stop()
    assert not failures, "dashboard panels that would show nothing:\n" + "\n".join(failures)
